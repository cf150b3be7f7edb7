"""The model registry's two aliases: every new version is the `candidate`; `promote` moves `champion`
to it only when it beats the champion on the promotion metric. Used by the flow (tracking.promotion)
and by `qlora promote`."""
from __future__ import annotations

from qlora.tasks.recipe import RecipeError
from qlora.tasks.tracking import mlflow_client, store_lock

CANDIDATE, CHAMPION = "candidate", "champion"


def register(uri: str, run_id: str, artifact_path: str, name: str, content_hash: str) -> str:
    """A model version for the logged artifact, unless one of the same content exists already."""
    with store_lock(uri):  # one version per content, also when two runs register at once
        return _register(mlflow_client(uri), run_id, artifact_path, name, content_hash)


def _register(client, run_id: str, artifact_path: str, name: str, content_hash: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # exists
    for v in client.search_model_versions(f"name = '{name}'"):
        if v.tags.get("qlora.content_hash") == content_hash:
            return v.version
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id, tags={"qlora.content_hash": content_hash})
    # Every new version is the candidate; `qlora promote` decides whether it becomes the champion.
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return version.version


def promote(uri: str, name: str, metric: str | None = None, min_delta: float = 0.0, mode: str | None = None) -> dict:
    """Point `champion` at the `candidate` version if it beats the champion on the metric (higher is
    better with mode max, lower with min) by more than min_delta. Without a metric: the model's own
    test figure (merged_test_* for a merged model). Returns the decision and its reason."""
    from mlflow.exceptions import MlflowException

    from qlora.tasks.recipe import default_promotion_metric, lower_is_better

    c = mlflow_client(uri)
    try:
        candidate = c.get_model_version_by_alias(name, CANDIDATE)
    except MlflowException:
        raise RecipeError(f"registered model '{name}' has no '{CANDIDATE}' version", "NAME") from None
    run = c.get_run(candidate.run_id)
    cand_metrics = run.data.metrics
    if metric is None:
        merged = candidate.source.rstrip("/").endswith("merged_model")
        metric = default_promotion_metric(merged, run.data.tags.get("qlora.task", "sequence-classification"))
    mode = mode or lower_is_better(metric)
    if metric not in cand_metrics:
        raise RecipeError(f"metric '{metric}' was not logged by the candidate's run", "--metric",
                          hint=f"logged: {', '.join(sorted(k for k in cand_metrics if k.startswith(('test_', 'merged_test_'))))}")
    try:
        champion = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    value = cand_metrics[metric]
    decision = {"model": name, "metric": metric, "candidate_version": candidate.version, "candidate_value": value,
                "champion_version": champion.version if champion else None, "promoted": False}
    if champion is not None and champion.version == candidate.version:
        return {**decision, "champion_value": value, "reason": f"version {candidate.version} is already the champion"}
    if champion is not None:
        sign = 1 if mode == "max" else -1
        best = c.get_run(champion.run_id).data.metrics.get(metric, -sign * float("inf"))
        decision["champion_value"] = best
        if sign * (value - best) <= min_delta:
            return {**decision, "reason": f"kept champion v{champion.version}: candidate v{candidate.version} "
                                          f"{metric}={value:.4f} does not beat {best:.4f} by more than {min_delta}"}
    c.set_registered_model_alias(name, CHAMPION, candidate.version)
    return {**decision, "promoted": True,
            "reason": f"promoted v{candidate.version} to {CHAMPION} ({metric}={value:.4f}, {mode}imized"
                      + (f", champion v{champion.version} had {decision['champion_value']:.4f})" if champion else
                         ", no champion before)")}
