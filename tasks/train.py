"""Train: the quantized base loaded, LoRA attached, a plain training loop with resumable checkpoints.

One process holds the model from load to save; what leaves the stage is the adapter directory.
Checkpoints (adapter, optimizer, scheduler, RNG, step) go to `<work_dir>/train/<key>.partial/` and
survive a crash: the same command resumes from the newest one, with the same data order.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks import model as models
from tasks import signals, training
from tasks.progress import bar as progress_bar
from tasks.training import collate_lm, pack
from tasks.recipe import LoraSection, QuantizationSection, RecipeError, TrainSection
from tasks.stage import run_logger, stage

if TYPE_CHECKING:  # torch is imported where it is used: a cached run never needs it
    import torch
from tasks.tracking import Tracker

MEGABATCH = 50
# What the loop logs per step (MLflow metric names).
TRAINING_METRICS = ["train_loss", "learning_rate", "epoch", "samples_per_s", "tokens_per_s", "grad_norm",
                    "eval_loss", "eval_accuracy"]  # batches per length-sorted block: rows of similar length, order still random


def pad_token_id(tok) -> int:
    """Causal LMs often have no pad token: pad with end-of-sequence (padded positions are masked)."""
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return candidate


def set_seed(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The row indices of each batch of one epoch: a pure function of (seed, epoch), so a resumed
    run sees exactly the batches the interrupted one would have."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        block = batch_size * MEGABATCH
        order = np.concatenate([sorted(order[i:i + block], key=lambda j: -lengths[j])
                                for i in range(0, len(order), block)])
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if group_by_length:  # keep the longest batch first (a memory spike shows at once), shuffle the rest
        longest = max(range(len(batches)), key=lambda b: max(lengths[j] for j in batches[b]))
        batches.insert(0, batches.pop(longest))
        rest = batches[1:]
        rng.shuffle(rest)
        batches = batches[:1] + rest
    return batches


def lm_loss(model, dataset, batch_size: int, pad_id: int, dev, multiple_of: int = 1, desc: str | None = None) -> float:
    """Mean loss per target token over a dataset (what perplexity is the exponential of); a progress
    bar named desc when given."""
    import torch

    model.eval()
    lengths = dataset["length"]
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])
    total, count = 0.0, 0
    shown = progress_bar(len(order), desc, "row") if desc else None
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            if shown is not None:
                shown.update(len(order[start:start + batch_size]))
            batch = collate_lm([[dataset[i]] for i in order[start:start + batch_size]], pad_id, dev,
                               multiple_of=multiple_of)
            batch.pop("real_tokens")
            targets = batch.pop("targets")
            total += model(**batch).loss.float().item() * targets
            count += targets
    if shown is not None:
        shown.close()
    model.train()
    return total / max(count, 1)


def collate(rows: list[dict], pad_id: int, dev: torch.device, multiple_of: int = 1) -> dict:
    """Encoder batch, padded to the longest row rounded up to multiple_of (as collate_lm)."""
    import torch
    width = training.round_up(max(len(r["input_ids"]) for r in rows), multiple_of)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        mask[i, : r.get("length", n)] = 1  # rows padded at tokenization keep their pads masked
    labels = torch.tensor([r["labels"] for r in rows])
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}


def build_optimizer(params, cfg: TrainSection):
    import torch
    if cfg.optim == "adamw_torch":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optim == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[cfg.optim]
    return cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _release_free_memory() -> None:
    """Hand memory freed by earlier work back to the OS (glibc malloc_trim), so that resident memory
    measures what is live: two trainings in one process then measure alike."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measure is then an upper bound of reuse
        pass


class PeakMemory:
    """Peak resident memory above the starting level while the block runs (CPU: /proc sampled
    every 5 ms; CUDA: the allocator's peak)."""

    def __init__(self, dev):
        self.dev, self.peak = dev, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import torch
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.start = torch.cuda.memory_allocated(self.dev)
            return self
        _release_free_memory()  # else freed blocks kept by the allocator hide this block's own peak
        self.start, self._stop = self._rss(), threading.Event()
        self._high = self.start

        def sample():
            while not self._stop.wait(0.005):
                self._high = max(self._high, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch
        if self.dev.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.dev) - self.start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._high, self._rss()) - self.start




def _bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def weights_bytes(model) -> int:
    """A model's weights and buffers in memory (4-bit weights at their packed size)."""
    return sum(_bytes(t) for t in list(model.parameters()) + list(model.buffers()))


def training_state_bytes(model, optimizer) -> dict[str, int]:
    """What a method must hold besides activations, counted exactly: the model's weights, the
    gradients of the trainable ones, the optimizer's state."""
    import torch

    trainable = sum(_bytes(p) for p in model.parameters() if p.requires_grad)  # one gradient each
    state = sum(_bytes(v) for per_param in optimizer.state.values() for v in per_param.values()
                if isinstance(v, torch.Tensor))
    return {"weights_bytes": weights_bytes(model), "gradient_bytes": trainable, "optimizer_state_bytes": state}


def memory_plan(config, cfg: TrainSection, q: QuantizationSection, lora: dict, max_length: int | None, causal: bool,
                fused_ce: bool, dev) -> dict:
    """Micro-batch, accumulation, checkpointing and offload for this run: the recipe's own, or, with
    train.max_memory_gib, the fastest that fits the budget (checked before the model is loaded)."""
    recipe_plan = {"micro_batch": cfg.per_device_train_batch_size, "accumulation": cfg.gradient_accumulation_steps,
                   "gradient_checkpointing": cfg.gradient_checkpointing, "offload_activations": cfg.offload_activations}
    if cfg.max_memory_gib is None:
        return recipe_plan
    bits = {"4bit": 4, "8bit": 8}.get(q.mode, 32 if q.bnb_4bit_compute_dtype == "float32" else 16)
    seq = max_length or getattr(config, "max_position_embeddings", 512)

    def estimate(micro: int, gc: bool, offload: bool) -> int:
        return training.estimate_memory(config, weight_bits=bits, trainable_params=lora["trainable_params"],
                                        optim=cfg.optim, tokens=micro * seq, gradient_checkpointing=gc,
                                        offload=offload, fused_ce=fused_ce, causal=causal)["peak"]
    try:
        return training.plan_memory(cfg.max_memory_gib, cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
                                    estimate, allow_offload=dev.type == "cuda")
    except ValueError as e:
        raise RecipeError(str(e), "train.max_memory_gib",
                          hint="raise the budget, shorten tokenize.max_length, or use a paged 8-bit optimizer") from None


def check_memory_budget(model_path: str, cfg: TrainSection, q: QuantizationSection, lora: dict,
                        max_length: int | None, causal: bool, trust_remote_code: bool = False) -> dict | None:
    """train.max_memory_gib checked from the model's config before anything is loaded: a budget too
    small for even micro-batch 1 fails here, with the estimate. The plan itself is made in the stage."""
    if cfg.max_memory_gib is None:
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    dev = models.device()
    with warnings.catch_warnings():  # the stage warns of a kernel the machine lacks; here only the estimate counts
        warnings.simplefilter("ignore")
        liger = training.use_liger(cfg.kernels, config, dev)  # as the stage decides: train.kernels none, no fused loss
    return memory_plan(config, cfg, q, lora, max_length, causal, liger, dev)


def out_of_memory(step: int, plan: dict, cfg: TrainSection, free_at_start: int | None, resumable: bool) -> RecipeError:
    """The message for a CUDA out-of-memory error: where it happened, what was kept, what to set."""
    import torch

    peak = torch.cuda.max_memory_allocated() / training.GIB if torch.cuda.is_available() else 0.0
    free = (free_at_start or 0) / training.GIB
    suggested = round(min(0.9 * free, peak * 0.8) if cfg.max_memory_gib is None else 0.8 * cfg.max_memory_gib, 1)
    kept = (f"the checkpoint at step {step} is kept; rerun to resume from it" if resumable
            else "no step had completed, nothing to keep")
    return RecipeError(
        f"CUDA ran out of memory in step {step + 1} (micro-batch {plan['micro_batch']}, checkpointing "
        f"{plan['gradient_checkpointing']}, offload {plan['offload_activations']}; peak {peak:.1f} GiB, "
        f"{free:.1f} GiB were free at the start); {kept}", "train.max_memory_gib",
        hint=f"set train.max_memory_gib: {max(suggested, 1.0)} (the train stage then picks a micro-batch and "
             f"checkpointing that fit), or free the GPU of other processes")


def on_checkpoint(step: int) -> None:
    """Called after each checkpoint is saved. Tests replace it to interrupt a run."""


def predict(model, dataset, batch_size: int, pad_id: int, dev: torch.device,
            multiple_of: int = 1, desc: str | None = None) -> tuple[np.ndarray, float]:
    """Logits for every row (in dataset order) and the mean loss; rows sorted by length for speed;
    a progress bar named desc when given."""
    import torch

    with torch.no_grad():
        return _predict(model, dataset, batch_size, pad_id, dev, multiple_of, desc)


def _predict(model, dataset, batch_size: int, pad_id: int, dev, multiple_of: int,
             desc: str | None = None) -> tuple[np.ndarray, float]:
    model.eval()
    lengths = dataset["length"]
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])
    logits = [None] * len(dataset)
    loss_sum = 0.0
    shown = progress_bar(len(order), desc, "row") if desc else None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if shown is not None:
            shown.update(len(idx))
        batch = collate([dataset[i] for i in idx], pad_id, dev, multiple_of)
        out = model(**batch)
        loss_sum += out.loss.float().item() * len(idx)
        for i, row in zip(idx, out.logits.float().cpu().numpy()):
            logits[i] = row
    if shown is not None:
        shown.close()
    model.train()
    return np.stack(logits), loss_sum / max(len(dataset), 1)


def trainable_state(model) -> dict:
    """What a checkpoint must hold: the adapter (and head) for LoRA, every weight for full fine-tuning."""
    from peft import PeftModel, get_peft_model_state_dict

    return get_peft_model_state_dict(model) if isinstance(model, PeftModel) else model.state_dict()


def _save_checkpoint(scratch: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> None:
    import torch
    from safetensors.torch import save_file

    final = scratch / f"checkpoint-{step:07d}"
    tmp = scratch / f".tmp-checkpoint-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Copies: on the CPU .cpu() would hand back views of the one flat buffer (flatten_parameters).
    weights = {k: v.detach().to("cpu", copy=True) for k, v in trainable_state(model).items()}
    save_file(weights, tmp / "adapter.safetensors")
    # Only tensors and plain containers in state.pt (loaded with weights_only=True: nothing in a
    # checkpoint is executed); the NumPy and Python RNG states as JSON.
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng_torch": torch.get_rng_state(), "rng_cuda": cuda_rng}, tmp / "state.pt")
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    (tmp / "rng.json").write_text(json.dumps({
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next]}))
    (tmp / "progress.json").write_text(json.dumps(state))
    os.replace(tmp, final)
    for old in sorted(scratch.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _read_checkpoint(path: Path) -> dict:
    """Every file of a checkpoint, read before any is applied: an unreadable one changes nothing."""
    import torch
    from safetensors.torch import load_file

    return {"weights": load_file(path / "adapter.safetensors"),
            "state": torch.load(path / "state.pt", weights_only=True),
            "rng": json.loads((path / "rng.json").read_text()),
            "progress": json.loads((path / "progress.json").read_text())}


def _apply_checkpoint(checkpoint: dict, model, optimizer, scheduler) -> dict:
    import torch
    from peft import PeftModel, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, checkpoint["weights"])
    else:
        model.load_state_dict(checkpoint["weights"])
    state = checkpoint["state"]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    kind, keys, pos, has_gauss, gauss = checkpoint["rng"]["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = checkpoint["rng"]["python"]
    random.setstate((version, tuple(internal), gauss_next))
    return checkpoint["progress"]


def newest_readable_checkpoint(scratch: Path, log) -> tuple[Path, dict] | None:
    """The newest checkpoint that reads back; a damaged or planted one (unreadable, or holding
    anything but tensors and plain data) is reported and removed, and the one before it tried."""
    for path in sorted(scratch.glob("checkpoint-*"), reverse=True):
        try:
            return path, _read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any failure to read means: do not trust it
            log(f"checkpoint {path} cannot be used ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                f"removed, resuming from an earlier one")
            shutil.rmtree(path, ignore_errors=True)
    return None


def training_steps(steps_per_epoch: int, cfg: TrainSection) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(steps_per_epoch * cfg.num_train_epochs))


def _accuracy(logits: np.ndarray, labels) -> float:
    return float((logits.argmax(-1) == np.asarray(labels)).mean())


@stage("train", ignore=("run_id", "tracking_uri"))
def train(out: Path, tokenized: dict, quantized: dict, lora: dict, lora_cfg: LoraSection,
          q: QuantizationSection, cfg: TrainSection, packing: bool = False, max_length: int | None = None,
          pad_to_max_length: bool = False,
          run_id: str | None = None, tracking_uri: str | None = None, *, scratch: Path) -> dict:
    import torch
    from datasets import load_from_disk
    from transformers import AutoConfig, AutoTokenizer, get_scheduler

    tracker = Tracker(tracking_uri, run_id)
    dev = models.device()
    label_names = tokenized["label_names"]
    data = load_from_disk(str(Path(tokenized["dir"]) / "dataset"))
    train_ds, val_ds = data["train"], data["validation"]
    tok = AutoTokenizer.from_pretrained(quantized["original_path"])
    pad_id = pad_token_id(tok)

    causal = quantized["task"] == models.CAUSAL
    examples_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    config = AutoConfig.from_pretrained(models.quantized_path(quantized))
    try:
        liger = training.use_liger(cfg.kernels, config, dev, cfg.require_fast_paths)
        attention = training.attention_implementation(cfg.attention, dev, cfg.require_fast_paths)
        compiled = training.use_compile(cfg.compile, dev, cfg.require_fast_paths)
    except RuntimeError as e:
        field, message = str(e).split(": ", 1)
        raise RecipeError(message, field, hint="set train.require_fast_paths: false to fall back instead") from None
    plan = memory_plan(config, cfg, q, lora, max_length, causal, liger, dev)
    micro_size = plan["micro_batch"]
    free_at_start = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None

    set_seed(cfg.seed)  # before loading: the LoRA weights are initialised under the seed
    # PeakMemory: this stage's own peak, not the process's high-water mark; scoped: what the stage
    # patches (Liger's kernels) is undone when it ends.
    with PeakMemory(dev) as memory, contextlib.ExitStack() as scoped:
        base = models.load_base(quantized, label_names, q, attention)
        fast_paths = [f"attention:{base.config._attn_implementation}"]
        if liger:
            kernels = training.liger_layer_kernels(compiled)
            scoped.enter_context(training.liger_kernels(base, kernels))
            fast_paths.append("liger:" + "+".join(["cross_entropy", *sorted(kernels)]))
        model = models.model_for_training(base, lora, lora_cfg, quantized["quantized"], plan["gradient_checkpointing"])
        if cfg.fused_lora and lora_cfg.enabled:
            fast_paths.append(f"fused_lora:{training.fuse_lora_layers(model)}")
        if compiled:  # packed rows change width every step: dynamic shapes from the first
            fast_paths.append(f"compiled_layers:{training.compile_layers(model, dynamic=packing or None)}")
        multiple_of = training.width_multiple(compiled)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # Flat gradients are views into one buffer: zeroed in place, never set to None.
        flat = training.use_flat_optimizer(dev)
        optimizer = build_optimizer(training.flatten_parameters(params) if flat else params, cfg)
        if flat:
            fast_paths.append(f"flat_optimizer:{len(params) + 1 - len(optimizer.param_groups[0]['params'])}")  # weights in it
        tracker.set_tags({"train.fast_paths": ",".join(fast_paths), **{f"train.memory_plan.{k}": v for k, v in plan.items()}})

        # Units of data: examples, or (packing) rows of several examples each.
        units = pack(train_ds["length"], max_length, cfg.seed) if packing else [[i] for i in range(len(train_ds))]
        lengths = [sum(train_ds["length"][i] for i in u) for u in units] if packing else train_ds["length"]

        def make_batch(unit_ids: list[int]) -> dict:
            if causal:
                return collate_lm([[train_ds[i] for i in units[u]] for u in unit_ids], pad_id, dev,
                                  max_length if pad_to_max_length else None, multiple_of)
            batch = collate([train_ds[units[u][0]] for u in unit_ids], pad_id, dev, multiple_of)
            batch["real_tokens"] = int(batch["attention_mask"].sum())
            batch["targets"] = len(unit_ids)
            return batch

        def validate_now() -> dict:
            if causal:
                return {"eval_loss": lm_loss(model, val_ds, cfg.per_device_eval_batch_size, pad_id, dev, multiple_of)}
            logits, val_loss = predict(model, val_ds, cfg.per_device_eval_batch_size, pad_id, dev, multiple_of)
            return {"eval_loss": val_loss, "eval_accuracy": _accuracy(logits, val_ds["labels"])}

        # An optimizer step takes examples_per_step units whatever the micro-batch: the data of each
        # step, and so the result, do not depend on the memory plan.
        per_epoch = math.ceil(len(units) / examples_per_step)
        total = training_steps(per_epoch, cfg)
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total),
                                  num_training_steps=total)
        eval_every = cfg.eval_steps or per_epoch

        progress = {"step": 0, "elapsed_s": 0.0, "samples": 0, "tokens": 0}
        found = newest_readable_checkpoint(scratch, run_logger().warning)
        if found:
            progress = _apply_checkpoint(found[1], model, optimizer, scheduler)
            tracker.log_text(f"resumed from {found[0].name} at step {progress['step']}")
        history_path = scratch / "history.jsonl"
        if history_path.exists():  # drop records past the checkpoint we resume from
            kept = [line for line in history_path.read_text().splitlines() if json.loads(line)["step"] <= progress["step"]]
            history_path.write_text("".join(line + "\n" for line in kept))
        resumed_at = progress["step"]
        tracker.skip_logged(TRAINING_METRICS)

        def record(metrics: dict, step: int) -> None:
            with history_path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            tracker.log_metrics(metrics, step)

        step = progress["step"]
        window_loss, window_n, started = 0.0, 0, time.perf_counter()
        # Time spent validating and checkpointing is not training time: it is counted apart.
        paused = 0.0

        def training_seconds() -> float:
            return progress["elapsed_s"] + time.perf_counter() - started - paused

        def checkpoint_now() -> None:
            if (scratch / f"checkpoint-{step:07d}").exists():
                return
            _save_checkpoint(scratch, step, model, optimizer, scheduler,
                             {"step": step, "elapsed_s": training_seconds(), "samples": samples, "tokens": tokens},
                             cfg.save_total_limit)
        samples, tokens = progress["samples"], progress["tokens"]
        bar = progress_bar(total, "train", "step", initial=step)
        epoch = step // per_epoch

        def stop_here() -> None:
            """SIGTERM/SIGINT: the step in flight is dropped; the last finished one is checkpointed."""
            optimizer.zero_grad(set_to_none=not flat)
            if step > resumed_at:
                checkpoint_now()
            tracker.log_text(f"stopped by {signals.received_signal()} at step {step}; rerun to resume")
            raise signals.Interrupted(signals.received_signal())

        optimizer.zero_grad(set_to_none=not flat)
        scoped.enter_context(signals.deferred())  # a signal now waits for a step boundary
        signals.raise_if_requested()
        while step < total:
            step_batches = batch_order(lengths, examples_per_step, cfg.seed, epoch, cfg.group_by_length)
            for b in range(step - epoch * per_epoch, len(step_batches)):
                rows = step_batches[b]
                micro_batches = [make_batch(rows[i:i + micro_size]) for i in range(0, len(rows), micro_size)]
                step_targets = sum(mb["targets"] for mb in micro_batches)
                step_loss, step_tokens = 0.0, 0
                try:
                    for mb in micro_batches:
                        if signals.stop_requested():
                            stop_here()
                        share = mb.pop("targets") / max(step_targets, 1)
                        step_tokens += mb.pop("real_tokens")  # non-pad tokens only
                        loss = training.forward_backward(model, mb, dev, q.bnb_4bit_compute_dtype,
                                                         plan["offload_activations"], share)
                        step_loss = step_loss + loss * share
                except torch.OutOfMemoryError:
                    del micro_batches, mb
                    optimizer.zero_grad(set_to_none=not flat)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    if step > 0:
                        checkpoint_now()
                    raise out_of_memory(step, plan, cfg, free_at_start, resumable=step > 0) from None
                del micro_batches
                if not math.isfinite(float(step_loss)):
                    raise RecipeError(f"the training loss is {float(step_loss)} at step {step + 1}: training "
                                      f"diverged, nothing is saved or registered", "train.learning_rate",
                                      hint="lower the learning rate, or set train.max_grad_norm") from None
                window_loss += float(step_loss)
                window_n += 1
                tokens += step_tokens
                samples += sum(len(units[u]) for u in rows)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=not flat)
                step += 1
                bar.update(1)
                if step % cfg.logging_steps == 0 or step == total:
                    elapsed = training_seconds()
                    metrics = {"train_loss": window_loss / window_n, "learning_rate": scheduler.get_last_lr()[0],
                               "epoch": step / per_epoch, "samples_per_s": samples / elapsed,
                               "tokens_per_s": tokens / elapsed}
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
                    record(metrics, step)
                    bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
                    window_loss, window_n = 0.0, 0
                pause_start = time.perf_counter()
                if step % eval_every == 0 or step == total:
                    record(validate_now(), step)
                if step % cfg.save_steps == 0 and step < total:
                    paused += time.perf_counter() - pause_start
                    pause_start = time.perf_counter()
                    checkpoint_now()
                    on_checkpoint(step)
                paused += time.perf_counter() - pause_start
                if step >= total:
                    break
                if signals.stop_requested():
                    stop_here()
            epoch += 1
        bar.close()
        elapsed = training_seconds()

    # LoRA: the adapter (small, needs the base); full fine-tuning: the whole model.
    artifact = "adapter" if lora_cfg.enabled else "model"
    model.save_pretrained(out / artifact)
    models.copy_tokenizer(quantized["original_path"], out / artifact)
    shutil.copy2(history_path, out / "history.jsonl")
    history = [json.loads(line) for line in history_path.read_text().splitlines()]
    train_losses = [h["train_loss"] for h in history if "train_loss" in h]
    return {
        artifact: artifact, "history": "history.jsonl", "steps": step, "resumed_from_step": resumed_at,
        "train_runtime_s": round(elapsed, 3), "train_samples": samples, "train_tokens": tokens,
        "samples_per_s": round(samples / elapsed, 3), "tokens_per_s": round(tokens / elapsed, 3),
        "peak_memory_bytes": memory.peak, "device": str(dev), **training_state_bytes(model, optimizer),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "trainable_params": lora["trainable_params"], "trainable_percent": lora["trainable_percent"],
        "label_names": label_names, "fast_paths": fast_paths, "memory_plan": plan,
    }
