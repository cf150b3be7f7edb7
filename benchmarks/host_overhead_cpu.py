"""How much of a training step is the host queuing work, and what compiling the layers saves: the
Llama-2-7B layer structure (32 layers, LoRA on all 7 linear layers of each: 224 LoRA layers) at a
tiny width on the CPU, float32, NF4 base, gradient checkpointing, LoRA r=64 (so that every LoRA
weight has the 4096 elements from which bitsandbytes keeps 8-bit optimizer state, as at 7B width)
dropout 0.05, then gradient clipping and a paged 8-bit AdamW step. At this width the arithmetic is
negligible, so the step time stands for the Python and dispatch work per step that, on a GPU, the
kernels wait on (benchmarks/RESULTS.md: the 7B step there is host-bound).

    python benchmarks/host_overhead_cpu.py [--steps 10]

Variants, each in its own process: peft's LoRA forward, fused LoRA layers, fused + compiled layers
(train.compile), and the same with the LoRA weights stepped as one flat optimizer tensor. Prints ms per
step (best of 3 rounds), the optimizer's share, and the first step's time (compiling)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_variant(variant: str, path: str, steps: int) -> dict:
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora.tasks.training.fused_lora import fuse_lora_layers
    from qlora.tasks.training.kernels import compile_layers
    from qlora.tasks.training.lora import model_for_training
    from qlora.tasks.training.optimizer import flatten_parameters
    from qlora.tasks.training.step import forward_backward

    torch.manual_seed(0)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32, device_map="cpu",
                                                attn_implementation="sdpa")
    import bitsandbytes as bnb

    lora = SimpleNamespace(enabled=True, bias="none", use_dora=False, use_rslora=False, init="default", r=64, lora_alpha=128,
                           lora_dropout=0.05)
    from qlora.tasks.results import LoraPlan
    resolved = LoraPlan.uncounted("causal-lm", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"], [])
    model = model_for_training(base, resolved, lora, True, True)
    if variant != "peft":
        fuse_lora_layers(model)
    if variant.startswith("fused+compiled"):
        compile_layers(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    flat = variant.endswith("+flat")
    optimizer = bnb.optim.PagedAdamW8bit(flatten_parameters(params) if flat else params, lr=1e-4)
    optimizer_seconds = []
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")

    def step():
        loss = float(forward_backward(model, {"input_ids": ids, "labels": ids, "use_cache": False}, cpu,
                                               "float32", False))
        started = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=not flat)
        optimizer_seconds.append(time.perf_counter() - started)
        return loss

    started = time.perf_counter()
    step()
    first = time.perf_counter() - started
    for _ in range(2):
        step()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - started) / steps)
    return {"ms_per_step": best * 1000, "first_step_s": first, "optimizer_tensors": len(optimizer.param_groups[0]["params"]),
            "optimizer_ms": 1000 * sorted(optimizer_seconds)[len(optimizer_seconds) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        import torch

        torch.set_num_threads(2)
        print("RESULT " + json.dumps(run_variant(args.variant, args.path, args.steps)), flush=True)
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                                     num_key_value_heads=4, vocab_size=256)).save_pretrained(path)
        rows = {}
        for variant in ("peft", "fused", "fused+compiled", "fused+compiled+flat"):
            done = subprocess.run([sys.executable, __file__, "--variant", variant, "--path", path, "--steps",
                                   str(args.steps)], capture_output=True, text=True)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
            rows[variant] = json.loads(line[0][7:])
    print(f"{'variant':<22}{'ms/step':>10}{'vs peft':>9}{'optimizer ms':>14}{'tensors':>9}{'first step s':>14}")
    for variant, r in rows.items():
        print(f"{variant:<22}{r['ms_per_step']:>10.1f}{r['ms_per_step'] / rows['peft']['ms_per_step']:>8.2f}x"
              f"{r['optimizer_ms']:>14.1f}{r['optimizer_tensors']:>9}{r['first_step_s']:>14.1f}")


if __name__ == "__main__":
    main()
