"""Flows that run the pipeline several times under one parent MLflow run:
- compare_methods: the same recipe as QLoRA (4-bit base; plain, LoftQ-initialised, DoRA), LoRA (16-bit
  base) and full fine-tuning, each over one or more seeds;
- sweep: a grid over any recipe fields (LoRA r and lora_alpha, the learning rate, ...), each trial a
  nested MLflow run, trials in parallel through Prefect's thread pool where the machine allows.
"""
from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from qlora.flows.finetune import finetune
from qlora.runtime import secrets
from qlora.tasks import tracking
from qlora.tasks.recipe import Recipe, RecipeError, apply_overrides, recipe_from_dict

METHOD_COLUMNS = ["method", "seed", "learning_rate", "trainable_params", "trainable_percent", "weights_mb", "gradients_mb",
                  "optimizer_state_mb", "train_peak_memory_mb", "train_runtime_s", "samples_per_s", "accuracy",
                  "f1_macro", "run_id"]


def method_recipes(recipe: dict, full_learning_rate: float) -> dict[str, dict]:
    """One recipe switch apart: 4-bit base + LoRA (plain, LoftQ-initialised, DoRA), 16-bit base + LoRA,
    16-bit base fully trained (at its own, lower learning rate: a LoRA rate would wreck a fully trained
    model)."""
    qlora = copy.deepcopy(recipe)
    qlora.setdefault("quantization", {}).update(load_in_4bit=True, load_in_8bit=False)
    qlora.setdefault("lora", {}).update(init="default", use_dora=False)
    loftq, dora = copy.deepcopy(qlora), copy.deepcopy(qlora)
    loftq["lora"]["init"] = "loftq"
    dora["lora"]["use_dora"] = True
    lora = copy.deepcopy(qlora)
    lora["quantization"].update(load_in_4bit=False)
    lora.setdefault("merge", {})["compare"] = False  # merge variants differ only for a quantized base
    full = copy.deepcopy(lora)
    full["lora"]["enabled"] = False
    full["merge"]["enabled"] = False
    full.setdefault("train", {})["learning_rate"] = full_learning_rate
    return {"qlora": qlora, "qlora+loftq": loftq, "qlora+dora": dora, "lora": lora, "full": full}


def summarize_methods(rows: pd.DataFrame) -> pd.DataFrame:
    """Per method over its seeds: test accuracy and macro-F1 as mean and standard deviation (the spread of
    the seeds), training time and memory as means."""
    grouped = rows.groupby("method", sort=False)
    table = grouped.agg(runs=("seed", "count"), accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
                        f1_macro_mean=("f1_macro", "mean"), train_runtime_s=("train_runtime_s", "mean"),
                        train_peak_memory_mb=("train_peak_memory_mb", "mean"),
                        trainable_params=("trainable_params", "first")).reset_index()
    best = table.loc[table["method"] == "lora", "accuracy_mean"]
    if len(best):  # the gap every method leaves to 16-bit LoRA, in accuracy points
        table["points_below_lora"] = 100 * (best.iloc[0] - table["accuracy_mean"])
    return table


def expand_grid(recipe: dict, grid: dict[str, list], file: str | None = None) -> list[tuple[dict, dict]]:
    """(trial params, trial recipe) for every combination; every trial validated before any runs."""
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise RecipeError("a sweep field needs a non-empty list of values", key, file,
                              hint=f"e.g. --grid {key}=[4,8,16]")
    trials = []
    for combo in itertools.product(*grid.values()):
        params = dict(zip(grid, combo))
        trial = apply_overrides(copy.deepcopy(recipe), [f"{k}={_yaml(v)}" for k, v in params.items()])
        trial["name"] = recipe["name"]
        recipe_from_dict(trial, file)  # unknown fields and bad values fail here, before anything runs
        trials.append((params, trial))
    return trials


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _row(summary: dict) -> dict:
    t, m = summary["train"], summary["test_metrics"]
    return {"trainable_params": summary["lora"]["trainable_params"],
            "trainable_percent": summary["lora"]["trainable_percent"],
            "weights_mb": t.get("weights_bytes", 0) / 2**20, "gradients_mb": t.get("gradient_bytes", 0) / 2**20,
            "optimizer_state_mb": t.get("optimizer_state_bytes", 0) / 2**20,
            "train_peak_memory_mb": t["peak_memory_bytes"] / 2**20, "train_runtime_s": t["train_runtime_s"],
            "samples_per_s": t["samples_per_s"], "accuracy": m.get("accuracy"), "f1_macro": m.get("f1_macro"),
            "run_id": summary["run_id"]}


def _log_table(uri: str, parent: str, table: pd.DataFrame, name: str, work: Path) -> None:
    client = tracking.mlflow_client(uri)
    client.log_table(parent, data=table, artifact_file=f"{name}/table.json")
    work.mkdir(parents=True, exist_ok=True)
    table.to_csv(work / f"{name}.csv", index=False)
    client.log_artifact(parent, str(work / f"{name}.csv"), name)


@flow(name="qlora-compare-methods", persist_result=False)
def compare_methods(recipe: Recipe, recipe_file: Optional[str] = None, full_learning_rate: float = 5e-5,
                    seeds: Optional[list[int]] = None) -> dict:
    r = recipe
    seeds = seeds or [r.train.seed]
    # Every variant valid before the first trains (a bad full-fine-tuning learning rate fails now).
    variants = {(m, seed): recipe_from_dict({**v, "train": {**v.get("train", {}), "seed": seed}}, recipe_file)
                for m, v in method_recipes(r.with_secrets(), full_learning_rate).items() for seed in seeds}
    uri = tracking.tracking_uri_of(r)
    parent = tracking.start_parent_run(r, uri, f"{r.name}-methods", {"qlora.kind": "method-comparison"})
    status = "FAILED"
    try:
        rows = []
        for (method, seed), variant in variants.items():
            summary = finetune(variant, recipe_file, parent_run_id=parent)
            rows.append({"method": method, "seed": seed, "learning_rate": variant.train.learning_rate, **_row(summary)})
        table = pd.DataFrame(rows, columns=METHOD_COLUMNS)
        _log_table(uri, parent, table, "methods", Path(r.work_dir) / "reports")
        summary_table = summarize_methods(table)
        _log_table(uri, parent, summary_table, "methods-summary", Path(r.work_dir) / "reports")
        status = "FINISHED"
        return {"run_id": parent, "tracking_uri": secrets.mask(uri), "table": table.to_dict(orient="records"),
                "summary": summary_table.to_dict(orient="records")}
    finally:
        tracking.end_run(uri, parent, status)


@task(name="trial", cache_policy=NO_CACHE, persist_result=False)
def trial(recipe: Recipe, recipe_file: Optional[str], parent: str) -> dict:
    return finetune(recipe, recipe_file, parent_run_id=parent)


@flow(name="qlora-sweep", persist_result=False)
def sweep(recipe: Recipe, grid: dict[str, list], recipe_file: Optional[str] = None) -> dict:
    r = recipe
    trials = expand_grid(r.with_secrets(), grid, recipe_file)
    uri = tracking.tracking_uri_of(r)
    parent = tracking.start_parent_run(r, uri, f"{r.name}-sweep", {"qlora.kind": "sweep",
                                                                    "qlora.sweep_fields": ",".join(grid)})
    status = "FAILED"
    try:
        futures = [trial.submit(recipe_from_dict(t, recipe_file), recipe_file, parent) for _, t in trials]
        rows = [{**params, **_row(f.result())} for (params, _), f in zip(trials, futures)]
        table = pd.DataFrame(rows)
        _log_table(uri, parent, table, "sweep", Path(r.work_dir) / "reports")
        status = "FINISHED"
        return {"run_id": parent, "tracking_uri": secrets.mask(uri), "table": table.to_dict(orient="records")}
    finally:
        tracking.end_run(uri, parent, status)


def sweep_with_workers(parallel: int):
    """The sweep flow with `parallel` trials at a time (threads: stages release the GIL in torch)."""
    return sweep.with_options(task_runner=ThreadPoolTaskRunner(max_workers=parallel))
