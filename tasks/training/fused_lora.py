"""One autograd function for a LoRA layer. peft computes a LoRA layer as base(x) (4-bit: dequantize +
matmul), a defensive copy of the result, dropout(x), A, B, a scaling multiply and an add, each a
separate kernel with its own saved tensors. Here one function does the same arithmetic: the base
weight dequantized once in forward and once in backward (never saved), the LoRA product added into
the base output by one addmm, and the input gradients of base and adapter accumulated into one buffer.
"""
from __future__ import annotations

import functools


def _dense_weight(base, dtype):
    """The frozen base weight as a (out, in) matrix in the compute dtype (4-bit: dequantized)."""
    import bitsandbytes as bnb
    import torch

    weight = base.weight
    if not isinstance(base, bnb.nn.Linear4bit):
        return weight.to(dtype)
    # Sharded (FSDP), the gathered weight is a plain tensor: its quantization state is the module's.
    state = getattr(weight, "quant_state", None)
    state = base.quant_state if state is None else state
    absmax = getattr(base, "_qlora_absmax", None)
    if absmax is None:
        return bnb.functional.dequantize_4bit(weight.data, state).to(dtype)
    dequantize = _cuda_dequantize() if weight.device.type == "cuda" and not torch.compiler.is_compiling() else None
    if dequantize is not None:
        out = torch.empty(state.shape, dtype=dtype, device=weight.device)
        dequantize(weight.data, absmax, state.blocksize, state.quant_type, dtype, out)
        return out
    return torch.ops.bitsandbytes.dequantize_4bit(weight.data, absmax, state.blocksize, state.quant_type,
                                                  list(state.shape), dtype)


@functools.cache
def _cuda_dequantize():
    """bitsandbytes' CUDA dequantization called directly: through torch's op dispatcher (a Python
    kernel) each call costs tens of microseconds of host time, and a 7B step makes hundreds of them
    (RESULTS.md, fourth round). None where this
    bitsandbytes lays its CUDA backend out differently (then the public op, which is also what a
    compiled layer calls: the compiler traces the op, not a C call)."""
    try:
        from bitsandbytes.backends.cuda.ops import _dequantize_4bit_impl
    except (ImportError, AttributeError):  # another layout, or a torch without CUDA (the module fails to load)
        return None
    return _dequantize_4bit_impl


def unnest_absmax(base) -> None:
    """With double quantization, every dequantization first dequantizes the block scales (a second
    bitsandbytes call of its own, twice per layer per step: the profiled GPU step then waited on the
    host). Keep the scales dequantized instead: the same values, at
    4 bytes per 64 weights (0.06 bytes a parameter) of extra memory."""
    import bitsandbytes as bnb
    import torch

    state = base.weight.quant_state
    if base.weight.device.type == "cuda" and state.nested:
        with torch.no_grad():
            absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2)
            base._qlora_absmax = (absmax + state.offset).float()


def _lora_function():
    import torch

    class LoraLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, x_dropped, A, B, bias, base, scaling):
            # A and B arrive in their own (float32) dtype and their gradients leave in it: casting
            # here instead of before the call spares two autograd nodes per layer (CPU time).
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            W = _dense_weight(base, x.dtype)
            out = x2 @ W.t() if bias is None else torch.addmm(bias.to(x.dtype), x2, W.t())
            del W
            xd = x2 if x_dropped is None else x_dropped.reshape(-1, shape[-1])
            A16, B16 = A.to(x.dtype), B.to(x.dtype)
            h = xd @ A16.t()
            out.addmm_(h, B16.t(), alpha=scaling)
            ctx.base, ctx.scaling, ctx.shape, ctx.weight_dtype = base, scaling, shape, A.dtype
            ctx.save_for_backward(xd, h, A16, B16)
            return out.view(*shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            xd, h, A, B = ctx.saved_tensors
            g = grad.reshape(-1, grad.shape[-1]).to(h.dtype)
            s = ctx.scaling
            gh = (g @ B).mul_(s)
            grad_A = (gh.t() @ xd).to(ctx.weight_dtype)
            grad_B = (g.t() @ h).mul_(s).to(ctx.weight_dtype)
            grad_x = grad_x_dropped = None
            needs_x, needs_xd = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            if needs_x:
                grad_x = g @ _dense_weight(ctx.base, g.dtype)
                if not needs_xd:  # no dropout: the adapter's input gradient goes to x too
                    grad_x.addmm_(gh, A)
                grad_x = grad_x.view(ctx.shape)
            if needs_xd:
                grad_x_dropped = (gh @ A).view(ctx.shape)
            return grad_x, grad_x_dropped, grad_A, grad_B, None, None, None

    return LoraLinear


_LORA_FUNCTION = None


def _fused_forward(self, x, *args, **kwargs):
    """forward of a peft LoRA layer through the fused function; anything else (adapters disabled or
    merged, several adapters, DoRA and other variants, a LoRA bias or a trained base bias, mixed-batch
    adapter names) takes peft's own forward."""
    import torch

    active = [a for a in self.active_adapters if a in self.lora_A]
    base = self.get_base_layer()
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] in self.lora_variant
            or self.lora_B[active[0]].bias is not None or (base.bias is not None and base.bias.requires_grad)):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    dtype = getattr(base, "compute_dtype", None) or x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    dropout = self.lora_dropout[name]
    x_in = x.to(dtype)
    x_dropped = dropout(x_in) if isinstance(dropout, torch.nn.Dropout) and self.training and dropout.p > 0 else None
    with torch.autocast(x.device.type, enabled=False):
        out = _LORA_FUNCTION.apply(x_in, x_dropped, self.lora_A[name].weight, self.lora_B[name].weight, base.bias,
                                   base, float(self.scaling[name]))
    return out.to(x.dtype)


def fuse_lora_layers(model, unnest: bool = True) -> int:
    """Route every plain LoRA layer (on a 4-bit or a 16/32-bit linear) through the fused function;
    returns how many (a DoRA layer, a peft variant, keeps peft's forward). The adapter's weights, names and saved files are peft's, unchanged. unnest:
    keep the 4-bit block scales dequantized (unnest_absmax)."""
    import types

    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import LoraLayer

    global _LORA_FUNCTION
    _LORA_FUNCTION = _LORA_FUNCTION or _lora_function()
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), (bnb.nn.Linear4bit, torch.nn.Linear)) \
                and not isinstance(module.get_base_layer(), bnb.nn.Linear8bitLt) and not module.lora_variant:
            module.forward = types.MethodType(_fused_forward, module)
            if unnest and isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
                unnest_absmax(module.get_base_layer())
            count += 1
    return count
