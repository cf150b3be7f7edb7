"""Merge: the adapter folded into the base, saved as safetensors with its tokenizer, loadable by
plain transformers. Three strategies:
- dequantized: the 4-bit base dequantized (the weights training actually saw), merged, 16-bit;
- original: the original 16-bit checkpoint reloaded, merged, 16-bit;
- 4bit: the dequantized merge re-quantized to NF4. This is what peft's merge_and_unload on a 4-bit
  model gives; it is built only to be measured, never as the model to ship.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from qlora.tasks.recipe import QuantizationSection
from qlora.tasks.results import Merged, Quantized, Trained
from qlora.tasks.stage import stage
from qlora.tasks.training import loading

if TYPE_CHECKING:  # torch is imported where it is used: a cached run never needs it
    import torch

Strategy = Literal["dequantized", "original", "4bit"]
VARIANT_OF = {"dequantized": "merged-dequant", "original": "merged-original", "4bit": "merged-4bit"}


def merged_model(adapter_dir: str, quantized: Quantized, q: QuantizationSection, label_names: list[str],
                 base: str, dtype: torch.dtype):
    import torch
    from peft import PeftModel

    if base == "dequantized" and quantized.quantized:
        model = loading.load_base(quantized, label_names, q)
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its "dequantized in float32 and cast to float32" note is noise here
        try:
            model = model.dequantize()  # Linear4bit/Linear8bitLt -> nn.Linear holding the dequantized weights
        finally:
            hf_logging.set_verbosity(verbosity)
    else:  # the original checkpoint (for an unquantized run both bases are the same)
        model = loading.load_model(quantized.original_path, quantized.task, label_names, torch.float32)
    model = model.to(torch.float32)  # merge in full precision, cast once at the end
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    # A fresh, never-quantized model of the same architecture holds the merged weights: a model
    # loaded through a quantizer keeps its weight conversions and would save them back as 4-bit.
    config = merged.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        clean = loading.auto_class(quantized.task).from_config(config, dtype=dtype)
    clean.load_state_dict({k: v.to(dtype) for k, v in merged.state_dict().items()}, assign=True)
    clean.tie_weights()  # tied input/output embeddings (common in small causal LMs) stay tied
    return clean.eval()


@stage("merge")
def merge(out: Path, trained: Trained, quantized: Quantized, q: QuantizationSection, strategy: Strategy,
          dtype: str) -> Merged:
    labels = trained.label_names
    adapter = str(trained.file(trained.adapter))
    if strategy == "4bit":
        # Merge into 16-bit first, then quantize that to NF4 exactly as the base was.
        staging = out / "merged-16bit"
        models_dtype = loading.dtype_of(q.bnb_4bit_compute_dtype)
        merged_model(adapter, quantized, q, labels, "dequantized", models_dtype).save_pretrained(staging)
        four_bit = QuantizationSection(**{**q.model_dump(), "load_in_4bit": True, "load_in_8bit": False})
        requantized = loading.load_model(str(staging), quantized.task, labels, models_dtype,
                                        loading.bnb_config(four_bit, str(staging), quantized.task))
        requantized.save_pretrained(out / "model")
        shutil.rmtree(staging)
    else:
        merged_model(adapter, quantized, q, labels, strategy, loading.dtype_of(dtype)).save_pretrained(
            out / "model", safe_serialization=True)
    loading.copy_tokenizer(quantized.original_path, out / "model")
    from qlora.tasks.store import dir_size

    return Merged(model="model", strategy=strategy, variant=VARIANT_OF[strategy], dtype=dtype,
                  size_bytes=dir_size(out / "model"), label_names=labels)
