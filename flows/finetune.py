"""The pipeline flow. Its body is the DAG, top to bottom: load -> split -> tokenize -> LoRA plan ->
quantize -> (reference, for preference losses) -> evaluate the base (and the adapter a run continues)
-> train -> evaluate -> merge -> evaluate merged -> package, each a cached Prefect task; the
whole run recorded in one MLflow run through a RunRecorder (qlora.tasks.tracking)."""
# No `from __future__ import annotations`: Prefect builds the flow's parameter model from these
# annotations in the module a deployment loads by path, where string annotations do not resolve.
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from prefect import flow
from prefect.runtime import flow_run

from qlora.runtime import signals
from qlora.tasks import lineage, tracking
from qlora.tasks.comparison import comparison_table
from qlora.tasks.convert import convert_gguf
from qlora.tasks.data import describe_source
from qlora.tasks.evaluate import check_metrics, evaluate_model
from qlora.tasks.harness import check_harness
from qlora.tasks.judge import resolve_judge
from qlora.tasks.load import load, load_arguments
from qlora.tasks.lora_plan import plan_lora
from qlora.tasks.merge import VARIANT_OF, merge
from qlora.tasks.model import resolve_model
from qlora.tasks.package import base_reference, package
from qlora.tasks.quantize import quantize
from qlora.tasks.reference import score_reference
from qlora.tasks.recipe import LoraSection, Recipe, RecipeError, apply_overrides, load_recipe, recipe_from_dict
from qlora.tasks.results import (BaseModelFiles, DataSource, Evaluated, Merged, StageResult, StartingAdapter, Trained,
                                 UntrainedBase)
from qlora.tasks.split import split
from qlora.tasks.stage import materializing
from qlora.tasks.store import dir_size, hash_value
from qlora.tasks.tokenize import tokenize
from qlora.tasks.train import train
from qlora.tasks.upstream import continued_lora
from qlora.tasks.training.loading import CAUSAL
from qlora.tasks.training.plan import check_memory_budget

if TYPE_CHECKING:
    import pandas as pd


@flow(name="qlora-finetune", persist_result=False)
def finetune(recipe: Optional[Recipe] = None, recipe_file: Optional[str] = None, parent_run_id: Optional[str] = None,
             overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """One pipeline run, of a validated recipe, or of recipe_file read with `--set`-style overrides (as
    deployments give it). parent_run_id nests its MLflow run under a comparison or sweep. Prefect
    keeps the recipe's JSON as the flow run's parameters: its secret-bearing fields are masked there."""
    r = _recipe(recipe, recipe_file, overrides)
    run = StageRunner(r.work_dir, r.name)
    signals.install()  # ours, not Prefect's: training stops at a step boundary, with a checkpoint
    causal = r.model.task == CAUSAL

    # Cheap stages first: a mistake in the data or the LoRA targets fails before any MLflow run exists.
    check_metrics(r.evaluate, r.model.task)
    harness = check_harness(r.evaluate.harness)  # lm-eval installed, every task known
    model = original = resolve_model(r.model, tracking.tracking_uri_of(r), r.work_dir)
    start = original.start  # an adapter another run trained: this run continues it
    lora_cfg = continued_lora(r.lora, start)
    if model.gguf:  # dequantized once into a cached 16-bit model directory
        model = run(convert_gguf, model).as_base()
    source = describe_source(r.data)
    loaded = run(load, source, **load_arguments(r), asset="dataset")
    labels = loaded.label_names
    splits = run(split, loaded, r.split, r.data.sample)
    preference = r.preference if r.preference.enabled else None
    tokenized = run(tokenize, splits, model.tokenizer, r.tokenize, r.prompt if causal else None,
                    preference.data_view() if preference else None, asset="tokenized", upstream=("dataset",))
    lora = run(plan_lora, model, lora_cfg, labels, r.model.task, r.model.trust_remote_code)  # on the meta device
    check_memory_budget(model.path, r.train, r.quantization, lora, r.tokenize.max_length, causal,
                        r.model.trust_remote_code, r.distributed, dropout=lora_cfg.drops_inputs,
                        preference=preference)
    # Every cheap check passed: the tracking store opens (a new sqlite store creates its tables,
    # seconds). Not earlier: a failing recipe leaves no store.
    uri = tracking.tracking_uri_of(r)
    tracking.prepare_store(uri)
    judge = resolve_judge(r.evaluate.judge, uri, r.work_dir)  # a registered classifier, fetched once
    quantized = run(quantize, model, r.quantization, labels, r.train.seed, r.model.task, r.model.trust_remote_code)

    key = recipe_key(r, source, model, start)
    with mlflow_run(r, key, uri, parent_run_id) as record:
        record.inputs(recipe_file, loaded, splits, tokenized, lora, source.uri())
        if original.upstream:  # started from a model another run produced: link the chain
            record.upstream(original.upstream)
        # Preference losses with a reference: the starting model scores every row once (cached).
        reference = run(score_reference, tokenized, quantized, r.quantization, r.train.per_device_eval_batch_size,
                        start) if r.preference.needs_reference else None
        evaluate = dict(quantized=quantized, tokenized=tokenized, q=r.quantization, cfg=r.evaluate,
                        batch_size=r.train.per_device_eval_batch_size, preference=preference, reference=reference,
                        judge=judge, harness=harness)
        trained = run(train, tokenized=tokenized, quantized=quantized, lora=lora, **train_settings(r, lora_cfg),
                      run_id=record.run_id, tracking_uri=uri, reference=reference, start=start,
                      asset="adapter" if r.lora.enabled else "model",
                      upstream=("tokenized",))
        record.training(trained)
        # The untrained base's evaluation (and the starting adapter's) after training, not before:
        # nothing in training reads them, and training starts that much sooner.
        if causal:  # the same evaluation of the untrained base: before-vs-after numbers
            base_eval = run(evaluate_model, UntrainedBase(hash=f"base-{quantized.hash}"), **evaluate,
                            label="evaluate-base")
            record.evaluation(base_eval, "base")
            starting_eval = base_eval
            if start is not None:  # and of the adapter it continues: the starting model
                starting_eval = run(evaluate_model, start, **evaluate, label="evaluate-start")
                record.evaluation(starting_eval, "start")
            if judge is not None:  # the tuned answers are judged against the starting model's
                evaluate["against"] = starting_eval
        evaluated = run(evaluate_model, trained, **evaluate)
        record.evaluation(evaluated, "adapter")
        merged = merged_eval = None
        if r.merge.enabled and r.lora.enabled:
            merged = run(merge, trained, quantized, r.quantization, r.merge.base, r.merge.dtype,
                         asset="merged-model", upstream=("adapter",))
            record.merged(merged)
            merged_eval = run(evaluate_model, merged, **evaluate, label="evaluate-merged")
            record.evaluation(merged_eval, "merged")
        card = model_card(r, original, source, trained, evaluated, merged_eval, record.registered)
        packaged = run(package, trained, quantized, merged, card)
        record.packages(packaged, merged is not None)
        if r.tracking.register_models:
            record.register(trained, merged)
        if merged is not None and r.merge.compare:
            record.comparison(compare_variants(run, r, trained, evaluated, merged, merged_eval, evaluate),
                              Path(merged_eval.dir))
        if r.tracking.promotion.enabled:
            record.promote()
        return record.finish(run.lineage, run.seconds, key)


def train_settings(r: Recipe, lora_cfg: Optional[LoraSection] = None) -> dict:
    """The train stage's inputs that come from the recipe (lora_cfg: the adapter's shape, where the run
    continues one)."""
    return dict(lora_cfg=lora_cfg or r.lora, q=r.quantization, cfg=r.train, packing=r.tokenize.packing, launch=r.distributed,
                max_length=r.tokenize.max_length,
                pad_to_max_length=r.model.task == CAUSAL and r.tokenize.padding == "max_length",
                preference=r.preference if r.preference.enabled else None)


@contextlib.contextmanager
def mlflow_run(r: Recipe, key: str, uri: str, parent_run_id: str | None) -> Iterator[tracking.RunRecorder]:
    """The pipeline's MLflow run (new, or this recipe's unfinished one resumed) around the stages that
    report to it; ended FINISHED, KILLED (a signal, or an emergency exit) or FAILED, whatever happened."""
    experiment, run_id, resumed = tracking.start_run(r, key, uri, flow_run.get_id(), parent_run_id)
    status = "FAILED"
    unregister = signals.on_emergency(lambda: tracking.end_run(uri, run_id, "KILLED"))
    try:
        yield tracking.RunRecorder(r, uri, experiment, run_id, resumed, flow_run.get_id())
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        unregister()
        _end_run(uri, run_id, status)


def _end_run(uri: str, run_id: str, status: str) -> None:
    """The MLflow run's final status, whatever happened. A write that failed fails a run that would
    have finished; a run already failing keeps its own error, and the write's is logged beside it."""
    try:
        tracking.end_run(uri, run_id, status)
    except Exception as e:
        if status == "FINISHED":
            raise
        tracking.log.warning("MLflow: %s", e)


def _recipe(recipe: Recipe | None, recipe_file: str | None, overrides: list[str] | None) -> Recipe:
    if recipe is None:
        if recipe_file is None:
            raise RecipeError("give a recipe or a recipe_file", "recipe")
        return load_recipe(recipe_file, overrides or [])
    if not overrides:
        return recipe
    return recipe_from_dict(apply_overrides(recipe.with_secrets(), overrides), recipe_file)


def recipe_key(recipe: Recipe, source: DataSource, model: BaseModelFiles,
               start: Optional[StartingAdapter] = None) -> str:
    """Identity of a pipeline run for MLflow: same recipe, data and model (and adapter it continues) ->
    same (resumable) run."""
    fields = recipe.with_secrets(exclude={"tracking": True, "work_dir": True, "description": True,
                                          "distributed": True, "train": set(recipe.train.NOT_IN_CACHE_KEY)})
    return hash_value({"recipe": fields, "data": source.hash, "model": model.hash,
                       **({"start": start.hash} if start is not None else {})})


class StageRunner:
    """Runs stage tasks, remembering which were cache hits, in the order they ran (for the summary,
    the lineage and the MLflow run). A stage that builds a data or model asset runs as a
    materializing task of that asset."""

    def __init__(self, work_dir: str, recipe_name: str):
        self.work_dir, self.recipe_name, self.seconds = work_dir, recipe_name, {}
        self.lineage: list[dict] = []

    def __call__(self, stage_task, *args, label: str | None = None, asset: str | None = None,
                 upstream: tuple[str, ...] = (), **kwargs) -> StageResult:
        start = time.perf_counter()
        if label:
            stage_task = stage_task.with_options(task_run_name=label)
        if asset:
            stage_task = materializing(stage_task, [lineage.asset(self.recipe_name, asset)],
                                       [lineage.asset(self.recipe_name, a) for a in upstream])
        state = stage_task(*args, work_dir=self.work_dir, return_state=True, **kwargs)
        result = state.result()  # re-raises the task's exception
        name = label or stage_task.name
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.lineage.append({"stage": name, "key": result.hash, "cached": state.name == "Cached" or result.cache_hit,
                             "built_by_flow_run": result.built_by_flow_run})
        return result


def compare_variants(run: StageRunner, r: Recipe, trained: Trained, evaluated: Evaluated, merged: Merged,
                     merged_eval: Evaluated, evaluate: dict) -> "pd.DataFrame":
    """Build and evaluate the merge variants not built yet; tabulate all four against the adapter."""
    quantized = evaluate["quantized"]
    adapter_bytes = dir_size(trained.weights_dir)
    base_bytes = quantized.size_bytes or dir_size(quantized.original_path)
    evaluations = {"adapter": evaluated, merged.variant: merged_eval}
    sizes = {"adapter": (adapter_bytes, adapter_bytes + base_bytes), merged.variant: (merged.size_bytes, merged.size_bytes)}
    for strategy, variant in VARIANT_OF.items():
        if variant in evaluations:
            continue
        built = run(merge, trained, quantized, r.quantization, strategy, r.merge.dtype, label=f"merge-{variant}")
        evaluations[variant] = run(evaluate_model, built, **evaluate, label=f"evaluate-{variant}")
        sizes[variant] = (built.size_bytes, built.size_bytes)
    return comparison_table(evaluations, sizes)


def model_card(r: Recipe, model: BaseModelFiles, source: DataSource, trained: Trained, evaluated: Evaluated,
               merged_eval: Evaluated | None, registered: str) -> dict:
    """What the model cards say: provenance, test metrics, how to load."""
    return {"recipe": r.name, "method": r.method, "task": r.model.task, "reference": r.model.name_or_path,
            # Continuing an adapter, the tuned one fits the base that adapter was trained on.
            "base": model.start.config["base_model_name_or_path"] if model.start else base_reference(r.model, model),
            "labels": trained.label_names if r.model.task != CAUSAL else [],
            "data": source.uri(), "data_hash": source.hash, "steps": trained.steps,
            "metrics": evaluated.metrics, "merged_metrics": merged_eval.metrics if merged_eval else None,
            "registered_name": f"{registered}-merged" if merged_eval else f"{registered}-model",
            "model_kind": "merged model" if merged_eval else "fine-tuned model"}
