"""A stage's cache key follows the code it really runs: every project module it imports, however
indirectly (found by reading the source), and the versions of the libraries that shape its output."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from qlora.tasks import store

REPO = Path(__file__).resolve().parent.parent
PRINT_KEYS = ("import qlora.tasks.load, qlora.tasks.evaluate; "
              "print(qlora.tasks.evaluate.evaluate_model.code_fingerprint, qlora.tasks.load.load.code_fingerprint)")


def _fingerprints(root: Path) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", PRINT_KEYS], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluate, load = done.stdout.split()
    return evaluate, load


def test_editing_a_helper_two_imports_away_rebuilds_the_stage(tmp_path):
    """evaluate imports qlora.tasks.inference, which imports qlora.tasks.batches (the LM collation that feeds the
    loss): an edit there changes evaluate's key, and not the load stage's, which never runs it."""
    # The installed wheel's layout (qlora/tasks, qlora/flows), imported ahead of the checkout.
    for source, dest in (("qlora", "qlora"), ("tasks", "qlora/tasks"), ("flows", "qlora/flows")):
        shutil.copytree(REPO / source, tmp_path / dest, ignore=shutil.ignore_patterns("__pycache__"))
    before = _fingerprints(tmp_path)
    batches = tmp_path / "qlora" / "tasks" / "batches.py"
    source = batches.read_text()
    assert "def collate_lm(" in source
    batches.write_text(source.replace("def collate_lm(", "def _added_helper():\n    return 1\n\n\ndef collate_lm(", 1))
    after = _fingerprints(tmp_path)
    assert after[0] != before[0], "evaluate's key ignored an edit of tasks/batches.py"
    assert after[1] == before[1], "the load stage's key changed for code it does not import"
    metric = tmp_path / "qlora" / "tasks" / "metrics" / "accuracy.py"  # loaded by path, named by the recipe
    metric.write_text(metric.read_text() + "\n# edited\n")
    assert _fingerprints(tmp_path)[0] != after[0]


def test_a_library_upgrade_changes_the_key(monkeypatch):
    import importlib.metadata

    before = store.source_fingerprint("qlora.tasks.train")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "99.0" if name == "transformers" else real(name))
    assert store.source_fingerprint("qlora.tasks.train") == before  # versions are read once per process
    store._installed.cache_clear()  # as a new process after the upgrade would
    try:
        assert store.source_fingerprint("qlora.tasks.train") != before
    finally:
        monkeypatch.undo()
        store._installed.cache_clear()
    assert store.source_fingerprint("qlora.tasks.train", libraries=("torch",)) == \
        store.source_fingerprint("qlora.tasks.train", libraries=("torch",))


def test_the_modules_a_stage_runs_are_found_without_importing_them():
    found = store.project_modules("qlora.tasks.evaluate")
    assert {"qlora.tasks.evaluate", "qlora.tasks.inference", "qlora.tasks.batches", "qlora.tasks.training.loading", "qlora.tasks.store"} <= set(found)
    assert "qlora.tasks.train" not in found and "qlora.tasks.merge" not in found and "qlora.cli" not in found
    assert {"qlora.tasks.training.lora", "qlora.tasks.training.step", "qlora.tasks.training.checkpoint"} <= set(
        store.project_modules("qlora.tasks.train"))


def test_a_files_digest_is_read_once_per_version_and_any_write_reads_it_again(tmp_path, monkeypatch):
    """A data or weights file is digested whole (an edit anywhere in a large file that keeps its size
    changes the key), once per version: an unchanged file's digest is remembered across commands by
    its identity and times; a write, however small and whatever its mtime is set back to, is read."""
    import time

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store._digest_memo.cache_clear()
    reads = []
    digest = store._sha256_file
    monkeypatch.setattr(store, "_sha256_file", lambda p: reads.append(p) or digest(p))
    data = tmp_path / "rows.csv"
    data.write_bytes(b"text,label\n" + b"a fine film,1\n" * 50_000)
    first = store.file_fingerprint(data)
    assert len(reads) == 1 and not store.digest_memo_path().exists(), "a file written this second is not remembered"
    time.sleep(1.1)
    assert store.file_fingerprint(data) == first and len(reads) == 2
    store._digest_memo.cache_clear()  # a new command reads the memo from disk
    assert store.file_fingerprint(data) == first and len(reads) == 2
    stat = data.stat()
    with data.open("r+b") as f:  # one byte changed in the middle: same size, mtime set back
        f.seek(stat.st_size // 2 - (stat.st_size // 2) % 14 + 12)
        f.write(b"0")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size and data.stat().st_mtime_ns == stat.st_mtime_ns
    assert store.file_fingerprint(data) != first and len(reads) == 3
    store.digest_memo_path().write_text('{"planted": "not a digest"')  # unreadable memo: read the files
    store._digest_memo.cache_clear()
    assert store.file_fingerprint(data) != first and len(reads) == 4
    store._digest_memo.cache_clear()
