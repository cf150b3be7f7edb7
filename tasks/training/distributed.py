"""Training on several processes: torch.distributed, launched by torchrun (its elastic agent and c10d
rendezvous), never a process manager of our own. The train stage starts one torchrun agent per node;
each worker it starts runs the same training code as a single process does, on its share of every
optimizer step's rows; the gradients are averaged over the processes once per step (or, sharded,
reduced by FSDP). Rank 0 alone logs and saves.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    """How many of the processes run on this node (torchrun's LOCAL_WORLD_SIZE)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_from_env() -> World:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment): NCCL for CUDA tensors, gloo for CPU ones (on a GPU machine too: FSDP's CPU offload
    keeps the shards, and so the gradient norm and the gathered checkpoint, in CPU memory). Without
    torchrun: one process, no group."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return World()
    import torch
    import torch.distributed as dist

    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")),
                  int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        # The store's keys under a prefix of this attempt: after torchrun restarts the workers, a
        # rank must never read an address its dead predecessor published (with gloo, the new group
        # then hung or failed to connect, one restart in three here).
        from datetime import timedelta

        hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and world.rank == 0
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size,
                              is_master=hosts_store, timeout=timedelta(minutes=10))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", rank=world.rank,
                                world_size=world.size, store=dist.PrefixStore(f"qlora/attempt_{attempt}", store))
    return world


def shutdown(failed: bool = False) -> None:
    """Leave the process group. A rank that failed aborts it instead: destroying it would wait for the
    other ranks, which wait in their next collective for this one, so nothing would ever exit; aborted,
    this rank exits, and torchrun stops the rest and reports the failure."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if not failed:
        dist.destroy_process_group()
    elif hasattr(dist.distributed_c10d, "_abort_process_group"):  # a torch without it: leave the group as is
        dist.distributed_c10d._abort_process_group()


def all_reduce_sum(values: list[float], dev) -> list[float]:
    """The sum over ranks of a few numbers (one collective); the numbers themselves in one process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def per_rank(value: int, world: World, dev) -> list[int]:
    """One number from every rank, in rank order (a collective; one process: [value])."""
    values = [0.0] * world.size
    values[world.rank] = float(value)
    return [int(v) for v in all_reduce_sum(values, dev)]


def broadcast_int(value: int, dev) -> int:
    """Rank 0's value on every rank (one process: the value)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=dev)
    dist.broadcast(t, src=0)
    return int(t.item())


def global_sum(values: list[float], dev):
    """The sum over ranks as a tensor on dev, without waiting on the host: on CUDA the all-reduce is
    queued on the stream (what uses the tensor waits for it there), so the host keeps queuing the
    forward pass. One process: the plain sum."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return float(sum(values))
    t = torch.tensor([float(sum(values))], dtype=torch.float32, device=dev)
    dist.all_reduce(t, async_op=True).wait()  # CUDA: the stream waits, not the host
    return t


def average_gradients(optimizer, world_size: int) -> None:
    """The gradients the optimizer steps, averaged over the processes once per optimizer step, after
    its last backward: one all-reduce per gradient tensor (the flat optimizer holds one for every LoRA
    weight), queued without a host sync. Not DistributedDataParallel: its per-weight autograd hooks
    and bucket copies add host time to every backward, and a QLoRA step is paced by the host (the
    compiled layers launch faster than Python can feed them), while overlapping the all-reduce with
    backward saves nothing when the gradients are an adapter's (benchmarks/RESULTS.md has both side by
    side). A weight no row of this rank reached gets zeros, so every rank reduces the same tensors."""
    import torch
    import torch.distributed as dist

    grads = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    for g in grads:
        dist.all_reduce(g)
    torch._foreach_div_(grads, float(world_size))


@contextlib.contextmanager
def gradients_synced(trained, sync: bool):
    """FSDP's gradients reduced over the processes after this backward (sync), or only accumulated
    here (the micro-batches before a step's last); anything else is left as it is."""
    if sync or not hasattr(trained, "set_requires_gradient_sync"):
        yield
        return
    trained.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        trained.set_requires_gradient_sync(True)


def processes_per_node(requested: int | str) -> int:
    """auto: one process per visible GPU (one on a CPU machine). More processes than visible GPUs is
    refused (ValueError): two processes would share a GPU. On a CPU machine any number run (gloo)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "auto":
        return max(gpus, 1)
    if gpus and int(requested) > gpus:
        raise ValueError(f"{requested} processes per node, but {gpus} GPU(s) are visible here")
    return int(requested)


def missing_backend() -> str | None:
    """The collective backend init_from_env will ask for (NCCL and gloo on GPUs, gloo on the CPU), when
    this torch build lacks it; None when it is there."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed"
    if torch.cuda.is_available() and not dist.is_nccl_available():
        return "NCCL"
    return None if dist.is_gloo_available() else "gloo"


def torchrun_command(module: str, argument: str, nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
                     max_restarts: int = 0, run_id: str = "qlora", rdzv_timeout_s: float = 900) -> list[str]:
    """The torchrun invocation of `python -m module argument` on this node. One node: a standalone
    rendezvous on a free local port. Several: c10d rendezvous at rdzv_endpoint, where every node's
    agent (the same command) meets. Only rank 0's output is shown."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--max-restarts={max_restarts}", "--local-ranks-filter=0"]
    if nnodes == 1 and rdzv_endpoint is None:
        command.append("--standalone")
    else:
        command += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                    f"--rdzv-id={run_id}", f"--rdzv-conf=join_timeout={int(rdzv_timeout_s)}"]
    return command + ["-m", module, argument]


def join_pointer(work_dir, rdzv_endpoint: str):
    """Where the node that runs the flow says which training the other nodes join (`qlora join`)."""
    from pathlib import Path

    return Path(work_dir) / "train" / "rendezvous" / (rdzv_endpoint.replace(":", "_").replace("/", "_") + ".json")


def join(work_dir: str, rdzv_endpoint: str, nproc: int | str = "auto", timeout_s: float = 3600,
         log: Callable[[str], None] = print) -> int:
    """This node's torchrun agent for the training the flow's node started: waits (up to timeout_s)
    for its pointer under the shared work_dir, then joins the rendezvous. Returns the agent's exit code."""
    import json
    import time

    pointer = join_pointer(work_dir, rdzv_endpoint)
    deadline = time.monotonic() + timeout_s
    while not pointer.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no training to join at {rdzv_endpoint} under {work_dir} after {timeout_s:g} s")
        time.sleep(1)
    plan = json.loads(pointer.read_text())
    command = torchrun_command("qlora.tasks.training.trainer", plan["spec"], processes_per_node(nproc), plan["nnodes"],
                               rdzv_endpoint, plan["max_restarts"], plan["rdzv_id"], plan["rdzv_timeout_s"])
    log(f"joining {rdzv_endpoint}: {' '.join(command[2:])}")
    # Rank 0 may land on this node: it logs to MLflow where the spec or this node's environment says.
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return launch(command, log, {"QLORA_PROGRESS": "0", **({"QLORA_WORKER_TRACKING_URI": uri} if uri else {})})


# NVLink multicast (NVLS) off: on shared hosts it can take GPUs out of service, and the all-reduce of
# adapter gradients gains nothing from it.
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def launch(command: list[str], log: Callable[[str], None], env: dict[str, str] | None = None) -> int:
    """Run a torchrun agent, each line of rank 0's output passed to log as it comes (the Prefect log);
    returns the agent's exit code. SIGTERM/SIGINT reach the agent, which passes them to its workers:
    they checkpoint at the next step boundary and exit."""
    environment = {**os.environ, **SAFE_NCCL_ENV, **(env or {}), "PYTHONUNBUFFERED": "1"}
    from qlora.runtime.signals import child_dies_with_parent

    # The agent (and through it the workers) gets SIGTERM if this process dies, even by SIGKILL or
    # the stop watchdog: no orphaned workers go on writing checkpoints under a later run.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=environment, preexec_fn=child_dies_with_parent) as agent:
        try:
            for line in agent.stdout:
                log(line.rstrip("\n"))
        except BaseException:
            agent.terminate()
            agent.wait()
            raise
        return agent.wait()
