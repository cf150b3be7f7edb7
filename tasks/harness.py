"""EleutherAI's lm-evaluation-harness inside the evaluate stage (`evaluate.harness`): the standard
benchmark tasks, or local ones, run on the model the stage already holds (the 4-bit base with its
adapter, the merged model, the base before training) through lm-eval's public `HFLM`, which takes a
loaded model object: no second load, and the adapter is never silently dropped (lm-eval's own loader
would load the base by name). Results: one metric per task and metric, `harness.<task>.<metric>` and
its `_stderr`, and lm-eval's results JSON beside the stage's other files."""
from __future__ import annotations

import difflib
import functools
import json
import math
from pathlib import Path

from qlora.tasks import store
from qlora.tasks.recipe import HarnessSection, RecipeError
from qlora.tasks.results import HarnessTasks

FIELD = "evaluate.harness.tasks"
RESULTS_FILE = "harness.json"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RecipeError("evaluate.harness needs lm-evaluation-harness, which is not installed", FIELD,
                          hint="pip install -e \".[eval]\" (or pip install lm-eval)") from None
    return lm_eval, TaskManager


def _task_manager(cfg: HarnessSection):
    include = None
    if cfg.include_path is not None:
        include = Path(cfg.include_path).expanduser()
        if not include.is_dir():
            raise RecipeError(f"not a directory: {cfg.include_path}", "evaluate.harness.include_path")
        include = str(include.resolve())
    return _indexed_tasks(include)


@functools.lru_cache(maxsize=4)
def _indexed_tasks(include: str | None):
    """lm-eval's TaskManager (it indexes every task YAML it ships, seconds): built once per process and
    include path, for the preflight and each variant's evaluation alike."""
    _, TaskManager = _lm_eval()
    return TaskManager(include_path=include)


def check_harness(cfg: HarnessSection) -> HarnessTasks | None:
    """lm-eval is installed, the include_path is a directory, and every task names a task, group or tag
    it knows (one line naming the field otherwise). Returns the tasks' identity for the evaluate stage's
    key: the configuration, the local task files' content and lm-eval's version."""
    if not cfg.enabled:
        return None
    manager = _task_manager(cfg)
    known = set(manager.all_tasks)
    for name in cfg.tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            raise RecipeError(f"unknown harness task '{name}'", FIELD,
                              hint=(f"did you mean {', '.join(close)}? " if close else "")
                              + "lm-eval's own tasks, or YAML files under evaluate.harness.include_path")
    from importlib.metadata import version

    local = store.tree_fingerprint(Path(cfg.include_path).expanduser()) if cfg.include_path else None
    return HarnessTasks(hash=store.hash_value({"config": cfg.model_dump(mode="json"), "local": local,
                                              "lm_eval": version("lm_eval")}))


def run_harness(model, tokenizer, cfg: HarnessSection, out: Path) -> dict[str, float]:
    """lm-eval's simple_evaluate on the loaded model; its results JSON written to out/harness.json.
    Returns the metrics as `harness.<task>.<metric>` (a filter other than `none` appended after a
    dot), each with its `_stderr` where lm-eval gives one."""
    lm_eval, _ = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                      task_manager=_task_manager(cfg), log_samples=False,
                                      bootstrap_iters=cfg.bootstrap_iters)
    model.train(was_training)
    kept = {k: results[k] for k in ("results", "groups", "configs", "versions", "n-shot", "higher_is_better",
                                    "n-samples", "lm_eval_version") if k in results}
    (out / RESULTS_FILE).write_text(json.dumps(kept, indent=2, default=str))
    return harness_metrics(results["results"])


def harness_metrics(results: dict) -> dict[str, float]:
    """lm-eval's per-task results ({"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}) as flat
    metric names; values that are not numbers (lm-eval writes "N/A" for a missing stderr) are left out."""
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            name, sep, filter_name = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            # acc_stderr,strict-match -> harness.task.acc.strict-match_stderr, beside harness.task.acc.strict-match
            measure = name.removesuffix("_stderr")
            filtered = f".{filter_name}" if filter_name != "none" else ""
            metrics[f"harness.{task}.{measure}{filtered}{name[len(measure):]}"] = float(value)
    return metrics
