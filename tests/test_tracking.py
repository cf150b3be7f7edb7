"""Which MLflow run a pipeline run reports to: an unfinished run of the same recipe is resumed,
unless another live pipeline run (a deployment serving runs at once) still reports to it. And the
process that writes a run's MLflow records (tasks.tracking_process)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import small_recipe
from tasks import tracking, tracking_process
from tasks.recipe import RecipeError, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent


def start_run(recipe, key, uri, flow_run_id):
    session = tracking_process.shared().session()
    _, run_id, resumed = tracking.start_run(session, recipe, key, uri, flow_run_id)
    session.flush()
    return run_id, resumed


def test_a_run_another_live_process_reports_to_is_not_shared(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = recipe_from_dict(small_recipe())
    client = mlflow.MlflowClient(uri)
    first, resumed = start_run(recipe, "key-1", uri, "flow-a")
    assert not resumed
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        client.set_tag(first, tracking.OWNER_TAG, tracking.process_owner(other.pid))
        second, resumed = start_run(recipe, "key-1", uri, "flow-b")
        assert not resumed and second != first  # its process is alive: it keeps its run
    finally:
        other.kill()
        other.wait()
    third, resumed = start_run(recipe, "key-1", uri, "flow-c")
    assert resumed  # a killed run's process is gone (its Prefect state may still say Running)
    client.set_terminated(second, status="FINISHED")
    client.set_terminated(first, status="FAILED")
    again, resumed = start_run(recipe, "key-1", uri, "flow-d")
    assert resumed and again == first  # a failed run is resumed whoever started it
    assert client.get_run(again).data.tags["prefect.flow_run_id"] == "flow-d"


def test_a_run_reported_to_from_another_machine_asks_prefect(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = recipe_from_dict(small_recipe())
    first, _ = start_run(recipe, "key-1", uri, "flow-a")
    mlflow.MlflowClient(uri).set_tag(first, tracking.OWNER_TAG, "another-host:123:456")
    monkeypatch.setattr(tracking, "flow_run_is_active", lambda flow_run_id: flow_run_id == "flow-a")
    second, resumed = start_run(recipe, "key-1", uri, "flow-b")
    assert not resumed and second != first
    monkeypatch.setattr(tracking, "flow_run_is_active", lambda flow_run_id: False)
    assert start_run(recipe, "key-1", uri, "flow-c")[1]


def test_an_unknown_flow_run_is_not_active():
    assert tracking.flow_run_is_active("00000000-0000-0000-0000-000000000000") is False


def test_the_recording_process_keeps_order_and_fails_only_the_run_whose_write_failed(tmp_path):
    """Writes are done in the order sent; an answer waits for the writes before it; a failed write is
    raised in its own run (which ends FAILED), not in another run sharing the process; a RecipeError
    keeps its field."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = tracking_process.TrackingProcess()
    try:
        a, b = process.session(), process.session()
        found = a.ask("find_unfinished_runs", uri, "exp", "key-1")
        run_a = a.ask("create_run", uri, found["experiment_id"], "a", {})
        run_b = b.ask("create_run", uri, found["experiment_id"], "b", {})
        a.call("log_summary", uri, run_a, {"x": np.float32(1.5), "n": np.int64(3)})
        a.call("log_params", uri, "0" * 32, {"k": "v"})  # no such run: MLflow refuses
        b.call("log_summary", uri, run_b, {"y": 2.0})
        b.flush()
        with pytest.raises(tracking_process.TrackingProcessError, match="log_params"):
            a.end_run(uri, run_a, "FINISHED")
        b.end_run(uri, run_b, "FINISHED")
        client = mlflow.MlflowClient(uri)
        assert client.get_run(run_a).info.status == "FAILED"
        assert client.get_run(run_a).data.metrics == {"x": 1.5, "n": 3.0}
        assert client.get_run(run_b).info.status == "FINISHED"
        with pytest.raises(RecipeError) as refused:
            b.ask("promote", uri, "no-such-model", None, 0.0, None)
        assert refused.value.field == "NAME" and "no-such-model" in str(refused.value)
    finally:
        process.close()
    assert process.process.returncode == 0


def test_the_recording_process_dies_with_the_run(tmp_path):
    """A run killed with SIGKILL leaves no recording process behind."""
    parent = subprocess.Popen([sys.executable, "-c", "from tasks import tracking_process; import time; "
                               "p = tracking_process.shared(); print(p.process.pid, flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
