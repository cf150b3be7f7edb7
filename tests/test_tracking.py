"""Which MLflow run a pipeline run reports to: an unfinished run of the same recipe is resumed,
unless another live flow run (a deployment serving runs at once) still owns it."""
from __future__ import annotations

import mlflow

from conftest import small_agnews_recipe
from tasks import tracking
from tasks.recipe import recipe_from_dict


def test_a_run_owned_by_a_live_flow_run_is_not_shared(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = recipe_from_dict(small_agnews_recipe())
    first, resumed = tracking.start_run(recipe, "key-1", uri, "flow-a")
    assert not resumed
    monkeypatch.setattr(tracking, "flow_run_is_active", lambda flow_run_id: flow_run_id == "flow-a")
    second, resumed = tracking.start_run(recipe, "key-1", uri, "flow-b")
    assert not resumed and second != first  # flow-a is still running its own
    monkeypatch.setattr(tracking, "flow_run_is_active", lambda flow_run_id: False)
    third, resumed = tracking.start_run(recipe, "key-1", uri, "flow-c")
    assert resumed and third in (first, second)  # an abandoned unfinished run is picked up
    client = mlflow.MlflowClient(uri)
    client.set_terminated(first, status="FAILED")
    client.set_terminated(second, status="FINISHED")
    monkeypatch.setattr(tracking, "flow_run_is_active", lambda flow_run_id: True)
    again, resumed = tracking.start_run(recipe, "key-1", uri, "flow-d")
    assert resumed and again == first  # a failed run is resumed whoever started it
    assert client.get_run(again).data.tags["prefect.flow_run_id"] == "flow-d"


def test_an_unknown_flow_run_is_not_active():
    assert tracking.flow_run_is_active("00000000-0000-0000-0000-000000000000") is False
