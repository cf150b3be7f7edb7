"""Variant comparison: agreement, the table, and refusing to compare unlike runs."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from qlora.tasks.comparison import agreement, check_comparable, comparison_table
from qlora.tasks.recipe import RecipeError
from qlora.tasks.results import Evaluated


def _preds(logits) -> pd.DataFrame:
    logits = np.asarray(logits, dtype=float)
    return pd.DataFrame({"prediction": logits.argmax(-1), "logit_a": logits[:, 0], "logit_b": logits[:, 1]})


def test_agreement_counts_identical_labels_and_the_largest_logit_gap():
    ref = _preds([[1, 0], [0, 1], [2, 1], [0, 3]])
    other = _preds([[1, 0.5], [0, 1], [1, 2], [0, 2.5]])
    a = agreement(ref, other)
    assert a == {"agreement_pct": 75.0, "max_abs_logit_diff": 1.0}


def test_causal_agreement_is_identical_continuations_and_logit_gap():
    ref = pd.DataFrame({"greedy": ["a cat", "yes", "no"]})
    other = pd.DataFrame({"greedy": ["a cat", "yes.", "no"]})
    logits = np.zeros((3, 5), dtype=np.float32)
    shifted = logits.copy()
    shifted[1, 4] = -0.25
    a = agreement(ref, other, logits, shifted)
    assert a["agreement_pct"] == pytest.approx(200 / 3) and a["max_abs_logit_diff"] == 0.25


def test_table_rows_follow_variant_order(tmp_path):
    metrics = {"accuracy": 0.9, "f1_macro": 0.88, "latency_p50_ms": 2.0, "latency_p95_ms": 3.0,
               "examples_per_s": 500.0, "peak_memory_bytes": 2**20, "weights_bytes": 2**21}
    evaluations = {}
    for name, logits in (("merged-4bit", [[0, 1], [0, 1]]), ("adapter", [[1, 0], [0, 1]])):
        (tmp_path / name).mkdir()
        _preds(logits).to_parquet(tmp_path / name / "p.parquet")
        evaluations[name] = Evaluated(dir=str(tmp_path / name), predictions="p.parquet", metrics=metrics, examples=2,
                                      dtype="float32")
    table = comparison_table(evaluations, {"adapter": (2**20, 3 * 2**20), "merged-4bit": (2**21, 2**21)})
    assert table["variant"].tolist() == ["adapter", "merged-4bit"]
    assert table["agreement_pct"].tolist() == [100.0, 50.0]
    assert table["deploy_size_mb"].tolist() == [3.0, 2.0]


def _run(run_id, task, labels):
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id),
                           data=SimpleNamespace(params={"model.task": task}, tags={"qlora.labels": labels}))


def test_runs_of_different_label_sets_are_not_compared():
    check_comparable([_run("a" * 8, "sequence-classification", '["x", "y"]')] * 2)
    with pytest.raises(RecipeError, match="differ in labels"):
        check_comparable([_run("a" * 8, "sequence-classification", '["x", "y"]'),
                          _run("b" * 8, "sequence-classification", '["x", "z"]')])
    with pytest.raises(RecipeError, match="differ in task"):
        check_comparable([_run("a" * 8, "sequence-classification", '["x"]'), _run("b" * 8, "causal-lm", '["x"]')])
