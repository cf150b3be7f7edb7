"""LoRA attached for training: peft's LoraConfig from the resolved targets, and the model made ready
to train (only adapters and heads trainable, in float32; the base in its compute dtype).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from qlora.tasks.recipe import RecipeError

if TYPE_CHECKING:
    from qlora.tasks.recipe import LoraSection
    from qlora.tasks.results import LoraPlan


# lora.init -> peft's init_lora_weights. loftq starts as default: the adapter is fitted after loading
# (tasks/training/loftq.py), on the quantized base.
PEFT_INIT = {"default": True, "gaussian": "gaussian", "loftq": True, "pissa": "pissa", "olora": "olora"}
# Initialisations that replace the base weights by a residual while training (converted back at save).
MUTATES_BASE = ("pissa", "olora")


def lora_config(task: str, target_modules: list[str], modules_to_save: list[str], cfg: LoraSection,
                initialise: bool = True):
    """peft's LoraConfig of the lora section; a combination peft refuses is one line naming the field.
    initialise=False: peft's default start, for models that are only counted (on the meta device)."""
    from peft import LoraConfig, TaskType

    task_type = TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS
    try:
        return LoraConfig(task_type=task_type, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(target_modules), bias=cfg.bias, use_dora=cfg.use_dora,
                          use_rslora=cfg.use_rslora, modules_to_save=list(modules_to_save),  # a copy: peft extends it
                          init_lora_weights=PEFT_INIT[cfg.init] if initialise else True)
    except ValueError as e:
        field = "lora.use_dora" if "dora" in str(e).lower() else "lora.init" if "init" in str(e).lower() else "lora"
        raise RecipeError(f"peft refuses this lora section: {str(e).splitlines()[0]}", field) from None


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
    table found elsewhere to the weight's device at every dequantization. (Not what made the profiled
    step wait on the CPU: that was the nested scales, see unnest_absmax; this made no measurable
    difference there.)"""
    state = getattr(module.weight, "quant_state", None)
    device = module.weight.device
    if device.type == "meta":  # a rank that receives its shards: the state stays where it is real
        return
    while state is not None:
        for name in ("code", "absmax", "offset"):
            value = getattr(state, name, None)
            if hasattr(value, "device") and value.device != device and (name != "offset" or value.dim() > 0):
                setattr(state, name, value.to(device))
        state = getattr(state, "state2", None)


def draw_adapter_weights(model, seed: int, init: str = "default") -> None:
    """Every LoRA A matrix drawn again as peft draws it (default: Kaiming-uniform; gaussian: normal with
    standard deviation 1/r; B stays zero), from a CPU generator seeded with the run's seed, in the model's order. peft draws on the weight's own device,
    and CPU and CUDA generators differ: without this, the adapter would start elsewhere on a CPU, on a
    GPU, or when a sharded run loads the base into CPU memory, and the same recipe on 1 or 8 GPUs
    would not be the same experiment."""
    import math

    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name and p.requires_grad and p.dim() == 2:
                drawn = torch.empty(p.shape, dtype=torch.float32)
                if init == "gaussian":  # p is (r, in)
                    torch.nn.init.normal_(drawn, std=1 / p.shape[0], generator=generator)
                else:
                    torch.nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
                p.copy_(drawn)


def load_adapter_weights(model, directory) -> None:
    """The LoRA weights of a saved adapter of the same shape, in place of the new ones (training continues
    it). Every adapter weight of the model must be in the file: a partial load would train from a mix."""
    from pathlib import Path

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, saved)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise RuntimeError(f"the adapter in {directory} lacks {len(missing)} of this model's LoRA weights "
                           f"(first: {missing[0]})")


def model_for_training(base, lora: LoraPlan, cfg: LoraSection, quantized: bool, gradient_checkpointing: bool,
                       initialise: bool = True):
    """The base with LoRA attached (only the adapters and the head train), or, for full
    fine-tuning, the base itself with every weight trainable. initialise=False: a model on the meta
    device, whose weights (the adapter's start included) another rank sends.

    Not peft's prepare_model_for_kbit_training: it casts every 16-bit weight (norms, embeddings) to
    float32, so on a GPU the hidden states, and with them attention, run in float32 (slower and larger
    than this path, benchmarks/RESULTS.md). Here the base stays in its compute
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
        model = get_peft_model(base, lora_config(lora.task, lora.target_modules, lora.modules_to_save, cfg,
                                                 initialise))
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return model


def checkpoint_some_layers(model, count: int) -> int:
    """Gradient checkpointing kept on `count` of the decoder layers (spread evenly), off on the rest:
    a checkpointed layer keeps only its input and runs its forward twice (a third more arithmetic: its
    weights' matmuls once more, for a frozen base that computes no weight gradients); the others keep
    every activation their backward reads. So the memory a budget leaves buys back recomputation a
    layer at a time. Returns how many layers are checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    count = max(0, min(count, len(layers)))
    chosen = {round(i * len(layers) / count) for i in range(count)} if count else set()
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index in chosen
    return count
