"""A stage's cache key follows the code it really runs: every project module it imports, however
indirectly (found by reading the source), and the versions of the libraries that shape its output."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tasks import store

REPO = Path(__file__).resolve().parent.parent
PRINT_KEYS = ("import tasks.data, tasks.evaluate; "
              "print(tasks.evaluate.evaluate_model.code_fingerprint, tasks.data.load.code_fingerprint)")


def _fingerprints(root: Path) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", PRINT_KEYS], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluate, load = done.stdout.split()
    return evaluate, load


def test_editing_a_helper_two_imports_away_rebuilds_the_stage(tmp_path):
    """evaluate imports tasks.inference, which imports tasks.batches (the LM collation that feeds the
    loss): an edit there changes evaluate's key, and not the load stage's, which never runs it."""
    for package in ("tasks", "flows"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = _fingerprints(tmp_path)
    batches = tmp_path / "tasks" / "batches.py"
    source = batches.read_text()
    assert "def collate_lm(" in source
    batches.write_text(source.replace("def collate_lm(", "def _added_helper():\n    return 1\n\n\ndef collate_lm(", 1))
    after = _fingerprints(tmp_path)
    assert after[0] != before[0], "evaluate's key ignored an edit of tasks/batches.py"
    assert after[1] == before[1], "the load stage's key changed for code it does not import"
    metric = tmp_path / "tasks" / "metrics" / "accuracy.py"  # loaded by path, named by the recipe
    metric.write_text(metric.read_text() + "\n# edited\n")
    assert _fingerprints(tmp_path)[0] != after[0]


def test_a_library_upgrade_changes_the_key(monkeypatch):
    import importlib.metadata

    before = store.source_fingerprint("tasks.train")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "99.0" if name == "transformers" else real(name))
    assert store.source_fingerprint("tasks.train") != before
    assert store.source_fingerprint("tasks.train", libraries=("torch",)) == \
        store.source_fingerprint("tasks.train", libraries=("torch",))


def test_the_modules_a_stage_runs_are_found_without_importing_them():
    found = store.project_modules("tasks.evaluate")
    assert {"tasks.evaluate", "tasks.inference", "tasks.batches", "tasks.model", "tasks.store"} <= set(found)
    assert "tasks.train" not in found and "tasks.merge" not in found and "qlora.cli" not in found
    assert {"tasks.training.lora", "tasks.training.step", "tasks.training.checkpoint"} <= set(
        store.project_modules("tasks.train"))
