"""What a person browsing the Prefect UI sees of a run: a markdown summary per stage (its content
key, inputs' fingerprints, size, time), the evaluation metrics as a table, links between the Prefect
flow run and the MLflow run and model versions, and the promotion decision. Every call here is a
no-op outside a Prefect run (tests and benchmarks call stages as plain functions)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora.runtime.secrets import mask

if TYPE_CHECKING:
    from qlora.tasks.results import StageResult

log = logging.getLogger("qlora")


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def _safe(create, **kwargs) -> None:
    """Artifacts describe a run; failing to write one must not fail the run."""
    if not _in_run():
        return
    try:
        create(**kwargs)
    except Exception as e:  # noqa: BLE001 - reported, never raised
        log.warning("could not write a Prefect artifact: %s", e)


def _scalar(value: Any) -> str | None:
    if isinstance(value, (str, int, float, bool)) and len(str(value)) < 200:
        return str(value)
    return None


def stage_summary(name: str, key: str, directory: Path, seconds: float, inputs: dict[str, Any],
                  result: StageResult) -> None:
    from prefect.artifacts import create_markdown_artifact

    from qlora.tasks.store import dir_size

    lines = [f"### {name}", "", "| | |", "| --- | --- |", f"| content key | `{key}` |",
             f"| directory | `{directory}` |", f"| size | {dir_size(directory) / 2**20:.1f} MB |",
             f"| time | {seconds:.1f} s |"]
    for arg, fingerprint in inputs.items():
        lines.append(f"| input `{arg}` | `{fingerprint}` |")
    fields = result.model_dump(mode="json", exclude={"hash", "dir", "cache_hit"})
    for k, v in fields.items():
        if _scalar(v) is not None:
            lines.append(f"| {k} | {_scalar(v)} |")
    stats = fields.get("stats")
    if isinstance(stats, dict):
        lines += ["", "```json", json.dumps(stats, indent=1, default=str)[:4000], "```"]
    _safe(create_markdown_artifact, markdown="\n".join(lines), description=f"{name}: what was built")


def metrics_table(metrics: dict[str, float], key: str, description: str) -> None:
    from prefect.artifacts import create_table_artifact

    rows = [{"metric": k, "value": round(float(v), 6)} for k, v in sorted(metrics.items())
            if isinstance(v, (int, float))]
    _safe(create_table_artifact, table=rows, key=_artifact_key(key), description=description)


def link(url: str, text: str, key: str, description: str) -> None:
    from prefect.artifacts import create_link_artifact

    _safe(create_link_artifact, link=url, link_text=text, key=_artifact_key(key), description=description)


def markdown(text: str, key: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    _safe(create_markdown_artifact, markdown=text, key=_artifact_key(key), description=description)


def _artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    import re

    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def prefect_ui_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI, where a server (not an ephemeral API) serves one."""
    api = os.environ.get("PREFECT_UI_URL") or os.environ.get("PREFECT_API_URL")
    if not (api and flow_run_id):
        return None
    base = api.rstrip("/").removesuffix("/api")
    return f"{base}/runs/flow-run/{flow_run_id}"


def _mlflow_ui(tracking_uri: str) -> str | None:
    """The MLflow UI's address: the tracking server itself, or `qlora ui`'s MLflow UI
    (QLORA_MLFLOW_UI_URL) for a local store; None when nothing serves one."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return (os.environ.get("QLORA_MLFLOW_UI_URL") or "").rstrip("/") or None


# MLflow 3's UI chooses between its GenAI views (traces) and its machine-learning views (runs) by the
# page's `workflowType` query parameter, else by the browser's last choice (GenAI at first); the
# experiment's mlflow.experimentKind tag is not read while that switch is shown. Every link we give
# names the runs view.
MLFLOW_RUNS_VIEW = "workflowType=machine_learning"


def mlflow_page(base: str, page: str) -> str:
    """An MLflow UI page (`experiments/1/runs/abc`), opened in the machine-learning view."""
    return f"{base.rstrip('/')}/#/{page}?{MLFLOW_RUNS_VIEW}"


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    base = _mlflow_ui(tracking_uri)
    return mlflow_page(base, f"experiments/{experiment_id}/runs/{run_id}") if base else None


def mlflow_model_url(tracking_uri: str, name: str, version: str) -> str | None:
    base = _mlflow_ui(tracking_uri)
    return mlflow_page(base, f"models/{name}/versions/{version}") if base else None


def link_or_note(url: str | None, text: str, key: str, description: str, tracking_uri: str) -> None:
    """A link artifact where a UI serves the page, else a note saying how to open it."""
    if url:
        link(url, text, key, description)
    else:
        markdown(f"{text}, in the tracking store `{mask(tracking_uri)}`: browse it with `qlora ui`", key,
                 description)


def asset(recipe_name: str, kind: str):
    """The Prefect asset a stage materializes: one per recipe and kind (dataset, tokenized, adapter,
    merged-model), so the chain dataset -> tokenized -> adapter -> merged model is queryable."""
    from prefect.assets import Asset, AssetProperties

    return Asset(key=f"qlora://{_artifact_key(recipe_name)}/{kind}",
                 properties=AssetProperties(name=f"{recipe_name} {kind}",
                                            description=f"the {kind} of recipe {recipe_name}, content-addressed under its work_dir"))


def run_lineage(recipe_name: str, stages: list[dict], flow_run_id: str | None) -> None:
    """Every stage of this run with its content key, whether this run built it or found it cached,
    and for a cache hit the flow run that built it (a link where the Prefect UI serves one): the
    open-source UI's way from a model back to the data that made it."""
    rows = ["| stage | content key | this run | built by |", "| --- | --- | --- | --- |"]
    for s in stages:
        builder = s.get("built_by_flow_run")
        if not s["cached"]:
            built_by = "this flow run"
        elif builder:  # a link relative to the UI showing it: valid in whichever server's UI shows it
            built_by = f"[flow run {builder[:8]}](/runs/flow-run/{builder})"
        else:
            built_by = "an earlier run"
        rows.append(f"| {s['stage']} | `{s['key'][:12]}` | {'cached' if s['cached'] else 'built'} | {built_by} |")
    text = (f"### {recipe_name}: lineage of flow run `{flow_run_id}`\n\n"
            "Stages in the order they ran; each one's content key covers its inputs' keys, so a key names "
            "everything upstream of it.\n\n" + "\n".join(rows))
    markdown(text, f"{recipe_name}-lineage", "every stage of this run: content key, built or cached, and by which flow run")
