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


def head_classes(task: str):
    """transformers' map of config classes to the model classes with this task's head."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING if task == CAUSAL else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING


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
    if type(config) not in head_classes(task) and not trust_remote_code:
        raise RecipeError(f"model type '{config.model_type}' has no {task} head in transformers", "model.task")
    with torch.device("meta"):
        return cls.from_config(config, trust_remote_code=trust_remote_code)


def import_model_code(task: str, config) -> None:
    """The modules a load of this model imports (its modeling code, peft, bitsandbytes), imported now:
    what is measured of a load is then its weights, not code."""
    import importlib

    for name in ("peft", "bitsandbytes", "torch.distributed.fsdp"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    mapping = head_classes(task)
    if type(config) in mapping:
        mapping[type(config)]  # the lookup imports the class's module


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
    dtype = dtype_of(q.bnb_4bit_compute_dtype)
    return _with_attention_fallback(lambda attn: load_model(quantized.model_path, quantized.task, label_names, dtype,
                                                            attention=attn, on_cpu=on_cpu), attention)


def empty_base(quantized: Quantized, label_names: list[str], q: QuantizationSection, attention: str | None = None,
               trust_remote_code: bool = False):
    """The same model as load_base builds, with no weights read: every parameter on the meta device (a
    sharded run's other ranks receive their shards from rank 0, fsdp.shard_model), buffers computed
    as the model's own code computes them. A 4-bit layer is rebuilt from the checkpoint's own entries
    for it (its block scales and quantization type, a sixty-fourth of its bytes): the packed weights
    themselves are not read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = quantized.model_path
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **_label_kwargs(label_names))
    dtype = dtype_of(q.bnb_4bit_compute_dtype)

    def build(attn):
        extra = {"attn_implementation": attn} if attn else {}
        with init_empty_weights(include_buffers=False):
            return auto_class(quantized.task).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **extra)

    model = _with_attention_fallback(build, attention)
    model.tie_weights()  # as a load ties them (building on the meta device does not)
    if quantized.quantized:
        states = quant_states(Path(path))
        if not states and q.mode != "none":
            raise RuntimeError(f"{path} holds no 4-bit layers: only 4-bit or 16-bit bases load on one rank per node")
        for name, state in states.items():
            _replace_with_4bit(model, name, state, dtype)
        model.is_loaded_in_4bit = True  # what transformers' 4-bit load sets, and peft reads to wrap these layers
    return model


def quant_states(model_dir: Path) -> dict[str, dict]:
    """A saved 4-bit model's quantization entries (block scales, code tables, the packed description),
    by layer name, as bitsandbytes' QuantState.from_dict takes them; read without its packed weights."""
    from safetensors import safe_open

    from qlora.tasks.weights import tensor_files

    by_file: dict[Path, list[str]] = {}
    for name, file in tensor_files(model_dir).items():
        if ".weight." in name:
            by_file.setdefault(file, []).append(name)
    states: dict[str, dict] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                layer, key = name.split(".weight.", 1)
                states.setdefault(layer, {})[key] = f.get_tensor(name)
    return {layer: s for layer, s in states.items() if any(k.startswith("quant_state.bitsandbytes__") for k in s)}


def _replace_with_4bit(model, name: str, state: dict, compute_dtype) -> None:
    """The linear layer `name` replaced by a 4-bit one, its weight on the meta device with its real
    quantization state (as transformers builds a 4-bit layer from the same checkpoint)."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import QuantState

    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    quant_state = QuantState.from_dict(state, device=torch.device("cpu"))
    layer = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=quant_state.nested, quant_type=quant_state.quant_type, device="meta")
    packed = torch.empty(((old.in_features * old.out_features + 1) // 2, 1), dtype=torch.uint8, device="meta")
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=quant_state, blocksize=quant_state.blocksize,
                                     compress_statistics=quant_state.nested, quant_type=quant_state.quant_type,
                                     module=layer, bnb_quantized=True)
    if old.bias is not None:
        layer.bias = old.bias
    setattr(parent, child, layer)


def _with_attention_fallback(build, attention: str | None):
    """build(attention), or, where that attention implementation is not available here, build("sdpa")
    with a warning."""
    try:
        return build(attention)
    except (ValueError, ImportError) as e:
        if not attention or attention in ("sdpa", "eager") or "attn" not in str(e).lower():
            raise
        import warnings

        warnings.warn(f"train.attention: {attention} is not available for this model here ({e}); using sdpa")
        return build("sdpa")
