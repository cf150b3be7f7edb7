"""The optimizer: by name (torch's or bitsandbytes' 8-bit and paged ones), over the trainable weights
flattened into one tensor where that saves host time.
"""
from __future__ import annotations

from qlora.tasks.batches import round_up


def use_flat_optimizer(dev) -> bool:
    """Whether the train stage steps its weights as one flat tensor: on CUDA, where the profile of a 7B
    step put far more host time than GPU work on paged 8-bit AdamW's loop over 448 tensors. On
    the CPU, bitsandbytes' 8-bit step over one long tensor is slower (7B LoRA shapes,
    its full-size float32 temporaries), so there each weight stays its own."""
    return dev.type == "cuda"


def flatten_parameters(params: list, align: int = 256, min_numel: int = 4096) -> list:
    """The trainable weights of at least min_numel elements become views into one float32 buffer, their
    gradients views into another, so the optimizer steps, and clipping measures, one tensor instead of
    hundreds (a 7B model has 448 LoRA weights; bitsandbytes' 8-bit optimizers cost host time per
    tensor). Returns what to give the optimizer: the flat weight, then the small ones, as they were
    (bitsandbytes keeps 32-bit state below 4096 elements). Each weight starts at a multiple of 256
    elements, the block size of 8-bit optimizer state: every block covers what it would have covered
    unflattened, so the optimizer computes the same thing. Gradients accumulate in place: zero them
    with zero_grad(set_to_none=False), never by setting them to None. Clip over the weights as they
    were, not the flat one: a float32 norm over one long tensor on the CPU drifts (1e-4 relative
    over 10M elements), a norm of per-weight norms does not."""
    import torch

    large = [p for p in params if p.numel() >= min_numel]
    if not large or len({(p.dtype, p.device) for p in large}) > 1:
        return list(params)
    offsets, total = [], 0
    for p in large:
        offsets.append(total)
        total += round_up(p.numel(), align)
    flat = torch.nn.Parameter(torch.zeros(total, dtype=large[0].dtype, device=large[0].device))
    flat.grad = torch.zeros_like(flat)
    with torch.no_grad():
        for p, at in zip(large, offsets):
            view = flat.data[at:at + p.numel()].view_as(p)
            view.copy_(p.data)
            p.data = view
            p.grad = flat.grad[at:at + p.numel()].view_as(p)
    return [flat] + [p for p in params if p.numel() < min_numel]


def build_optimizer(params, name: str, learning_rate: float, weight_decay: float):
    """The optimizer a recipe names (train.optim), over params."""
    import torch
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(params, lr=learning_rate, weight_decay=weight_decay)
