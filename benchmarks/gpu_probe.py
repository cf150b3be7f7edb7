"""Where a QLoRA training step's time and memory go on a GPU (random-weight Llama shapes, no download).

Measures, each variant in its own process (clean peak memory), tokens/s and peak GiB at one shape,
then profiles one step of the tutorial set-up and of the lean one with the torch profiler:

    tutorial      prepare_model_for_kbit_training (float32 upcasts) + reentrant checkpointing
    lean          no upcast, non-reentrant checkpointing
    lean-nodrop   lean, LoRA dropout 0 (peft then skips the dropout copy of every LoRA input)
    lean-chunkce  lean-nodrop, cross-entropy over token chunks from the hidden states (no full logits)
    lean-nogc     lean-nodrop without checkpointing
    lean-bs4      lean-nodrop at batch 4
    fast          lean-nodrop under torch.autocast(bfloat16): float32 LoRA weights cast (small), not activations
    fast-bs4      fast at batch 4
    fast-offload  fast, tensors saved for backward (checkpoint inputs, logits) kept in pinned CPU memory,
                  paged 8-bit AdamW states
    pipeline*     the pipeline's own training set-up (tasks/training.py: model_for_training, train_context)
    --check       on a small random Llama: the pipeline path's loss and LoRA gradients against the plain
                  peft path (prepare_model_for_kbit_training, no autocast), fresh random inputs

    python benchmarks/gpu_probe.py [--shape llama2-7b] [--seq 2048] [--steps 8]

Needs CUDA, bitsandbytes and peft. Writes the profiles under $OUT when set.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
}
VARIANTS = ["tutorial", "lean", "lean-nodrop", "lean-chunkce", "lean-nogc", "lean-bs4", "fast", "fast-bs4",
            "fast-offload", "fast-offload-bs4", "pipeline", "pipeline-offload", "pipeline-bs4"]
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build(shape: str, seq: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = f"/tmp/{shape}"
    if not os.path.exists(f"{path}/config.json"):
        cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 4096))
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return path


def chunked_loss(model, input_ids, labels, chunk: int = 2048):
    """Mean next-token cross-entropy from the decoder's hidden states, chunk by chunk; each chunk's
    logits are recomputed in backward, never all held at once."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    base = model.get_base_model()
    hidden = base.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1].reshape(-1, base.config.hidden_size)
    targets = labels[:, 1:].reshape(-1)
    head = base.lm_head

    def piece(h, t):
        return F.cross_entropy(head(h).float(), t, reduction="sum", ignore_index=-100)

    total = sum(checkpoint(piece, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                for i in range(0, hidden.shape[0], chunk))
    return total / (targets != -100).sum()


def timed(variant: str, step, batches: list, steps: int) -> dict:
    """Tokens/s over `steps` steps after three warm-up steps; the loss must fall."""
    import torch

    bs, seq = batches[0].shape
    first = float(step(batches[0]))
    for i in range(2):
        step(batches[(i + 1) % len(batches)])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % len(batches)])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"variant": variant, "batch": bs, "seq": seq, "tok_s": round(bs * seq * steps / seconds),
            "step_s": round(seconds / steps, 3), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "loss_first": round(first, 3), "loss_last": round(float(loss), 3)}


def run_variant(variant: str, path: str, seq: int, steps: int, profile_dir: str | None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bs = 4 if variant.endswith("bs4") else 2
    fast = variant.startswith("fast")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    gc = variant != "lean-nogc"
    if variant.startswith("pipeline"):
        return run_pipeline(variant, model, bs, seq, steps)
    if variant == "tutorial":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dropout = 0.05 if variant in ("tutorial", "lean") else 0.0
    import contextlib

    import bitsandbytes as bnb
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear",
                                             bias="none", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    if "offload" in variant:
        opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    model.train()
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step(x):
        cast = torch.autocast("cuda", dtype=torch.bfloat16) if fast else contextlib.nullcontext()
        saved = torch.autograd.graph.save_on_cpu(pin_memory=True) if "offload" in variant else contextlib.nullcontext()
        with cast, saved:
            if variant == "lean-chunkce":
                loss = chunked_loss(model, x, x)
            else:
                loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    batches = [torch.randint(0, vocab, (bs, seq), device="cuda", generator=gen) for _ in range(4)]
    out = timed(variant, step, batches, steps)
    if profile_dir and variant in ("fast", "fast-offload-bs4"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(batches[0])
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
        Path(profile_dir, f"profile-{variant}.txt").write_text(table)
        prof.export_chrome_trace(str(Path(profile_dir, f"trace-{variant}.json")))
        out["profile"] = f"profile-{variant}.txt"
    return out


def _lora_cfg(dropout: float = 0.0):
    from types import SimpleNamespace

    return SimpleNamespace(enabled=True, r=16, lora_alpha=32, lora_dropout=dropout, bias="none", use_dora=False,
                           use_rslora=False)


def _resolved(model) -> dict:
    names = sorted({n.split(".")[-1] for n, m in model.named_modules()
                    if type(m).__name__ in ("Linear", "Linear4bit") and not n.endswith("lm_head")})
    return {"task": "causal-lm", "target_modules": names, "modules_to_save": []}


def run_pipeline(variant: str, base, bs: int, seq: int, steps: int) -> dict:
    """The pipeline's training step: tasks/training.py's set-up and forward context, paged 8-bit AdamW
    with offload (the recipe's optim: paged_adamw_8bit), fused AdamW otherwise."""
    import bitsandbytes as bnb
    import torch

    from tasks.training import model_for_training, train_context

    offload = "offload" in variant
    model = model_for_training(base, _resolved(base), _lora_cfg(), True, True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4) if offload else torch.optim.AdamW(params, lr=2e-4, fused=True)
    model.train()
    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (bs, seq), device="cuda", generator=gen) for _ in range(4)]

    def step(x):
        with train_context(dev, "bfloat16", offload):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return timed(variant, step, batches, steps)


def check(trials: int = 3) -> None:
    """Relative error of the pipeline path's loss and LoRA gradients against the plain path."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from tasks.training import lora_config, model_for_training, train_context

    path = "/tmp/llama-check"
    if not os.path.exists(f"{path}/config.json"):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=8, vocab_size=32000)
                         ).to(torch.bfloat16).save_pretrained(path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    dev = torch.device("cuda")
    worst = {"loss": 0.0, "grad": 0.0}
    for trial in range(trials):
        x = torch.randint(0, 32000, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(100 + trial))
        grads, losses = [], []
        for path_name in ("plain", "pipeline", "pipeline-offload"):
            base = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                        device_map={"": 0})
            if path_name == "plain":
                model = get_peft_model(prepare_model_for_kbit_training(base, use_gradient_checkpointing=True),
                                       lora_config(_resolved(base), _lora_cfg()))
            else:
                model = model_for_training(base, _resolved(base), _lora_cfg(), True, True)
            model.train()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:  # the same nonzero adapter in every path (B starts at zero)
                        g = torch.Generator().manual_seed(hash(name.replace("base_model.model.", "")) % 2**31)
                        p.copy_(0.02 * torch.randn(p.shape, generator=g))
            with train_context(dev, "bfloat16", path_name == "pipeline-offload") if path_name != "plain" else \
                    torch.enable_grad():
                loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad.float() for n, p in model.named_parameters() if "lora_" in n})
        for other, other_loss in zip(grads[1:], losses[1:]):
            worst["loss"] = max(worst["loss"], abs(other_loss - losses[0]) / abs(losses[0]))
            for name, g in grads[0].items():
                worst["grad"] = max(worst["grad"], float((other[name] - g).norm() / g.norm()))
    ok = worst["loss"] < 1e-2 and worst["grad"] < 1e-2
    print(f"CHECK pipeline path vs plain path, {trials} fresh inputs: max relative error loss {worst['loss']:.2e}, "
          f"LoRA gradients {worst['grad']:.2e} -> {'OK' if ok else 'FAIL'} (bound 1e-2)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help="only the correctness check")
    args = parser.parse_args()
    if args.check:
        return check()
    profile_dir = os.environ.get("OUT")
    if args.variant:
        print("RESULT", json.dumps(run_variant(args.variant, f"/tmp/{args.shape}", args.seq, args.steps, profile_dir)),
              flush=True)
        return
    build(args.shape, args.seq)
    n_params = {"llama2-7b": 6.74e9, "llama3-8b": 8.03e9}[args.shape]
    rows = []
    for variant in args.variants.split(","):
        done = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--seq", str(args.seq), "--steps",
                               str(args.steps), "--variant", variant], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{variant}: failed\n{done.stderr[-1500:]}", flush=True)
            continue
        row = json.loads(lines[0][7:])
        row["tflops"] = round(6 * n_params * row["tok_s"] / 1e12, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.shape}, seq {args.seq}, LoRA r=16 all-linear, NF4 + double quant, bf16 compute")
    print(f"{'variant':<14}{'batch':>6}{'tok/s':>8}{'step s':>8}{'peak GiB':>10}{'6N TFLOP/s':>12}{'loss first->last':>18}")
    for r in rows:
        print(f"{r['variant']:<14}{r['batch']:>6}{r['tok_s']:>8}{r['step_s']:>8}{r['peak_gib']:>10}{r['tflops']:>12}"
              f"{r['loss_first']:>10} -> {r['loss_last']}")


if __name__ == "__main__":
    main()
