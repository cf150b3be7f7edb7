"""How a model is set up and run for training: LoRA attached, gradient checkpointing, trainable
weights in float32, the forward pass under autocast (and optionally with its saved activations in
CPU memory). Free of Prefect and of the recipe schema, so the GPU benchmark runs exactly this code.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tasks.recipe import LoraSection


def lora_config(resolved: dict, cfg: LoraSection):
    from peft import LoraConfig, TaskType

    task_type = TaskType.CAUSAL_LM if resolved.get("task") == "causal-lm" else TaskType.SEQ_CLS
    return LoraConfig(task_type=task_type, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(resolved["target_modules"]), bias=cfg.bias, use_dora=cfg.use_dora,
                      use_rslora=cfg.use_rslora, modules_to_save=list(resolved["modules_to_save"]))  # peft extends it in place


def keep_4bit_layers_trainable(model) -> None:
    """bitsandbytes converts a 4-bit layer's weights to a CPU inference layout the first time it runs
    in eval mode without gradients, and keeps that layout: the mid-training validation would then
    switch the layers to a kernel without autograd (gradients stop flowing, or the step fails). A
    model being trained never takes that path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            place_quant_state(module)


def place_quant_state(module) -> None:
    """Keep a 4-bit layer's quantization constants on its weight's device: bitsandbytes copies a code
    table found elsewhere to the weight's device at every dequantization. (Not what made the H100
    step wait on the CPU: that was the nested scales, see unnest_absmax; this made no measurable
    difference there.)"""
    state = getattr(module.weight, "quant_state", None)
    device = module.weight.device
    while state is not None:
        for name in ("code", "absmax", "offset"):
            value = getattr(state, name, None)
            if hasattr(value, "device") and value.device != device and (name != "offset" or value.dim() > 0):
                setattr(state, name, value.to(device))
        state = getattr(state, "state2", None)


def model_for_training(base, resolved: dict, cfg: LoraSection, quantized: bool, gradient_checkpointing: bool):
    """The base with LoRA attached (only the adapters and the head train), or, for full
    fine-tuning, the base itself with every weight trainable.

    Not peft's prepare_model_for_kbit_training: it casts every 16-bit weight (norms, embeddings) to
    float32, so on a GPU the hidden states, and with them attention, run in float32 (measured on an
    H100, 7B shape: 1.5x slower and 1.3x the memory of this path). Here the base stays in its compute
    dtype, checkpointing is non-reentrant (no input-gradient hook needed), and only the trainable
    weights are float32 (optimizer precision), run in the compute dtype under autocast (`train_context`)."""
    import torch
    from peft import get_peft_model

    if quantized:
        keep_4bit_layers_trainable(base)
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.enabled:
        base.requires_grad_(True)
        model = base
    else:
        model = get_peft_model(base, lora_config(resolved, cfg))
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return model


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


class _Offloaded:
    __slots__ = ("cpu", "buffer", "device", "gpu", "ready", "index", "released")


_OFFLOAD_STATE: dict = {}  # CUDA device -> (copy stream, pinned byte buffers free for reuse)
_OFFLOAD_LOCK = threading.Lock()  # packs run on the training thread, unpacks on autograd's device thread


def offload_to_cpu(min_bytes: int = 2**20):
    """Saved-for-backward tensors (with checkpointing: each layer's input) kept in pinned CPU memory,
    without stalling the GPU or the CPU. torch's save_on_cpu copies on the compute stream and waits for
    each copy, so the CPU stops queuing kernels at every layer (measured on an H100, 7B shape: 14% of
    the step). Here the copy out runs on a side stream as soon as the tensor exists, and in backward
    each tensor's copy back starts while the layer after it (in backward order, the one before) is
    still being computed. The pinned buffers are reused from step to step: every copy to or from them
    runs on the one side stream, so a buffer handed back after its copy back is queued is safe to
    fill again (rows of varying width take any free buffer large enough; the pool keeps at most twice
    what one forward pass saved). Small tensors (shared rotary tables, masks) stay on the GPU."""
    import torch

    saved: list = []  # in the order saved; backward unpacks them roughly in reverse

    def state(device):
        with _OFFLOAD_LOCK:
            if device not in _OFFLOAD_STATE:
                with torch.cuda.device(device):
                    _OFFLOAD_STATE[device] = (torch.cuda.Stream(), [])
            return _OFFLOAD_STATE[device]

    def fetch(item):
        if item.gpu is None:
            stream, _ = state(item.device)
            with torch.cuda.stream(stream):
                item.gpu = torch.empty(item.cpu.shape, dtype=item.cpu.dtype, device=item.device)
                item.gpu.copy_(item.cpu, non_blocking=True)
                item.ready = stream.record_event()

    def pack(tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type != "cuda" or nbytes < min_bytes or isinstance(tensor, torch.nn.Parameter):
            return tensor
        stream, free = state(tensor.device)
        with _OFFLOAD_LOCK:
            fits = [i for i, b in enumerate(free) if b.numel() >= nbytes]  # (indices: tensors do not compare by ==)
            buffer = free.pop(min(fits, key=lambda i: free[i].numel())) if fits else None
        if buffer is None:
            buffer = torch.empty(round_up(nbytes, 2**21), dtype=torch.uint8, pin_memory=True)
        cpu = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
        stream.wait_stream(torch.cuda.current_stream())  # the tensor is written before it is copied
        with torch.cuda.stream(stream):
            cpu.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy is done
        item = _Offloaded()
        item.cpu, item.buffer, item.device, item.gpu, item.ready, item.index, item.released = \
            cpu, buffer, tensor.device, None, None, len(saved), False
        saved.append(item)
        return item

    def unpack(item):
        if isinstance(item, torch.Tensor):
            return item
        if item.released:
            raise RuntimeError("activations offloaded to CPU are read once: backward twice through the same "
                               "graph (retain_graph) needs train.offload_activations off")
        fetch(item)
        saved[item.index] = None
        earlier = next((s for s in reversed(saved[:item.index]) if s is not None), None)
        if earlier is not None:
            fetch(earlier)  # the next one backward needs, copied while this one is used
        _, free = state(item.device)
        with _OFFLOAD_LOCK:
            free.append(item.buffer)  # its copy back is queued first
            if len(free) > 2 * len(saved):
                free.pop(min(range(len(free)), key=lambda i: free[i].numel()))
        item.released = True
        compute = torch.cuda.current_stream()
        compute.wait_event(item.ready)
        tensor, item.gpu = item.gpu, None
        tensor.record_stream(compute)
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


# --- Fused LoRA linear ----------------------------------------------------------------------------
# peft computes a LoRA layer as base(x) (4-bit: dequantize + matmul), a defensive copy of the result,
# dropout(x), A, B, a scaling multiply and an add, each a separate kernel with its own saved tensors.
# Here one autograd function does the same arithmetic: the base weight dequantized once in forward
# and once in backward (never saved), the LoRA product added into the base output by one addmm, and
# the input gradient of the base and of the adapter accumulated into one buffer.

def _dense_weight(base, dtype):
    """The frozen base weight as a (out, in) matrix in the compute dtype (4-bit: dequantized)."""
    import bitsandbytes as bnb
    import torch

    weight = base.weight
    if not isinstance(base, bnb.nn.Linear4bit):
        return weight.to(dtype)
    state = weight.quant_state
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
    kernel) each call costs about 60 us of CPU time, and a 7B step makes 672 of them. None where this
    bitsandbytes lays its CUDA backend out differently (then the public op, which is also what a
    compiled layer calls: the compiler traces the op, not a C call)."""
    try:
        from bitsandbytes.backends.cuda.ops import _dequantize_4bit_impl
    except (ImportError, AttributeError):  # another layout, or a torch without CUDA (the module fails to load)
        return None
    return _dequantize_4bit_impl


def unnest_absmax(base) -> None:
    """With double quantization, every dequantization first dequantizes the block scales (a second
    bitsandbytes call that costs about 0.4 ms of CPU time on CUDA, twice per layer per step: on an
    H100 the step then waits on the CPU). Keep the scales dequantized instead: the same values, at
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


def fuse_lora_layers(model) -> int:
    """Route every plain LoRA layer (on a 4-bit or a 16/32-bit linear) through the fused function;
    returns how many. The adapter's weights, names and saved files are peft's, unchanged."""
    import types

    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import LoraLayer

    global _LORA_FUNCTION
    _LORA_FUNCTION = _LORA_FUNCTION or _lora_function()
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), (bnb.nn.Linear4bit, torch.nn.Linear)) \
                and not isinstance(module.get_base_layer(), bnb.nn.Linear8bitLt):
            module.forward = types.MethodType(_fused_forward, module)
            if isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
                unnest_absmax(module.get_base_layer())
            count += 1
    return count


# --- Kernels and attention ------------------------------------------------------------------------

def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


def use_liger(mode: str, config, dev, required: bool = False) -> bool:
    """Whether Liger's Triton kernels (a cross-entropy fused with the output layer that never holds
    the full logits; RMSNorm and SwiGLU for eager layers) apply: CUDA, liger-kernel installed, a causal LM
    of a supported family. mode auto: where they apply; liger: wanted, so a machine or model without
    them warns and trains without (or fails, when required)."""
    if mode == "none":
        return False
    reason = None
    if dev.type != "cuda":
        reason = "Liger kernels need CUDA (Triton)"
    else:
        try:
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
        except ImportError:
            reason = "liger-kernel is not installed (pip install liger-kernel)"
        else:
            model_type = getattr(config, "model_type", None)
            causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
            if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN or not causal:
                reason = f"Liger has no kernels for this model ({model_type}, {config.architectures})"
    if reason is None:
        return True
    if mode == "liger":
        if required:
            raise RuntimeError(f"train.kernels: liger is required, but {reason}")
        _warn(f"train.kernels: liger requested, but {reason}; training without it")
    return False


# Liger's layer kernels for eager layers. Not its RoPE: it keeps float32 where the eager code rounds to
# bf16, and alone moved LoRA gradients 1.05e-2 from the plain path (the check's bound is 1e-2; RMSNorm
# and SwiGLU together 9.0e-3, within a few percent of the speed; H100, benchmarks/RESULTS.md).
EAGER_LIGER_KERNELS = frozenset({"rms_norm", "swiglu"})


def liger_layer_kernels(compiled: bool) -> frozenset:
    """Which of Liger's layer kernels the layers take: none when compiled (the compiler fuses them)."""
    return frozenset() if compiled else EAGER_LIGER_KERNELS


@contextlib.contextmanager
def liger_kernels(model, layer_kernels):
    """Liger's kernels in this model while the block runs: its fused linear cross-entropy, and the
    layer kernels named (of "rope", "rms_norm", "swiglu"; none for compiled layers: the compiler fuses
    those). Liger also rebinds names in the model's transformers module (the RoPE function, the norm
    and MLP classes): every model built later in this process would get them, the evaluate and merge
    stages' too, so they are put back on leaving. The model's own patched modules stay."""
    import sys

    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    kernels = set(layer_kernels)
    module = sys.modules[type(model).__module__]
    before = dict(vars(module))
    try:
        _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=True,
                                        **{k: k in kernels for k in ("rope", "rms_norm", "swiglu")})
        yield
    finally:
        for name in set(vars(module)) - set(before):
            delattr(module, name)
        for name, value in before.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


def _missing_compiler(dev) -> str | None:
    """Why torch.compile cannot build kernels here (needs Triton on CUDA, a C++ compiler on the CPU), or None."""
    import importlib.util
    import shutil

    if dev.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed"
    return None if any(shutil.which(c) for c in ("g++", "c++", "clang++")) else "no C++ compiler on PATH"


def can_compile(dev, required: bool = False) -> bool:
    """Whether torch.compile can build kernels here. Without: a warning and eager layers (or an
    error, when required)."""
    reason = _missing_compiler(dev)
    if reason is None:
        return True
    if required:
        raise RuntimeError(f"train.compile: required, but {reason}")
    _warn(f"train.compile: {reason}; training with eager layers")
    return False


def use_compile(mode, dev, required: bool = False) -> bool:
    """Whether to compile the transformer layers. auto: on CUDA where Triton is installed (H100, 7B
    shape: fixed-length rows 8353 vs 7464 tokens/s eager; packed rows of real lengths 8049 vs 3555,
    compiled once with dynamic widths in 24 s of warm-up), never on the CPU, where compiling costs
    more than it saves on short runs; a machine without Triton quietly trains eager (nothing was
    asked for). true: wanted, so a machine without a compiler warns (or fails, when required)."""
    if mode == "auto":
        return dev.type == "cuda" and _missing_compiler(dev) is None
    return bool(mode) and can_compile(dev, required)


def compile_layers(model, dynamic: bool | None = None, emulate_casts: bool = True) -> int:
    """torch.compile each transformer layer (the blocks of the longest list of identical modules);
    returns how many. One compiled graph serves every layer (their weights are its inputs); a new
    sequence length compiles once more, with dynamic shapes from then on (dynamic=True: from the
    first step, for data whose width changes every step, as packed rows' does). Why: the eager step
    queues each small operation from Python; on a CPU stand-in for that overhead (benchmarks/
    host_overhead_cpu.py: 32 layers at tiny width) compiling cut the step from 156 to 53 ms, with the
    eager loss and gradients (tests/test_fast_paths.py). emulate_casts: see _layer_compiler (off only
    to measure what it costs)."""
    import torch

    backend = functools.partial(_layer_compiler, emulate_casts=emulate_casts)  # one backend: one graph for all
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)
                  and len({type(b) for b in m}) == 1), key=len, default=[])
    for block in blocks:
        block.compile(backend=backend, dynamic=dynamic)
    return len(blocks)


def _layer_compiler(graph, example_inputs, emulate_casts: bool = True):
    """Inductor, as the compiled layers need it. The joint graph's common-subexpression pass off: a
    fused LoRA layer dequantizes its weight in forward and again in backward; merged into one, the
    compiled layer would keep every dequantized weight for its backward (7B: 0.36 GiB a layer;
    measured +0.26 GiB of peak on an H100). And, with emulate_casts (Inductor's emulate_precision_casts),
    each cast to bf16 that the eager code makes rounded as it is there, where Inductor would keep the
    float32 value inside a fused kernel: the compiled layers then compute what the eager layers compute
    (CPU, 4 layers, bf16: LoRA gradients 4.6e-3 from eager instead of 8.2e-3, loss 3e-6 instead of 2e-4)."""
    import torch._functorch.config
    from torch._inductor.compile_fx import compile_fx

    with torch._functorch.config.patch(cse=False):
        return compile_fx(graph, example_inputs, config_patches={"emulate_precision_casts": emulate_casts})


def attention_implementation(requested: str, dev, required: bool = False) -> str:
    """The attention kernel to load the model with. auto: flash-attn where installed on CUDA, else
    PyTorch's SDPA (flash / memory-efficient kernels, and packed rows through a block mask)."""
    import importlib.util

    has_flash = dev.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if has_flash else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        reason = "flash-attn is not installed" if dev.type == "cuda" else "flash-attn needs CUDA"
        if required:
            raise RuntimeError(f"train.attention: flash_attention_2 required, but {reason}")
        _warn(f"train.attention: flash_attention_2 requested, but {reason}; using sdpa")
        return "sdpa"
    return requested


# --- Memory plan ----------------------------------------------------------------------------------
GIB = 2**30


def _shape(config) -> dict:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers = text.hidden_size, text.num_hidden_layers
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    inter = getattr(text, "intermediate_size", None) or 4 * h
    gated = getattr(text, "hidden_act", "silu") in ("silu", "swiglu") or "llama" in text.model_type
    per_layer = {"q": (h, heads * head_dim), "k": (h, kv * head_dim), "v": (h, kv * head_dim),
                 "o": (heads * head_dim, h), "down": (inter, h), "up": (h, inter)}
    if gated:
        per_layer["gate"] = (h, inter)
    tied = getattr(config, "tie_word_embeddings", True)
    return {"h": h, "inter": inter, "layers": layers, "vocab": text.vocab_size, "per_layer": per_layer,
            "embedding_params": text.vocab_size * h * (1 if tied else 2)}


def estimate_memory(config, *, weight_bits: int, trainable_params: int, optim: str, tokens: int,
                    gradient_checkpointing: bool, offload: bool, fused_ce: bool, causal: bool) -> dict:
    """Bytes a training step needs at its peak, from the model's config alone (before loading):
    weights (NF4 0.5625 bytes a parameter with its float32 block scales, 8-bit 1.03, else 16-bit;
    embeddings and norms at least 16-bit, never quantized), trainable weights in float32 with their
    gradients and optimizer state, and activations for `tokens` tokens per micro-batch. Each part is
    checked against the part measured on an H100 (benchmarks/gpu_train.py, measured_vs_estimated_gib;
    benchmarks/RESULTS.md): the estimate stays at or above the measured peak, by at most about 3%,
    so a budget holds."""
    s = _shape(config)
    linear = sum(i * o for i, o in s["per_layer"].values()) * s["layers"]
    # 4-bit: half a byte, plus a float32 scale per 64 weights: fused LoRA layers unnest the double
    # quantization's 8-bit scales on CUDA (the load's 0.516 bytes grows to this).
    per_param = {4: 0.5 + 4 / 64, 8: 1.03}.get(weight_bits, weight_bits / 8)
    weights = linear * per_param + (s["embedding_params"] + 4 * s["h"] * s["layers"]) * max(2, weight_bits / 8)  # never quantized
    state_per_param = {"adamw_torch": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8, "sgd": 0}[optim]
    # float32 weight, gradient, state; and 2.5 bytes more than that count, as measured (12.3-12.8 bytes a
    # LoRA parameter with paged 8-bit AdamW on the 7B, 8B and 33B shapes)
    training_state = trainable_params * (4 + 4 + state_per_param + 2.5)
    layer = tokens * 2 * (18 * s["h"] + 6 * s["inter"])  # what one layer keeps for its backward
    checkpoints = 0 if offload else tokens * 2 * s["h"] * s["layers"]
    logits = tokens * s["vocab"] * 10 if causal and not fused_ce else 0  # 16-bit logits, float32 copy and gradient
    # Fitted to the H100 peaks of compiled layers, which keep more for their backward than eager ones
    # (0.88-0.95 of this count measured, eager about 0.82): 0.97 of the count plus 0.22 GiB (allocator
    # slack, cuBLAS workspace).
    if gradient_checkpointing:  # the checkpoints, plus one layer recomputed or the loss, whichever is larger
        activations = max(0.97 * (checkpoints + layer), checkpoints + logits)
    else:
        activations = 0.97 * layer * s["layers"] + logits
    overhead = 0.22 * GIB
    peak = weights + training_state + activations + overhead
    return {"peak": int(peak), "weights": int(weights), "training_state": int(training_state),
            "activations": int(activations)}


def plan_memory(budget_gib: float, examples_per_step: int, estimate, allow_offload: bool = True) -> dict:
    """The fastest set-up whose estimated peak fits the budget: the largest micro-batch (dividing the
    examples per optimizer step, the rest accumulated), first without, then with gradient
    checkpointing, then with the checkpoints offloaded to CPU. estimate(micro, gc, offload) -> bytes.
    Raises ValueError (with the smallest estimate) when nothing fits."""
    micro_batches = [m for m in range(examples_per_step, 0, -1) if examples_per_step % m == 0]
    # Largest micro-batch first: on an H100 a 7B step is bound by per-call CPU work (hundreds of
    # kernel launches per layer), so halving the micro-batch halves tokens/s (measured), while
    # offloading the checkpoints costs a few percent.
    for m in micro_batches:
        for gc, offload in ((False, False), (True, False)) + (((True, True),) if allow_offload else ()):
            peak = estimate(m, gc, offload)
            if peak <= budget_gib * GIB:
                return {"micro_batch": m, "accumulation": examples_per_step // m, "gradient_checkpointing": gc,
                        "offload_activations": offload, "estimated_peak_gib": round(peak / GIB, 2)}
    smallest = estimate(1, True, allow_offload)
    raise ValueError(f"{budget_gib:g} GiB is too small: training needs about {smallest / GIB:.1f} GiB even at "
                     f"micro-batch 1 with gradient checkpointing" + (" and activations offloaded to CPU" if allow_offload else ""))


# --- Batches of a causal LM ---------------------------------------------------------------------

def pack(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Examples packed into rows of at most max_length tokens, next-fit in a seeded random order.
    Fixed for the whole run: each epoch shuffles the rows, so a step count means the same data."""
    rows, current, used = [], [], 0
    for i in np.random.default_rng([seed, 2**31 - 1]).permutation(len(lengths)).tolist():
        if current and used + lengths[i] > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    return rows + ([current] if current else [])


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def width_multiple(compiled: bool) -> int:
    """What row widths are rounded up to: compiled layers compile once more for a width that is not a
    multiple of 8 (an alignment guard); eager layers take the rows as they are."""
    return 8 if compiled else 1


def collate_lm(units: list[list[dict]], pad_id: int, dev, width: int | None = None, multiple_of: int = 1) -> dict:
    """Causal-LM batch. Each unit is one example, or several packed into one row: then positions
    restart per example and no attention mask is passed, so transformers keeps attention within
    each example (its packed-sequence detection), and the first token of each example is never a
    target (it would be predicted from the previous example). width: pad every row to it
    (tokenize.padding: max_length, the tutorial way) instead of to the longest row. multiple_of: round
    the width up to it (width_multiple)."""
    import torch

    packed = any(len(u) > 1 for u in units)
    width = max([sum(len(e["input_ids"]) for e in u) for u in units] + [width or 0])
    width = round_up(width, multiple_of)
    ids = torch.full((len(units), width), pad_id, dtype=torch.long)
    labels = torch.full((len(units), width), -100, dtype=torch.long)
    positions = torch.zeros((len(units), width), dtype=torch.long)
    mask = torch.zeros((len(units), width), dtype=torch.long)
    for r, unit in enumerate(units):
        at = 0
        for e in unit:
            n = len(e["input_ids"])
            ids[r, at:at + n] = torch.as_tensor(e["input_ids"])
            labels[r, at:at + n] = torch.as_tensor(e["labels"])
            labels[r, at] = -100
            positions[r, at:at + n] = torch.arange(n)
            at += n
        mask[r, :at] = 1
        positions[r, at:] = torch.arange(width - at)  # padding: a segment of its own
    # No KV cache: with one, transformers skips its packed-sequence detection (and training needs none).
    batch = {"input_ids": ids.to(dev), "labels": labels.to(dev), "use_cache": False}
    if packed:
        batch["position_ids"] = positions.to(dev)
    else:
        batch["attention_mask"] = mask.to(dev)
    batch["real_tokens"] = int(mask.sum())
    batch["targets"] = int((labels[:, 1:] != -100).sum())  # tokens the loss averages over
    return batch


# --- Optimizer ----------------------------------------------------------------------------------

def use_flat_optimizer(dev) -> bool:
    """Whether the train stage steps its weights as one flat tensor: on CUDA, where the profile of a 7B
    step put 122 ms of host time on paged 8-bit AdamW's loop over 448 tensors (2.6 ms of GPU work). On
    the CPU, bitsandbytes' 8-bit step over one long tensor is slower (7B LoRA shapes: 562 vs 376 ms,
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


# --- One micro-batch ----------------------------------------------------------------------------

def forward_backward(model, batch: dict, dev, compute_dtype: str, offload: bool, share: float = 1.0):
    """Forward and backward of one micro-batch, its gradient weighted by its share of the optimizer
    step (its targets over the step's), so that accumulating micro-batches gives the gradient of the
    whole step; the loss (a tensor: no device sync here)."""
    with train_context(dev, compute_dtype, offload):
        loss = model(**batch).loss
    (loss * share).backward()
    return loss.detach()
