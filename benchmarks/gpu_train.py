"""QLoRA training speed and memory on a GPU: the tutorial recipe against the pipeline's own training
code (tasks/training/, the functions the train stage calls), side by side in one invocation, on
Llama-shaped models with random weights (nothing is downloaded).

    python benchmarks/gpu_train.py --shape llama2-7b [--seq 2048] [--steps 10] [--budget 5.65]
    python benchmarks/gpu_train.py --shape llama2-7b --lengths   # variable-length real examples
    python benchmarks/gpu_train.py --shape llama-33b --only pipeline --budget 24
    python benchmarks/gpu_train.py --check [--lora-variant dora]  # fast paths vs the plain path
    python benchmarks/gpu_train.py --optimizer-step               # the optimizer's share: flat vs per tensor
    python benchmarks/gpu_train.py --log-mlflow gpu_train.json    # record a result file in MLflow

Variants, each in its own process (a clean peak-memory count):
    tutorial     ../shared/reference/tutorial_qlora_gpu.py as it is (prepare_model_for_kbit_training,
                 reentrant checkpointing, LoRA dropout 0.05, fused AdamW), fixed-length rows
    tutorial-pad the same set-up on variable-length examples, each padded to --seq as the tutorial
                 recipe's tokenizer call does (padding="max_length")
    pipeline     tasks/training/ as the train stage runs it by default on CUDA: fused LoRA layers,
                 compiled decoder layers, Liger's fused cross-entropy, SDPA, no float32 upcast,
                 non-reentrant checkpointing, paged 8-bit AdamW, LoRA dropout 0.05, the memory plan
                 for --budget GiB (micro-batch, checkpointing, offload); variable-length examples
                 packed into rows of --seq tokens
    pipeline+OPTIONS  the same with a forced set-up, options joined by "+": m1, m2 (micro-batch,
                 checkpointing on), offload, noliger, nofused, noflat (each LoRA weight its
                 own optimizer tensor), nocompile (train.compile: false; eager
                 layers take Liger's RMSNorm and SwiGLU kernels), liger:KERNEL:... (only
                 these of Liger's layer kernels: rms_norm, rope, swiglu), compile, noemulate
                 (compiled layers keep float32 inside fused kernels where eager code rounds to bf16);
                 e.g. --only pipeline,pipeline+nocompile
Both take the same tokens per optimizer step (--batch rows of --seq). Only non-pad tokens count.
MFU: (6 x parameters + 12 x layers x hidden x seq) FLOPs per token over a measured bf16 matmul peak.
Writes gpu_train.json (and a profile of one step with --profile) under $OUT when set.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
REFERENCE = Path(os.environ.get("QLORA_REFERENCE", REPO.parent / "shared" / "reference" / "tutorial_qlora_gpu.py"))
SHAPES = {
    "tiny": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000),
    "tinyllama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    "llama-33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                      num_key_value_heads=52, vocab_size=32000),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
BUILT_IN_MEMORY = {"llama-33b", "llama2-70b"}  # their 16-bit weights (66, 138 GB) do not fit the disk


def config_of(shape: str, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 4096), tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"])


def n_params(cfg) -> int:
    h, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * v * h + h


def build_on_disk(shape: str, seq: int) -> str:
    """Random bf16 weights saved where the reference script looks (/tmp/<shape>)."""
    import torch
    from transformers import LlamaForCausalLM

    path = f"/tmp/{shape}"
    if not os.path.exists(f"{path}/config.json"):
        with torch.device("cuda"):
            model = LlamaForCausalLM(config_of(shape, seq)).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return path


def build_in_memory(shape: str, seq: int, park_on_cpu: bool = False, quant_storage=None):
    """A model too big for the disk in 16-bit: made on the meta device, then each linear layer given
    random bf16 weights on the GPU and quantized to NF4 (double quantization) at once, layer by layer:
    the 16-bit weights of one layer at a time ever exist. park_on_cpu: each quantized layer then moves
    to CPU memory, as a sharded train stage loads the base (the GPU never holds the whole model).
    quant_storage: the dtype the packed 4-bit bytes are stored as (bitsandbytes' bnb_4bit_quant_storage;
    default uint8); the weights drawn are the same whatever it is."""
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaForCausalLM

    cfg = config_of(shape, seq)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator("cuda").manual_seed(0)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                weight = torch.randn(linear.out_features, linear.in_features, device="cuda", dtype=torch.bfloat16,
                                     generator=gen).mul_(cfg.initializer_range)
                storage = {"quant_storage": quant_storage} if quant_storage is not None else {}
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta", **storage)
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                             **storage)
                q.weight = q.weight.to("cuda")  # quantizes
                q.quant_state = q.weight.quant_state
                if park_on_cpu:
                    q.weight = q.weight.to("cpu")  # the packed bytes and their quantization state
                    q.quant_state = q.weight.quant_state
                setattr(parent, name, q)
                del weight
    for module in model.modules():  # what stays 16-bit: embeddings, norms, output layer
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                value = torch.ones(p.shape, device="cuda") if "norm" in type(module).__name__.lower() else \
                    torch.randn(p.shape, device="cuda", generator=gen) * cfg.initializer_range
                value = value.to(torch.bfloat16)
                module._parameters[name] = torch.nn.Parameter(value.cpu() if park_on_cpu else value, requires_grad=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg, device="cpu" if park_on_cpu else "cuda")
    model.is_loaded_in_4bit = True  # what peft checks to wrap 4-bit layers
    model.config.dtype = torch.bfloat16
    return model


def load_quantized(path: str, attention: str = "sdpa", dtype: str = "bfloat16"):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=getattr(torch, dtype))
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=getattr(torch, dtype),
                                                device_map={"": 0}, attn_implementation=attention)


def example_lengths(seq: int, count: int, seed: int = 0) -> list[int]:
    """Lengths of real examples (benchmarks/data/lengths.json), drawn with replacement."""
    import numpy as np

    data = json.loads((REPO / "benchmarks" / "data" / "lengths.json").read_text())
    pool = np.array(data["ag_news"] + data["chatterbot_qa"])
    return [int(min(n, seq)) for n in np.random.default_rng(seed).choice(pool, count)]


def _examples(lengths: list[int], vocab: int, seed: int, documents: int = 8) -> list[dict]:
    """Examples of the given lengths, each the opening of one of a few random documents: text a model
    can learn (the loss falls within a few steps), unlike tokens drawn afresh for every example."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    docs = torch.randint(3, vocab, (documents, max(lengths)), generator=gen).tolist()
    picks = torch.randint(0, documents, (len(lengths),), generator=gen).tolist()
    return [{"input_ids": docs[d][:n], "labels": docs[d][:n]} for d, n in zip(picks, lengths)]


def timed(steps: int, warmup: int, step) -> tuple[float, list[float], int, float]:
    """Seconds over `steps` steps after `warmup` ones; every loss; the tokens counted; the warm-up's
    seconds (compiling happens there)."""
    import torch

    losses, tokens = [], 0
    start = time.perf_counter()
    for i in range(warmup):
        losses.append(step(i)[0])
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss, n = step(i)
        losses.append(loss)
        tokens += n
    torch.cuda.synchronize()
    return time.perf_counter() - start, [float(x) for x in losses], tokens, warmup_s


def run_tutorial_padded(args) -> dict:
    """The tutorial set-up (as the reference script) on variable-length examples padded to --seq."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qlora.tasks.batches import collate_lm

    path = build_on_disk(args.shape, args.seq)  # (built on the GPU when missing: not part of the peak)
    torch.cuda.reset_peak_memory_stats()
    model = load_quantized(path)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(**LORA, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    model.train()
    examples = _examples(example_lengths(args.seq, 4096, seed=1), model.config.vocab_size, seed=1)

    def step(i):
        rows = examples[(i * args.batch) % len(examples):][:args.batch]
        batch = collate_lm([[e] for e in rows], 0, torch.device("cuda"), width=args.seq)
        real = batch.pop("real_tokens")
        batch.pop("targets")
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), real

    seconds, losses, tokens, warmup_s = timed(args.steps, 3, step)
    return {"tok_s": tokens / seconds, "step_s": seconds / args.steps, "losses": losses, "warmup_s": round(warmup_s, 1),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def liger_layers(options, compiled: bool) -> frozenset:
    """The Liger layer kernels a set-up names (option liger:rms_norm:swiglu; "liger:" for none), else
    those the train stage takes."""
    from qlora.tasks.training.kernels import liger_layer_kernels

    named = [o.split(":")[1:] for o in options if o.startswith("liger:")]
    return frozenset(k for k in named[0] if k) if named else liger_layer_kernels(compiled)


def run_pipeline(args) -> dict:
    """The pipeline's training code: what tasks/train.py's stage does per step, on random weights."""
    import bitsandbytes as bnb
    import torch

    from qlora.tasks.batches import collate_lm, pack, width_multiple
    from qlora.tasks.training.fused_lora import fuse_lora_layers
    from qlora.tasks.training.kernels import attention_implementation, compile_layers, liger_kernels, use_compile, use_liger
    from qlora.tasks.training.lora import checkpoint_some_layers, model_for_training
    from qlora.tasks.training.memory import _shape, estimate_memory, plan_memory
    from qlora.tasks.training.optimizer import flatten_parameters
    from qlora.tasks.training.step import forward_backward

    dev = torch.device("cuda")
    cfg = config_of(args.shape, args.seq)
    options = args.variant.split("+")[1:]  # pipeline+m2+offload+noliger+nofused+nocompile: a forced set-up
    liger = use_liger("auto", cfg, dev) and not args.no_liger and "noliger" not in options
    lora_params = LORA["r"] * sum(i + o for i, o in _shape(cfg)["per_layer"].values()) * cfg.num_hidden_layers
    packed = args.lengths

    layers = cfg.num_hidden_layers

    def estimate_parts(micro, checkpointed, offload) -> dict:
        return estimate_memory(cfg, weight_bits=4, trainable_params=lora_params, optim="paged_adamw_8bit",
                               tokens=micro * args.seq, gradient_checkpointing=checkpointed > 0,
                               checkpointed_layers=checkpointed, offload=offload, fused_ce=liger, causal=True,
                               dropout=LORA["lora_dropout"] > 0)

    def estimate(micro, checkpointed, offload):
        return estimate_parts(micro, checkpointed, offload)["peak"]

    forced_micro = next((int(o[1:]) for o in options if o.startswith("m") and o[1:].isdigit()), None)
    if forced_micro:
        plan = {"micro_batch": forced_micro, "accumulation": args.batch // forced_micro, "gradient_checkpointing": True,
                "checkpointed_layers": layers, "offload_activations": "offload" in options}
    elif args.budget:
        plan = plan_memory(args.budget, args.batch, estimate, layers)
    else:
        plan = {"micro_batch": args.batch, "accumulation": 1, "gradient_checkpointing": True,
                "checkpointed_layers": layers, "offload_activations": False}
    plan["estimated_peak_gib"] = round(estimate(plan["micro_batch"], plan["checkpointed_layers"],
                                                plan["offload_activations"]) / 2**30, 2)
    path = None if args.shape in BUILT_IN_MEMORY else build_on_disk(args.shape, args.seq)  # not part of the peak
    torch.cuda.reset_peak_memory_stats()
    attention = attention_implementation("auto", dev)
    if path is None:
        base = build_in_memory(args.shape, args.seq)
        base.config._attn_implementation = attention
    else:
        base = load_quantized(path, attention)
    # The quantized base as loaded; the fused layers unnest its block scales later (counted in the
    # estimate's weights, in the measured training state).
    weights = torch.cuda.memory_allocated()
    compiled = "compile" in options or ("nocompile" not in options and use_compile("auto", dev))
    scope = contextlib.ExitStack()  # held to the end of the run (closing it undoes Liger's module-level patches)
    if liger:
        scope.enter_context(liger_kernels(base, liger_layers(options, compiled)))
    from qlora.tasks.results import LoraPlan
    resolved = LoraPlan.uncounted("causal-lm", sorted({n.split(".")[-1] for n, m in base.named_modules()
                                                   if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}))
    from types import SimpleNamespace
    lora_cfg = SimpleNamespace(enabled=True, bias="none", use_dora=False, use_rslora=False, init="default", **LORA)
    model = model_for_training(base, resolved, lora_cfg, True, plan["gradient_checkpointing"])
    checkpoint_some_layers(model, plan["checkpointed_layers"])
    fused = 0 if args.no_fused or "nofused" in options else fuse_lora_layers(model)
    compiled_layers = (compile_layers(model, dynamic=packed or None, emulate_casts="noemulate" not in options)
                       if compiled else 0)  # compiled in the warm-up steps
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params if "noflat" in options else flatten_parameters(params), lr=2e-4)
    model.train()
    micro, multiple_of = plan["micro_batch"], width_multiple(compiled)
    if packed:
        examples = _examples(example_lengths(args.seq, 20000, seed=1), cfg.vocab_size, seed=1)
        rows = [[examples[i] for i in r] for r in pack([len(e["input_ids"]) for e in examples], args.seq, 0)]
    else:  # the tutorial's fixed rows: one random batch, trained on repeatedly (its loss must fall)
        gen = torch.Generator().manual_seed(0)
        fixed = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).tolist()
        rows = [[{"input_ids": r, "labels": r}] for r in fixed]

    def step(i):
        units = [rows[(i * args.batch + k) % len(rows)] for k in range(args.batch)]
        batches = [collate_lm(units[k:k + micro], 0, dev, multiple_of=multiple_of)
                   for k in range(0, args.batch, micro)]
        if not packed:  # the tutorial trains on every position of its rows, the first one too
            for b in batches:
                b["labels"] = b["input_ids"]
        total = sum(b["targets"] for b in batches)
        loss_sum, real = 0.0, 0
        for b in batches:
            share = b.pop("targets") / total
            real += b.pop("real_tokens")
            loss_sum = loss_sum + forward_backward(model, b, dev, "bfloat16", plan["offload_activations"],
                                                   share) * share
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        trace.append((round(torch.cuda.max_memory_allocated() / 2**30, 2), max(b["input_ids"].shape[1] for b in batches),
                      max(len(u) for u in units)))
        return loss_sum, real

    trace = []  # per step: peak GiB so far, row width, most examples in a row

    seconds, losses, tokens, warmup_s = timed(args.steps, 3, step)
    # Measured against the plan's estimate, part by part: what stays between steps beyond the weights is
    # the training state (LoRA weights, gradients, optimizer state); the rest of the peak is activations.
    resident = torch.cuda.memory_allocated()
    est = estimate_parts(plan["micro_batch"], plan["checkpointed_layers"], plan["offload_activations"])
    est["rest"] = est["peak"] - est["weights"] - est["training_state"]
    plan["measured_vs_estimated_gib"] = {
        part: [round(measured / 2**30, 2), round(est[part] / 2**30, 2)] for part, measured in
        (("weights", weights), ("training_state", resident - weights),
         ("rest", torch.cuda.max_memory_allocated() - resident))}  # rest: activations and workspace
    out = {"tok_s": tokens / seconds, "step_s": seconds / args.steps, "losses": losses, "warmup_s": round(warmup_s, 1),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "plan": plan, "trace": trace,
           "fast_paths": {"attention": attention, "liger": liger, "fused_lora_layers": fused,
                          "compiled_layers": compiled_layers,
                          "flat_optimizer": "noflat" not in options}}
    if args.profile and os.environ.get("OUT"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(0)
            torch.cuda.synchronize()
        name = f"profile-{args.shape}-{args.variant.replace('+', '_')}.txt"
        averages = prof.key_averages()
        Path(os.environ["OUT"], name).write_text(
            averages.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70) + "\n\n" +
            averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
        out["profile"] = name
    return out


def run_tutorial(args) -> dict:
    """The reference script itself, unchanged."""
    build_on_disk(args.shape, args.seq)
    done = subprocess.run([sys.executable, str(REFERENCE), args.shape, str(args.seq), str(args.batch),
                           str(args.steps), "--all-linear"], capture_output=True, text=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise RuntimeError(done.stderr[-2000:])
    r = json.loads(line[0][7:])
    return {"tok_s": r["tok_s"], "step_s": r["step_s"], "losses": [r["loss"]], "peak_gib": r["peak_gib"],
            "note": "loss after the timed steps (the script prints only that)"}


def optimizer_step(steps: int = 20) -> dict:
    """The optimizer's share of a step alone: paged 8-bit AdamW, gradient clipping and zeroing over the
    Llama-2-7B LoRA weights (r=16, all linear layers: 448 tensors, 40M parameters), each weight its own
    tensor vs flattened into one (tasks/training/optimizer.py: flatten_parameters); ms per step, and whether
    both give the same weights after the steps."""
    import bitsandbytes as bnb
    import torch

    from qlora.tasks.training.optimizer import flatten_parameters

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [(16, 4096), (4096, 16)] * 4 + [(16, 4096), (11008, 16)] * 2 + [(16, 11008), (4096, 16)]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.02 for _ in range(32) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dev) for s in shapes]  # one layer's, reused for every layer
    result = {}
    for name in ("per tensor", "flattened"):
        params = [torch.nn.Parameter(w.to(dev, copy=True)) for w in init]
        stepped = flatten_parameters(params) if name == "flattened" else params
        opt = bnb.optim.PagedAdamW8bit(stepped, lr=2e-4)
        times = []
        for i in range(steps + 3):
            for k, p in enumerate(params):  # what backward leaves: a gradient in every weight
                if p.grad is None:
                    p.grad = grads[k % len(shapes)].clone()
                else:
                    p.grad.copy_(grads[k % len(shapes)])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=name == "per tensor")
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result[name] = {"ms": 1000 * sorted(times[3:])[len(times[3:]) // 2], "weights": [p.detach().cpu() for p in params]}
    same = max(float((a - b).abs().max()) for a, b in zip(result["per tensor"]["weights"], result["flattened"]["weights"]))
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "tensors": len(init),
           "per_tensor_ms": round(result["per tensor"]["ms"], 2), "flattened_ms": round(result["flattened"]["ms"], 2),
           "max_weight_difference": same}
    print(f"OPTIMIZER {out['device']}: {len(init)} LoRA weights, clip + paged 8-bit AdamW + zero, median of {steps} "
          f"steps: per tensor {out['per_tensor_ms']} ms, flattened {out['flattened_ms']} ms; largest weight "
          f"difference after {steps + 3} steps {same:.1e}", flush=True)
    return out


def gemm_peak() -> float:
    """bf16 matmul FLOP/s measured here (8192 x 8192 x 8192): the denominator of MFU."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - start)


def check(trials: int = 3, variant: str = "lora") -> dict:
    """Every fast path against the plain path on a small random Llama: loss and LoRA gradients, fresh
    random inputs each trial, the same adapter weights everywhere (B nonzero, so every gradient is).
    The plain path is the pipeline's model with no fast path: peft's LoRA layers, eager layers, no
    Liger, activations kept on the GPU, the same precision (bf16 autocast, 16-bit base). Each fast
    path must stay within 1e-2 of it, or within twice the noise floor where that is larger: relative
    error |a - b| / |b| over all LoRA gradients together (the worst single tensor is printed too). The
    noise floor is the plain path against itself with the same sum rounded differently; it grows with
    the adapter's scaling (rsLoRA's alpha / sqrt(r) is four times LoRA's alpha / r at r 16), and so
    does every path's distance from the plain path, a wrong computation's far more than twice. The precision itself is checked against float32
    compute, beside the tutorial recipe's (prepare_model_for_kbit_training: float32 norms,
    embeddings and residual stream, no autocast): bf16 rounding alone puts either about 1e-2 away.
    variant: the adapter checked, lora, dora (lora.use_dora: the fused layer steps aside, the other
    paths run) or rslora (lora.use_rslora: another scaling through the fused layer)."""
    import torch
    import torch._dynamo
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaConfig, LlamaForCausalLM
    from types import SimpleNamespace

    from qlora.tasks.training.fused_lora import fuse_lora_layers
    from qlora.tasks.training.kernels import compile_layers, liger_kernels, use_compile, use_liger
    from qlora.tasks.training.lora import lora_config, model_for_training
    from qlora.tasks.training.step import forward_backward, train_context

    path = "/tmp/llama-check"
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=32000, architectures=["LlamaForCausalLM"])
    if not os.path.exists(f"{path}/config.json"):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    dev = torch.device("cuda")
    lora_cfg = SimpleNamespace(enabled=True, bias="none", use_dora=variant == "dora", use_rslora=variant == "rslora",
                               init="default", r=16, lora_alpha=32,
                               lora_dropout=0.0)
    from qlora.tasks.results import LoraPlan
    resolved = LoraPlan.uncounted("causal-lm", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"], [])
    # The paths the train stage takes (each must stay within the bound), then the parts and the
    # alternatives it does not take, measured for the record (why the stage takes what it takes).
    fast_paths = {"fused LoRA (train.kernels: none, compile: false)": {"fused"},
                  "fused LoRA + compiled layers (train.kernels: none)": {"fused", "compile"},
                  "fused LoRA + Liger cross-entropy, RMSNorm, SwiGLU (compile: false)": {"fused", "liger"},
                  "fused LoRA + Liger cross-entropy, RMSNorm, SwiGLU + offload (compile: false)":
                      {"fused", "liger", "offload"},
                  "fused LoRA + compiled layers + Liger cross-entropy": {"fused", "compile", "liger"},
                  "fused LoRA + compiled layers + Liger cross-entropy + offload (the default under a budget)":
                      {"fused", "compile", "liger", "offload"}}
    # Measured with LoRA, for the record; another adapter variant checks only the paths taken.
    not_taken = {"Liger cross-entropy alone": {"liger:"},
                 "Liger cross-entropy + RMSNorm": {"liger:rms_norm"},
                 "Liger cross-entropy + SwiGLU": {"liger:swiglu"},
                 "Liger cross-entropy + RoPE": {"liger:rope"},
                 "fused LoRA + all of Liger's layer kernels (RoPE too)": {"fused", "liger:rope:rms_norm:swiglu"},
                 "fused LoRA + compiled layers without precision-cast emulation + Liger cross-entropy":
                     {"fused", "compile", "liger", "noemulate"}}
    if variant != "lora":  # the alternatives are measured with LoRA, for the record; here only the paths taken
        not_taken = {}
    # The noise floor: the plain path itself, the same batch run as two accumulated micro-batches of one
    # row (what the memory plan does under a budget): the same sum, only rounded differently.
    floor = "plain, one row per micro-batch"
    # And the plain path with only its cross-entropy computed in chunks of 64 rows by plain torch, as
    # Liger's fused cross-entropy chunks it on this model: the same arithmetic, other matrix shapes.
    chunked = "plain, cross-entropy in chunks of 64 rows (torch)"
    setups = {"float32": None, "tutorial recipe's precision": None, "plain": set(), floor: {"m1"}, chunked: {"chunks"},
              **fast_paths, **not_taken}
    worst = {name: {"loss": 0.0, "grads": 0.0, "worst_tensor": 0.0, "grads_vs_float32": 0.0}
             for name in setups if name != "float32"}
    for trial in range(trials):
        x = torch.randint(0, 32000, (2, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(100 + trial))
        results = {}
        for name, opts in setups.items():
            began = time.perf_counter()
            scoped = contextlib.ExitStack()
            base = load_quantized(path, dtype="float32" if name == "float32" else "bfloat16")
            if opts is None:  # float32, and the tutorial's upcast: peft on prepare_model_for_kbit_training
                model = get_peft_model(prepare_model_for_kbit_training(base, use_gradient_checkpointing=True),
                                       lora_config(resolved.task, resolved.target_modules, resolved.modules_to_save, lora_cfg))
            else:
                compiled = "compile" in opts and use_compile("auto", dev)
                wants_liger = any(o.split(":")[0] == "liger" for o in opts)
                if wants_liger and use_liger("auto", base.config, dev):
                    # Undone after this setup: Liger's module-level patches would reach every later model.
                    scoped.enter_context(liger_kernels(base, liger_layers(opts, compiled)))
                model = model_for_training(base, resolved, lora_cfg, True, True)
                if "fused" in opts:
                    fuse_lora_layers(model)
                if compiled:
                    torch._dynamo.reset()  # a fresh compile per model: no cached graph, no recompile limit
                    compile_layers(model, emulate_casts="noemulate" not in opts)
            model.train()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_A" in n or "lora_B" in n:  # (DoRA's magnitudes stay as peft computed them)
                        g = torch.Generator().manual_seed(sum(map(ord, n.replace("base_model.model.", ""))))
                        p.copy_(0.02 * torch.randn(p.shape, generator=g))
            if opts is None:
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                loss.backward()
            elif "chunks" in opts:
                inner = model.get_base_model()
                with train_context(dev, "bfloat16", False):
                    h = inner.model(input_ids=x, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
                    y = x[:, 1:].flatten()
                    loss = sum(torch.nn.functional.cross_entropy(inner.lm_head(h[i:i + 64]).float(), y[i:i + 64],
                                                                 reduction="sum") for i in range(0, len(y), 64)) / len(y)
                loss.backward()
            else:
                rows = [x[i:i + 1] for i in range(len(x))] if "m1" in opts else [x]
                loss = sum(forward_backward(model, {"input_ids": r, "labels": r, "use_cache": False}, dev,
                                                     "bfloat16", "offload" in opts, len(r) / len(x)) * len(r) / len(x)
                           for r in rows)
            results[name] = (float(loss), {n: p.grad.float() for n, p in model.named_parameters() if "lora_" in n})
            scoped.close()
            del model, base
            torch.cuda.empty_cache()
            if trial == 0:
                print(f"CHECK setup {name}: {time.perf_counter() - began:.1f} s", flush=True)
        _, g32 = results.pop("float32")
        loss_a, ga = results["plain"]
        for name, (loss_b, gb) in results.items():
            w = worst[name]
            w["loss"] = max(w["loss"], abs(loss_b - loss_a) / abs(loss_a))
            w["grads"] = max(w["grads"], _relative(gb, ga))
            w["grads_vs_float32"] = max(w["grads_vs_float32"], _relative(gb, g32))
            w["worst_tensor"] = max([w["worst_tensor"]] + [float((gb[n] - ga[n]).norm() / ga[n].norm()) for n in ga])
    bound = max(1e-2, 2 * worst[floor]["grads"])
    for name in [*fast_paths, *not_taken]:
        w = worst[name]
        w["ok"] = w["loss"] < 1e-2 and w["grads"] < bound
        w["taken_by_the_train_stage"] = name in fast_paths
        verdict = ("OK" if w["ok"] else "FAIL") if name in fast_paths else \
            f"{'within' if w['ok'] else 'over'} the bound, not a path the train stage takes"
        print(f"CHECK {name} vs plain path, {trials} fresh inputs: relative error loss {w['loss']:.2e}, "
              f"LoRA gradients {w['grads']:.2e} (worst single tensor {w['worst_tensor']:.2e}) -> "
              f"{verdict} (bound {bound:.2e})", flush=True)
    for name in (floor, chunked):
        w = worst[name]
        print(f"CHECK noise floor, {name} vs plain path (no fast path, bf16 rounding alone): relative error loss "
              f"{w['loss']:.2e}, LoRA gradients {w['grads']:.2e} (worst single tensor {w['worst_tensor']:.2e})",
              flush=True)
    # Not a pass/fail: the pipeline keeps the residual stream, norms and embeddings in bf16 where the
    # tutorial upcasts them to float32, a trade for memory and speed (benchmarks/RESULTS.md, first round).
    tutorial, plain = worst["tutorial recipe's precision"], worst["plain"]
    print(f"CHECK precision, LoRA gradients vs float32 compute: pipeline (bf16 residual stream) "
          f"{plain['grads_vs_float32']:.2e}, tutorial recipe (float32 residual stream) "
          f"{tutorial['grads_vs_float32']:.2e}; pipeline vs tutorial {tutorial['grads']:.2e}", flush=True)
    failed = [name for name in fast_paths if not worst[name]["ok"]]
    print(f"CHECK {'FAILED: ' + '; '.join(failed) if failed else f'every path the train stage takes is within {bound:.2e}'}")
    return worst, not failed


def _relative(got: dict, want: dict) -> float:
    """|got - want| / |want| over all tensors together."""
    diff = sum(float((got[n] - want[n]).norm()) ** 2 for n in want) ** 0.5
    return diff / sum(float(want[n].norm()) ** 2 for n in want) ** 0.5


def log_mlflow(path: str) -> None:
    """Record a result file as an MLflow run of the project's store (experiment gpu-benchmarks)."""
    import mlflow

    from qlora.tasks.tracking import default_tracking_uri

    data = json.loads(Path(path).read_text())
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())
    mlflow.set_experiment("gpu-benchmarks")
    # One invocation's file holds "tables"; a collected file holds "calls" (one per machine), each with its tables.
    tables = data.get("tables") or [dict(t, call=c["call"]) for c in data["calls"] for t in c["tables"]]
    for table in tables:
        suffix = f"-call{table['call']}" if "call" in table else ""
        with mlflow.start_run(run_name=f"{table['shape']}-{table['data']}{suffix}"):
            mlflow.log_params({"shape": table["shape"], "seq": table["seq"], "batch": table["batch"],
                               "data": table["data"], "gpu": data["gpu"], "command": table["command"][:500],
                               **{f"version.{k}": v for k, v in data["versions"].items()}})
            for row in table["rows"]:
                v = row["variant"].replace("+", "_")
                mlflow.log_metrics({f"{v}.tokens_per_s": row["tok_s"], f"{v}.peak_gib": row["peak_gib"],
                                    f"{v}.mfu": row["mfu"], f"{v}.loss_last": row["loss_last"]})
            mlflow.log_dict(table, "gpu_train.json")
    print(f"logged {len(tables)} tables to experiment gpu-benchmarks at {mlflow.get_tracking_uri()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2, help="rows of --seq tokens per optimizer step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget", type=float, help="the pipeline's train.max_memory_gib")
    parser.add_argument("--lengths", action="store_true", help="variable-length real examples")
    parser.add_argument("--only", help="comma-separated variants")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-liger", action="store_true")
    parser.add_argument("--no-fused", action="store_true")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--lora-variant", default="lora", choices=["lora", "dora", "rslora"],
                        help="with --check: the adapter kind every path is checked with")
    parser.add_argument("--trials", type=int, default=3, help="with --check: fresh random inputs")
    parser.add_argument("--optimizer-step", action="store_true", help="the optimizer's share of a step alone")
    parser.add_argument("--log-mlflow", metavar="JSON")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.log_mlflow:
        return log_mlflow(args.log_mlflow)
    if args.optimizer_step:
        result = optimizer_step()
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "optimizer_step.json").write_text(json.dumps(result))
        return
    if args.check:
        result, passed = check(args.trials, variant=args.lora_variant)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "check.json").write_text(json.dumps(result))
        sys.exit(0 if passed else 1)
    if args.variant:
        run = {"tutorial": run_tutorial, "tutorial-pad": run_tutorial_padded}.get(args.variant, run_pipeline)
        print("RESULT " + json.dumps(run(args)), flush=True)
        return
    import torch
    import transformers

    variants = args.only.split(",") if args.only else (["tutorial-pad", "pipeline"] if args.lengths else
                                                        ["tutorial", "pipeline"])
    cfg = config_of(args.shape, args.seq)
    if args.shape not in BUILT_IN_MEMORY:
        build_on_disk(args.shape, args.seq)  # here, not inside a measured variant
    peak = gemm_peak()
    flops_per_token = 6 * n_params(cfg) + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq
    rows = []
    child = ["--shape", args.shape, "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps)]
    child += ["--budget", str(args.budget)] if args.budget else []
    child += [f for f, on in (("--lengths", args.lengths), ("--profile", args.profile), ("--no-liger", args.no_liger),
                              ("--no-fused", args.no_fused)) if on]
    for variant in variants:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, *child, "--variant", variant], capture_output=True,
                              text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            print(f"{variant}: failed\n{done.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[0][7:])
        row = {"variant": variant, "tok_s": round(r["tok_s"]), "step_s": round(r["step_s"], 3),
               "peak_gib": round(r["peak_gib"], 2), "mfu": round(flops_per_token * r["tok_s"] / peak, 3),
               "loss_first": round(r["losses"][0], 3), "loss_last": round(r["losses"][-1], 3),
               "wall_s": round(time.perf_counter() - started),
               **{k: r[k] for k in ("warmup_s", "plan", "fast_paths", "note", "profile") if k in r}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["variant"].startswith("tutorial")), None)
    print(f"\n{args.shape}, seq {args.seq}, {args.batch} rows per optimizer step, "
          f"{'variable-length real examples (non-pad tokens)' if args.lengths else 'fixed-length rows'}, "
          f"LoRA r=16 all-linear, NF4 + double quant, bf16; {torch.cuda.get_device_name()}, "
          f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    print(f"{'variant':<24}{'tok/s':>8}{'x tut':>7}{'peak GiB':>10}{'x tut':>7}{'MFU':>7}{'loss first -> last':>20}")
    for r in rows:
        speed = f"{r['tok_s'] / base['tok_s']:.2f}" if base else "-"
        mem = f"{r['peak_gib'] / base['peak_gib']:.2f}" if base else "-"
        print(f"{r['variant']:<24}{r['tok_s']:>8}{speed:>7}{r['peak_gib']:>10}{mem:>7}{r['mfu']:>7}"
              f"{r['loss_first']:>11} -> {r['loss_last']}")
    if os.environ.get("OUT"):
        import peft
        try:
            import bitsandbytes
            bnb_version = bitsandbytes.__version__
        except ImportError:
            bnb_version = None
        out = Path(os.environ["OUT"], "gpu_train.json")
        data = json.loads(out.read_text()) if out.exists() else {"tables": []}
        data.update(gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                    versions={"torch": torch.__version__, "transformers": transformers.__version__,
                              "peft": peft.__version__, "bitsandbytes": bnb_version})
        data["tables"].append({"shape": args.shape, "seq": args.seq, "batch": args.batch,
                               "data": "variable-length" if args.lengths else "fixed-length",
                               "command": "python benchmarks/gpu_train.py " + " ".join(sys.argv[1:]),
                               "gemm_peak_tflops": round(peak / 1e12), "rows": rows})
        out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
