"""quantize: the base loaded with its task head (initialised under the seed) and, when quantizing,
saved once in 4 (or 8) bits: later stages load it in a fraction of the time."""
from __future__ import annotations

from pathlib import Path

from qlora.tasks import store
from qlora.tasks.recipe import QuantizationSection, RecipeError
from qlora.tasks.results import BaseModelFiles, Quantized
from qlora.tasks.stage import stage
from qlora.tasks.training.loading import bnb_config, copy_tokenizer, device, dtype_of, load_model


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


@stage("quantize")
def quantize(out: Path, model: BaseModelFiles, q: QuantizationSection, label_names: list[str], seed: int,
             task: str = "sequence-classification", trust_remote_code: bool = False) -> Quantized:
    """Load the base with its task head (initialised under the seed) and, when quantizing, save the
    quantized weights once: later stages load them in a fraction of the time."""
    import torch

    check_quantization(q)
    torch.manual_seed(seed)
    if q.mode == "none":
        return Quantized(path=model.path, quantized=False, original_path=model.path, task=task)
    base = load_model(model.path, task, label_names, dtype_of(q.bnb_4bit_compute_dtype),
                      bnb_config(q, model.path, task, trust_remote_code), trust_remote_code)
    base.save_pretrained(out / "model")
    copy_tokenizer(model.path, out / "model")
    return Quantized(path="model", quantized=True, original_path=model.path, task=task,
                     size_bytes=store.dir_size(out / "model"))
