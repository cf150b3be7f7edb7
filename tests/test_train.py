"""Model and train stages on the real MiniLM in 4-bit: head kept out of quantization, LoRA targets
checked, seeded runs identical, an interrupted run resumes exactly where it stopped."""
from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_recipe, stages_before_training
from safetensors.torch import load_file

from qlora.tasks.batches import batch_order
from qlora.tasks.merge import merge
from qlora.tasks.lora_plan import plan_lora
from qlora.tasks.quantize import quantize
from qlora.tasks.recipe import LoraSection, RecipeError, recipe_from_dict
from qlora.tasks.train import train
from qlora.tasks.training.loading import load_base


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Data, quantized base and LoRA plan for a small AG News recipe, built once."""
    return stages_before_training(recipe_from_dict(small_recipe()), str(tmp_path_factory.mktemp("work")))


def _train(p, work_dir, on_checkpoint=None, **train_overrides):
    cfg = p["recipe"].train.model_copy(update=train_overrides)
    return train.fn(p["tokenized"], p["quantized"], p["lora"], p["recipe"].lora, p["recipe"].quantization, cfg,
                    on_checkpoint=on_checkpoint, work_dir=str(work_dir))


def _adapter(result) -> dict[str, torch.Tensor]:
    return load_file(Path(result.dir) / result.adapter / "adapter_model.safetensors")


def _history(result) -> list[dict]:
    return [json.loads(line) for line in (Path(result.dir) / result.history).read_text().splitlines()]


def test_head_stays_out_of_quantization(prepared):
    import bitsandbytes as bnb

    model = load_base(prepared["quantized"], ["a", "b", "c"], prepared["recipe"].quantization)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.dtype == torch.float32
    assert type(model.bert.pooler.dense) is torch.nn.Linear


def test_lora_targets_resolved_and_counted(prepared):
    lora = prepared["lora"]
    assert lora.target_modules == ["query", "value"] and lora.modules_to_save == ["classifier"]
    # 6 layers x 2 targets x r*(384+384), plus the 3-class head (384*3 + 3)
    assert lora.trainable_params == 6 * 2 * 8 * (384 + 384) + 384 * 3 + 3
    all_linear = plan_lora.fn(prepared["model"], LoraSection(target_modules="all-linear"), ["a", "b"],
                                work_dir=prepared["work"])
    assert all_linear.target_modules == ["dense", "key", "query", "value"]
    with pytest.raises(RecipeError, match=r"\['q_proj'\] match no linear layer") as e:
        plan_lora.fn(prepared["model"], LoraSection(target_modules=["query", "q_proj"]), ["a", "b"],
                       work_dir=prepared["work"])
    assert e.value.field == "lora.target_modules" and "query" in e.value.hint


def test_batch_order_is_a_function_of_seed_and_epoch():
    lengths = [i % 37 for i in range(1000)]
    a = batch_order(lengths, 16, seed=1, epoch=0, group_by_length=True)
    assert a == batch_order(lengths, 16, seed=1, epoch=0, group_by_length=True)
    assert a != batch_order(lengths, 16, seed=1, epoch=1, group_by_length=True)
    assert sorted(i for b in a for i in b) == list(range(1000))
    # grouping by length keeps rows of similar length together: little padding
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in a)
    plain = batch_order(lengths, 16, seed=1, epoch=0, group_by_length=False)
    waste_plain = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plain)
    assert waste < waste_plain / 5


class _Cycle:
    def __init__(self):
        self.me = self


def test_garbage_is_collected_at_step_boundaries_and_the_collector_restored():
    """Training collects Python's garbage itself, at fixed steps (every rank at the same ones), and
    gives the collector back as it found it: also after an error, and only when the last of several
    trainings running at once in threads ends."""
    from qlora.tasks.training.collection import PauseLog, StepCollection

    assert gc.isenabled()
    with StepCollection(every=2, full_every=4) as collection:
        assert not gc.isenabled()
        passes = PauseLog()
        cycle = _Cycle()
        alive = weakref.ref(cycle)
        del cycle
        collection.collect(1)
        assert alive() is not None, "collected between the steps the schedule names"
        collection.collect(2)
        assert alive() is None, "garbage of the steps before was not collected at step 2"
        collection.collect(3)
        collection.collect(4)
        passes.close()
        assert [generation for generation, _ in passes.pauses] == [1, 2], "young at step 2, everything at 4"
    assert gc.isenabled()

    with pytest.raises(ValueError):
        with StepCollection():
            raise ValueError("a failed step")
    assert gc.isenabled()

    first, second = StepCollection(), StepCollection()  # two trials' trainings, in one process
    first.close()
    assert not gc.isenabled(), "one training ended while another still trains"
    second.close()
    second.close()  # twice: no effect
    assert gc.isenabled()

    gc.disable()
    try:
        StepCollection().close()
        assert not gc.isenabled(), "a collector that was off is left off"
    finally:
        gc.enable()


@pytest.mark.slow
def test_two_seeded_runs_are_identical(prepared, tmp_path):
    """LoRA weights are initialised after the seed is set: two CPU runs give the same result."""
    a, b = _train(prepared, tmp_path / "a"), _train(prepared, tmp_path / "b")
    assert [h.get("train_loss") for h in _history(a)] == [h.get("train_loss") for h in _history(b)]
    for k, v in _adapter(a).items():
        assert torch.equal(v, _adapter(b)[k]), k
    assert a.steps == 8 and _history(a)[-1]["step"] == 8


@pytest.mark.slow
def test_interrupted_training_resumes_exactly(prepared, tmp_path):
    """Stop after the step-4 checkpoint; the re-run resumes at step 4 with optimizer, scheduler,
    RNG and data order restored, and ends where an uninterrupted run ends (no loss jump, no
    restarted schedule)."""
    straight = _train(prepared, tmp_path / "straight")

    collector_on = []

    def crash(step):
        collector_on.append(gc.isenabled())
        if step == 4:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _train(prepared, tmp_path / "resumed", on_checkpoint=crash)
    assert collector_on and not any(collector_on), "Python's collector ran on its own schedule during training"
    assert gc.isenabled(), "a training that failed left Python's garbage collector off"
    partial = list((tmp_path / "resumed" / "train").glob("*.partial"))
    assert len(partial) == 1 and (partial[0] / "checkpoint-0000004").is_dir()
    assert not [p for p in (tmp_path / "resumed" / "train").iterdir() if not p.name.endswith(".partial")], \
        "no completed-looking directory after a crash"
    resumed = _train(prepared, tmp_path / "resumed")
    assert resumed.resumed_from_step == 4 and resumed.steps == 8
    h_straight, h_resumed = _history(straight), _history(resumed)
    assert [h["step"] for h in h_resumed] == [h["step"] for h in h_straight]
    for x, y in zip(h_straight, h_resumed):
        for key in ("train_loss", "learning_rate", "eval_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    for k, v in _adapter(straight).items():
        torch.testing.assert_close(_adapter(resumed)[k], v, rtol=1e-3, atol=1e-4)  # float reduction order
    assert not partial[0].exists(), "checkpoints are cleared once the stage completes"


@pytest.mark.slow
def test_out_of_memory_keeps_a_checkpoint_says_what_to_set_and_resumes(prepared, tmp_path, monkeypatch):
    """CUDA running out of memory in step 3 (simulated): a checkpoint of step 2 is written though the
    recipe's save_steps is far off, the error names train.max_memory_gib with a value, and the next
    run, under a memory budget (not part of the stage's cache key), resumes at step 2."""
    from qlora.tasks.training import memory, step

    real = step.forward_backward
    calls = []

    def out_of_memory_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "forward_backward", out_of_memory_in_step_3)
    with pytest.raises(memory.OutOfMemory, match=r"CUDA ran out of memory in step 3 .*the checkpoint at step 2 is kept") as e:
        _train(prepared, tmp_path, save_steps=1000)
    assert e.value.field == "train.max_memory_gib" and "set train.max_memory_gib: " in str(e.value)
    partial = list((tmp_path / "train").glob("*.partial"))
    assert len(partial) == 1 and (partial[0] / "checkpoint-0000002").is_dir()
    monkeypatch.setattr(step, "forward_backward", real)
    resumed = _train(prepared, tmp_path, save_steps=1000, max_memory_gib=4.0)
    assert resumed.resumed_from_step == 2 and resumed.steps == 8
    assert resumed.memory_plan["micro_batch"] * resumed.memory_plan["accumulation"] == 16


def test_merge_dequantized_matches_adapter(prepared, tmp_path):
    """The merged 16-bit model predicts what the 4-bit base plus adapter predicts."""
    from peft import PeftModel

    from qlora.tasks.evaluate import load_for_eval

    trained = _train(prepared, tmp_path)
    q = prepared["recipe"].quantization
    merged = merge.fn(trained, prepared["quantized"], q, "dequantized", "float32", work_dir=str(tmp_path))
    model_dir = Path(merged.dir) / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["id2label"]["1"] == "rotten"
    labels = trained.label_names
    adapter_model = load_for_eval(trained, prepared["quantized"], q, labels)
    assert isinstance(adapter_model, PeftModel)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(model_dir)  # plain transformers loads it
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(["Stocks rallied as the central bank held rates.", "The striker scored twice in the final."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        a, m = adapter_model.eval()(**batch).logits, plain.eval()(**batch).logits
    torch.testing.assert_close(m, a, rtol=0, atol=2e-3)


@pytest.mark.parametrize("quantization, optim", [({"load_in_4bit": False, "load_in_8bit": True}, "paged_adamw_8bit"),
                                                 ({"load_in_4bit": False}, "paged_adamw_32bit")])
@pytest.mark.slow
def test_8bit_and_unquantized_bases_train_with_paged_optimizers(prepared, tmp_path, quantization, optim):
    """The same recipe with an 8-bit base, or none (plain LoRA), and bitsandbytes' paged optimizers."""
    r = recipe_from_dict(small_recipe(quantization=quantization, train={"optim": optim, "max_steps": 2}))
    work = str(tmp_path)
    labels = prepared["tokenized"].label_names
    quantized = quantize.fn(prepared["model"], r.quantization, labels, r.train.seed, work_dir=work)
    assert quantized.quantized == (r.quantization.mode == "8bit")
    result = train.fn(prepared["tokenized"], quantized, prepared["lora"], r.lora, r.quantization, r.train, work_dir=work)
    assert result.steps == 2 and result.final_train_loss > 0


def test_gradients_still_reach_every_layer_after_a_validation_pass(prepared):
    """A mid-training evaluation (eval mode, no grad) must not switch 4-bit layers to an inference
    kernel: afterwards the first layer's LoRA weights still get gradients."""
    from qlora.tasks.batches import collate
    from qlora.tasks.training.lora import model_for_training

    r = prepared["recipe"]
    model = model_for_training(load_base(prepared["quantized"], prepared["tokenized"].label_names, r.quantization),
                               prepared["lora"], r.lora, True, False)
    from datasets import load_from_disk

    ds = load_from_disk(f"{prepared['tokenized'].dir}/dataset")["train"]
    batch = collate([ds[i] for i in range(4)], 0, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    model(**batch).loss.backward()
    first = next(p for n, p in model.named_parameters() if "layer.0." in n and "lora_B" in n)  # A starts at 0 grad
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_encoder_rows_rounded_up_to_a_multiple_of_8_give_the_same_logits(prepared):
    """Compiled layers get row widths rounded up to a multiple of 8: the extra padding is masked, so
    the logits and the loss are those of the unrounded batch."""
    from datasets import load_from_disk

    from qlora.tasks.batches import collate

    r = prepared["recipe"]
    model = load_base(prepared["quantized"], prepared["tokenized"].label_names, r.quantization).eval()
    ds = load_from_disk(f"{prepared['tokenized'].dir}/dataset")["train"]
    long_rows = [ds[i] for i in range(len(ds)) if len(ds[i]["input_ids"]) >= 45][:4]
    rows = [dict(row, input_ids=row["input_ids"][:n], length=n) for row, n in zip(long_rows, (13, 21, 30, 45))]
    plain, rounded = collate(rows, 0, torch.device("cpu")), collate(rows, 0, torch.device("cpu"), multiple_of=8)
    assert rounded["input_ids"].shape[1] == -(-plain["input_ids"].shape[1] // 8) * 8 > plain["input_ids"].shape[1]
    with torch.no_grad():
        a, b = model(**plain), model(**rounded)
    # (other widths, other kernel reductions: logits agree to 1e-4; unmasked padding moves them by ~4e-2)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-4, atol=1e-5)


def test_training_path_matches_the_plain_peft_path(prepared):
    """The pipeline's training path (no float32 upcast of the base, non-reentrant checkpointing)
    computes the same loss and LoRA gradients as peft's plain one (prepare_model_for_kbit_training,
    reentrant checkpointing), on fresh random inputs; the trainable weights are float32."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from qlora.tasks.training.lora import keep_4bit_layers_trainable, lora_config, model_for_training

    r = prepared["recipe"]
    labels = prepared["tokenized"].label_names
    torch.manual_seed(1)
    ours = model_for_training(load_base(prepared["quantized"], labels, r.quantization), prepared["lora"], r.lora,
                              True, True)
    torch.manual_seed(1)
    plain = prepare_model_for_kbit_training(load_base(prepared["quantized"], labels, r.quantization),
                                            use_gradient_checkpointing=True)
    keep_4bit_layers_trainable(plain)
    plain = get_peft_model(plain, lora_config(prepared["lora"].task, prepared["lora"].target_modules, prepared["lora"].modules_to_save, r.lora))
    assert all(p.dtype == torch.float32 for p in ours.parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    ids = torch.randint(1000, 20000, (4, 24), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 0])}
    grads = []
    for model in (ours, plain):
        model.train()
        for module in model.modules():  # dropout off: the two paths draw different masks
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        # LoRA B starts at zero (so A gets no gradient): give both the same nonzero B
        for name, p in model.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    p.copy_(torch.linspace(-0.01, 0.01, p.numel()).reshape(p.shape))
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert abs(loss_a - loss_b) / abs(loss_b) < 1e-2
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        err = (grads_a[name] - grads_b[name]).norm() / grads_b[name].norm().clamp(min=1e-12)
        assert err < 1e-2, (name, float(err))


def _batch_order_by_python_sort(lengths, batch_size, seed, epoch, group_by_length):
    """The batch order as first written (Python sorts with per-row keys): the reference the numpy
    version must equal exactly, or a run resumed across the change would see other batches."""
    from qlora.tasks.batches import MEGABATCH

    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        block = batch_size * MEGABATCH
        order = np.concatenate([sorted(order[i:i + block], key=lambda j: -lengths[j])
                                for i in range(0, len(order), block)])
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if group_by_length:
        longest = max(range(len(batches)), key=lambda b: max(lengths[j] for j in batches[b]))
        batches.insert(0, batches.pop(longest))
        rest = batches[1:]
        rng.shuffle(rest)
        batches = batches[:1] + rest
    return batches


@pytest.mark.parametrize("rows, batch_size, distinct", [(1, 4, 3), (7, 3, 2), (1001, 8, 300), (5000, 16, 5)])
def test_batch_order_in_numpy_equals_the_python_sort(rows, batch_size, distinct):
    """Equal to the per-row-key sort it replaced (ties included), for every seed tried, and the
    packed rows' lengths equal their examples' sums."""
    from qlora.tasks.batches import batch_order, pack, unit_lengths

    for seed in range(5):
        lengths = np.random.default_rng(seed).integers(1, distinct + 1, rows)
        for grouped in (True, False):
            assert batch_order(lengths, batch_size, seed, 2, grouped) == \
                _batch_order_by_python_sort(lengths.tolist(), batch_size, seed, 2, grouped)
        units = pack(lengths, 40, seed)
        assert unit_lengths(lengths, units).tolist() == [int(sum(lengths[i] for i in u)) for u in units]
