"""The pipeline flow: load -> split -> tokenize -> quantize -> LoRA attach -> train -> evaluate -> merge
-> evaluate merged, each a cached Prefect task, the whole run recorded in one MLflow run."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from prefect import flow
from prefect.runtime import flow_run

from tasks import tracking
from tasks.data import describe_source, load, split, tokenize
from tasks.evaluate import check_metrics, evaluate_model
from tasks.compare import comparison_table
from tasks.merge import VARIANT_OF, merge
from tasks.model import CAUSAL, attach_lora, convert_gguf, converted, quantize, resolve_model
from tasks.recipe import Recipe, recipe_from_dict
from tasks.stage import call_stage
from tasks.store import dir_size, hash_value
from tasks.train import train


def recipe_key(recipe: Recipe, source: dict, model: dict) -> str:
    """Identity of a pipeline run for MLflow: same recipe, data and model -> same (resumable) run."""
    fields = recipe.model_dump(mode="json", exclude={"tracking", "work_dir", "description"})
    return hash_value({"recipe": fields, "data": source["hash"], "model": model["hash"]})


class StageRunner:
    """Runs stage tasks, remembering which were cache hits (for the summary and the MLflow run)."""

    def __init__(self, work_dir: str):
        self.work_dir, self.cached, self.seconds = work_dir, {}, {}

    def __call__(self, stage_task, *args, label: str | None = None, **kwargs) -> dict:
        start = time.perf_counter()
        if label:
            stage_task = stage_task.with_options(task_run_name=label)
        state = call_stage(stage_task, *args, work_dir=self.work_dir, **kwargs)
        result = state.result()  # re-raises the task's exception
        name = label or stage_task.name
        self.cached[name] = state.name == "Cached" or bool(result.get("cache_hit"))
        self.seconds[name] = round(time.perf_counter() - start, 3)
        return result


@flow(name="qlora-finetune")
def finetune(recipe: dict, recipe_file: Optional[str] = None, parent_run_id: Optional[str] = None) -> dict[str, Any]:
    """One pipeline run. parent_run_id nests its MLflow run under a comparison or sweep run."""
    r = recipe_from_dict(recipe, recipe_file)
    run = StageRunner(r.work_dir)

    # Cheap stages first: a mistake in the data or the LoRA targets fails before any MLflow run exists.
    causal = r.model.task == CAUSAL
    check_metrics(r.evaluate, r.model.task)
    model = resolve_model(r.model)
    if "gguf" in model:  # dequantized once into a cached 16-bit model directory
        model = converted(run(convert_gguf, model))
    source = describe_source(r.data)
    loaded = run(load, source, r.data, r.model.labels, r.prompt.columns if causal else None)
    labels = loaded["label_names"]
    splits = run(split, loaded, r.split, r.data.sample)
    tokenized = run(tokenize, splits, model["tokenizer"], r.tokenize, r.prompt if causal else None)
    # LoRA targets are checked on the meta device (cheap) before the base is quantized.
    lora = run(attach_lora, model, r.lora, labels, r.model.task, r.model.trust_remote_code)
    quantized = run(quantize, model, r.quantization, labels, r.train.seed, r.model.task, r.model.trust_remote_code)

    uri = tracking.tracking_uri_of(r)
    run_id, resumed = tracking.start_run(r, recipe_key(r, source, model), uri, flow_run.get_id(), parent_run_id)
    status = "FAILED"
    try:
        tracking.Tracker(uri, run_id).set_tags({"qlora.labels": json.dumps(labels), "qlora.task": r.model.task})
        tracking.log_recipe(uri, run_id, r, recipe_file)
        if not resumed:
            tracking.log_datasets(uri, run_id, splits, _source_uri(source))
        tracking.log_summary(uri, run_id, _data_counts(loaded, tokenized))
        tracking.log_summary(uri, run_id, {k: lora[k] for k in ("trainable_params", "base_params", "trainable_percent")})

        if causal:  # the same evaluation of the untrained base: before-vs-after numbers
            before = run(evaluate_model, {"hash": f"base-{quantized['hash']}", "base": True}, tokenized, quantized,
                         r.quantization, r.evaluate, r.train.per_device_eval_batch_size, label="evaluate-base")
            _log_evaluation(uri, run_id, before, "base_test_", "eval_base")
        trained = run(train, tokenized, quantized, lora, r.lora, r.quantization, r.train, r.tokenize.packing,
                      r.tokenize.max_length, causal and r.tokenize.padding == "max_length",
                      run_id=run_id, tracking_uri=uri)
        tracking.log_history(uri, run_id, Path(trained["dir"]) / trained["history"])
        tracking.log_summary(uri, run_id, {k: trained[k] for k in (
            "train_runtime_s", "samples_per_s", "tokens_per_s", "peak_memory_bytes", "steps")})
        artifact = "adapter" if r.lora.enabled else "model"  # full fine-tuning saves the whole model
        tracking.log_artifacts(uri, run_id, Path(trained["dir"]) / trained[artifact], artifact)

        evaluated = run(evaluate_model, trained, tokenized, quantized, r.quantization, r.evaluate,
                        r.train.per_device_eval_batch_size)
        _log_evaluation(uri, run_id, evaluated, "test_", "eval")

        summary = {"run_id": run_id, "tracking_uri": uri, "resumed_run": resumed,
                   "adapter_dir": str(Path(trained["dir"]) / trained[artifact]), "method": r.method,
                   "test_metrics": evaluated["metrics"], "train": trained, "lora": lora,
                   "data": loaded["stats"], "tokenize": tokenized["stats"]}
        if causal:
            summary["base_test_metrics"] = before["metrics"]
        if r.tracking.register_models:
            name = r.tracking.registered_model_name or r.name
            summary["adapter_version"] = tracking.register(uri, run_id, artifact, f"{name}-{artifact}", trained["hash"])

        if r.merge.enabled and r.lora.enabled:
            merged = run(merge, trained, quantized, r.quantization, r.merge.base, r.merge.dtype)
            merged_eval = run(evaluate_model, merged, tokenized, quantized, r.quantization, r.evaluate,
                              r.train.per_device_eval_batch_size, label="evaluate-merged")
            _log_evaluation(uri, run_id, merged_eval, "merged_test_", "eval_merged")
            tracking.log_artifacts(uri, run_id, Path(merged["dir"]) / merged["model"], "merged_model")
            summary.update(merged_dir=str(Path(merged["dir"]) / merged["model"]),
                           merged_test_metrics=merged_eval["metrics"])
            if r.tracking.register_models:
                summary["merged_version"] = tracking.register(uri, run_id, "merged_model",
                                                              f"{r.tracking.registered_model_name or r.name}-merged",
                                                              merged["hash"])
            if r.merge.compare:
                table = _compare_variants(run, r, trained, quantized, tokenized, evaluated, merged, merged_eval)
                tracking.log_comparison(uri, run_id, table, Path(merged_eval["dir"]))
                summary["comparison"] = table.to_dict(orient="records")
        summary.update(cached=run.cached, stage_seconds=run.seconds)
        tracking.Tracker(uri, run_id).set_tags({"qlora.cached_stages": ",".join(k for k, v in run.cached.items() if v)})
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_run(uri, run_id, status)


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


def _source_uri(source: dict) -> str:
    if "hub" in source:
        return f"https://huggingface.co/datasets/{source['hub']}"
    return str(Path(source["files"]["train"][0]).resolve())


def _data_counts(loaded: dict, tokenized: dict) -> dict[str, float]:
    counts = {f"data_{split}_{k}": v for split, stats in loaded["stats"].items() for k, v in stats.items()}
    counts.update({f"tokens_{split}_{k}": v for split, stats in tokenized["stats"].items() for k, v in stats.items()})
    return counts


def _log_evaluation(uri: str, run_id: str, evaluated: dict, prefix: str, artifact_dir: str) -> None:
    """Metrics, the stage's files (confusion matrix...) and its predictions (for a causal LM: prompt,
    reference and generated text) as an MLflow table."""
    directory = Path(evaluated["dir"])
    tracking.log_summary(uri, run_id, evaluated["metrics"], prefix)
    tracking.log_artifacts(uri, run_id, directory, artifact_dir)
    tracking.log_table(uri, run_id, pd.read_parquet(directory / evaluated["predictions"]),
                       f"{artifact_dir}/predictions_table.json")
