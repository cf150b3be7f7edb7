"""The memory a training step needs, estimated from the model's config before anything is loaded, and
the fastest plan (micro-batch, checkpointing, offload) that fits a budget.
"""
from __future__ import annotations

GIB = 2**30


class OutOfMemory(Exception):
    """CUDA ran out of memory during training: not a mistake in the recipe, but the message says what
    was kept and which setting makes the run fit (train.max_memory_gib, with a value)."""

    field = "train.max_memory_gib"

    @classmethod
    def at_step(cls, step: int, plan: dict, peak_gib: float, free_gib: float, budget_gib: float | None,
                resumable: bool) -> OutOfMemory:
        suggested = round(min(0.9 * free_gib, peak_gib * 0.8) if budget_gib is None else 0.8 * budget_gib, 1)
        kept = (f"the checkpoint at step {step} is kept; rerun to resume from it" if resumable
                else "no step had completed, nothing to keep")
        return cls(f"CUDA ran out of memory in step {step + 1} (micro-batch {plan['micro_batch']}, checkpointing "
                   f"{plan['gradient_checkpointing']}, offload {plan['offload_activations']}; peak {peak_gib:.1f} GiB, "
                   f"{free_gib:.1f} GiB were free at the start); {kept}; set {cls.field}: {max(suggested, 1.0)} (the "
                   f"train stage then picks a micro-batch and checkpointing that fit), or free the GPU of other "
                   f"processes")


def _shape(config) -> dict:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers = text.hidden_size, text.num_hidden_layers
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    inter = getattr(text, "intermediate_size", None) or 4 * h
    gated = getattr(text, "hidden_act", "silu") in ("silu", "swiglu") or "llama" in text.model_type
    per_layer = {"q": (h, heads * head_dim), "k": (h, kv * head_dim), "v": (h, kv * head_dim),
                 "o": (heads * head_dim, h), "down": (inter, h), "up": (h, inter)}
    if gated:
        per_layer["gate"] = (h, inter)
    tied = getattr(config, "tie_word_embeddings", True)
    return {"h": h, "inter": inter, "layers": layers, "vocab": text.vocab_size, "per_layer": per_layer,
            "embedding_params": text.vocab_size * h * (1 if tied else 2)}


def layer_count(config) -> int:
    """How many repeated layers the model has (the text model's, for a model with several)."""
    return _shape(config)["layers"]


def estimate_memory(config, *, weight_bits: int, trainable_params: int, optim: str, tokens: int,
                    gradient_checkpointing: bool, offload: bool, fused_ce: bool, causal: bool,
                    shards: int | None = None, checkpointed_layers: int | None = None,
                    dropout: bool = False) -> dict:
    """Bytes a training step needs at its peak, from the model's config alone (before loading):
    weights (NF4 0.5625 bytes a parameter with its float32 block scales, 8-bit 1.03, else 16-bit;
    embeddings and norms at least 16-bit, never quantized), trainable weights in float32 with their
    gradients and optimizer state, and activations for `tokens` tokens per micro-batch. Each part is
    checked against the part measured on a GPU (benchmarks/gpu_train.py, measured_vs_estimated_gib;
    benchmarks/RESULTS.md): the estimate stays at or above the measured peak, by a few percent at
    most, so a budget holds. The constants below are fitted there. shards: FSDP over that many GPUs
    (None: not sharded), each holding its part of the weights and training state, the 4-bit block
    scales whole (left nested, 1/64 byte a weight), and a few layers whole. checkpointed_layers: with
    gradient checkpointing, how many layers are checkpointed (None: all); the others keep what their
    backward reads, more when LoRA dropout is on (each adapter's own dropped copy of its input)."""
    s = _shape(config)
    linear = sum(i * o for i, o in s["per_layer"].values()) * s["layers"]
    # 4-bit: half a byte, plus a float32 scale per 64 weights: fused LoRA layers unnest the double
    # quantization's 8-bit scales on CUDA (the load's 0.516 bytes grows to this).
    per_param = {4: 0.5 + 4 / 64, 8: 1.03}.get(weight_bits, weight_bits / 8)
    weights = linear * per_param + (s["embedding_params"] + 4 * s["h"] * s["layers"]) * max(2, weight_bits / 8)  # never quantized
    if shards is not None:
        scales = linear * (1 / 64 + 1 / 4096) if weight_bits == 4 else 0  # nested 8-bit scales, on every GPU
        sharded = weights - (linear * (per_param - 0.5) if weight_bits == 4 else 0)  # packed 4-bit and 16-bit
        # Layers held whole besides the shards: two in one process; over several, five (the gathered
        # layers, the gather's receive buffers, the next layer prefetched), fitted to the 70B shape's
        # peaks on 1 and 2 GPUs (benchmarks/RESULTS.md, FSDP2).
        weights = sharded / shards + scales + (2 if shards == 1 else 5) * sharded / s["layers"]
    state_per_param = {"adamw_torch": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8, "sgd": 0}[optim]
    # float32 weight, gradient, state; and 2.5 bytes more than that count, as measured per LoRA
    # parameter with paged 8-bit AdamW on the 7B, 8B and 33B shapes
    training_state = trainable_params * (4 + 4 + state_per_param + 2.5) / (shards or 1)
    h, inter = s["h"], s["inter"]
    checkpointed = (s["layers"] if checkpointed_layers is None else min(checkpointed_layers, s["layers"])) \
        if gradient_checkpointing else 0
    layer = tokens * 2 * (18 * h + 6 * inter)  # one layer recomputed, with its backward's temporaries
    # What a layer that is not checkpointed keeps until its backward: its 16-bit activations (the MLP's
    # three intermediate-width tensors, a few hidden-width ones), and with dropout each adapter's
    # dropped input and its mask; fitted to the peaks of the 70B shape (FSDP, no dropout) and the 7B
    # shape (compiled, dropout 0.05) with some or none of their layers checkpointed (benchmarks/RESULTS.md).
    kept = tokens * (2 * (6.2 * h + 3 * inter) + (2.4 * (6 * h + inter) if dropout else 0))
    checkpoints = 0 if offload else tokens * 2 * h * checkpointed
    logits = tokens * s["vocab"] * 10 if causal and not fused_ce else 0  # 16-bit logits, float32 copy and gradient
    # Fitted to the measured peaks of compiled layers, which keep more for their backward than eager
    # ones: 0.97 of the count plus 0.22 GiB (allocator
    # slack, cuBLAS workspace).
    if checkpointed:  # the checkpoints, plus one layer recomputed or the loss, whichever is larger
        activations = max(0.97 * (checkpoints + layer), checkpoints + logits)
    else:  # the backward of the last layer, or the loss
        activations = max(0.97 * layer, logits)
    activations += (s["layers"] - checkpointed) * kept
    overhead = 0.22 * GIB
    peak = weights + training_state + activations + overhead
    return {"peak": int(peak), "weights": int(weights), "training_state": int(training_state),
            "activations": int(activations)}


def plan_memory(budget_gib: float, examples_per_step: int, estimate, layers: int, allow_offload: bool = True) -> dict:
    """The fastest set-up whose estimated peak fits the budget: the largest micro-batch (dividing the
    examples per optimizer step, the rest accumulated), first without gradient checkpointing, then
    with the fewest of the model's layers checkpointed that fits (each checkpointed layer runs its
    forward twice), then with the checkpoints offloaded to CPU. estimate(micro, checkpointed_layers,
    offload) -> bytes. Raises ValueError (with the smallest estimate) when nothing fits."""
    micro_batches = [m for m in range(examples_per_step, 0, -1) if examples_per_step % m == 0]
    budget = budget_gib * GIB
    # Largest micro-batch first: a 7B step on a fast GPU is bound by per-call host work (hundreds of
    # kernel launches per layer), so halving the micro-batch nearly halves tokens/s, while
    # offloading the checkpoints costs a few percent.
    for m in micro_batches:
        # fewer checkpointed layers need more memory: the fewest that fit, found by bisection
        if estimate(m, layers, False) <= budget:
            low, high = 0, layers  # estimate(high) fits
            while low < high:
                mid = (low + high) // 2
                low, high = (low, mid) if estimate(m, mid, False) <= budget else (mid + 1, high)
            return _plan(m, examples_per_step, high, False, estimate(m, high, False))
        if allow_offload and estimate(m, layers, True) <= budget:
            return _plan(m, examples_per_step, layers, True, estimate(m, layers, True))
    smallest = estimate(1, layers, allow_offload)
    raise ValueError(f"{budget_gib:g} GiB is too small: training needs about {smallest / GIB:.1f} GiB even at "
                     f"micro-batch 1 with gradient checkpointing" + (" and activations offloaded to CPU" if allow_offload else ""))


def _plan(micro: int, examples_per_step: int, checkpointed: int, offload: bool, peak: int) -> dict:
    return {"micro_batch": micro, "accumulation": examples_per_step // micro, "gradient_checkpointing": checkpointed > 0,
            "checkpointed_layers": checkpointed, "offload_activations": offload,
            "estimated_peak_gib": round(peak / GIB, 2)}
