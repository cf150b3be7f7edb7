"""Bad input: one clear line naming the field or file, exit code 2, nothing half-written."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import small_recipe, write_recipe

from qlora.cli import EXIT_USER_ERROR, main
from qlora.tasks.recipe import QuantizationSection, RecipeError


def _validate(project, capsys, recipe: dict, *overrides: str) -> str:
    path = write_recipe(project / "r.yaml", recipe)
    args = ["validate", str(path)] + [a for o in overrides for a in ("--set", o)]
    code = main(args)
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_valid_recipe_passes(project, capsys):
    path = write_recipe(project / "r.yaml", small_recipe())
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "target_modules: ['query', 'value']" in out


@pytest.mark.parametrize("override, expected", [
    ("lora.rr=8", "r.yaml: lora.rr: unknown key (did you mean 'r'?)"),
    ("train.num_train_epochs=many", "train.num_train_epochs"),
    ("model.name_or_path=./no/such/model", "model.name_or_path: path does not exist: ./no/such/model"),
    ("model.name_or_path=package:no_such_package_xyz/model", "Python package 'no_such_package_xyz' is not installed"),
    ("model.name_or_path=nobody/no-such-model-xyz", "cannot reach the Hugging Face Hub for 'nobody/no-such-model-xyz'"),
    ("data.path=./missing.csv", "data.path: path does not exist: ./missing.csv"),
    ("data.text_column=body", "data.text_column: column 'body' not found"),
    ("lora.target_modules=[q_proj, v_proj]", "lora.target_modules: ['q_proj', 'v_proj'] match no linear layer of bert"),
    ("evaluate.metrics=[bleurt]", "evaluate.metrics: unknown metric 'bleurt'"),
    ("train.compile=sometimes", "train.compile: Input should be 'auto', True or False (got 'sometimes')"),
])
def test_bad_field(project, capsys, override, expected):
    start = time.monotonic()
    err = _validate(project, capsys, small_recipe(), override)
    assert expected in err
    assert time.monotonic() - start < 30, "no hang, offline included"


def test_missing_section(project, capsys):
    recipe = small_recipe()
    del recipe["model"]
    assert "model: required but missing" in _validate(project, capsys, recipe)


def test_data_file_problems(project, capsys):
    (project / "empty.csv").write_text("")
    assert "data file is empty" in _validate(project, capsys, small_recipe(), f"data.path={project / 'empty.csv'}")
    (project / "latin.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    assert "not UTF-8" in _validate(project, capsys, small_recipe(), f"data.path={project / 'latin.csv'}")


def test_a_rerun_reads_its_data_once(project, monkeypatch):
    """Once the load stage holds this data's content, the preflight takes its checks from there (an
    unchanged re-run does not read and clean the data before the flow takes it from the cache); a
    changed file, or another data section, is read and checked again."""
    import shutil

    import qlora.tasks.data
    import qlora.tasks.load
    from qlora.cli import data_already_loaded, preflight
    from qlora.tasks.recipe import recipe_from_dict

    corpus = shutil.copytree(small_recipe()["data"]["path"], project / "reviews")
    r = recipe_from_dict({**small_recipe(), "data": {**small_recipe()["data"], "path": str(corpus)}})
    assert not data_already_loaded(r)
    source = qlora.tasks.data.describe_source(r.data)
    qlora.tasks.load.load.fn(source, r.data, r.model.labels, None, work_dir=r.work_dir)
    assert data_already_loaded(r)
    reads = []
    real = qlora.tasks.data.read_table
    monkeypatch.setattr(qlora.tasks.data, "read_table", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    preflight(r)
    assert reads == []
    train = next(corpus.glob("train.*"))
    train.write_bytes(train.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[0] + b"\n")  # one row fewer
    assert not data_already_loaded(r)
    preflight(r)
    assert reads
    other = recipe_from_dict({**small_recipe(), "data": {**small_recipe()["data"], "path": str(corpus),
                                                         "drop_duplicates": True}})
    assert not data_already_loaded(other)


def test_unreachable_tracking_server(project, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    start = time.monotonic()
    err = _validate(project, capsys, small_recipe(), f"tracking.tracking_uri=http://127.0.0.1:{port}")
    assert "tracking.tracking_uri: cannot reach the MLflow tracking server" in err
    assert time.monotonic() - start < 15


def test_4bit_that_bitsandbytes_cannot_run(monkeypatch):
    import bitsandbytes.functional as F

    from qlora.tasks.quantize import check_quantization

    def broken(*a, **k):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(F, "quantize_4bit", broken)
    with pytest.raises(RecipeError, match="cannot run 4bit quantization here") as e:
        check_quantization(QuantizationSection())
    assert e.value.field == "quantization.load_in_4bit" and "load_in_4bit: false" in e.value.hint
    check_quantization(QuantizationSection(load_in_4bit=False))  # plain LoRA needs no bitsandbytes kernels


def _run_cli(project: Path, recipe: dict, *overrides: str) -> subprocess.CompletedProcess:
    path = write_recipe(project / "r.yaml", recipe)
    args = [sys.executable, "-m", "qlora.cli", "run", str(path)] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
    return subprocess.run(args, cwd=project, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_errors_found_while_running_exit_2_and_leave_nothing(project):
    """Label names that don't match the data, and a split fraction that empties a split, surface
    inside the flow: still exit 2, one clear line, no MLflow run, no completed-looking artifacts."""
    df = pd.DataFrame({"text": [f"review {i}" for i in range(40)], "label": ["fresh", "rotten"] * 20})
    df.to_csv(project / "reviews.csv", index=False)
    recipe = small_recipe(data={"path": str(project / "reviews.csv"), "sample": None},
                                 model={"labels": ["positive", "negative"]})
    done = _run_cli(project, recipe)
    assert done.returncode == EXIT_USER_ERROR, done.stderr[-3000:]
    assert "error: " in done.stderr and "model.labels" in done.stderr and "do not match" in done.stderr
    done = _run_cli(project, recipe, "model.labels=null", "split.test_size=0.01")
    assert done.returncode == EXIT_USER_ERROR, done.stderr[-3000:]
    assert "split.test_size" in done.stderr and "leaves the test split empty" in done.stderr
    leftovers = [p for p in (project / ".qlora").glob("*/*") if p.name.startswith(".tmp")]
    assert not leftovers
    assert not (project / ".qlora" / "split").exists() or not any((project / ".qlora" / "split").iterdir())
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_validate_reports_data_mistakes_before_reading_the_model(project, capsys, monkeypatch):
    """The cheap checks (paths, columns, labels) come first: a wrong data path is reported without
    the model's config ever being read."""
    import qlora.tasks.model

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was read before the data path was checked")

    monkeypatch.setattr(qlora.tasks.model, "check_model", no_model)
    monkeypatch.setattr(qlora.tasks.model, "skeleton", no_model)
    err = _validate(project, capsys, small_recipe(), f"data.path={project / 'nowhere'}")
    assert "data.path" in err and "does not exist" in err


def test_version_and_help_of_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("qlora ")
    for command in ("run", "validate", "methods", "sweep", "deploy"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "override a recipe field" in out and "recipe YAML file" in out, command
    with pytest.raises(SystemExit):
        main(["ui", "--help"])
    assert "default 4200" in capsys.readouterr().out


@pytest.mark.skipif(not os.environ.get("QLORA_TEST_DATA"),
                    reason="QLORA_TEST_DATA (a directory holding ag_news/) not set: the AG News sample is optional")
def test_shipped_agnews_recipe_validates_on_the_ag_news_sample(capsys):
    """The optional real corpus: the shipped agnews-minilm recipe accepts the directory layout the
    README describes (train.csv, dev.csv, test.csv, integer labels)."""
    data = Path(os.environ["QLORA_TEST_DATA"]) / "ag_news"
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "agnews-minilm.yaml"
    assert main(["validate", str(recipe), "--set", f"data.path={data}", "--set", "work_dir=/tmp/qlora-validate"]) == 0
    assert "dev.csv" in capsys.readouterr().out


def test_shipped_recipes_are_listed_copied_and_run_by_name(project, capsys):
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert {"quickstart", "agnews-minilm", "chat-smollm2"} <= {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert main(["recipes", "copy", "quickstart"]) == 0 and (project / "quickstart.yaml").is_file()
    capsys.readouterr()
    assert main(["recipes", "copy", "quickstart"]) == EXIT_USER_ERROR  # never overwrites
    assert "exists already" in capsys.readouterr().err
    assert main(["recipes", "copy", "nope"]) == EXIT_USER_ERROR
    assert "shipped: " in capsys.readouterr().err
    # By name, from a directory that holds no recipes: the shipped file is found.
    assert main(["validate", "quickstart", "--set", "work_dir=" + str(project / "w")]) == 0
    assert "quickstart.yaml: ok" in capsys.readouterr().out
    assert main(["validate", "quickstrat"]) == EXIT_USER_ERROR
    assert "shipped recipes: " in capsys.readouterr().err
