"""DPO speed and memory on a GPU: TRL's DPOTrainer + peft + bitsandbytes set up as TRL's documentation
sets up QLoRA, against the pipeline's own training code (tasks/training/, the preference loss the train
stage runs), side by side in one invocation, on a Llama shape with random weights (nothing downloaded).

    python benchmarks/gpu_dpo.py --shape llama2-7b [--prompt 1024 --completion 1024] [--pairs 1] [--steps 8]
        [--offload] [--micro-batches N]   # ours: activations in host memory, the step's pairs accumulated

Variants, each in its own process (a clean peak-memory count):
    trl        DPOTrainer.train(): the 4-bit NF4 base (double quantization, bf16 compute) loaded with
               transformers' BitsAndBytesConfig, `peft_config` LoRA r=16/alpha=32/dropout 0.05 on all
               linear layers, gradient checkpointing, bf16, beta 0.1; the reference is the base with the
               adapter disabled, run every step (TRL's default, precompute_ref_log_probs=False)
    pipeline   tasks/training/ as the train stage runs a DPO recipe on CUDA: fused LoRA layers, compiled
               decoder layers, SDPA, every layer checkpointed, paged 8-bit AdamW over one flat tensor, the
               same LoRA; the reference's log-probabilities come in the batch (the reference stage computes
               them once per row, before training: its forward-only throughput is measured too, as
               `reference_tok_s`)
Both train on the same shape of data: --pairs pairs per optimizer step, each a prompt of --prompt tokens
with a chosen and a rejected completion of --completion tokens. Tokens counted: every non-pad token of
both sequences of each pair. Writes gpu_dpo.json under $OUT when set.
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

from gpu_train import LORA, build_on_disk, config_of, load_quantized  # noqa: E402


def _pairs(args, count: int, vocab: int) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=gen).tolist()
    return [{"prompt_ids": ids(args.prompt), "chosen_ids": ids(args.completion), "rejected_ids": ids(args.completion)}
            for _ in range(count)]


def _word_tokenizer(vocab: int):
    """A tokenizer that maps word tK to id K (no network): TRL's trainer needs one to tokenize text."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cfg = config_of(args.shape, args.prompt + args.completion)
    path = build_on_disk(args.shape, args.prompt + args.completion)
    torch.cuda.reset_peak_memory_stats()
    model = load_quantized(path)
    tok = _word_tokenizer(cfg.vocab_size)

    def text(ids):
        return " ".join(f"t{i}" for i in ids)
    # The completions are one token shorter: TRL appends EOS, giving the same lengths as the pipeline's rows.
    data = Dataset.from_list([{"prompt": text(p["prompt_ids"]), "chosen": text(p["chosen_ids"][:-1]),
                               "rejected": text(p["rejected_ids"][:-1])}
                              for p in _pairs(args, args.pairs * (args.steps + 3), cfg.vocab_size)])
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    out = tempfile.mkdtemp()
    dpo = DPOConfig(output_dir=out, per_device_train_batch_size=args.pairs, gradient_checkpointing=True, bf16=True,
                    beta=0.1, max_length=args.prompt + args.completion, max_steps=args.steps + 3, report_to=[],
                    logging_steps=1000, save_strategy="no", disable_tqdm=True, learning_rate=5e-5)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=dpo, train_dataset=data, processing_class=tok, peft_config=peft_config,
                         callbacks=[Clock()])
    lengths = trainer.train_dataset[0]
    per_pair = len(lengths["prompt_ids"]) * 2 + len(lengths["chosen_ids"]) + len(lengths["rejected_ids"])
    trainer.train()
    measured = times[3:]
    return {"tok_s": per_pair * args.pairs * len(measured) / sum(measured), "step_s": sum(measured) / len(measured),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "tokens_per_pair": per_pair,
            "warmup_s": round(sum(times[:3]), 1)}


def run_pipeline(args) -> dict:
    import bitsandbytes as bnb
    import torch

    from qlora.tasks.batches import collate_pairs, width_multiple
    from qlora.tasks.inference import completion_scores
    from qlora.tasks.recipe import PreferenceSection
    from qlora.tasks.results import LoraPlan
    from qlora.tasks.training.fused_lora import fuse_lora_layers
    from qlora.tasks.training.kernels import attention_implementation, compile_layers, use_compile
    from qlora.tasks.training.lora import model_for_training
    from qlora.tasks.training.optimizer import flatten_parameters
    from qlora.tasks.training.preference import batch_loss
    from qlora.tasks.training.step import forward_backward

    dev = torch.device("cuda")
    cfg = config_of(args.shape, args.prompt + args.completion)
    path = build_on_disk(args.shape, args.prompt + args.completion)
    torch.cuda.reset_peak_memory_stats()
    base = load_quantized(path, attention_implementation("auto", dev))
    pairs = _pairs(args, args.pairs * (args.steps + 3), cfg.vocab_size)
    # The reference stage's work: the base scores every pair once (forward only, no adapter).
    from datasets import Dataset
    scored = Dataset.from_list([{**p, "length": len(p["prompt_ids"]) + len(p["chosen_ids"])}
                                for p in pairs[:4 * args.pairs]])
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = completion_scores(base, scored, args.pairs, 0, dev)
    torch.cuda.synchronize()
    reference_tok_s = 2 * sum(r["length"] for r in scored) / (time.perf_counter() - start)
    torch.cuda.reset_peak_memory_stats()
    resolved = LoraPlan.uncounted("causal-lm", sorted({n.split(".")[-1] for n, m in base.named_modules()
                                                       if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}))
    from types import SimpleNamespace
    lora_cfg = SimpleNamespace(enabled=True, bias="none", use_dora=False, use_rslora=False, init="default", **LORA)
    model = model_for_training(base, resolved, lora_cfg, True, True)
    fused = fuse_lora_layers(model) if not args.no_fuse else 0
    compiled = compile_layers(model, None) if use_compile("auto", dev) and not args.no_compile else 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(flatten_parameters(params), lr=5e-5)
    model.train()
    static_gib = torch.cuda.memory_allocated() / 2**30
    pref = PreferenceSection(loss="dpo", beta=0.1)
    multiple_of = width_multiple(bool(compiled))
    times, tokens = [], 0
    for i in range(args.steps + 3):
        rows = pairs[i * args.pairs:(i + 1) * args.pairs]
        reference = {"chosen": ref["chosen"][:len(rows)], "rejected": ref["rejected"][:len(rows)]}
        torch.cuda.synchronize()
        start = time.perf_counter()
        # The step's pairs as --micro-batches accumulated micro-batches (what the memory plan does
        # under train.max_memory_gib): each micro-batch's gradient weighted by its share of the pairs.
        size = -(-len(rows) // args.micro_batches)
        for at in range(0, len(rows), size):
            part = {side: scores[at:at + size] for side, scores in reference.items()}
            batch = collate_pairs(rows[at:at + size], 0, dev, multiple_of, part)
            real = batch.pop("real_tokens")
            batch.pop("targets")
            if i >= 3:
                tokens += real
            forward_backward(model, batch, dev, "bfloat16", args.offload, len(rows[at:at + size]) / len(rows),
                             lambda m, b: batch_loss(m, b, pref)[0])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    measured = times[3:]
    return {"tok_s": tokens / sum(measured), "step_s": sum(measured) / len(measured),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "reference_tok_s": reference_tok_s,
            "static_gib": static_gib,
            "warmup_s": round(sum(times[:3]), 1), "fused_lora_layers": fused, "compiled_layers": compiled}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--completion", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=1, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", default="trl,pipeline")
    parser.add_argument("--no-fuse", action="store_true", help="ours without the fused LoRA layers")
    parser.add_argument("--no-compile", action="store_true", help="ours without compiled decoder layers")
    parser.add_argument("--offload", action="store_true",
                        help="ours with the checkpointed layers' inputs kept in host memory (train.offload_activations)")
    parser.add_argument("--micro-batches", type=int, default=1, help="ours: each step's pairs in this many micro-batches")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        result = run_trl(args) if args.variant == "trl" else run_pipeline(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {}
    for variant in args.only.split(","):
        command = [sys.executable, __file__, "--variant", variant, "--shape", args.shape, "--prompt", str(args.prompt),
                   "--completion", str(args.completion), "--pairs", str(args.pairs), "--steps", str(args.steps)]
        command += ["--no-fuse"] * args.no_fuse + ["--no-compile"] * args.no_compile + ["--offload"] * args.offload
        command += ["--micro-batches", str(args.micro_batches)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{variant} failed:\n{done.stderr[-3000:]}", flush=True)
            continue
        results[variant] = json.loads(lines[-1][7:])
        print(variant, json.dumps(results[variant]), flush=True)
    if {"trl", "pipeline"} <= set(results):
        t, p = results["trl"], results["pipeline"]
        results["ratio"] = {"tok_s": round(p["tok_s"] / t["tok_s"], 2), "peak_gib": round(p["peak_gib"] / t["peak_gib"], 2)}
        print(f"pipeline vs TRL: {results['ratio']['tok_s']}x tokens/s at {results['ratio']['peak_gib']}x peak memory")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_dpo.json").write_text(json.dumps({"args": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
