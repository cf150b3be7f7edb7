"""Which MLflow run a pipeline run reports to: an unfinished run of the same recipe is resumed,
unless another live pipeline run (a deployment serving runs at once) still reports to it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import small_recipe

import mlflow
from qlora.tasks import tracking
from qlora.tasks.recipe import RecipeError, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent


def start_run(recipe, key, uri, flow_run_id):
    _, run_id, resumed = tracking.start_run(recipe, key, uri, flow_run_id)
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


def test_a_failed_write_is_raised_where_it_happens_and_a_refused_promotion_keeps_its_field(tmp_path):
    """Writes go through MLflow's client in the run's own process: a read MLflow refuses raises at
    once, a background write it refuses is raised by end_run, which then ends the run FAILED; the
    run's other writes are kept; a RecipeError from the registry keeps its field."""
    from qlora.tasks import promotion

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    found = tracking.find_unfinished_runs(uri, "exp", "key-1")
    run = tracking.create_run(uri, found["experiment_id"], "a", {})
    tracking.log_summary(uri, run, {"x": np.float32(1.5), "n": np.int64(3)})
    with pytest.raises(Exception, match="(?i)run"):
        tracking.log_params(uri, "0" * 32, {"k": "v"})  # no such run: MLflow refuses
    tracking.log_batch(uri, run, params=[mlflow.entities.Param("../x", "v")])  # a name MLflow refuses, in the background
    with pytest.raises(Exception, match="(?i)invalid value"):
        tracking.end_run(uri, run, "FINISHED")  # the failed write is raised, and the run ends FAILED
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run).info.status == "FAILED"
    assert client.get_run(run).data.metrics == {"x": 1.5, "n": 3.0}
    with pytest.raises(RecipeError) as refused:
        promotion.promote(uri, "no-such-model", None, 0.0, None)
    assert refused.value.field == "NAME" and "no-such-model" in str(refused.value)
