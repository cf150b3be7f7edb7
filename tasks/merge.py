"""Merge: the adapter folded into a 16-bit base, saved as safetensors with its tokenizer, loadable
by plain transformers. Never a merge into 4-bit weights: re-quantizing the merged weights to NF4
loses much of the update. Two bases:
- dequantized: the 4-bit base dequantized (the weights training actually saw), then merged;
- original: the original 16-bit checkpoint reloaded, then merged.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tasks import model as models
from tasks.recipe import MergeSection, QuantizationSection
from tasks.stage import stage


def merged_model(adapter_dir: str, quantized: dict, q: QuantizationSection, label_names: list[str],
                 base: str, dtype: torch.dtype):
    from peft import PeftModel

    if base == "dequantized" and quantized["quantized"]:
        model = models.load_base(quantized, label_names, q)
        model = model.dequantize()  # Linear4bit/Linear8bitLt -> nn.Linear holding the dequantized weights
    else:  # the original checkpoint (for an unquantized run both bases are the same)
        model = models.load_classifier(quantized["original_path"], label_names, torch.float32)
    model = model.to(torch.float32)  # merge in full precision, cast once at the end
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    # A fresh, never-quantized model of the same architecture holds the merged weights: a model
    # loaded through a quantizer keeps its weight conversions and would save them back as 4-bit.
    from transformers import AutoModelForSequenceClassification

    config = merged.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        clean = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    clean.load_state_dict({k: v.to(dtype) for k, v in merged.state_dict().items()}, assign=True)
    return clean.eval()


@stage("merge", modules=("tasks.model",))
def merge(out: Path, trained: dict, quantized: dict, q: QuantizationSection, cfg: MergeSection) -> dict:
    dtype = models.dtype_of(cfg.dtype)
    model = merged_model(str(Path(trained["dir"]) / trained["adapter"]), quantized, q,
                         trained["label_names"], cfg.base, dtype)
    model.save_pretrained(out / "model", safe_serialization=True)
    models.copy_tokenizer(quantized["original_path"], out / "model")
    from tasks.store import dir_size

    return {"model": "model", "base": cfg.base, "dtype": cfg.dtype, "size_bytes": dir_size(out / "model"),
            "label_names": trained["label_names"]}
