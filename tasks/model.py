"""Model stages: GGUF conversion, quantize-and-load (the 4-bit base, saved once) and the LoRA plan
(target modules resolved and checked, trainable parameters counted), plus the loaders later stages
share.
"""
from __future__ import annotations

import logging
from pathlib import Path

from qlora.tasks import store
from qlora.tasks.recipe import LoraSection, ModelSection, QuantizationSection, RecipeError
from qlora.tasks.stage import stage
from qlora.tasks.training.loading import (
    CAUSAL,
    OUTPUT_HEADS,
    TOKENIZER_FILES,
    bnb_config,
    copy_tokenizer,
    device,
    dtype_of,
    load_model,
    skeleton,
)
from qlora.tasks.training.lora import lora_config

log = logging.getLogger("qlora")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def resolve_model(model: ModelSection) -> dict:
    """Local directory and content fingerprints (weights+config, tokenizer) of the base model."""
    path = store.resolve_location(model.name_or_path, "model.name_or_path")
    if path is None:
        from qlora.tasks.hub import download_model

        path = download_model(model.name_or_path, model.revision, "model.name_or_path")
    if path.is_file():
        check_gguf(path)
        return {"hash": store.file_fingerprint(path), "gguf": str(path.resolve())}
    if not path.is_dir() or not (path / "config.json").is_file():
        raise RecipeError(f"not a model directory (no config.json): {path}", "model.name_or_path")
    weights = [p.name for p in sorted(path.iterdir()) if p.name.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise RecipeError(f"no weights (*.safetensors, *.bin) in {path}", "model.name_or_path")
    tokenizer = [n for n in TOKENIZER_FILES if (path / n).is_file()]
    if not tokenizer:
        raise RecipeError(f"no tokenizer files in {path}", "model.name_or_path")
    return {"hash": store.tree_fingerprint(path, ["config.json"] + weights), "path": str(path.resolve()),
            "tokenizer": {"hash": store.tree_fingerprint(path, tokenizer), "path": str(path.resolve())}}


def check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise RecipeError(f"not a GGUF file (it starts with {magic!r}, not b'GGUF'): {path}", "model.name_or_path",
                          hint="give a GGUF file, or a model directory with config.json")


@stage("convert")
def convert_gguf(out: Path, model: dict) -> dict:
    """A GGUF checkpoint dequantized once into a 16-bit model directory (transformers reads GGUF
    through the gguf package), which is then quantized to NF4 like any other base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model["gguf"])
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        net = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
    except ImportError as e:
        raise RecipeError(f"reading GGUF needs the gguf package: {e}", "model.name_or_path",
                          hint="pip install gguf") from None
    # transformers will not save a model loaded from GGUF: move its (dequantized) weights into a
    # fresh model of the same architecture and save that.
    config = net.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(net.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    plain.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return {"model": "model", "tokenizer_hash": resolve_model(ModelSection(name_or_path=str(out / "model")))["tokenizer"]["hash"],
            "source": str(path)}


def converted(result: dict) -> dict:
    """A convert result as resolve_model describes a model directory."""
    path = str(Path(result["dir"]) / result["model"])
    return {"hash": result["hash"], "path": path, "tokenizer": {"hash": result["tokenizer_hash"], "path": path}}


def check_quantization(q: QuantizationSection) -> None:
    """The installed bitsandbytes can run the requested quantization on this machine."""
    import torch
    if q.mode == "none":
        return
    field = "quantization.load_in_4bit" if q.load_in_4bit else "quantization.load_in_8bit"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        x = torch.randn(64, 64, dtype=torch.float32, device=device())
        if q.load_in_4bit:
            packed, state = F.quantize_4bit(x, quant_type=q.bnb_4bit_quant_type, compress_statistics=q.bnb_4bit_use_double_quant)
            F.dequantize_4bit(packed, state)
        else:
            bnb.nn.Int8Params(x.cpu(), requires_grad=False).to(device())
    except Exception as e:  # noqa: BLE001 - any failure means this machine can't do it
        raise RecipeError(f"the installed bitsandbytes cannot run {q.mode} quantization here: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", field,
                          hint="install bitsandbytes>=0.48 (CPU support), or set quantization.load_in_4bit: false") from None


def check_model(model: ModelSection, q: QuantizationSection) -> dict:
    resolved = resolve_model(model)
    if "gguf" not in resolved:  # a GGUF checkpoint is read (slowly) by its convert stage
        try:
            skeleton(resolved["path"], model.task, [], model.trust_remote_code)
        except RecipeError:
            raise
        except Exception as e:  # noqa: BLE001
            raise RecipeError(f"cannot read the model config: {str(e).splitlines()[0]}", "model.name_or_path") from None
    check_quantization(q)
    return resolved


@stage("quantize")
def quantize(out: Path, model: dict, q: QuantizationSection, label_names: list[str], seed: int,
             task: str = "sequence-classification", trust_remote_code: bool = False) -> dict:
    """Load the base with its task head (initialised under the seed) and, when quantizing, save the
    quantized weights once: later stages load them in a fraction of the time."""
    import torch

    check_quantization(q)
    torch.manual_seed(seed)
    if q.mode == "none":
        return {"path": model["path"], "quantized": False, "original_path": model["path"], "task": task}
    base = load_model(model["path"], task, label_names, dtype_of(q.bnb_4bit_compute_dtype),
                      bnb_config(q, model["path"], task, trust_remote_code), trust_remote_code)
    base.save_pretrained(out / "model")
    copy_tokenizer(model["path"], out / "model")
    return {"path": "model", "quantized": True, "original_path": model["path"], "task": task,
            "size_bytes": store.dir_size(out / "model")}


# --- LoRA ----------------------------------------------------------------------------------------

def _linear_names(model) -> set[str]:
    import torch
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def resolve_lora_targets(model_path: str, cfg: LoraSection, label_names: list[str],
                         task: str = "sequence-classification", trust_remote_code: bool = False) -> dict:
    """Resolve target modules against the architecture (on the meta device: no weights loaded),
    refuse names that match nothing, and count what LoRA will train."""
    import torch
    from peft import get_peft_model

    base = skeleton(model_path, task, label_names, trust_remote_code)
    config = base.config
    head = [n for n, _ in base.named_children() if n in OUTPUT_HEADS]
    body = sorted(n for n in _linear_names(base) if n.split(".")[0] not in head)
    suffixes = sorted({n.split(".")[-1] for n in body})
    if cfg.target_modules == "all-linear":
        targets = suffixes
    else:
        unmatched = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in body)]
        if unmatched:
            raise RecipeError(f"{unmatched} match no linear layer of {config.model_type}", "lora.target_modules",
                              hint=f"its linear layers: {', '.join(suffixes)} (or use all-linear)")
        targets = list(cfg.target_modules)
    trained_heads = [] if task == CAUSAL else head
    modules_to_save = sorted(set(trained_heads) | set(cfg.modules_to_save or []))
    resolved = {"target_modules": targets, "modules_to_save": modules_to_save, "task": task}
    _check_rank(base, body, targets, cfg.r)
    total = sum(p.numel() for p in base.parameters())
    with torch.device("meta"):  # peft builds the LoRA weights where the default device says: no memory
        peft_model = get_peft_model(base, lora_config(resolved, cfg))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lora_layers = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    return {**resolved, "trainable_params": trainable, "base_params": total,
            "trainable_percent": round(100 * trainable / total, 4), "lora_layers": lora_layers}


def _check_rank(base, body: list[str], targets: list[str], r: int) -> None:
    """A LoRA rank above a targeted layer's smaller dimension adds weights and no capacity (and an
    absurd rank would allocate gigabytes): refused, naming the layer."""
    modules = dict(base.named_modules())
    targeted = [n for n in body if any(n == t or n.endswith("." + t) for t in targets)]
    smallest = min(targeted, key=lambda n: min(modules[n].in_features, modules[n].out_features), default=None)
    if smallest is not None:
        limit = min(modules[smallest].in_features, modules[smallest].out_features)
        if r > limit:
            raise RecipeError(f"rank {r} exceeds the smaller dimension ({limit}) of targeted layer {smallest}",
                              "lora.r", hint=f"use a rank of at most {limit} (typically 4 to 64)")


def count_full_params(model_path: str, label_names: list[str], task: str, trust_remote_code: bool = False) -> dict:
    total = sum(p.numel() for p in skeleton(model_path, task, label_names, trust_remote_code).parameters())
    return {"enabled": False, "task": task, "target_modules": [], "modules_to_save": [], "trainable_params": total,
            "base_params": total, "trainable_percent": 100.0, "lora_layers": 0}


@stage("lora")
def plan_lora(out: Path, model: dict, cfg: LoraSection, label_names: list[str],
              task: str = "sequence-classification", trust_remote_code: bool = False) -> dict:
    """What LoRA will train, decided on the meta device before anything is loaded: the target modules
    resolved against the architecture and checked, the heads trained fully, the parameters counted.
    The adapters themselves are attached in the train stage (tasks/training/lora.py)."""
    if not cfg.enabled:
        return count_full_params(model["path"], label_names, task, trust_remote_code)
    return {"enabled": True, **resolve_lora_targets(model["path"], cfg, label_names, task, trust_remote_code)}

