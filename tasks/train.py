"""Train stage: the quantized base loaded, LoRA attached, trained with resumable checkpoints
(tasks/training/trainer.py), in this process or, when the recipe's `distributed` section asks for several
processes, in torchrun workers that this stage launches and waits for.

What leaves the stage is the adapter directory and the run's figures. Checkpoints go to
`<work_dir>/train/<key>.partial/` and survive a crash: the same command resumes from the newest one,
with the same data order, on any number of processes.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Callable

from qlora.runtime.secrets import holds_secret
from qlora.tasks.recipe import (DistributedSection, LoraSection, PreferenceSection, QuantizationSection, RecipeError,
                                TrainSection)
from qlora.tasks.results import LoraPlan, Quantized, ReferenceScores, StartingAdapter, Tokenized, Trained
from qlora.tasks.stage import run_logger, stage
from qlora.tasks.training import distributed, memory, plan, trainer


@stage("train", ignore=("run_id", "tracking_uri", "on_checkpoint", "launch"))
def train(out: Path, tokenized: Tokenized, quantized: Quantized, lora: LoraPlan, lora_cfg: LoraSection,
          q: QuantizationSection, cfg: TrainSection, packing: bool = False, max_length: int | None = None,
          pad_to_max_length: bool = False, run_id: str | None = None, tracking_uri: str | None = None,
          on_checkpoint: Callable[[int], None] | None = None, launch: DistributedSection | None = None,
          preference: PreferenceSection | None = None, reference: ReferenceScores | None = None,
          start: StartingAdapter | None = None, *, scratch: Path) -> Trained:
    """The train stage. on_checkpoint(step) is called after each periodic checkpoint (tests interrupt
    a run there). launch: how many processes train (the recipe's `distributed` section). Neither is
    part of the cache key: the same recipe on 1, 2 or 8 GPUs builds the same adapter. preference: the
    preference loss (None: supervised), with the reference stage's scores where the loss has one.
    start: an adapter another run trained, which training continues (lora_cfg is its shape)."""
    launch = launch or DistributedSection()
    spec = trainer.TrainingSpec(tokenized=tokenized, quantized=quantized, lora=lora, lora_cfg=lora_cfg, q=q, cfg=cfg,
                                packing=packing, max_length=max_length, pad_to_max_length=pad_to_max_length,
                                run_id=run_id, tracking_uri=tracking_uri, strategy=launch.strategy,
                                cpu_offload=launch.cpu_offload, preference=preference, reference=reference,
                                start=start)
    processes = plan.training_processes(launch) // launch.nnodes
    if processes * launch.nnodes > 1:  # before any process starts: the plan fits (the host memory per node too)
        plan.check_memory_budget(quantized.model_path, cfg, q, lora, max_length, quantized.task == "causal-lm",
                                 launch=launch, with_estimate=True, dropout=lora_cfg.drops_inputs, preference=preference)
    if processes * launch.nnodes == 1:
        return trainer.run_training(spec, out, scratch, on_checkpoint=on_checkpoint, warn=run_logger().warning)
    return train_with_torchrun(spec, out, scratch, launch, processes)


def train_with_torchrun(spec: trainer.TrainingSpec, out: Path, scratch: Path, launch: DistributedSection,
                        processes: int) -> Trained:
    """Workers started by torchrun on this node (and, with several nodes, by `qlora join` on the others,
    meeting at the rendezvous); rank 0's lines go to the Prefect log as they come."""
    log = run_logger()
    for stale in [*scratch.glob("worker-error-*.json"), scratch / trainer.RESULT_FILE, scratch / trainer.STARTED_FILE]:
        stale.unlink(missing_ok=True)
    spec_path = scratch / "worker-spec.json"
    # A tracking URI with a password in it travels only through this node's environment.
    uri = spec.tracking_uri
    on_disk = spec.model_copy(update={"tracking_uri": None if holds_secret(uri or "") else uri})
    spec_path.write_text(json.dumps({**on_disk.model_dump(mode="json"), "scratch": str(scratch), "out": str(out)}))
    rdzv_id = scratch.name.split(".")[0]
    command = distributed.torchrun_command("qlora.tasks.training.trainer", str(spec_path), processes, launch.nnodes,
                                           launch.rdzv_endpoint, launch.max_restarts, rdzv_id, launch.rdzv_timeout_s)
    pointer = None
    if launch.nnodes > 1:  # what `qlora join` on the other nodes reads (the work_dir is shared storage)
        pointer = distributed.join_pointer(scratch.parent.parent, launch.rdzv_endpoint)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(json.dumps({"spec": str(spec_path), "nnodes": launch.nnodes, "rdzv_id": rdzv_id,
                                       "max_restarts": launch.max_restarts, "rdzv_timeout_s": launch.rdzv_timeout_s}))
    log.info("train: %d process(es) on each of %d node(s): %s", processes, launch.nnodes, " ".join(command[2:]))
    env = {"QLORA_WORKER_TRACKING_URI": uri or "", "QLORA_PROGRESS": "0"}
    last_lines = collections.deque(maxlen=30)  # rank 0's and the agent's, for the error below

    def relay(line: str) -> None:
        last_lines.append(line)
        log.info(line)

    try:
        code = distributed.launch(command, relay, env)
    finally:
        if pointer is not None:
            pointer.unlink(missing_ok=True)
    if code == 0 and (scratch / trainer.RESULT_FILE).is_file():  # an attempt torchrun restarted may have failed
        return Trained.model_validate_json((scratch / trainer.RESULT_FILE).read_text())
    _raise_worker_error(scratch, code)
    if code != 0 and launch.nnodes > 1 and not (scratch / trainer.STARTED_FILE).exists():
        raise RecipeError(f"the {launch.nnodes} nodes did not all meet at the rendezvous {launch.rdzv_endpoint} "
                          f"within {launch.rdzv_timeout_s:g} s (torchrun exit code {code})", "distributed.rdzv_endpoint",
                          hint="start `qlora join` on the other nodes, with the same endpoint and a shared work_dir")
    raise RuntimeError(f"torchrun exited with code {code} and no result; its last lines:\n" + "\n".join(last_lines))


def _raise_worker_error(scratch: Path, code: int) -> None:
    """A worker's own error (one line, as in one process), or a stop by signal."""
    from qlora.runtime import signals

    errors = [json.loads(path.read_text()) for path in sorted(scratch.glob("worker-error-*.json"))]
    for error in sorted(errors, key=lambda e: e["kind"] == "crash"):  # the cause before its consequences
        if error["kind"] == "out_of_memory":
            raise memory.OutOfMemory(f"rank {error['rank']}: {error['message']}")
        if error["kind"] == "crash":
            raise RuntimeError(f"training rank {error['rank']} failed:\n{error['message']}")
        raise RecipeError(error["message"], error["field"], hint=error["hint"])
    if signals.stop_requested():
        signals.raise_if_requested()


