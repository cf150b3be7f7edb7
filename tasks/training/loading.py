"""The base model as training and evaluation load it: its architecture on the meta device, 4-bit
(bitsandbytes) or 16-bit, with its task head, on this process's device. Prefect-free: the training
engine and the stages share it.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.tasks.recipe import QuantizationSection, RecipeError

if TYPE_CHECKING:  # torch is imported where it is used: a cached run never needs it
    import torch

    from qlora.tasks.results import Quantized

# Output heads: never LoRA targets (a classification head is trained fully; a causal LM's lm_head is
# often tied to its input embeddings). They, and an encoder's pooler, stay out of quantization (4-bit
# heads fail on CPU and lose accuracy).
OUTPUT_HEADS = ("classifier", "pre_classifier", "score", "lm_head")


NOT_QUANTIZED = [*OUTPUT_HEADS, "pooler"]


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "spiece.model",
                   "chat_template.jinja", "chat_template.json"]  # transformers 5 keeps the chat template in its own file


CAUSAL = "causal-lm"


def auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == CAUSAL else AutoModelForSequenceClassification


def _label_kwargs(label_names: list[str]) -> dict:
    if not label_names:  # causal-lm: no classes
        return {}
    return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
            "label2id": {n: i for i, n in enumerate(label_names)}}


def skeleton(model_path: str, task: str, label_names: list[str], trust_remote_code: bool = False):
    """The architecture on the meta device: module names and parameter counts, no weights loaded."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, **_label_kwargs(label_names))
    cls = auto_class(task)
    if type(config) not in cls._model_mapping and not trust_remote_code:
        raise RecipeError(f"model type '{config.model_type}' has no {task} head in transformers", "model.task")
    with torch.device("meta"):
        return cls.from_config(config, trust_remote_code=trust_remote_code)


def dtype_of(name: str) -> torch.dtype:
    import torch
    return getattr(torch, name)


def device() -> torch.device:
    """Where this process computes: its own GPU (a torchrun worker's, set from LOCAL_RANK), else the CPU.
    With the index: a model loaded onto a bare "cuda" lands on the first GPU, whichever is current."""
    import torch
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def inference_dtype(saved: str, fallback: str) -> torch.dtype:
    """The dtype a saved 16-bit model is served in: its own where the device computes it natively
    (CUDA; for bfloat16, CPUs with AVX512-BF16 or AMX), else the fallback: emulated 16-bit
    matmuls on an older CPU are several times slower than float32."""
    import torch

    dtype = dtype_of(saved)
    if dtype == torch.float32 or device().type == "cuda":
        return dtype
    if dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return dtype
    return dtype_of(fallback)


def skip_module_names(model_path: str, names: list[str], task: str, trust_remote_code: bool = False) -> list[str]:
    """Full module paths for short names: transformers matches skip patterns from the start of a
    module's path or as its suffix, so "pooler" alone would not keep "bert.pooler.dense" out."""
    net = skeleton(model_path, task, [], trust_remote_code)
    found = {full for full, _ in net.named_modules() if full and full.split(".")[-1] in names}
    return sorted(found | set(names))


def bnb_config(q: QuantizationSection, model_path: str, task: str, trust_remote_code: bool = False):
    from transformers import BitsAndBytesConfig

    if q.mode == "none":
        return None
    # The output head (lm_head) of a causal LM is kept out by transformers itself.
    skip = skip_module_names(model_path, q.llm_int8_skip_modules or NOT_QUANTIZED, task, trust_remote_code)
    return BitsAndBytesConfig(
        load_in_4bit=q.load_in_4bit, load_in_8bit=q.load_in_8bit,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type, bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype_of(q.bnb_4bit_compute_dtype), llm_int8_skip_modules=skip)


def load_model(path: str, task: str, label_names: list[str], dtype: torch.dtype, quantization=None,
               trust_remote_code: bool = False, attention: str | None = None, on_cpu: bool = False):
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    # A saved quantized model carries its own quantization config: pass none then (None overrides it).
    extra = {"quantization_config": quantization} if quantization is not None else {}
    if attention:
        extra["attn_implementation"] = attention
    try:
        return auto_class(task).from_pretrained(
            path, dtype=dtype, device_map={"": "cpu" if on_cpu else device()}, trust_remote_code=trust_remote_code,
            use_safetensors=True,  # never a pickle-based file, even beside the safetensors
            **extra, **_label_kwargs(label_names))
    finally:
        hf_logging.set_verbosity(verbosity)


def copy_tokenizer(src: str, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)


def load_base(quantized: Quantized, label_names: list[str], q: QuantizationSection, attention: str | None = None,
              on_cpu: bool = False):
    """The base exactly as quantize saved it (or the original, unquantized, with the seed set before).
    on_cpu: into CPU memory (a sharded run moves each layer's shard to its GPU)."""
    path = quantized.model_path
    dtype = dtype_of(q.bnb_4bit_compute_dtype)
    try:
        return load_model(path, quantized.task, label_names, dtype, attention=attention, on_cpu=on_cpu)
    except (ValueError, ImportError) as e:
        if not attention or attention in ("sdpa", "eager") or "attn" not in str(e).lower():
            raise
        import warnings

        warnings.warn(f"train.attention: {attention} is not available for this model here ({e}); using sdpa")
        return load_model(path, quantized.task, label_names, dtype, attention="sdpa", on_cpu=on_cpu)
