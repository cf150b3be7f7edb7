"""QLoRA on several GPUs: the train stage's code (tasks/training/: fused LoRA layers, compiled layers,
Liger, flat paged 8-bit AdamW, checkpointing; distributed.py: data parallel under torchrun, the
gradients averaged by one NCCL all-reduce per step (the run named torch-ddp: by
DistributedDataParallel instead, side by side); fsdp.py:
FSDP2 with the 4-bit weights sharded) on 1 GPU and on N GPUs, side by side in one invocation, on a
Llama shape with random weights (nothing is downloaded).

    python benchmarks/gpu_distributed.py --shape llama2-7b --seq 2048 --micro 1 --steps 10 --gpus 2
    python benchmarks/gpu_distributed.py --strategy fsdp --shape llama2-70b --gpus 2 --runs N

--strategy fsdp: the N-GPU run shards (it runs on 1 GPU too: the sharding code without the
communication), and the 1-GPU reference trains as FSDP does (torch AdamW, nested 4-bit scales), so
the check compares sharding alone. The per-GPU peak is reported twice: while the model is built
(every rank builds the whole 4-bit model, then keeps its shards) and while it trains, beside the
memory planner's estimate for the run. --layers builds fewer of the shape's layers (the same work per
layer, sooner); --checkpoint-layers checkpoints only that many of them; --accumulate takes several
micro-batches per GPU per optimizer step.

Both runs take the same global batch (N x --micro x --accumulate rows of --seq tokens per optimizer
step) and the same per-GPU micro-batch: 1 GPU accumulates N times as many micro-batches as each of
N GPUs. Printed: tokens/s
of each and their ratio (the scaling), the per-GPU peak, the loss of every step side by side, and
the check: the loss and every LoRA gradient of the first step on N GPUs against 1 GPU (relative
error of all gradients together, held to 1e-2 as the single-GPU fast paths are against the plain
path). SDPA's backward is not deterministic (two identical 1-GPU runs differ by about 1e-2 on the
7B shape), so the check proper is `--kernels check` (Liger, the compiled and fused LoRA layers,
eager attention, torch's deterministic algorithms), where N GPUs must match 1 GPU; with the default
kernels the difference is reported beside that run-to-run floor (`--runs 1,again,N`).
Writes gpu_distributed.json under $OUT when set. Needs bitsandbytes, peft (and liger-kernel for Liger).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


# Which of the train stage's kernels a run uses (--kernels); each fast path on its own tells which one
# makes two runs differ.
KERNELS = {"fast": {"attention", "liger", "compile"}, "no-compile": {"attention", "liger"},
           "no-liger": {"attention", "compile"}, "attention-only": {"attention"}, "plain": set(),
           "deterministic": {"deterministic"}, "check": {"liger", "compile", "deterministic"}}


def worker(args) -> None:
    """One rank: the model built identically on every rank and in every run (same seeds), trained for
    warm-up + --steps steps on the global batch's share of this rank."""
    import bitsandbytes as bnb
    import torch
    import torch.distributed as dist

    from gpu_train import SHAPES, build_in_memory, config_of  # the single-GPU benchmark's random-weight models
    from qlora.tasks.batches import collate_lm
    from qlora.tasks.training import distributed, fsdp, memory
    from qlora.tasks.training.fused_lora import fuse_lora_layers
    from qlora.tasks.training.kernels import (attention_implementation, compile_layers, liger_kernels, liger_layer_kernels,
                                        use_compile, use_liger)
    from qlora.tasks.training.lora import checkpoint_some_layers, draw_adapter_weights, model_for_training
    from qlora.tasks.training.optimizer import flatten_parameters
    from qlora.tasks.training.step import forward_backward

    if "deterministic" in KERNELS[args.kernels]:  # every kernel deterministic: what remains is the split itself
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    world = distributed.init_from_env()
    if args.strategy == "fsdp" and not dist.is_initialized():  # one GPU, sharded: a group of one
        dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    dev = torch.device("cuda", torch.cuda.current_device())
    assert args.shape in SHAPES
    if args.layers:  # fewer of the shape's layers: the same per-layer work, built and stepped sooner
        SHAPES[args.shape] = {**SHAPES[args.shape], "num_hidden_layers": args.layers}
    cfg = config_of(args.shape, args.seq)
    sharded = args.strategy == "fsdp"
    like_fsdp = args.strategy_of_run == "fsdp" or sharded  # the reference trains as the sharded run does
    built_at = time.perf_counter()
    base = build_in_memory(args.shape, args.seq, park_on_cpu=sharded)  # as the train stage loads a sharded run
    build_s = time.perf_counter() - built_at
    kernels = KERNELS[args.kernels]
    base.config._attn_implementation = attention_implementation("auto", dev) if "attention" in kernels else "eager"
    liger = "liger" in kernels and use_liger("auto", cfg, dev)
    compiled = "compile" in kernels and use_compile("auto", dev)
    scope = contextlib.ExitStack()
    if liger:
        scope.enter_context(liger_kernels(base, liger_layer_kernels(compiled)))
    from types import SimpleNamespace

    from qlora.tasks.results import LoraPlan

    resolved = LoraPlan.uncounted("causal-lm", sorted({n.split(".")[-1] for n, m in base.named_modules()
                                                   if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}))
    lora_cfg = SimpleNamespace(enabled=True, bias="none", use_dora=False, use_rslora=False, init="default", r=16, lora_alpha=32,
                               lora_dropout=0.0)  # no dropout: the runs draw no masks and compare step by step
    torch.manual_seed(0)
    model = model_for_training(base, resolved, lora_cfg, True, gradient_checkpointing=True)
    if args.checkpoint_layers is not None:
        checkpoint_some_layers(model, args.checkpoint_layers)
    draw_adapter_weights(model, 0)  # as the trainer does: the same start on the GPU or in CPU memory
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B away from zero, so the first step's gradients reach A too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 1e-3)
    fuse_lora_layers(model, unnest=not like_fsdp)
    if compiled:
        compile_layers(model, sharded=sharded)
    if sharded:
        fsdp.shard_model(model, world, dev, cpu_offload=args.cpu_offload)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    load_peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    if like_fsdp:
        optimizer = torch.optim.AdamW(params, lr=2e-4)
    else:
        optimizer = bnb.optim.PagedAdamW8bit(flatten_parameters(params), lr=2e-4)
    trained = model
    if world.distributed and not sharded and args.grad_sync == "torch-ddp":  # the alternative, side by side
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[world.local_rank], init_sync=False, broadcast_buffers=False)
    model.train()
    batch = args.global_batch
    gen = torch.Generator().manual_seed(0)
    rows = [[{"input_ids": r, "labels": r}] for r in
            torch.randint(0, cfg.vocab_size, (4 * batch, args.seq), generator=gen).tolist()]
    grads_file = Path(args.out) / f"grads-{args.name}.pt"

    # Rows of a step in rank order: 1 GPU takes the micro-batches N GPUs take, one after the other
    # (--grouping natural: in row order, what differs then is only how bf16 rounds another split).
    per_rank = batch // world.size
    order = (list(range(batch)) if args.grouping == "natural" else
             [k for r in range(args.gpus) for k in range(r, batch, args.gpus)])

    def step(i: int) -> tuple[float, int]:
        units = [rows[(i * batch + k) % len(rows)] for k in order]
        mine = units[world.rank * per_rank:(world.rank + 1) * per_rank]
        micro_batches = [collate_lm(mine[k:k + args.micro], 0, dev) for k in range(0, len(mine), args.micro)]
        for b in micro_batches:
            b["labels"] = b["input_ids"]  # every position, as the tutorial trains
        total = distributed.global_sum([sum(b["targets"] for b in micro_batches)], dev)  # no host sync
        loss_sum, tokens = 0.0, 0
        for k, b in enumerate(micro_batches):
            share = b.pop("targets") * world.size / total  # gradients are averaged over ranks
            tokens += b.pop("real_tokens")
            last = k == len(micro_batches) - 1
            with distributed.gradients_synced(trained, last or not world.distributed):
                loss = forward_backward(trained, b, dev, "bfloat16", args.offload, share)
            loss_sum = loss_sum + loss * share / world.size
        if world.distributed and not sharded and args.grad_sync == "all-reduce":  # as the train stage averages
            distributed.average_gradients(optimizer, world.size)
        loss_sum, tokens = distributed.all_reduce_sum([float(loss_sum), tokens], dev)  # read each step, as the train stage
        if i == 0:  # the first step's gradients, after the average over ranks (sharded: gathered)
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().cpu()
                     for n, p in zip(names, params)}
            if world.main:
                torch.save(grads, grads_file)
            del grads
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=like_fsdp)  # flat gradients are zeroed in place
        return loss_sum, int(tokens)

    collection = None

    def steps(first: int, last: int, timed: list | None = None) -> tuple[list[float], int]:
        losses, tokens = [], 0
        for i in range(first, last):
            began = time.perf_counter()
            loss, n = step(i)
            if collection is not None:
                collection.collect(i + 1)
            losses.append(loss)
            tokens += n
            if timed is not None:
                timed.append(time.perf_counter() - began)
        return losses, tokens

    state_dir = Path(args.out) / f"state-{args.resume_from or args.name}"
    if args.resume_from:  # a run stopped on another number of GPUs, resumed here (the train stage's checkpoint code)
        from safetensors.torch import load_file

        from qlora.tasks.training.checkpoint import load_optimizer_state

        saved = load_file(state_dir / "weights.safetensors")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(saved[n].to(p.device, p.dtype))
        load_optimizer_state(optimizer, model, torch.load(state_dir / "optimizer.pt", weights_only=True))
        losses, _ = steps(args.first_step, args.first_step + args.steps)
        if world.main:
            Path(args.out, f"result-{args.name}.json").write_text(json.dumps(
                {"gpus": world.size, "first_step": args.first_step, "losses": losses}))
        scope.close()
        distributed.shutdown()
        return
    if args.stop_at:  # train to this step, save what a checkpoint holds, stop
        from safetensors.torch import save_file

        from qlora.tasks.training.checkpoint import training_state

        losses, _ = steps(0, args.stop_at)
        weights, optimizer_state = training_state(model, optimizer)
        if world.main:
            state_dir.mkdir(parents=True, exist_ok=True)
            save_file(weights, state_dir / "weights.safetensors")
            torch.save(optimizer_state, state_dir / "optimizer.pt")
            Path(args.out, f"result-{args.name}.json").write_text(json.dumps(
                {"gpus": world.size, "stopped_after_step": args.stop_at, "losses": losses}))
        scope.close()
        distributed.shutdown()
        return

    losses = steps(0, args.warmup)[0]  # compiling happens here
    torch.cuda.synchronize()
    from qlora.tasks.training.collection import PauseLog, StepCollection

    if args.gc == "steps":  # as the train stage collects: at step boundaries, every rank at the same steps
        collection = StepCollection()
    pauses = PauseLog()
    dist.barrier() if world.distributed else None
    start, step_seconds = time.perf_counter(), []
    timed_losses, tokens = steps(args.warmup, args.warmup + args.steps, step_seconds)
    losses += timed_losses
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    pauses.close()
    if collection is not None:
        collection.close()
    if args.profile and os.environ.get("OUT"):  # every rank steps (collectives); rank 0 writes
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            steps(args.warmup + args.steps, args.warmup + args.steps + 2)
            torch.cuda.synchronize()
        averages = prof.key_averages()
        if world.rank < 2:  # the first rank of each kind of run and its neighbour: what differs between ranks
            Path(os.environ["OUT"], f"profile-{args.name}-rank{world.rank}.txt").write_text(
                averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60) + "\n\n" +
                averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    peak = distributed.all_reduce_sum([torch.cuda.max_memory_allocated() / 2**30], dev)[0] / world.size
    # A checkpoint's cost: the whole adapter and optimizer state gathered to rank 0's CPU memory.
    from qlora.tasks.training.checkpoint import training_state

    gathered_at = time.perf_counter()
    training_state(model, optimizer)
    gather_s = time.perf_counter() - gathered_at
    estimate = memory.estimate_memory(cfg, weight_bits=4, trainable_params=trainable,
                                      optim="adamw_torch" if like_fsdp else "paged_adamw_8bit",
                                      tokens=args.micro * args.seq, gradient_checkpointing=True, offload=args.offload,
                                      checkpointed_layers=args.checkpoint_layers,
                                      fused_ce=liger, causal=True, shards=world.size if sharded else None)
    if world.main:
        result = {"gpus": world.size, "strategy": args.strategy, "tok_s": tokens / seconds, "step_s": seconds / args.steps,
                  "mean_peak_gib": peak, "peak_gib_rank0": torch.cuda.max_memory_allocated() / 2**30,
                  "build_peak_gib_rank0": load_peak, "build_s": build_s, "estimated_peak_gib": estimate["peak"] / 2**30,
                  "checkpoint_gather_s": gather_s, "losses": losses,
                  "step_s_each": [round(x, 4) for x in step_seconds], "liger": liger, "compiled": compiled,
                  "gc": args.gc, "gc_pauses_rank0": [[g, round(s, 4)] for g, s in pauses.pauses if s > 0.005],
                  "gc_passes_rank0": len(pauses.pauses)}
        Path(args.out, f"result-{args.name}.json").write_text(json.dumps(result))
    scope.close()
    distributed.shutdown()


def relative(got: dict, want: dict) -> float:
    """|got - want| / |want| over all tensors together."""
    diff = sum(float((got[n] - want[n]).norm()) ** 2 for n in want) ** 0.5
    return diff / sum(float(want[n].norm()) ** 2 for n in want) ** 0.5


def error_by_kind(got: dict, want: dict) -> dict:
    """The relative error grouped by what the tensor is (lora_A / lora_B of each projection) and by
    layer (first, middle, last): where a difference between two runs comes from."""
    import re

    groups: dict[str, list[str]] = {}
    layers = sorted({int(m.group(1)) for n in want if (m := re.search(r"layers\.(\d+)\.", n))})
    picked = {layers[0], layers[len(layers) // 2], layers[-1]} if layers else set()
    for n in want:
        kind = re.sub(r".*\.(\w+_proj)\.(lora_[AB]).*", r"\1.\2", n)
        groups.setdefault(kind, []).append(n)
        m = re.search(r"layers\.(\d+)\.", n)
        if m and int(m.group(1)) in picked:
            groups.setdefault(f"layer {m.group(1)}", []).append(n)
    return {k: round(relative({n: got[n] for n in v}, {n: want[n] for n in v}), 5) for k, v in sorted(groups.items())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=1, help="rows per GPU per micro-batch")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per GPU per optimizer step")
    parser.add_argument("--layers", type=int, help="build only this many of the shape's decoder layers")
    parser.add_argument("--checkpoint-layers", type=int, help="gradient checkpointing on this many layers (default: all)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--strategy", default="ddp", choices=["none", "ddp", "fsdp"], help="how the N-GPU run trains")
    parser.add_argument("--runs", default="1,N,floor",
                        help="which runs: 1 (one GPU), N (--gpus GPUs), floor (one GPU, rows split otherwise), "
                             "again (run 1 once more: the run-to-run noise), torch-ddp (N GPUs, gradients "
                             "averaged by DistributedDataParallel), resume (N GPUs stopped after --resume-at "
                             "steps, saved as the train stage's checkpoints save, resumed on 1 GPU for 10 steps)")
    parser.add_argument("--resume-at", type=int, default=5, help="the step the resume run stops at on N GPUs")
    parser.add_argument("--cpu-offload", action="store_true", help="fsdp: shards kept in CPU memory (distributed.cpu_offload)")
    parser.add_argument("--offload", action="store_true", help="activation checkpoints in CPU memory (train.offload_activations)")
    parser.add_argument("--profile", action="store_true", help="a torch profile of two steps of each run, under $OUT")
    parser.add_argument("--kernels", default="fast", choices=list(KERNELS),
                        help="fast: the train stage's kernels (Liger, compiled layers, flash/SDPA attention); "
                             "no-compile, no-liger, attention-only: some of them; plain: none of them, eager attention; "
                             "deterministic: plain, with torch's deterministic algorithms; check: Liger and compiled "
                             "layers with eager attention and deterministic algorithms (SDPA's backward is not "
                             "deterministic: two identical 1-GPU runs differ by about 1e-2)")
    parser.add_argument("--gc", default="steps", choices=["steps", "python"],
                        help="steps: garbage collected at step boundaries, as the train stage does "
                             "(tasks/training/collection.py); python: whenever Python's collector starts")
    parser.add_argument("--grad-sync", default="all-reduce", help=argparse.SUPPRESS)  # a run's: see --runs
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grouping", default="ranks", help=argparse.SUPPRESS)
    parser.add_argument("--global-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--strategy-of-run", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--resume-from", help=argparse.SUPPRESS)
    parser.add_argument("--first-step", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import torch

    from qlora.tasks.training.distributed import SAFE_NCCL_ENV, torchrun_command

    out = Path(tempfile.mkdtemp(prefix="gpu_distributed-"))
    results, grads = {}, {}
    wanted = args.runs.split(",")
    if "resume" in wanted and args.warmup + args.steps < args.resume_at + 10:
        parser.error("resume compares 10 steps after --resume-at with run 1: needs --warmup + --steps >= --resume-at + 10")
    # 1 GPU, N GPUs, and 1 GPU with the rows grouped otherwise (the bf16 noise floor of a split)
    runs = [("1", 1, "ranks", "none", "all-reduce", []), ("N", args.gpus, "ranks", args.strategy, "all-reduce", []),
            ("torch-ddp", args.gpus, "ranks", "ddp", "torch-ddp", []),
            ("floor", 1, "natural", "none", "all-reduce", []), ("again", 1, "ranks", "none", "all-reduce", [])]
    if "resume" in wanted:
        runs += [("stopped-N", args.gpus, "ranks", args.strategy, "all-reduce", ["--stop-at", str(args.resume_at)]),
                 ("resumed-1", 1, "ranks", "none", "all-reduce",
                  ["--resume-from", "stopped-N", "--first-step", str(args.resume_at), "--steps", "10"])]
        wanted += ["stopped-N", "resumed-1"]
    for name, gpus, grouping, strategy, sync, extra in runs:
        if name not in wanted:
            continue
        command = torchrun_command("gpu_distributed", "--worker", gpus)[:-3] + [
            __file__, "--worker", "--shape", args.shape, "--seq", str(args.seq), "--micro", str(args.micro),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--global-batch", str(args.gpus * args.micro * args.accumulate),
            "--gpus", str(args.gpus), "--grouping", grouping, "--out", str(out), "--name", name,
            "--strategy", strategy, "--strategy-of-run", args.strategy, "--kernels", args.kernels, "--gc", args.gc] + \
            (["--layers", str(args.layers)] if args.layers else []) + \
            (["--checkpoint-layers", str(args.checkpoint_layers)] if args.checkpoint_layers is not None else []) + \
            (["--profile"] if args.profile else []) + \
            ["--grad-sync", sync] + extra + \
            (["--cpu-offload"] if args.cpu_offload else []) + (["--offload"] if args.offload else [])
        started = time.perf_counter()
        done = subprocess.run(command, env={**os.environ, **SAFE_NCCL_ENV}, capture_output=True, text=True)
        if done.returncode or not (out / f"result-{name}.json").is_file():
            print(f"{name}: failed\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}", flush=True)
            sys.exit(1)
        results[name] = json.loads((out / f"result-{name}.json").read_text())
        results[name]["wall_s"] = time.perf_counter() - started
        if (out / f"grads-{name}.pt").is_file() and name not in ("stopped-N", "resumed-1"):
            grads[name] = torch.load(out / f"grads-{name}.pt", weights_only=True)
        print(f"run {name} ({gpus} GPU, {strategy}): {json.dumps({k: v for k, v in results[name].items() if k != 'losses'})}",
              flush=True)
    summary = {"shape": args.shape, "seq": args.seq, "kernels": args.kernels, "micro_per_gpu": args.micro, "global_batch": args.gpus * args.micro * args.accumulate,
               "layers": args.layers or "all", "checkpointed_layers": "all" if args.checkpoint_layers is None else args.checkpoint_layers, "cpu_offload": args.cpu_offload, "activation_offload": args.offload,
               "strategy": args.strategy, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "runs": {name: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "losses"}
                        for name, r in results.items()},
               "losses": {name: [round(x, 4) for x in r["losses"]] for name, r in results.items()}}
    if "1" in results and "N" in results:
        one, many = results["1"], results["N"]
        summary.update({
            "scaling": round(many["tok_s"] / one["tok_s"], 3),
            "efficiency": round(many["tok_s"] / one["tok_s"] / args.gpus, 3),
            "first_loss": [round(one["losses"][0], 5), round(many["losses"][0], 5)],
            "first_step_lora_grad_relative_error": relative(grads["N"], grads["1"]),
            "first_step_error_by_kind": error_by_kind(grads["N"], grads["1"]),
            "max_loss_difference": max(abs(a - b) for a, b in zip(one["losses"], many["losses"])),
        })
        if "torch-ddp" in results:
            summary["scaling_torch_ddp"] = round(results["torch-ddp"]["tok_s"] / one["tok_s"], 3)
            summary["first_step_lora_grad_relative_error_torch_ddp"] = relative(grads["torch-ddp"], grads["1"])
        if "floor" in results:
            summary["noise_floor_other_split_relative_error"] = relative(grads["floor"], grads["1"])
    if "resumed-1" in results and "1" in results:  # stopped on N GPUs at step k, resumed on 1: against 1 GPU throughout
        k = args.resume_at
        straight = results["1"]["losses"][k:k + 10]
        resumed = results["resumed-1"]["losses"]
        summary["resume"] = {"stopped_at_step": k, "resumed_losses": [round(x, 4) for x in resumed],
                             "uninterrupted_losses": [round(x, 4) for x in straight],
                             "max_loss_difference": max(abs(a - b) for a, b in zip(resumed, straight)),
                             "loss_difference_at_k_plus_10": abs(resumed[-1] - straight[len(resumed) - 1])}
        if "again" in results:
            again = results["again"]["losses"][k:k + 10]
            summary["resume"]["run_to_run_max_loss_difference"] = max(abs(a - b) for a, b in zip(again, straight))
    if "1" in results and "again" in results:  # the same run twice: what the GPU's kernels vary by themselves
        summary["noise_floor_same_run_relative_error"] = relative(grads["again"], grads["1"])
        summary["noise_floor_same_run_by_kind"] = error_by_kind(grads["again"], grads["1"])
        summary["check_passed"] = summary["first_step_lora_grad_relative_error"] < 1e-2
        summary["within_run_to_run_noise"] = (summary["first_step_lora_grad_relative_error"]
                                              <= 1.5 * summary["noise_floor_same_run_relative_error"])
    print(json.dumps(summary, indent=1), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_distributed.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
