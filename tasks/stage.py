"""`@stage`: a pipeline stage as a Prefect task with a content cache key and an atomic work directory.

    @stage("tokenize")
    def tokenize(out: Path, split: dict, cfg: TokenizeSection) -> dict: ...

becomes a Prefect task called as `tokenize(split, cfg, work_dir=...)`. Its key hashes, for each
argument, the upstream result's "hash" (for dicts that carry one), a recipe section's fields, or
the plain value; plus the source of the stage's module. Arguments named in `ignore` (run ids,
progress callbacks) are passed through but never part of the key. The stage writes into `out`, a
temporary directory renamed into `<work_dir>/<name>/<key>` when it returns; its result dict is
stored there as result.json, and gets "hash" (the key) and "dir" added. A stage that declares a
keyword `scratch` gets `<work_dir>/<name>/<key>.partial/`, kept across failures (checkpoints).
"""
from __future__ import annotations

import functools
import inspect
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.logging import get_run_logger
from pydantic import BaseModel

from tasks import lineage, store


def _key_part(value: Any) -> Any:
    if isinstance(value, dict) and "hash" in value:
        return value["hash"]
    if isinstance(value, BaseModel):  # less the fields that only say how fast (e.g. memory budgets)
        return value.model_dump(mode="json", exclude=set(getattr(value, "NOT_IN_CACHE_KEY", ())))
    if isinstance(value, (list, tuple)):
        return [_key_part(v) for v in value]
    return value


class _ContentKey(CachePolicy):
    """Prefect's cache key is the stage key. (A cached result whose directory was deleted since is
    caught by `call_stage`, which then re-runs the stage.)"""

    def __init__(self, key_of: Callable[[dict], tuple[str, Path]]):
        super().__init__()
        self.key_of = key_of

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> Optional[str]:
        key, directory = self.key_of(inputs)
        # Per work directory: a record must point into this project's store, not another's.
        return store.hash_value([key, str(directory.resolve())])


def call_stage(stage_task, *args, **kwargs):
    """Run a stage task inside a flow and return its final state. A cache hit whose work directory
    is gone (cleaned by hand) is re-run instead of handing on a stale path."""
    state = stage_task(*args, return_state=True, **kwargs)
    if state.name == "Cached" and store.read_result(Path(state.result()["dir"])) is None:
        state = stage_task.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
    return state


def stage(name: str, ignore: tuple[str, ...] = (), modules: tuple[str, ...] = ()):
    def decorate(build: Callable[..., dict]):
        module = sys.modules[build.__module__]
        # The stage's own module and the shared pieces whose behaviour changes its output.
        source = store.source_fingerprint(module.__name__, "tasks.store", *modules)
        params = [p for p in list(inspect.signature(build).parameters.values())[1:]  # drop `out`
                  if p.name != "scratch"]
        wants_scratch = "scratch" in inspect.signature(build).parameters
        skip = set(ignore) | {"work_dir"}

        def key_of(arguments: dict) -> tuple[str, Path]:
            parts = {k: _key_part(v) for k, v in arguments.items() if k not in skip}
            key = store.hash_value({"stage": name, "source": source, "inputs": parts})
            return key, store.stage_dir(arguments["work_dir"], name, key)

        @functools.wraps(build)
        def run_stage(*args, **kwargs) -> dict:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            key, directory = key_of(arguments)
            logger = _logger()
            cached = store.read_result(directory)
            if cached is not None:
                logger.info("%s: cache hit %s", name, directory)
                return {**cached, "cache_hit": True}
            logger.info("%s: building %s", name, directory)
            del arguments["work_dir"]
            # Scratch space that outlives a crash (checkpoints), removed once the stage completes.
            scratch = directory.with_name(directory.name + ".partial")
            if wants_scratch:
                scratch.mkdir(parents=True, exist_ok=True)
                arguments["scratch"] = scratch
            started = time.perf_counter()
            with store.building(directory) as tmp:
                result = build(tmp, **arguments) or {}
                result.update(hash=key, dir=str(directory.resolve()))
                store.write_result(tmp, result)
            shutil.rmtree(scratch, ignore_errors=True)
            inputs = {k: v["hash"] for k, v in arguments.items() if isinstance(v, dict) and "hash" in v}
            lineage.stage_summary(name, key, directory, time.perf_counter() - started, inputs, result)
            _describe_assets(key, directory)
            return result

        signature = inspect.Signature(
            params + [inspect.Parameter("work_dir", inspect.Parameter.KEYWORD_ONLY, annotation=str)])
        run_stage.__signature__ = signature
        # log_prints stays off: libraries that capture stdout (dill's globals detection, used by
        # datasets' fingerprints) would otherwise have their captures turned into log lines.
        prefect_task = task(name=name, cache_policy=_ContentKey(key_of), persist_result=True)(run_stage)
        prefect_task.key_of = key_of
        return prefect_task

    return decorate


def materializing(stage_task, assets: list, asset_deps: list):
    """The stage task as a Prefect MaterializingTask: a completed run emits materialization events
    for `assets`, with `asset_deps` upstream (given explicitly: a cached upstream stage emits none)."""
    from prefect.tasks import MaterializingTask

    task_ = MaterializingTask(fn=stage_task.fn, assets=assets, asset_deps=asset_deps, name=stage_task.name,
                              cache_policy=stage_task.cache_policy, persist_result=True,
                              task_run_name=stage_task.task_run_name)
    task_.key_of = stage_task.key_of
    return task_


def _describe_assets(key: str, directory: Path) -> None:
    from prefect.context import AssetContext

    context = AssetContext.get()
    for asset in (context.downstream_assets if context else ()):
        context.add_asset_metadata(asset.key, {"content_key": key, "directory": str(directory.resolve())})


def _logger():
    import logging

    try:
        return get_run_logger()
    except Exception:  # called outside a flow (tests, benchmarks)
        return logging.getLogger("qlora")
