"""Which MLflow run a pipeline run reports to: an unfinished run of the same recipe is resumed,
unless another live pipeline run (a deployment serving runs at once) still reports to it."""
from __future__ import annotations

import subprocess
import sys

import mlflow

from conftest import small_recipe
from tasks import tracking
from tasks.recipe import recipe_from_dict


def test_a_run_another_live_process_reports_to_is_not_shared(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = recipe_from_dict(small_recipe())
    client = mlflow.MlflowClient(uri)
    first, resumed = tracking.start_run(recipe, "key-1", uri, "flow-a")
    assert not resumed
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        client.set_tag(first, tracking.OWNER_TAG, tracking.process_owner(other.pid))
        second, resumed = tracking.start_run(recipe, "key-1", uri, "flow-b")
        assert not resumed and second != first  # its process is alive: it keeps its run
    finally:
        other.kill()
        other.wait()
    third, resumed = tracking.start_run(recipe, "key-1", uri, "flow-c")
    assert resumed  # a killed run's process is gone (its Prefect state may still say Running)
    client.set_terminated(second, status="FINISHED")
    client.set_terminated(first, status="FAILED")
    again, resumed = tracking.start_run(recipe, "key-1", uri, "flow-d")
    assert resumed and again == first  # a failed run is resumed whoever started it
    assert client.get_run(again).data.tags["prefect.flow_run_id"] == "flow-d"


def test_a_run_reported_to_from_another_machine_asks_prefect(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = recipe_from_dict(small_recipe())
    first, _ = tracking.start_run(recipe, "key-1", uri, "flow-a")
    mlflow.MlflowClient(uri).set_tag(first, tracking.OWNER_TAG, "another-host:123:456")
    monkeypatch.setattr(tracking, "flow_run_is_active", lambda flow_run_id: flow_run_id == "flow-a")
    second, resumed = tracking.start_run(recipe, "key-1", uri, "flow-b")
    assert not resumed and second != first
    monkeypatch.setattr(tracking, "flow_run_is_active", lambda flow_run_id: False)
    assert tracking.start_run(recipe, "key-1", uri, "flow-c")[1]


def test_an_unknown_flow_run_is_not_active():
    assert tracking.flow_run_is_active("00000000-0000-0000-0000-000000000000") is False
