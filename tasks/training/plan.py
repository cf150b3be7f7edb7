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
    host = check_host_memory(config, cfg, q, lora, launch, processes // launch.nnodes, strategy, dev,
                             plan.get("estimated_peak_gib"))
    return {**plan, "strategy": strategy, "host_per_node_gib": host}


# Host memory a training process holds besides the model: the interpreter, torch, transformers and
# peft, and on a GPU the CUDA context and its libraries (resident sets measured before the load,
# rounded up: benchmarks/RESULTS.md, "Loading the base once per node").
PROCESS_HOST_GIB = {"cpu": 1.0, "cuda": 1.5}


def weight_bits(q: QuantizationSection) -> int:
    """Bits per base weight as loaded for training: 4 or 8 quantized, else the compute dtype's."""
    return {"4bit": 4, "8bit": 8}.get(q.mode, 32 if q.bnb_4bit_compute_dtype == "float32" else 16)


def host_memory_per_node(config, cfg: TrainSection, q: QuantizationSection, lora: LoraPlan, launch: DistributedSection,
                         processes: int, strategy: str, dev, peak_gib: float | None = None) -> dict:
    """The host memory the most loaded node needs, by part, in GiB (estimated from the config before
    anything loads): its processes; sharded, the whole base that rank 0 loads and sends (one copy on
    the first node, whatever the number of processes), and with distributed.cpu_offload the node's
    shards of the weights and training state; on the CPU, training itself (peak_gib per process).
    processes: how many run on each node."""
    bits = weight_bits(q)
    whole = memory.estimate_memory(config, weight_bits=bits, trainable_params=lora.trainable_params, optim=cfg.optim,
                                   tokens=1, gradient_checkpointing=False, offload=False, fused_ce=True, causal=False)
    parts = {"processes": PROCESS_HOST_GIB[dev.type] * processes}
    if strategy == "fsdp" and q.mode != "8bit":
        parts["base"] = whole["weights"] / memory.GIB
    if strategy == "fsdp" and launch.cpu_offload and dev.type == "cuda":
        parts["offloaded"] = (whole["weights"] + whole["training_state"]) / memory.GIB / launch.nnodes
    if dev.type == "cpu" and peak_gib is not None:
        parts["training"] = peak_gib * processes
    return {k: round(v, 2) for k, v in parts.items()}


def host_memory_bytes() -> int:
    """This machine's memory, or its container's limit where that is lower (cgroup v2 memory.max)."""
    import os

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def check_host_memory(config, cfg: TrainSection, q: QuantizationSection, lora: LoraPlan, launch: DistributedSection,
                      processes: int, strategy: str, dev, peak_gib: float | None = None) -> float:
    """The host memory per node this plan needs (GiB); a plan the machine cannot hold is refused,
    naming the field that decides the largest part."""
    parts = host_memory_per_node(config, cfg, q, lora, launch, processes, strategy, dev, peak_gib)
    need, have = sum(parts.values()), host_memory_bytes() / memory.GIB
    if need > have:
        largest = max(parts, key=parts.get)
        field = {"offloaded": "distributed.cpu_offload", "base": "model.name_or_path"}.get(largest, "distributed.nproc_per_node")
        shown = ", ".join(f"{k} {v:g} GiB" for k, v in parts.items())
        raise RecipeError(f"this plan needs about {need:.1f} GiB of host memory per node ({shown}); this machine has "
                          f"{have:.1f} GiB", field,
                          hint="fewer processes per node, distributed.cpu_offload: false, or a machine with more memory")
    return round(need, 2)


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
    bits = weight_bits(q)
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
