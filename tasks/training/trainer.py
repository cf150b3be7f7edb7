"""The training run, as torchtune's recipes read: setup (data, model, optimizer), resume, the loop,
save. Prefect-free: the train stage runs it in its own process, or torchrun runs it in every worker
(`python -m qlora.tasks.training.trainer SPEC.json`), where each rank trains on its share of every optimizer step's
rows and rank 0 alone logs, checkpoints and saves. Checkpoints hold the adapter, optimizer, schedule,
RNG and the step: the same on any number of processes, so a run resumes on 1 GPU or on 8.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict

from qlora.runtime import signals
from qlora.runtime.progress import bar as progress_bar
from qlora.tasks.batches import (batch_order, collate, collate_lm, collate_pairs, collate_unpaired, lengths_of, pack,
                                 pad_token_id, unit_lengths, width_multiple)
from qlora.tasks.inference import accuracy, completion_scores, lm_loss, predict_logits
from qlora.tasks.measure import training_state_bytes
from qlora.tasks.recipe import LoraSection, PreferenceSection, QuantizationSection, RecipeError, TrainSection
from qlora.tasks.results import LoraPlan, Quantized, ReferenceScores, StartingAdapter, Tokenized, Trained
from qlora.tasks.tracking import Tracker
from qlora.tasks.training import checkpoint, distributed, fsdp, kernels, loading, memory, plan
from qlora.tasks.training import optimizer as optimizers
from qlora.tasks.training import preference as preferences
from qlora.tasks.training import step as steps
from qlora.tasks.training.collection import StepCollection
from qlora.tasks.training.distributed import World
from qlora.tasks.training.lora import (MUTATES_BASE, checkpoint_some_layers, draw_adapter_weights,
                                       load_adapter_weights, model_for_training)

# torch is imported where it is used: a cached run never needs it.


class TrainingSpec(BaseModel):
    """Everything a training run needs, as the train stage gives it: the upstream stages' results
    and the recipe's sections (JSON on disk for torchrun's workers)."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    tokenized: Tokenized
    quantized: Quantized
    lora: LoraPlan
    lora_cfg: LoraSection
    q: QuantizationSection
    cfg: TrainSection
    packing: bool = False
    max_length: Optional[int] = None
    pad_to_max_length: bool = False
    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    """Where training logs live; None in a spec on disk when the URI carries credentials (the
    workers take it from their environment)."""
    strategy: str = "auto"
    cpu_offload: bool = False
    preference: Optional[PreferenceSection] = None
    """Preference tuning (None: supervised): the loss, and the rows are pairs or KTO's rows."""
    reference: Optional[ReferenceScores] = None
    """The reference model's log-probabilities of every row (losses that have a reference)."""
    start: Optional[StartingAdapter] = None
    """An adapter another run trained: training starts from its weights, not from new ones."""
# What the loop logs per step (MLflow metric names).
TRAINING_METRICS = ["train_loss", "learning_rate", "epoch", "samples_per_s", "tokens_per_s", "grad_norm",
                    "eval_loss", "eval_accuracy", "eval_preference_accuracy", "eval_reward_margin",
                    "eval_logp_accuracy"]


def choose_fast_paths(cfg: TrainSection, config, dev) -> dict:
    """Which kernels this run uses (each decided by tasks.training.kernels); a kernel the recipe
    requires and the machine lacks is a recipe error naming its field."""
    try:
        return {"liger": kernels.use_liger(cfg.kernels, config, dev, cfg.require_fast_paths),
                "attention": kernels.attention_implementation(cfg.attention, dev, cfg.require_fast_paths),
                "compiled": kernels.use_compile(cfg.compile, dev, cfg.require_fast_paths)}
    except kernels.KernelUnavailable as e:
        raise RecipeError(e.reason, e.field, hint="set train.require_fast_paths: false to fall back instead") from None


@dataclass
class Progress:
    """Where a run stands; saved with each checkpoint, so a resumed run continues its counts."""
    step: int = 0
    elapsed_s: float = 0.0  # training time only: validation and checkpoints are counted apart
    samples: int = 0
    tokens: int = 0


class TrainingRun:
    """One training run's state: its data, model, optimizer and progress, and the steps of the stage
    as methods (setup_model, resume, loop, save), so no closure shares mutable state."""

    def __init__(self, spec: TrainingSpec, tracker: Tracker, scratch: Path, world: World = World()):
        from datasets import load_from_disk
        from transformers import AutoTokenizer

        self.quantized, self.lora, self.lora_cfg, self.q = spec.quantized, spec.lora, spec.lora_cfg, spec.q
        self.cfg = cfg = spec.cfg
        packing, max_length = spec.packing, spec.max_length
        self.scratch, self.dev, self.world = scratch, loading.device(), world
        self.tracker = tracker if world.main else Tracker(None, None)  # rank 0 alone talks to MLflow
        self.label_names = spec.tokenized.label_names
        data = load_from_disk(str(spec.tokenized.dataset_dir))
        self.train_ds, self.val_ds = data["train"], data["validation"]
        self.pad_id = pad_token_id(AutoTokenizer.from_pretrained(self.quantized.original_path))
        self.causal = self.quantized.task == loading.CAUSAL
        self.preference, self.start = spec.preference, spec.start
        self.reference = spec.reference.by_split() if spec.reference is not None else None
        self.width = max_length if spec.pad_to_max_length else None
        # Units of data: examples, or (packing) rows of several examples each.
        lengths = lengths_of(self.train_ds)
        self.units = pack(lengths, max_length, cfg.seed) if packing else [[i] for i in range(len(self.train_ds))]
        self.unit_lengths = unit_lengths(lengths, self.units) if packing else lengths
        # An optimizer step takes examples_per_step units whatever the micro-batch: the data of each
        # step, and so the result, do not depend on the memory plan.
        self.examples_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        self.per_epoch = math.ceil(len(self.units) / self.examples_per_step)
        self.total = training_steps(self.per_epoch, cfg)
        self.packing, self.progress, self.plan = packing, Progress(), {}
        self.strategy, self.cpu_offload = "none", False  # run_training sets them (distributed.strategy)
        self.load_host_bytes: list[int] = []  # per rank: host memory the model's set-up took at its peak
        self.load_node_bytes = self.load_mapped_bytes = 0  # the first node's processes (measure.NodeMemory)
        self.history = scratch / "history.jsonl"

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def setup_model(self, fast: dict, scoped: contextlib.ExitStack, warn: Callable[[str], None] = print) -> None:
        """The base loaded with the chosen kernels, LoRA attached (or every weight trainable), sharded
        or wrapped for several processes, the optimizer and the learning-rate schedule; the fast paths
        taken are tagged on the MLflow run."""
        from transformers import get_scheduler

        cfg, plan = self.cfg, self.plan
        # Sharded, rank 0 alone loads the base, into CPU memory, and each GPU takes only its shards of
        # it: no GPU ever holds the whole model (a 4-bit 70B is 35 GiB), and a node one copy of it.
        # The other ranks build it on the meta device. Each rank loads it whole for an 8-bit base, and
        # for DoRA, whose layers are initialised from their dequantized weights as peft attaches them.
        from_rank0 = self.sharded and self.q.mode != "8bit" and not (self.lora_cfg.enabled and self.lora_cfg.use_dora)
        weights_here = not from_rank0 or self.world.main
        if weights_here:
            base = loading.load_base(self.quantized, self.label_names, self.q, fast["attention"], on_cpu=self.sharded)
        else:
            base = loading.empty_base(self.quantized, self.label_names, self.q, fast["attention"])
        fast_paths = [f"attention:{base.config._attn_implementation}"]
        if fast["liger"]:
            layer_kernels = kernels.liger_layer_kernels(fast["compiled"])
            scoped.enter_context(kernels.liger_kernels(base, layer_kernels))
            fast_paths.append("liger:" + "+".join(["cross_entropy", *sorted(layer_kernels)]))
        model = model_for_training(base, self.lora, self.lora_cfg, self.quantized.quantized,
                                   plan["gradient_checkpointing"], initialise=weights_here)
        if plan.get("checkpointed_layers") is not None:  # the budget's plan: only as many as it needs
            checkpoint_some_layers(model, plan["checkpointed_layers"])
        if not weights_here:
            pass  # the adapter's start arrives from rank 0 with the base
        elif self.start is not None:
            load_adapter_weights(model, self.start.weights_dir)
        elif self.lora_cfg.enabled:
            self.initialise_adapter(model)
        if cfg.fused_lora and self.lora_cfg.enabled and self.lora_cfg.use_dora:
            reason = "train.fused_lora: DoRA layers have no fused form; they take peft's forward"
            if cfg.require_fast_paths:
                raise RecipeError(reason, "train.fused_lora", hint="set train.fused_lora: false for DoRA")
            warn(reason)
        elif cfg.fused_lora and self.lora_cfg.enabled:
            from qlora.tasks.training.fused_lora import fuse_lora_layers
            # Sharded, the 4-bit block scales stay nested: unnested, every GPU would hold all of them in float32.
            fast_paths.append(f"fused_lora:{fuse_lora_layers(model, unnest=not self.sharded)}")
        if fast["compiled"]:  # packed rows change width every step: dynamic shapes from the first
            fast_paths.append(f"compiled_layers:{kernels.compile_layers(model, self.packing or None, sharded=self.sharded)}")
        self.multiple_of = width_multiple(fast["compiled"])
        model.train()
        optim = cfg.optim
        if self.sharded:  # before the optimizer: it steps the shards
            fast_paths.append(f"fsdp:{self.world.size}x{fsdp.shard_model(model, self.world, self.dev, self.cpu_offload, from_rank0)}")
            if optim != "adamw_torch" and optim != "sgd":
                warn(f"train.optim: {optim} (bitsandbytes) cannot step FSDP's sharded weights; using adamw_torch, "
                     f"whose state is sharded too")
                optim = "adamw_torch"
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Flat gradients are views into one buffer: zeroed in place, never set to None.
        self.flat = optimizers.use_flat_optimizer(self.dev) and not self.sharded
        weights = optimizers.flatten_parameters(self.params) if self.flat else self.params
        self.optimizer = optimizers.build_optimizer(weights, optim, cfg.learning_rate, cfg.weight_decay)
        if self.flat:  # how many weights the flat tensor holds
            fast_paths.append(f"flat_optimizer:{len(self.params) + 1 - len(self.optimizer.param_groups[0]['params'])}")
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=math.ceil(cfg.warmup_ratio * self.total),
                                       num_training_steps=self.total)
        self.model, self.fast_paths = model, fast_paths
        if self.strategy == "ddp":
            fast_paths.append(f"ddp:{self.world.size}")
        self.tracker.set_tags({"train.fast_paths": ",".join(fast_paths),
                               **{f"train.memory_plan.{k}": v for k, v in plan.items()}})

    @property
    def initial_adapter(self) -> Path | None:
        """Where the adapter as initialised is kept, for an initialisation that replaced the base weights
        (PiSSA, OLoRA): the saved adapter is converted against it into an ordinary LoRA on the original base."""
        mutates = self.lora_cfg.enabled and self.start is None and self.lora_cfg.init in MUTATES_BASE
        return self.scratch / "initial-adapter" if mutates else None

    def initialise_adapter(self, model) -> None:
        """The adapter's start (lora.init): drawn from the run's seed, fitted to the 4-bit base's
        quantization error (loftq), or taken from the weights by peft (pissa, olora: kept for the save)."""
        init = self.lora_cfg.init
        if init == "loftq":
            from qlora.tasks.training.loftq import loftq_init

            loftq_init(model, self.quantized.original_path)
        elif self.initial_adapter is not None:
            if self.world.main:
                model.save_pretrained(self.initial_adapter)
        else:
            draw_adapter_weights(model, self.cfg.seed, init)

    def resume(self, warn: Callable[[str], None]) -> None:
        """Continue from the newest readable checkpoint, if any: weights, optimizer, schedule, RNG and
        progress restored; history past it dropped; metrics MLflow already has are not logged twice."""
        if self.sharded:  # rank 0 alone reads the trained weights and optimizer state, and sends them
            found = checkpoint.agreed_checkpoint(self.scratch, warn, self.world.rank, self.dev)
        else:
            found = checkpoint.newest_readable_checkpoint(self.scratch, warn)
        if found:
            saved = checkpoint.apply_checkpoint(found[1], self.model, self.optimizer, self.scheduler)
            self.progress = Progress(**saved)
            self.tracker.log_text(f"resumed from {found[0].name} at step {self.progress.step}")
        if self.history.exists() and self.world.main:
            kept = [line for line in self.history.read_text().splitlines()
                    if json.loads(line)["step"] <= self.progress.step]
            self.history.write_text("".join(line + "\n" for line in kept))
        self.resumed_at = self.progress.step
        self.tracker.skip_logged(TRAINING_METRICS)

    def loop(self, on_checkpoint: Callable[[int], None]) -> None:
        """The training loop: optimizer steps of examples_per_step units, accumulated over the
        plan's micro-batches; logging, validation and checkpoints at their intervals; a signal stops
        it at a step boundary with a checkpoint. Python's garbage is collected at step boundaries,
        every rank at the same steps (tasks/training/collection.py)."""
        with StepCollection() as collection:
            self._loop(on_checkpoint, collection)

    def _loop(self, on_checkpoint: Callable[[int], None], collection: StepCollection) -> None:
        import torch

        cfg, p = self.cfg, self.progress
        eval_every = cfg.eval_steps or self.per_epoch
        window_loss, window_n = 0.0, 0
        self.clock = Clock(p.elapsed_s)
        bar = progress_bar(self.total, "train", "step", initial=p.step, disable=not self.world.main)
        self.zero_grad()
        epoch = p.step // self.per_epoch
        while p.step < self.total:
            step_batches = batch_order(self.unit_lengths, self.examples_per_step, cfg.seed, epoch, cfg.group_by_length)
            for rows in step_batches[p.step - epoch * self.per_epoch:]:
                step_loss, step_tokens, stop = self.forward_backward(rows)
                if stop:
                    self.stop()
                window_loss, window_n = window_loss + step_loss, window_n + 1
                p.tokens += step_tokens
                p.samples += sum(len(self.units[u]) for u in rows)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm else None
                if hasattr(grad_norm, "full_tensor"):  # sharded weights: the norm over every shard
                    grad_norm = grad_norm.full_tensor()
                self.optimizer.step()
                self.scheduler.step()
                self.zero_grad()
                p.step += 1
                collection.collect(p.step)
                bar.update(1)
                if p.step % cfg.logging_steps == 0 or p.step == self.total:
                    elapsed = self.clock.seconds()
                    metrics = {"train_loss": window_loss / window_n, "learning_rate": self.scheduler.get_last_lr()[0],
                               "epoch": p.step / self.per_epoch, "samples_per_s": p.samples / elapsed,
                               "tokens_per_s": p.tokens / elapsed}
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
                    self.record(metrics)
                    bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
                    window_loss, window_n = 0.0, 0
                # Rank 0 validates and checkpoints, the others wait at the next step; sharded, every
                # rank takes part (each holds a part of every layer) and rank 0 records.
                with self.clock.paused():
                    if (p.step % eval_every == 0 or p.step == self.total) and (self.world.main or self.sharded):
                        self.record(self.validate())
                    if p.step % cfg.save_steps == 0 and p.step < self.total and (self.world.main or self.sharded):
                        self.checkpoint()
                        if self.world.main:
                            on_checkpoint(p.step)
                if p.step >= self.total:
                    break
                if signals.stop_requested() and not self.world.distributed:  # several ranks: agreed in the step
                    self.stop()
            epoch += 1
        bar.close()
        p.elapsed_s = self.clock.seconds()

    def forward_backward(self, rows: list[int]) -> tuple[float, int, bool]:
        """One optimizer step's gradient, accumulated over micro-batches, each weighted by its share of
        the step's targets (over every rank's rows): the gradient of the whole step, whatever the
        micro-batch and the number of processes. Returns the step's loss, its non-pad tokens and
        whether a signal asks every rank to stop here."""
        world, micro = self.world, self.plan["micro_batch"]
        mine = rows[world.rank::world.size]  # this rank's share of the step (all of it in one process)
        # A rank left without rows (a last step smaller than the world) runs one at zero weight: FSDP
        # needs every rank's backward, and every rank averages the same gradients.
        taken = mine or rows[:1]
        micro_batches = [self.batch(taken[i:i + micro]) for i in range(0, len(taken), micro)]
        local_targets = sum(mb["targets"] for mb in micro_batches) if mine else 0
        # Over all ranks, queued without a host sync (a tensor) under torchrun; a number in one process.
        step_targets = distributed.global_sum([local_targets], self.dev)
        step_targets = step_targets.clamp_min(1) if world.distributed else max(step_targets, 1)
        step_loss, step_tokens = 0.0, 0
        for i, mb in enumerate(micro_batches):
            if signals.stop_requested() and not world.distributed:
                self.stop()
            # Gradients are averaged over ranks: each rank's share is scaled up by the world size.
            targets, real_tokens = mb.pop("targets"), mb.pop("real_tokens")  # not model inputs
            share = (targets if mine else 0) * world.size / step_targets
            step_tokens += real_tokens if mine else 0
            sync = i == len(micro_batches) - 1 or not world.distributed
            with distributed.gradients_synced(self.model, sync):  # sharded: reduced over the ranks once per step
                loss = steps.forward_backward(self.model, mb, self.dev, self.q.bnb_4bit_compute_dtype,
                                              self.plan["offload_activations"], share, self.loss_of)
            step_loss = step_loss + loss * share / world.size
        if world.distributed and not self.sharded:
            distributed.average_gradients(self.optimizer, world.size)
        stop = signals.stop_requested()
        if world.distributed:  # the step's loss and tokens over all ranks, and one decision to stop
            step_loss, step_tokens, stops = distributed.all_reduce_sum([float(step_loss), step_tokens, stop], self.dev)
            step_tokens, stop = int(step_tokens), stops > 0
        step_loss = float(step_loss)
        if not math.isfinite(step_loss):
            raise RecipeError(f"the training loss is {step_loss} at step {self.progress.step + 1}: training "
                              f"diverged, nothing is saved or registered", "train.learning_rate",
                              hint="lower the learning rate, or set train.max_grad_norm")
        return step_loss, step_tokens, stop

    def loss_of(self, model, batch: dict):
        """A micro-batch's loss: the model's own (supervised), or the preference loss."""
        if self.preference is None:
            return model(**batch).loss
        return preferences.batch_loss(model, batch, self.preference, chunked=not self.sharded)[0]

    def reference_of(self, split: str, rows: list[int]) -> dict | None:
        """The reference's log-probabilities of these rows, as the collators take them."""
        if self.reference is None:
            return None
        names = ("chosen", "rejected") if self.preference.paired else ("logps", "kl")
        return {name: self.reference[split][name][rows] for name in names}

    def batch(self, unit_ids: list[int]) -> dict:
        if self.preference is not None:
            rows = [self.units[u][0] for u in unit_ids]
            collate_rows = collate_pairs if self.preference.paired else collate_unpaired
            return collate_rows([self.train_ds[i] for i in rows], self.pad_id, self.dev, self.multiple_of,
                                self.reference_of("train", rows))
        if self.causal:
            return collate_lm([[self.train_ds[i] for i in self.units[u]] for u in unit_ids], self.pad_id, self.dev,
                              self.width, self.multiple_of)
        batch = collate([self.train_ds[self.units[u][0]] for u in unit_ids], self.pad_id, self.dev, self.multiple_of)
        batch["real_tokens"] = int(batch["attention_mask"].sum())
        batch["targets"] = len(unit_ids)
        return batch

    def validate(self) -> dict:
        size = self.cfg.per_device_eval_batch_size
        if self.preference is not None:
            scores = completion_scores(self.model, self.val_ds, size, self.pad_id, self.dev, self.multiple_of,
                                       chunked=not self.sharded)
            figures = preferences.preference_metrics(self.preference, scores,
                                                     self.reference["validation"] if self.reference else None)
            return {"eval_loss": figures["loss"], **{f"eval_{k}": figures[k] for k in
                                                     ("preference_accuracy", "reward_margin", "logp_accuracy")
                                                     if k in figures}}
        if self.causal:
            return {"eval_loss": lm_loss(self.model, self.val_ds, size, self.pad_id, self.dev, self.multiple_of)}
        logits, loss = predict_logits(self.model, self.val_ds, size, self.pad_id, self.dev, self.multiple_of)
        return {"eval_loss": loss, "eval_accuracy": accuracy(logits, self.val_ds["labels"])}

    def record(self, metrics: dict) -> None:
        if not self.world.main:
            return
        if self.world.distributed:  # the agent passes rank 0's output on to the Prefect log
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"step {self.progress.step}/{self.total}: {shown}", flush=True)
        with self.history.open("a") as f:
            f.write(json.dumps({"step": self.progress.step, **metrics}) + "\n")
        self.tracker.log_metrics(metrics, self.progress.step)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=not self.flat)

    def checkpoint(self) -> None:
        """Rank 0 writes it; sharded, every rank first sends its shards (a collective)."""
        step = self.progress.step
        exists = (self.scratch / f"checkpoint-{step:07d}").exists()
        if not (self.world.main or self.sharded) or (exists and not self.sharded):
            return
        weights, optimizer_state = checkpoint.training_state(self.model, self.optimizer)
        if self.world.main and not exists:
            saved = asdict(self.progress) | {"elapsed_s": self.clock.seconds()}
            checkpoint.save_checkpoint(self.scratch, step, weights, optimizer_state, self.scheduler, saved,
                                       self.cfg.save_total_limit)

    def stop(self) -> None:
        """SIGTERM/SIGINT: the step in flight is dropped; the last finished one is checkpointed."""
        self.zero_grad()
        if self.progress.step > self.resumed_at:
            self.checkpoint()
        self.tracker.log_text(f"stopped by {signals.received_signal()} at step {self.progress.step}; rerun to resume")
        raise signals.Interrupted(signals.received_signal())

    def out_of_memory(self, free_at_start: int | None) -> memory.OutOfMemory:
        """After CUDA ran out of memory: the last finished step checkpointed, and the error that says
        where it happened, what was kept and what to set."""
        import torch

        step = self.progress.step
        self.zero_grad()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if step > 0 and not self.sharded:  # sharded, the others are not here to send their shards
            self.checkpoint()
        peak = torch.cuda.max_memory_allocated() / memory.GIB if torch.cuda.is_available() else 0.0
        return memory.OutOfMemory.at_step(step, self.plan, peak, (free_at_start or 0) / memory.GIB, self.cfg.max_memory_gib,
                                  resumable=step > 0 and not self.sharded)

    def save(self, out: Path, peak_bytes: int) -> Trained | None:
        """LoRA: the adapter (small, needs the base); full fine-tuning: the whole model. And the
        stage's result: counts, speed, memory and the plan. Rank 0 writes (the others return None);
        sharded, every rank first sends its shards of the trained weights."""
        weights = fsdp.full_trainable_weights(self.model) if self.sharded else None
        if not self.world.main:
            return None
        p = self.progress
        artifact = "adapter" if self.lora_cfg.enabled else "model"
        options = {"state_dict": weights} if weights is not None else {}
        if self.initial_adapter is not None:  # an ordinary LoRA of the original base (rank 2r), not of the residual
            options["path_initial_model_for_weight_conversion"] = str(self.initial_adapter)
        self.model.save_pretrained(out / artifact, **options)
        if self.initial_adapter is not None:
            keep_trained_modules(self.model, out / artifact)
        loading.copy_tokenizer(self.quantized.original_path, out / artifact)
        shutil.copy2(self.history, out / "history.jsonl")
        history = [json.loads(line) for line in self.history.read_text().splitlines()]
        train_losses = [h["train_loss"] for h in history if "train_loss" in h]
        return Trained(**{
            artifact: artifact, "history": "history.jsonl", "steps": p.step, "resumed_from_step": self.resumed_at,
            "train_runtime_s": round(p.elapsed_s, 3), "train_samples": p.samples, "train_tokens": p.tokens,
            "samples_per_s": round(p.samples / p.elapsed_s, 3), "tokens_per_s": round(p.tokens / p.elapsed_s, 3),
            "peak_memory_bytes": peak_bytes, "device": str(self.dev), "processes": self.world.size,
            "distributed": self.strategy,  # none, ddp or fsdp
            "load_host_bytes": self.load_host_bytes, "load_node_bytes": self.load_node_bytes,
            "load_mapped_bytes": self.load_mapped_bytes,
            **training_state_bytes(self.model, self.optimizer),
            "final_train_loss": train_losses[-1] if train_losses else None,
            "trainable_params": self.lora.trainable_params, "trainable_percent": self.lora.trainable_percent,
            "label_names": self.label_names, "fast_paths": self.fast_paths, "memory_plan": self.plan,
        })


def keep_trained_modules(model, directory: Path) -> None:
    """peft's conversion of a PiSSA/OLoRA adapter writes the LoRA weights only: the fully trained modules
    (a classifier's head, modules_to_save) are put back beside them from the model's own state."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    file = directory / "adapter_model.safetensors"
    saved = load_file(str(file))
    missing = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
               if "lora_" not in k and k not in saved}
    if missing:
        save_file({**saved, **missing}, str(file), metadata={"format": "pt"})


class Clock:
    """Training time: wall time since start, less the time spent in `paused()` blocks, plus what an
    interrupted run had already counted."""

    def __init__(self, already: float = 0.0):
        self.already, self.started, self.pauses, self.pause_start = already, time.perf_counter(), 0.0, None

    def seconds(self) -> float:
        now = time.perf_counter()
        ongoing = now - self.pause_start if self.pause_start is not None else 0.0
        return self.already + now - self.started - self.pauses - ongoing

    @contextlib.contextmanager
    def paused(self):
        self.pause_start = time.perf_counter()
        try:
            yield
        finally:
            self.pauses += time.perf_counter() - self.pause_start
            self.pause_start = None


def set_seed(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_steps(steps_per_epoch: int, cfg: TrainSection) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(steps_per_epoch * cfg.num_train_epochs))


def run_training(spec: TrainingSpec, out: Path, scratch: Path, world: World = World(),
                 on_checkpoint: Callable[[int], None] | None = None, warn: Callable[[str], None] = print) -> Trained | None:
    """One training run from its spec (the train stage's inputs, as JSON-able values): in the stage's
    own process, or in each torchrun worker. Returns rank 0's result (None on the other ranks)."""
    import torch
    from transformers import AutoConfig

    from qlora.tasks.measure import NodeMemory, PeakMemory

    q, cfg, lora_cfg, lora, max_length = spec.q, spec.cfg, spec.lora_cfg, spec.lora, spec.max_length
    run = TrainingRun(spec, Tracker(spec.tracking_uri, spec.run_id, background=True), scratch, world)
    config = AutoConfig.from_pretrained(spec.quantized.model_path)
    fast = choose_fast_paths(cfg, config, run.dev)
    dropout = lora_cfg.drops_inputs
    sequences = preferences.rows_per_example(spec.preference)
    fused_ce = plan.fused_loss(fast["liger"], spec.preference)
    run.strategy = plan.training_strategy(spec.strategy, world, config, cfg, q, lora, max_length,
                                          run.causal, fused_ce, run.dev, dropout, sequences=sequences)
    run.cpu_offload = spec.cpu_offload
    run.plan = plan.memory_plan(config, cfg, q, lora, max_length, run.causal, fused_ce, run.dev, world.size,
                                sharded=run.sharded, dropout=dropout, sequences=sequences)
    free_at_start = torch.cuda.mem_get_info(run.dev)[0] if run.dev.type == "cuda" else None

    set_seed(cfg.seed)  # before loading: the LoRA weights are initialised under the seed, alike on every rank
    # PeakMemory: this run's own peak, not the process's high-water mark; scoped: what the run
    # patches (Liger's kernels) is undone when it ends.
    with PeakMemory(run.dev) as peak, contextlib.ExitStack() as scoped:
        loading.import_model_code(spec.quantized.task, config)  # imported before the load is measured
        # Host memory of the load: each process's peak, and (sampled by the node's first process) the
        # node's processes together, whose peak is what the machine must hold.
        pids = distributed.per_rank(os.getpid(), world, run.dev)[world.rank - world.local_rank:][:world.local_size]
        with PeakMemory(torch.device("cpu")) as host, NodeMemory(pids if world.local_rank == 0 else []) as node:
            run.setup_model(fast, scoped, warn)
        run.load_host_bytes = distributed.per_rank(host.peak, world, run.dev)
        run.load_node_bytes, run.load_mapped_bytes = node.own, node.mapped
        run.resume(warn)
        if world.rank > 0:  # dropout masks of their own on the other ranks
            torch.manual_seed(cfg.seed + 1_000_003 * world.rank + run.progress.step)
        scoped.enter_context(signals.deferred())  # a signal now waits for a step boundary
        signals.raise_if_requested()
        try:
            run.loop(on_checkpoint or (lambda step: None))
        except torch.OutOfMemoryError as e:
            traceback.clear_frames(e.__traceback__)  # the failed step's tensors go before the checkpoint
            raise run.out_of_memory(free_at_start) from None
        finally:
            run.tracker.flush()  # the step metrics MLflow writes in the background
    return run.save(out, peak.peak)


# --- a torchrun worker ---------------------------------------------------------------------------
# The train stage writes the spec, starts torchrun, and reads back what rank 0 wrote: the result, or
# the error of whichever rank failed (as JSON: a user's mistake or an out-of-memory is one line there
# too, never a traceback).

RESULT_FILE, ERROR_FILE, STARTED_FILE = "worker-result.json", "worker-error-{rank}.json", "worker-started"


def worker_main(spec_path: str) -> int:
    signals.install()  # SIGTERM from the agent: checkpoint at the step boundary, then exit
    on_disk = json.loads(Path(spec_path).read_text())
    scratch, out = Path(on_disk.pop("scratch")), Path(on_disk.pop("out"))
    spec = TrainingSpec.model_validate(on_disk)
    # A URI with credentials comes from the launching node's environment, never from the spec on disk.
    spec = spec.model_copy(update={"tracking_uri": os.environ.get("QLORA_WORKER_TRACKING_URI") or spec.tracking_uri})
    world = distributed.init_from_env()  # after the rendezvous: every node is there
    (scratch / ERROR_FILE.format(rank=world.rank)).unlink(missing_ok=True)  # a restarted attempt's own
    if world.main:
        (scratch / STARTED_FILE).touch()
    failed = True
    try:
        result = run_training(spec, out, scratch, world, warn=lambda text: print(text, file=sys.stderr, flush=True))
        if world.main:
            (scratch / RESULT_FILE).write_text(result.model_dump_json())
        failed = False
        return 0
    except (RecipeError, memory.OutOfMemory) as e:
        kind = "out_of_memory" if isinstance(e, memory.OutOfMemory) else "recipe"
        details = {"kind": kind, "message": getattr(e, "message", str(e)), "field": getattr(e, "field", None),
                   "hint": getattr(e, "hint", None), "rank": world.rank}
        (scratch / ERROR_FILE.format(rank=world.rank)).write_text(json.dumps(details))
        return 1
    except KeyboardInterrupt:
        return signals.exit_code()
    except Exception:  # a defect, not the user's: its traceback goes to the stage's error
        details = {"kind": "crash", "message": traceback.format_exc()[-4000:], "field": None, "hint": None,
                   "rank": world.rank}
        (scratch / ERROR_FILE.format(rank=world.rank)).write_text(json.dumps(details))
        raise
    finally:
        distributed.shutdown(failed)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
