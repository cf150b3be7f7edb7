"""One micro-batch's forward and backward, under the context training runs in (autocast to the compute
dtype, optional activation offload).
"""
from __future__ import annotations

from qlora.tasks.training.offload import offload_to_cpu


def train_context(dev, compute_dtype: str, offload_activations: bool = False):
    """What the forward pass runs under: autocast to a 16-bit compute dtype on CUDA (float32 trainable
    weights are cast per matmul, small, instead of activations to float32, large), and optionally the
    tensors saved for backward kept in pinned CPU memory."""
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    dtype = getattr(torch, compute_dtype)
    if dev.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        stack.enter_context(torch.autocast("cuda", dtype=dtype))
    if offload_activations and dev.type == "cuda":
        stack.enter_context(offload_to_cpu())
    return stack


def forward_backward(model, batch: dict, dev, compute_dtype: str, offload: bool, share: float = 1.0, loss_of=None):
    """Forward and backward of one micro-batch, its gradient weighted by its share of the optimizer
    step (its targets over the step's), so that accumulating micro-batches gives the gradient of the
    whole step; the loss (a tensor: no device sync here). loss_of(model, batch): the loss, when not
    the model's own (preference losses)."""
    with train_context(dev, compute_dtype, offload):
        loss = loss_of(model, batch) if loss_of is not None else model(**batch).loss
    (loss * share).backward()
    return loss.detach()
