"""The run's plan, computed here and nowhere else, from the recipe, the model's config and the world
size: how many processes train, DDP or FSDP, and the memory plan (micro-batch, accumulation,
checkpointed layers, offload) with its estimated peak per GPU (the arithmetic is memory.py's). The
CLI's validate, the flow's early budget check and every training process ask it.
"""
from __future__ import annotations

import math
import warnings

from qlora.tasks.recipe import DistributedSection, PreferenceSection, QuantizationSection, RecipeError, TrainSection
from qlora.tasks.results import LoraPlan
from qlora.tasks.training import distributed, fsdp, kernels, loading, memory
from qlora.tasks.training.distributed import World
from qlora.tasks.training.preference import rows_per_example


def training_processes(launch: DistributedSection) -> int:
    """How many processes train in all (the world size); more processes per node than its visible
    GPUs is a recipe error."""
    if launch.strategy == "none":
        return 1
    try:
        processes = distributed.processes_per_node(launch.nproc_per_node) * launch.nnodes
    except ValueError as e:
        raise RecipeError(str(e), "distributed.nproc_per_node", hint="auto: one process per visible GPU") from None
    missing = distributed.missing_backend() if processes > 1 else None
    if missing:
        raise RecipeError(f"{processes} processes need {missing}, which this torch build lacks", "distributed.strategy",
                          hint="set distributed.strategy: none, or install a torch build with it")
    return processes


def fused_loss(liger: bool, preference: PreferenceSection | None) -> bool:
    """Whether the loss is Liger's fused cross-entropy (no logits kept): the supervised loss where Liger
    is used; a preference loss scores the completions' log-probabilities itself."""
    return liger and preference is None


def check_memory_budget(model_path: str, cfg: TrainSection, q: QuantizationSection, lora: LoraPlan,
                        max_length: int | None, causal: bool, trust_remote_code: bool = False,
                        launch: DistributedSection | None = None, with_estimate: bool = False,
                        dropout: bool = False, preference: PreferenceSection | None = None) -> dict | None:
    """train.max_memory_gib checked from the model's config before anything is loaded: a budget too
    small for even micro-batch 1 fails here, with the estimate. The plan itself is made in the stage.
    with_estimate (qlora validate): the plan and its per-GPU estimate even without a budget. The
    world size is resolved only past that point: counting GPUs imports torch, which an unchanged
    re-run without a budget never needs. preference: a preference loss (pairs count two sequences, and
    no preference loss takes Liger's fused cross-entropy), as the stage plans it."""
    if cfg.max_memory_gib is None and not with_estimate:
        return None
    launch = launch or DistributedSection()
    processes = training_processes(launch)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    dev = loading.device()
    with warnings.catch_warnings():  # the stage warns of a kernel the machine lacks; here only the estimate counts
        warnings.simplefilter("ignore")
        liger = fused_loss(kernels.use_liger(cfg.kernels, config, dev), preference)  # as the stage decides
    sequences = rows_per_example(preference)
    world = distributed.World(0, processes)
    strategy = training_strategy(launch.strategy, world, config, cfg, q, lora, max_length, causal, liger, dev,
                                 dropout, sequences=sequences)
    plan = memory_plan(config, cfg, q, lora, max_length, causal, liger, dev, processes, with_estimate,
                       sharded=strategy == "fsdp", dropout=dropout, sequences=sequences)
    return {**plan, "strategy": strategy}


def memory_plan(config, cfg: TrainSection, q: QuantizationSection, lora: LoraPlan, max_length: int | None, causal: bool,
                fused_ce: bool, dev, processes: int = 1, with_estimate: bool = False, sharded: bool = False,
                dropout: bool = False, sequences: int = 1) -> dict:
    """Micro-batch, accumulation, checkpointing and offload for this run, per process: the recipe's
    own (with its estimated peak, when with_estimate), or, with train.max_memory_gib, the fastest that
    fits the budget of each GPU (checked before the model is loaded). Under DDP every process holds
    the whole model and its share of each step's examples (its gradients are averaged in place);
    sharded (FSDP), its part of the weights and training state, and a layer or two gathered whole.
    dropout: LoRA dropout is on (layers not checkpointed keep each adapter's dropped input). sequences:
    rows per example (a preference pair is two)."""
    recipe_plan = {"micro_batch": cfg.per_device_train_batch_size, "accumulation": cfg.gradient_accumulation_steps,
                   "gradient_checkpointing": cfg.gradient_checkpointing, "offload_activations": cfg.offload_activations}
    if cfg.max_memory_gib is None and not with_estimate:
        return recipe_plan
    bits = {"4bit": 4, "8bit": 8}.get(q.mode, 32 if q.bnb_4bit_compute_dtype == "float32" else 16)
    seq = max_length or getattr(config, "max_position_embeddings", 512)
    shards = processes if sharded else None

    layers = memory.layer_count(config)

    def estimate(micro: int, checkpointed: int, offload: bool) -> int:
        return memory.estimate_memory(
            config, weight_bits=bits, trainable_params=lora.trainable_params, optim=cfg.optim, tokens=micro * seq * sequences,
            gradient_checkpointing=checkpointed > 0, checkpointed_layers=checkpointed, offload=offload,
            fused_ce=fused_ce, causal=causal, shards=shards, dropout=dropout)["peak"]
    if cfg.max_memory_gib is None:  # the recipe's own plan, with what it is estimated to need per GPU
        peak = estimate(cfg.per_device_train_batch_size, layers if cfg.gradient_checkpointing else 0,
                        cfg.offload_activations)
        return {**recipe_plan, "estimated_peak_gib": round(peak / memory.GIB, 2)}
    examples_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    try:
        return memory.plan_memory(cfg.max_memory_gib, math.ceil(examples_per_step / processes), estimate, layers,
                                  allow_offload=dev.type == "cuda")
    except ValueError as e:
        raise RecipeError(str(e), "train.max_memory_gib",
                          hint="raise the budget, shorten tokenize.max_length, or use a paged 8-bit optimizer") from None


def training_strategy(requested: str, world: World, config, cfg: TrainSection, q: QuantizationSection, lora: LoraPlan,
                      max_length: int | None, causal: bool, fused_ce: bool, dev, dropout: bool = False,
                      sequences: int = 1) -> str:
    """distributed.strategy for this run (tasks.training.fsdp.choose_strategy). auto: DDP when every
    GPU can hold the whole model and its training state, by the memory estimate of the DDP plan
    against the budget (train.max_memory_gib) or, without one, the GPU's memory; else FSDP."""
    fits = True
    if world.distributed and requested == "auto" and dev.type == "cuda":
        import torch

        try:
            plan = memory_plan(config, cfg, q, lora, max_length, causal, fused_ce, dev, world.size, with_estimate=True,
                               dropout=dropout, sequences=sequences)
            fits = plan["estimated_peak_gib"] * memory.GIB <= torch.cuda.get_device_properties(dev).total_memory
        except RecipeError:  # no DDP plan fits the budget
            fits = False
    return fsdp.choose_strategy(requested, world, fits)
