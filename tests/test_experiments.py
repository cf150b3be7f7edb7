"""Method comparison and sweeps: recipes one switch apart, grids validated before anything runs,
and (slow) both flows end to end with nested MLflow runs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import small_recipe, write_recipe

from qlora.flows.experiments import expand_grid, method_recipes
from qlora.tasks.recipe import RecipeError, recipe_from_dict


def test_methods_are_one_switch_apart():
    variants = method_recipes(small_recipe(), full_learning_rate=5e-5)
    recipes = {m: recipe_from_dict(v) for m, v in variants.items()}
    assert {m: r.method for m, r in recipes.items()} == {"qlora": "qlora", "qlora+loftq": "qlora", "qlora+dora": "qlora",
                                                         "lora": "lora", "full": "full"}
    assert recipes["qlora"].lora == recipes["lora"].lora and recipes["qlora"].data == recipes["full"].data
    assert recipes["qlora+loftq"].lora == recipes["qlora"].lora.model_copy(update={"init": "loftq"})
    assert recipes["qlora+dora"].lora == recipes["qlora"].lora.model_copy(update={"use_dora": True})
    assert recipes["full"].train.learning_rate == 5e-5 and recipes["lora"].train.learning_rate == 1e-3


def test_methods_summary_gives_mean_spread_and_the_gap_to_lora():
    import pandas as pd

    from qlora.flows.experiments import summarize_methods

    rows = pd.DataFrame([{"method": m, "seed": s, "accuracy": a, "f1_macro": a, "train_runtime_s": 10.0,
                          "train_peak_memory_mb": 100.0, "trainable_params": 5}
                         for m, accs in (("qlora", [0.80, 0.82, 0.84]), ("lora", [0.85, 0.85, 0.85]))
                         for s, a in zip((1, 2, 3), accs)])
    table = summarize_methods(rows).set_index("method")
    assert table.loc["qlora", "runs"] == 3 and table.loc["qlora", "accuracy_mean"] == pytest.approx(0.82)
    assert table.loc["qlora", "accuracy_std"] == pytest.approx(0.02) and table.loc["lora", "accuracy_std"] == 0
    assert table.loc["qlora", "points_below_lora"] == pytest.approx(3.0)


def test_full_finetuning_of_a_4bit_base_is_refused():
    with pytest.raises(RecipeError, match="needs an unquantized base"):
        recipe_from_dict(small_recipe(lora={"enabled": False}))


def test_grid_expands_and_validates_every_trial_first():
    trials = expand_grid(small_recipe(), {"lora.r": [4, 8], "lora.lora_alpha": [8, 16, 32]})
    assert len(trials) == 6 and trials[0][0] == {"lora.r": 4, "lora.lora_alpha": 8}
    assert recipe_from_dict(trials[-1][1]).lora.r == 8 and recipe_from_dict(trials[-1][1]).lora.lora_alpha == 32
    with pytest.raises(RecipeError, match="non-empty list") as e:
        expand_grid(small_recipe(), {"lora.r": []})
    assert e.value.field == "lora.r"
    with pytest.raises(RecipeError, match="did you mean 'lora_alpha'"):
        expand_grid(small_recipe(), {"lora.r": [4], "lora.alpha": [8]})
    with pytest.raises(RecipeError, match="lora.r"):
        expand_grid(small_recipe(), {"lora.r": [4, -1]})


def test_sweep_cli_refuses_bad_grids_before_running(project, capsys):
    from qlora.cli import main

    path = write_recipe(project / "r.yaml", small_recipe())
    assert main(["sweep", str(path), "--grid", "lora.r=[]"]) == 2
    assert "lora.r: a sweep field needs a non-empty list" in capsys.readouterr().err
    assert main(["sweep", str(path), "--grid", "lora.lora_alfa=[8,16]"]) == 2
    assert "did you mean 'lora_alpha'" in capsys.readouterr().err
    assert main(["methods", str(path), "--seeds", "1,two"]) == 2
    assert "--seeds: integers separated by commas (e.g. 1,2,3), got '1,two'" in capsys.readouterr().err
    assert not (project / ".qlora").exists() and not (project / "mlflow" / "mlflow.db").exists()


def _cli(project, *args):
    import os

    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
    done = subprocess.run([sys.executable, "-m", "qlora.cli", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _children(project, parent_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    exp = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exp, f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.slow
def test_sweep_and_methods_end_to_end(project):
    write_recipe(project / "r.yaml", small_recipe(train={"max_steps": 4, "eval_steps": 4}))
    out = _cli(project, "sweep", "r.yaml", "--grid", "lora.r=[4,8]")
    parent = out.strip().splitlines()[-1].split()[3]
    client, children = _children(project, parent)
    assert sorted(c.data.params["lora.r"] for c in children) == ["4", "8"]
    assert all(c.info.status == "FINISHED" for c in children)
    table = json.loads(open(client.download_artifacts(parent, "sweep/table.json", str(project))).read())
    assert "lora.r" in table["columns"] and len(table["data"]) == 2

    out = _cli(project, "methods", "r.yaml", "--seeds", "7")
    parent = out.strip().splitlines()[-1].split()[3]
    client, children = _children(project, parent)
    assert len(children) == 5 and {c.data.params["train.seed"] for c in children} == {"7"}
    assert sorted((c.data.params["lora.init"], c.data.params["lora.use_dora"]) for c in children
                  if c.data.tags["qlora.method"] == "qlora") == [("default", "False"), ("default", "True"),
                                                                  ("loftq", "False")]
    methods = {c.data.tags["qlora.method"]: c for c in children if c.data.params["lora.init"] == "default"
               and c.data.params["lora.use_dora"] == "False"}
    assert set(methods) == {"qlora", "lora", "full"}
    assert "per method, over its seeds:" in out and "points_below_lora" in out
    trainable = {m: c.data.metrics["trainable_params"] for m, c in methods.items()}
    assert trainable["qlora"] == trainable["lora"] < trainable["full"] / 10
    for line in ("qlora", "lora", "full"):
        assert line in out
