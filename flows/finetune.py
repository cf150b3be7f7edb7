"""The pipeline flow: load -> split -> tokenize -> quantize -> LoRA attach -> train -> evaluate -> merge
-> evaluate merged, each a cached Prefect task, the whole run recorded in one MLflow run."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from tasks import lineage, secrets, signals, tracking
from tasks.data import describe_source, load, split, tokenize
from tasks.evaluate import check_metrics, evaluate_model
from tasks.compare import comparison_table
from tasks.merge import VARIANT_OF, merge
from tasks.model import CAUSAL, plan_lora, convert_gguf, converted, quantize, resolve_model
from tasks.package import base_reference, package
from tasks.recipe import Recipe, RecipeError, apply_overrides, load_recipe, recipe_from_dict
from tasks.stage import materializing
from tasks.store import dir_size, hash_value
from tasks.train import check_memory_budget, train


def recipe_key(recipe: Recipe, source: dict, model: dict) -> str:
    """Identity of a pipeline run for MLflow: same recipe, data and model -> same (resumable) run."""
    fields = recipe.model_dump(mode="json", exclude={"tracking": True, "work_dir": True, "description": True,
                                                     "train": set(recipe.train.NOT_IN_CACHE_KEY)})
    return hash_value({"recipe": fields, "data": source["hash"], "model": model["hash"]})


class StageRunner:
    """Runs stage tasks, remembering which were cache hits (for the summary and the MLflow run).
    A stage that builds a data or model asset runs as a materializing task of that asset."""

    def __init__(self, work_dir: str, recipe_name: str):
        self.work_dir, self.recipe_name, self.cached, self.seconds = work_dir, recipe_name, {}, {}
        self.lineage: list[dict] = []  # every stage in the order it ran

    def __call__(self, stage_task, *args, label: str | None = None, asset: str | None = None,
                 upstream: tuple[str, ...] = (), **kwargs) -> dict:
        start = time.perf_counter()
        if label:
            stage_task = stage_task.with_options(task_run_name=label)
        if asset:
            stage_task = materializing(stage_task, [lineage.asset(self.recipe_name, asset)],
                                       [lineage.asset(self.recipe_name, a) for a in upstream])
        state = stage_task(*args, work_dir=self.work_dir, return_state=True, **kwargs)
        result = state.result()  # re-raises the task's exception
        name = label or stage_task.name
        self.cached[name] = state.name == "Cached" or bool(result.get("cache_hit"))
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.lineage.append({"stage": name, "key": result["hash"], "cached": self.cached[name],
                             "built_by_flow_run": result.get("built_by_flow_run")})
        return result


@flow(name="qlora-finetune", persist_result=False)
def finetune(recipe: Optional[dict] = None, recipe_file: Optional[str] = None, parent_run_id: Optional[str] = None,
             overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """One pipeline run, of a recipe given as a dict, or read from recipe_file with `--set`-style
    overrides (how prefect.yaml's deployments name it). parent_run_id nests its MLflow run under a
    comparison or sweep run."""
    if recipe is None:
        if recipe_file is None:
            raise RecipeError("give a recipe or a recipe_file", "recipe")
        r = load_recipe(recipe_file, overrides or [])
    else:
        raw = secrets.restore(recipe)  # the parameters shown in Prefect carry placeholders, not secrets
        r = recipe_from_dict(apply_overrides(raw, overrides) if overrides else raw, recipe_file)
    run = StageRunner(r.work_dir, r.name)
    signals.install()  # ours, not Prefect's: training stops at a step boundary, with a checkpoint

    # Cheap stages first: a mistake in the data or the LoRA targets fails before any MLflow run exists.
    causal = r.model.task == CAUSAL
    check_metrics(r.evaluate, r.model.task)
    uri = tracking.tracking_uri_of(r)
    model = original = resolve_model(r.model)
    if "gguf" in model:  # dequantized once into a cached 16-bit model directory
        model = converted(run(convert_gguf, model))
    source = describe_source(r.data)
    loaded = run(load, source, r.data, r.model.labels, r.prompt.columns if causal else None, asset="dataset")
    labels = loaded["label_names"]
    splits = run(split, loaded, r.split, r.data.sample)
    tokenized = run(tokenize, splits, model["tokenizer"], r.tokenize, r.prompt if causal else None,
                    asset="tokenized", upstream=("dataset",))
    # LoRA targets are checked on the meta device (cheap) before the base is quantized.
    lora = run(plan_lora, model, r.lora, labels, r.model.task, r.model.trust_remote_code)
    check_memory_budget(model["path"], r.train, r.quantization, lora, r.tokenize.max_length, causal,
                        r.model.trust_remote_code)
    # The recipe has passed every cheap check: open the tracking store (a new sqlite store creates its
    # tables, seconds) while the base is quantized. Not earlier: a failing recipe leaves no store.
    store_ready = threading.Thread(target=tracking.prepare_store, args=(uri,), daemon=True)
    store_ready.start()
    try:
        quantized = run(quantize, model, r.quantization, labels, r.train.seed, r.model.task, r.model.trust_remote_code)
    finally:
        store_ready.join()

    key = recipe_key(r, source, model)
    run_id, resumed = tracking.start_run(r, key, uri, flow_run.get_id(), parent_run_id)
    status = "FAILED"
    unregister = signals.on_emergency(lambda: tracking.end_run(uri, run_id, "KILLED"))
    try:
        _link_runs(uri, run_id, r.name)
        tracking.Tracker(uri, run_id).set_tags({"qlora.labels": json.dumps(labels), "qlora.task": r.model.task})
        tracking.log_recipe(uri, run_id, r, recipe_file)
        if not resumed:
            tracking.log_datasets(uri, run_id, splits, _source_uri(source))
        tracking.log_summary(uri, run_id, _data_counts(loaded, tokenized))
        tracking.log_summary(uri, run_id, {k: lora[k] for k in ("trainable_params", "base_params", "trainable_percent")})

        if causal:  # the same evaluation of the untrained base: before-vs-after numbers
            before = run(evaluate_model, {"hash": f"base-{quantized['hash']}", "base": True}, tokenized, quantized,
                         r.quantization, r.evaluate, r.train.per_device_eval_batch_size, label="evaluate-base")
            _log_evaluation(uri, run_id, before, "base_test_", "eval_base", r.name)
        trained = run(train, tokenized, quantized, lora, r.lora, r.quantization, r.train, r.tokenize.packing,
                      r.tokenize.max_length, causal and r.tokenize.padding == "max_length",
                      run_id=run_id, tracking_uri=uri, asset="adapter" if r.lora.enabled else "model",
                      upstream=("tokenized",))
        tracking.log_history(uri, run_id, Path(trained["dir"]) / trained["history"])
        tracking.log_summary(uri, run_id, {k: trained[k] for k in (
            "train_runtime_s", "samples_per_s", "tokens_per_s", "peak_memory_bytes", "steps", "weights_bytes",
            "gradient_bytes", "optimizer_state_bytes") if k in trained})
        artifact = "adapter" if r.lora.enabled else "model"  # full fine-tuning saves the whole model

        evaluated = run(evaluate_model, trained, tokenized, quantized, r.quantization, r.evaluate,
                        r.train.per_device_eval_batch_size)
        _log_evaluation(uri, run_id, evaluated, "test_", "eval", r.name)

        summary = {"run_id": run_id, "tracking_uri": uri, "resumed_run": resumed,
                   "adapter_dir": str(Path(trained["dir"]) / trained[artifact]), "method": r.method,
                   "test_metrics": evaluated["metrics"], "train": trained, "lora": lora,
                   "data": loaded["stats"], "tokenize": tokenized["stats"]}
        if causal:
            summary["base_test_metrics"] = before["metrics"]
        registered = r.tracking.registered_model_name or r.name
        merged = merged_eval = None
        if r.merge.enabled and r.lora.enabled:
            merged = run(merge, trained, quantized, r.quantization, r.merge.base, r.merge.dtype,
                         asset="merged-model", upstream=("adapter",))
            merged_eval = run(evaluate_model, merged, tokenized, quantized, r.quantization, r.evaluate,
                              r.train.per_device_eval_batch_size, label="evaluate-merged")
            _log_evaluation(uri, run_id, merged_eval, "merged_test_", "eval_merged", r.name)
            summary.update(merged_dir=str(Path(merged["dir"]) / merged["model"]),
                           merged_test_metrics=merged_eval["metrics"])
        # What users take away: the portable adapter, and the merged (or fully fine-tuned) model as an
        # MLflow model; these are what the run logs and the registry versions point at.
        packaged = run(package, trained, quantized, merged,
                       _card_info(r, original, source, trained, evaluated, merged_eval, registered))
        for name in ("adapter", "mlflow_model"):
            if name in packaged:
                logged_as = {"adapter": "adapter", "mlflow_model": "merged_model" if merged else "model"}[name]
                tracking.log_artifacts(uri, run_id, Path(packaged["dir"]) / packaged[name], logged_as)
                summary[f"{logged_as}_package"] = str(Path(packaged["dir"]) / packaged[name])
        if r.tracking.register_models:
            summary[f"{artifact}_version"] = tracking.register(uri, run_id, artifact, f"{registered}-{artifact}",
                                                               trained["hash"])
            _link_version(uri, f"{registered}-{artifact}", summary[f"{artifact}_version"])
            if merged is not None:
                summary["merged_version"] = tracking.register(uri, run_id, "merged_model", f"{registered}-merged",
                                                              merged["hash"])
                _link_version(uri, f"{registered}-merged", summary["merged_version"])
        if merged is not None and r.merge.compare:
            table = _compare_variants(run, r, trained, quantized, tokenized, evaluated, merged, merged_eval)
            tracking.log_comparison(uri, run_id, table, Path(merged_eval["dir"]))
            summary["comparison"] = table.to_dict(orient="records")
        if r.tracking.promotion.enabled:
            promoted = "merged" if r.tracking.promotion.model_for(r.merge.enabled and r.lora.enabled) == "merged" \
                else artifact
            summary["promotion"] = _promote(uri, run_id, r, f"{registered}-{promoted}")
        summary.update(cached=run.cached, stage_seconds=run.seconds, all_cached=all(run.cached.values()))
        _report(r.name, summary)
        lineage.run_lineage(r.name, run.lineage, flow_run.get_id())
        tracking.Tracker(uri, run_id).set_tags({"qlora.cached_stages": ",".join(k for k, v in run.cached.items() if v)})
        if summary["all_cached"]:
            tracking.mark_all_cached(uri, run_id, r.name, key)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_run(uri, run_id, status)
        unregister()


def _compare_variants(run: StageRunner, r: Recipe, trained: dict, quantized: dict, tokenized: dict,
                      evaluated: dict, merged: dict, merged_eval: dict) -> pd.DataFrame:
    """Build and evaluate the merge variants not built yet; tabulate all four against the adapter."""
    adapter_bytes = dir_size(Path(trained["dir"]) / trained["adapter"])
    base_bytes = quantized.get("size_bytes") or dir_size(quantized["original_path"])
    evaluations = {"adapter": evaluated, merged["variant"]: merged_eval}
    sizes = {"adapter": (adapter_bytes, adapter_bytes + base_bytes),
             merged["variant"]: (merged["size_bytes"], merged["size_bytes"])}
    for strategy, variant in VARIANT_OF.items():
        if variant in evaluations:
            continue
        built = run(merge, trained, quantized, r.quantization, strategy, r.merge.dtype, label=f"merge-{variant}")
        evaluations[variant] = run(evaluate_model, built, tokenized, quantized, r.quantization, r.evaluate,
                                   r.train.per_device_eval_batch_size, label=f"evaluate-{variant}")
        sizes[variant] = (built["size_bytes"], built["size_bytes"])
    return comparison_table(evaluations, sizes)


def _card_info(r: Recipe, model: dict, source: dict, trained: dict, evaluated: dict, merged_eval: dict | None,
               registered: str) -> dict:
    """What the model cards say: provenance, test metrics, how to load."""
    return {"recipe": r.name, "method": r.method, "task": r.model.task, "reference": r.model.name_or_path,
            "base": base_reference(r.model, model), "labels": trained["label_names"] if r.model.task != CAUSAL else [],
            "data": _source_uri(source), "data_hash": source["hash"], "steps": trained["steps"],
            "metrics": evaluated["metrics"], "merged_metrics": merged_eval["metrics"] if merged_eval else None,
            "registered_name": f"{registered}-merged" if merged_eval else f"{registered}-model",
            "model_kind": "merged model" if merged_eval else "fine-tuned model"}


def _source_uri(source: dict) -> str:
    if "hub" in source:
        return f"https://huggingface.co/datasets/{source['hub']}"
    return str(Path(source["files"]["train"][0]).resolve())


def _data_counts(loaded: dict, tokenized: dict) -> dict[str, float]:
    counts = {f"data_{split}_{k}": v for split, stats in loaded["stats"].items() for k, v in stats.items()}
    counts.update({f"tokens_{split}_{k}": v for split, stats in tokenized["stats"].items() for k, v in stats.items()})
    return counts


def _log_evaluation(uri: str, run_id: str, evaluated: dict, prefix: str, artifact_dir: str, recipe_name: str) -> None:
    """Metrics, the stage's files (confusion matrix...) and its predictions (for a causal LM: prompt,
    reference and generated text) as an MLflow table; the metrics as a Prefect table artifact too."""
    directory = Path(evaluated["dir"])
    tracking.log_summary(uri, run_id, evaluated["metrics"], prefix)
    lineage.metrics_table(evaluated["metrics"], f"{recipe_name}-{artifact_dir}",
                          f"{prefix}metrics of MLflow run {run_id}")
    tracking.log_artifacts(uri, run_id, directory, artifact_dir)
    tracking.log_table(uri, run_id, pd.read_parquet(directory / evaluated["predictions"]),
                       f"{artifact_dir}/predictions_table.json")


def _link_runs(uri: str, run_id: str, recipe_name: str) -> None:
    """Either side leads to the other: the MLflow run carries the Prefect flow run's id and page,
    the Prefect flow run a link to the MLflow run."""
    flow_run_id = flow_run.get_id()
    page = lineage.prefect_ui_url(flow_run_id)
    if page:
        tracking.Tracker(uri, run_id).set_tags({"prefect.flow_run_url": page})
    experiment = tracking.experiment_of(uri, run_id)
    lineage.link_or_note(lineage.mlflow_run_url(uri, experiment, run_id), f"MLflow run {run_id}",
                         f"{recipe_name}-mlflow-run", f"the MLflow run of this flow run", uri)


def _promote(uri: str, run_id: str, r: Recipe, name: str) -> dict:
    """Champion or not for registered model `name`, by the recipe's metric and margin; the decision
    and its reason recorded in MLflow (tags, promotion.json) and Prefect (markdown artifact), either way."""
    from flows.registry import promote

    p = r.tracking.promotion
    merges = r.merge.enabled and r.lora.enabled
    decision = promote(uri, name, p.metric_for(merges, r.model.task), p.margin, p.mode_for(merges, r.model.task))
    tracker = tracking.Tracker(uri, run_id)
    tracker.set_tags({"qlora.promotion.promoted": decision["promoted"], "qlora.promotion.reason": decision["reason"]})
    tracking.log_dict(uri, run_id, decision, "promotion.json")
    lineage.markdown(f"### promotion: {'promoted' if decision['promoted'] else 'not promoted'}\n\n{decision['reason']}"
                     f"\n\nMLflow run `{run_id}`, registered model `{name}`", f"{r.name}-promotion",
                     f"promotion decision for {name}")
    get_run_logger().info("promotion: %s", decision["reason"])
    return decision


def _report(recipe_name: str, summary: dict) -> None:
    """The run's outcome in the flow run's log and as an artifact: above all, whether anything was retrained."""
    if summary["all_cached"]:
        text = "unchanged data and recipe: every stage was a cache hit, nothing retrained"
    else:
        built = [k for k, v in summary["cached"].items() if not v]
        text = f"built: {', '.join(built)}; cached: {', '.join(k for k, v in summary['cached'].items() if v) or 'none'}"
    get_run_logger().info(text)
    lines = [f"### {recipe_name}: {text}", "", f"MLflow run `{summary['run_id']}` ({summary['tracking_uri']})"]
    if "promotion" in summary:
        lines.append(f"\npromotion: {summary['promotion']['reason']}")
    lineage.markdown("\n".join(lines), f"{recipe_name}-run-summary", "what this run built")


def _link_version(uri: str, name: str, version: str) -> None:
    lineage.link_or_note(lineage.mlflow_model_url(uri, name, version), f"registered model {name} v{version}",
                         f"{name}-version", f"registered model {name}, version {version}", uri)
