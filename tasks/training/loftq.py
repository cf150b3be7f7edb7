"""LoftQ initialisation for a 4-bit base (`lora.init: loftq`): each adapter starts as the rank-r
approximation of what quantization took from its layer, so base + adapter starts at the 16-bit model
instead of at its NF4 rounding (Li et al., 2023, "LoftQ"; one alternating step with the base kept as
the quantize stage made it, which keeps the base, the merge and the export unchanged).

    residual = W - dequantize(NF4(W))        W: the original 16-bit weight, read from its safetensors
    U, S, Vh = svd(residual)
    B = U[:, :r] sqrt(S[:r]) / scaling,  A = sqrt(S[:r]) Vh[:r]      so scaling * B @ A = rank-r residual

Not peft's `replace_lora_weights_loftq`: it computes on CUDA only (a CPU run fails), and it ignores
the LoRA scaling (its start is off by alpha / r unless alpha equals r)."""
from __future__ import annotations

from pathlib import Path


def loftq_init(model, original_dir: str) -> int:
    """Fit every LoRA layer on a 4-bit linear to its quantization error, in place. Returns how many."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    from qlora.tasks.weights import tensor_files

    files = tensor_files(Path(original_dir))
    inner = model.get_base_model()
    prefix = getattr(inner, "base_model_prefix", "")
    fitted = 0
    for name, module in inner.named_modules():
        base = module.get_base_layer() if isinstance(module, LoraLayer) else None
        if not isinstance(base, bnb.nn.Linear4bit):
            continue
        # A head-wrapped model (e.g. ...ForSequenceClassification) may have been saved without its prefix.
        candidates = [f"{name}.weight", f"{name.removeprefix(prefix + '.')}.weight", f"{prefix}.{name}.weight"]
        tensor_name = next((c for c in candidates if c in files), None)
        if tensor_name is None:
            raise RuntimeError(f"lora.init: loftq needs the original weight of {name}, which {original_dir} lacks")
        with safe_open(str(files[tensor_name]), framework="pt", device="cpu") as f:
            original = f.get_tensor(tensor_name).to(device=base.weight.device, dtype=torch.float32)
        quantized = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(torch.float32)
        U, S, Vh = torch.linalg.svd(original - quantized, full_matrices=False)
        for adapter in module.active_adapters:
            r, scaling = module.r[adapter], module.scaling[adapter]
            root = S[:r].sqrt()
            with torch.no_grad():
                module.lora_B[adapter].weight.copy_(U[:, :r] * root / scaling)
                module.lora_A[adapter].weight.copy_(root[:, None] * Vh[:r])
        fitted += 1
    return fitted
