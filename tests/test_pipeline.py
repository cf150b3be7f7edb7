"""End to end through the CLI: the real MiniLM in 4-bit on AG News rows, a real (temporary) Prefect
server on 127.0.0.1 and a real sqlite MLflow store in the project directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import small_recipe, write_recipe

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _command(project: Path, *overrides: str) -> list[str]:
    args = [sys.executable, "-m", "qlora.cli", "run", str(project / "r.yaml"), "--json", str(project / "summary.json")]
    return args + [a for o in overrides for a in ("--set", o)]


def _env(project: Path) -> dict:
    # Prefect's database in the project too: tests never touch the user's ~/.prefect
    return {**os.environ, "PREFECT_HOME": str(project / ".prefect")}


def run(project: Path, *overrides: str, command: list[str] | None = None) -> dict:
    done = subprocess.run(command or _command(project, *overrides), cwd=project, env=_env(project),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "== qlora run complete ==" in done.stdout
    return {**json.loads((project / "summary.json").read_text()), "stdout": done.stdout}


# `qlora run`, saying at the end which heavy libraries its own process imported.
REPORTING_IMPORTS = ("import sys; from qlora import cli; code = cli.main(sys.argv[1:]); "
                     "print('imported:', sorted(m for m in ('mlflow', 'pandas', 'torch', 'datasets') if m in sys.modules)); "
                     "raise SystemExit(code)")


def _client(project: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def test_run_rerun_and_edit(project):
    recipe = small_recipe(merge={"enabled": True, "dtype": "bfloat16", "compare": True})
    recipe["description"] = "a long description " * 600  # longer than MLflow's parameter limit
    write_recipe(project / "r.yaml", recipe)

    first = run(project)
    assert first["train"]["steps"] == 8 and not first["cached"]["train"]
    assert 0.0 <= first["test_metrics"]["accuracy"] <= 1.0  # 8 steps: accuracy targets live in the benchmark
    assert {"f1_macro", "precision_plot", "recall_fresh"} <= set(first["test_metrics"])
    assert Path(first["merged_dir"], "model.safetensors").is_file()

    client = _client(project)
    r = client.get_run(first["run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.params["lora.r"] == "8" and r.data.params["train.learning_rate"] == "0.001"
    assert r.data.params["description"].endswith("[truncated]")
    uuid.UUID(r.data.tags["prefect.flow_run_id"])
    for metric in ("test_accuracy", "test_f1_macro", "merged_test_accuracy", "trainable_params",
                   "trainable_percent", "peak_memory_bytes", "samples_per_s", "tokens_per_s",
                   "data_train_rows_kept", "test_latency_p50_ms"):
        assert metric in r.data.metrics, metric
    losses = client.get_metric_history(first["run_id"], "train_loss")
    assert [m.step for m in losses] == [2, 4, 6, 8]
    assert len(client.get_metric_history(first["run_id"], "learning_rate")) == 4
    artifacts = {a.path for d in ("", "adapter", "eval", "merged_model", "recipe")
                 for a in client.list_artifacts(first["run_id"], d)}
    assert {"adapter/adapter_model.safetensors", "eval/confusion_matrix.png", "eval/predictions_table.json",
            "merged_model/MLmodel", "recipe/r.yaml", "recipe/resolved.yaml"} <= artifacts
    contexts = sorted(i.tags[0].value for i in r.inputs.dataset_inputs)
    assert contexts == ["testing", "training", "validation"]
    assert all(i.dataset.digest for i in r.inputs.dataset_inputs)
    versions = {v.name for v in client.search_model_versions("name LIKE 'reviews-test%'")}
    assert versions == {"reviews-test-adapter", "reviews-test-merged"}

    # Merge variants, side by side, against the adapter
    table = {row["variant"]: row for row in first["comparison"]}
    assert list(table) == ["adapter", "merged-dequant", "merged-original", "merged-4bit"]
    assert table["adapter"]["agreement_pct"] == 100.0 and table["adapter"]["max_abs_logit_diff"] == 0.0
    assert table["merged-dequant"]["agreement_pct"] >= 95.0
    # Re-quantized: the merged weights are 4-bit again, smaller in memory than base + adapter.
    assert table["merged-4bit"]["weights_mb"] < table["adapter"]["weights_mb"]
    children = client.search_runs([r.info.experiment_id], f"tags.mlflow.parentRunId = '{first['run_id']}'")
    assert sorted(c.data.tags["qlora.variant"] for c in children) == sorted(table)
    assert {"comparison/variants.json", "comparison/variants.csv", "comparison/variants.png"} <= {
        a.path for a in client.list_artifacts(first["run_id"], "comparison")}
    _commands_on_finished_runs(project, first["run_id"])

    # Unchanged recipe: every stage cached, no training step, a new (finished) MLflow run: the run's
    # process imports neither torch nor datasets (pandas it does here: the merge comparison's table
    # is computed by the flow, from cached stages).
    start = time.monotonic()
    second = run(project, command=[sys.executable, "-c", REPORTING_IMPORTS] + _command(project)[3:])
    elapsed = time.monotonic() - start
    assert "imported: ['mlflow', 'pandas']" in second["stdout"], second["stdout"][-300:]
    assert all(second["cached"].values()), second["cached"]
    assert second["test_metrics"] == first["test_metrics"]
    assert client.get_run(second["run_id"]).info.status == "FINISHED"
    assert len(client.search_model_versions("name = 'reviews-test-adapter'")) == 1, "same adapter, no new version"
    print(f"cached re-run: {elapsed:.1f} s")

    # Prefect's cache says "Cached" now; a work directory deleted by hand is rebuilt, not trusted.
    import shutil

    for d in (project / ".qlora" / "tokenize").iterdir():
        shutil.rmtree(d)
    rebuilt = run(project)
    assert not rebuilt["cached"]["tokenize"] and rebuilt["cached"]["train"]
    assert list((project / ".qlora" / "tokenize").iterdir())

    # A new learning rate re-runs training and what follows it, not the data stages.
    third = run(project, "train.learning_rate=5e-4")
    cached = third["cached"]
    assert all(cached[s] for s in ("load", "split", "tokenize", "quantize", "lora")), cached
    assert not cached["train"] and not cached["evaluate"]
    assert third["train"]["steps"] == 8


def test_compiled_layers_train_through_the_pipeline(project):
    """train.compile: every encoder layer compiled (sequence lengths vary from batch to batch: the
    second length compiles with dynamic shapes), the run completes and records the fast path."""
    from qlora.tasks.training.kernels import can_compile

    if not can_compile(torch.device("cpu")):
        pytest.skip("torch.compile needs a C++ compiler")
    write_recipe(project / "r.yaml", small_recipe(train={"compile": True}))
    summary = run(project)
    assert "compiled_layers:6" in summary["train"]["fast_paths"], summary["train"]["fast_paths"]
    assert summary["train"]["steps"] == 8 and 0 <= summary["test_metrics"]["accuracy"] <= 1
    runs = _client(project).search_runs([e.experiment_id for e in _client(project).search_experiments()])
    assert "compiled_layers:6" in runs[0].data.tags["train.fast_paths"]


def test_killed_run_resumes_training_and_its_mlflow_run(project):
    """SIGKILL after the first checkpoint: the MLflow run is left RUNNING; the same command resumes
    it (same run id), continues training from the checkpoint and finishes the run."""
    recipe = small_recipe(train={"max_steps": 30, "save_steps": 5, "eval_steps": 10, "logging_steps": 5})
    write_recipe(project / "r.yaml", recipe)
    process = subprocess.Popen(_command(project), cwd=project, env=_env(project), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if list(project.glob(".qlora/train/*.partial/checkpoint-*")):
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before its first checkpoint"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    client = _client(project)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"
    killed_id = runs[0].info.run_id
    logged_before = [m.step for m in client.get_metric_history(killed_id, "train_loss")]

    summary = run(project)
    assert summary["run_id"] == killed_id and summary["resumed_run"]
    assert summary["train"]["resumed_from_step"] >= 5 and summary["train"]["steps"] == 30
    assert summary["cached"]["load"] and summary["cached"]["tokenize"]
    assert client.get_run(killed_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(killed_id, "train_loss")]
    assert set(logged_before) <= set(steps) and max(steps) == 30
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, "no orphan run left behind"
    done = _cli(project, "compare", killed_id)  # merge was off in this recipe
    assert done.returncode == 2 and f"run {killed_id} has no merged model" in done.stderr
    assert "qlora run recipes/reviews-test.yaml --set merge.enabled=true" in done.stderr


def _cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora.cli", *args], cwd=project, env=_env(project),
                          capture_output=True, text=True, timeout=300)


def _commands_on_finished_runs(project: Path, run_id: str) -> None:
    done = _cli(project, "compare", run_id)
    assert done.returncode == 0, done.stderr[-2000:]
    for variant in ("adapter", "merged-dequant", "merged-original", "merged-4bit"):
        assert variant in done.stdout
    done = _cli(project, "predict", "--run", run_id, "A thoroughly charming, funny film",
                "A tired sequel with nothing new to say")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "label" in done.stdout and "tired sequel" in done.stdout
    assert any(name in done.stdout for name in ("plot", "rotten", "fresh"))
    done = _cli(project, "predict", "--model", "reviews-test-merged@candidate", "A thoroughly charming, funny film")
    assert done.returncode == 0, done.stderr[-2000:]
    done = _cli(project, "promote", "reviews-test-merged", "--metric", "merged_test_accuracy")
    assert done.returncode == 0 and "promoted v1 to champion" in done.stdout, done.stdout + done.stderr
    done = _cli(project, "promote", "reviews-test-merged", "--metric", "merged_test_accuracy")
    assert "already the champion" in done.stdout
    done = _cli(project, "promote", "reviews-test-merged", "--metric", "bleu")
    assert done.returncode == 2 and "--metric: metric 'bleu' was not logged" in done.stderr
    done = _cli(project, "compare", "0123456789abcdef")
    assert done.returncode == 2 and "no MLflow run with id" in done.stderr
