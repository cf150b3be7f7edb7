"""Faster kernels where the machine has them: Liger's Triton kernels, the attention implementation,
compiled transformer layers. Each says why it is (or is not) used, and warns or fails when a
kernel the recipe asked for is missing.
"""
from __future__ import annotations

import contextlib
import functools


class KernelUnavailable(RuntimeError):
    """A kernel the recipe requires (train.require_fast_paths) that this machine lacks: which field
    asked for it, and why it is missing."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


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
            raise KernelUnavailable("train.kernels", f"liger is required, but {reason}")
        _warn(f"train.kernels: liger requested, but {reason}; training without it")
    return False


# Liger's layer kernels for eager layers. Not its RoPE: it keeps float32 where the eager code rounds to
# bf16, and alone it moved LoRA gradients past the check's bound against the plain path; RMSNorm and
# SwiGLU stay within it at about the same speed (gpu_train.py --check; benchmarks/RESULTS.md).
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
        raise KernelUnavailable("train.compile", f"required, but {reason}")
    _warn(f"train.compile: {reason}; training with eager layers")
    return False


def use_compile(mode, dev, required: bool = False) -> bool:
    """Whether to compile the transformer layers. auto: on CUDA where Triton is installed (faster on
    fixed-length rows, and far faster on packed rows of real lengths, compiled once with dynamic
    widths; benchmarks/RESULTS.md, third and fourth rounds), never on the CPU, where compiling costs
    more than it saves on short runs; a machine without Triton quietly trains eager (nothing was
    asked for). true: wanted, so a machine without a compiler warns (or fails, when required)."""
    if mode == "auto":
        return dev.type == "cuda" and _missing_compiler(dev) is None
    return bool(mode) and can_compile(dev, required)


def compile_layers(model, dynamic: bool | None = None, emulate_casts: bool = True, sharded: bool = False) -> int:
    """torch.compile each transformer layer (the blocks of the longest list of identical modules);
    returns how many. One compiled graph serves every layer (their weights are its inputs); a new
    sequence length compiles once more, with dynamic shapes from then on (dynamic=True: from the
    first step, for data whose width changes every step, as packed rows' does). Why: the eager step
    queues each small operation from Python; on a CPU stand-in for that overhead (benchmarks/
    host_overhead_cpu.py: 32 layers at tiny width) compiling cut the step to about a third, with the
    eager loss and gradients (tests/test_fast_paths.py). emulate_casts: see _layer_compiler (off only
    to measure what it costs). sharded (FSDP): only each layer's forward is compiled, so that FSDP's
    hooks, which gather a layer's weights before it runs and free them after, run around the compiled
    code as they run around eager code (as torchtitan compiles its blocks)."""
    import torch

    backend = functools.partial(_layer_compiler, emulate_casts=emulate_casts)  # one backend: one graph for all
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)
                  and len({type(b) for b in m}) == 1), key=len, default=[])
    for block in blocks:
        if sharded:
            block.forward = torch.compile(block.forward, backend=backend, dynamic=dynamic)
        else:
            block.compile(backend=backend, dynamic=dynamic)
    return len(blocks)


def _layer_compiler(graph, example_inputs, emulate_casts: bool = True):
    """Inductor, as the compiled layers need it. The joint graph's common-subexpression pass off: a
    fused LoRA layer dequantizes its weight in forward and again in backward; merged into one, the
    compiled layer would keep every dequantized weight for its backward (a dense 16-bit copy of every
    layer's weights: the peak grew, RESULTS.md). And, with emulate_casts (Inductor's emulate_precision_casts),
    each cast to bf16 that the eager code makes rounded as it is there, where Inductor would keep the
    float32 value inside a fused kernel: the compiled layers then compute what the eager layers compute
    (their LoRA gradients and loss come closer to eager's; tests/test_fast_paths.py checks them).
    And Inductor's deterministic mode: otherwise each process that compiles afresh picks its kernels'
    configurations by timing them on the device, and the pick changes the numbers (on a 7B shape two
    fresh compiles' first-step LoRA gradients differed by 4%, as did 2 GPUs against 1: each rank
    compiles for itself); with it the compiled layers compute the same in every run and on every
    rank, at no measured cost in speed (benchmarks/RESULTS.md)."""
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.compile_fx import compile_fx

    patches = {"emulate_precision_casts": emulate_casts}
    if hasattr(torch._inductor.config, "deterministic"):  # older torch has no such mode
        patches["deterministic"] = True
    with torch._functorch.config.patch(cse=False):
        return compile_fx(graph, example_inputs, config_patches=patches)


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
            raise KernelUnavailable("train.attention", f"flash_attention_2 required, but {reason}")
        _warn(f"train.attention: flash_attention_2 requested, but {reason}; using sdpa")
        return "sdpa"
    return requested
