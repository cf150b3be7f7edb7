"""The FSDP QLoRA set-up users copy today, as peft's documentation gives it ("Use PEFT QLoRA and FSDP
for finetuning large models on multiple GPUs": accelerate's FSDP with the 4-bit weights stored as
bfloat16, parameters offloaded to CPU memory, reentrant gradient checkpointing, bf16 mixed precision
taken from the quant storage dtype, peft's FSDP wrap policy), on a Llama shape with random weights, so
that benchmarks/gpu_distributed.py --strategy fsdp has its baseline on the same machine.

    python benchmarks/gpu_fsdp_peft_baseline.py --shape llama2-70b --gpus 2 [--no-offload] [--micro 2 --accumulate 2]
    python benchmarks/gpu_fsdp_peft_baseline.py ... --compare gpu_distributed.json   # prints the ratio

What is not as a user runs it, and why: the model is built in memory (gpu_train.build_in_memory, with
bfloat16 quant storage; a 70B model's 16-bit weights do not fit the disk), identically on every rank,
so FSDP's sync_module_states broadcast is left out; the quantization state of each 4-bit layer is put on
the GPU before wrapping (what bitsandbytes reads on the module once FSDP has flattened its weight); the
loop is accelerate's own (accumulate, backward, clip, step), which is what transformers' Trainer runs,
without the Trainer (no `datasets` here); attention is torch's SDPA (flash-attn is not installed).
LoRA as in the tutorial recipe and our benchmarks: r 16, alpha 32, dropout 0.05, every linear layer.
Prints tokens/s (all GPUs), the mean per-GPU peak, the loss; writes gpu_fsdp_peft_baseline.json
under $OUT when set.
"""
from __future__ import annotations

import argparse
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


def worker(args) -> None:
    import bitsandbytes as bnb
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy

    from gpu_train import SHAPES, build_in_memory, config_of

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    if args.layers:  # fewer of the shape's layers, as gpu_distributed.py --layers
        SHAPES[args.shape] = {**SHAPES[args.shape], "num_hidden_layers": args.layers}
    cfg = config_of(args.shape, args.seq)
    built_at = time.perf_counter()
    model = build_in_memory(args.shape, args.seq, park_on_cpu=True, quant_storage=torch.bfloat16)
    build_s = time.perf_counter() - built_at
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight.quant_state.to(dev)
            module.quant_state = module.weight.quant_state
    model.config._attn_implementation = "sdpa"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             bias="none", task_type="CAUSAL_LM"))
    bf16 = torch.bfloat16
    plugin = FullyShardedDataParallelPlugin(
        sharding_strategy=ShardingStrategy.FULL_SHARD, backward_prefetch=BackwardPrefetch.BACKWARD_PRE,
        cpu_offload=CPUOffload(offload_params=not args.no_offload), auto_wrap_policy=fsdp_auto_wrap_policy(model),
        use_orig_params=False, sync_module_states=False, forward_prefetch=False,
        mixed_precision_policy=MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16))
    accelerator = Accelerator(fsdp_plugin=plugin, mixed_precision="bf16", gradient_accumulation_steps=args.accumulate)
    model = accelerator.prepare(model)
    optimizer = accelerator.prepare(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4))
    torch.cuda.synchronize()
    build_peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    model.train()
    gen = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randint(0, cfg.vocab_size, (args.micro, args.seq), generator=gen).to(dev)

    def step() -> torch.Tensor:
        for _ in range(args.accumulate):
            with accelerator.accumulate(model):
                loss = model(input_ids=x, labels=x).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
        return loss.detach()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    world = dist.get_world_size()
    peaks = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=dev)
    dist.all_reduce(peaks)
    if dist.get_rank() == 0:
        tokens = world * args.micro * args.accumulate * args.seq * args.steps
        Path(args.out).write_text(json.dumps({
            "gpus": world, "tok_s": tokens / seconds, "step_s": seconds / args.steps,
            "mean_peak_gib": float(peaks) / world, "build_peak_gib_rank0": build_peak, "build_s": build_s,
            "loss": float(loss), "offload_params": not args.no_offload}))
    accelerator.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama2-70b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--micro", type=int, default=2, help="rows per GPU per micro-batch (the documentation: 2)")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step (the documentation: 2)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, help="build only this many of the shape's decoder layers")
    parser.add_argument("--no-offload", action="store_true", help="parameters stay on the GPU (fsdp_offload_params false)")
    parser.add_argument("--compare", type=Path, help="a gpu_distributed.json of ours from the same call: print the ratio")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from qlora.tasks.training.distributed import SAFE_NCCL_ENV

    out = Path(tempfile.mkdtemp(prefix="fsdp-peft-")) / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.gpus),
               __file__, "--worker", "--out", str(out)] + [
        a for k, v in vars(args).items() if k not in ("worker", "out", "compare", "no_offload", "gpus")
        if v is not None for a in (f"--{k.replace('_', '-')}", str(v))] + (["--no-offload"] if args.no_offload else [])
    done = subprocess.run(command, env={**os.environ, **SAFE_NCCL_ENV}, capture_output=True, text=True)
    if done.returncode or not out.is_file():
        print(f"failed ({done.returncode})\n{done.stdout[-3000:]}\n{done.stderr[-8000:]}", flush=True)
        sys.exit(1)
    result = {"shape": args.shape, "layers": args.layers or "all", "seq": args.seq, "micro": args.micro, "accumulate": args.accumulate,
              **json.loads(out.read_text())}
    if args.compare:
        ours = json.loads(args.compare.read_text())["runs"]["N"]
        result["ours"] = {k: ours[k] for k in ("tok_s", "mean_peak_gib")}
        result["tok_s_ratio_ours_over_baseline"] = round(ours["tok_s"] / result["tok_s"], 3)
    print(json.dumps(result, indent=1), flush=True)
    if os.environ.get("OUT"):
        name = "gpu_fsdp_peft_baseline" + ("-no-offload" if args.no_offload else "") + ".json"
        Path(os.environ["OUT"], name).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
