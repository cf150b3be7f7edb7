"""`@stage`: a pipeline stage as a Prefect task with a content cache key and an atomic work directory.

    @stage("tokenize")
    def tokenize(out: Path, split: Split, cfg: TokenizeSection) -> Tokenized: ...

becomes a Prefect task called as `tokenize(split, cfg, work_dir=...)`. Its key hashes, for each
argument, the upstream result's `hash` (any `Keyed` record, tasks/results.py), a recipe section's
fields, or the plain value; plus the source of the stage's module. Arguments named in `ignore` (run
ids, progress callbacks) are passed through but never part of the key. The stage writes into `out`, a
temporary directory renamed into `<work_dir>/<name>/<key>` when it returns; its typed result gets
`hash` (the key) and `dir` added and is stored there as result.json (with manifest.json: size and
digest of every file, checked whenever the cached result is used), read back into the same type. One process builds a key at
a time (a file lock beside the directory); a cache hit ends the Prefect task in state Cached. A stage that declares a
keyword `scratch` gets `<work_dir>/<name>/<key>.partial/`, kept across failures (checkpoints).
"""
from __future__ import annotations

import functools
import inspect
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import Completed
from pydantic import BaseModel, ValidationError

from qlora.runtime.errors import DiskFull, is_disk_full
from qlora.runtime.secrets import REVEALING
from qlora.tasks import lineage, store
from qlora.tasks.results import Keyed, StageResult


def _key_part(value: Any) -> Any:
    if isinstance(value, Keyed):
        return value.hash
    if isinstance(value, BaseModel):  # less the fields that only say how fast (e.g. memory budgets)
        return value.model_dump(mode="json", context=REVEALING, exclude=set(getattr(value, "NOT_IN_CACHE_KEY", ())))
    if isinstance(value, (list, tuple)):
        return [_key_part(v) for v in value]
    return value


def _intact_result(name: str, directory: Path, result_type: type[StageResult], logger) -> StageResult | None:
    """The stored result of a stage, or None if it must be built: absent, or corrupted (reported,
    naming the file, and discarded: the stage and what follows are rebuilt, never published)."""
    store.sweep_orphans(directory)
    try:
        stored = store.read_result(directory)
        if stored is None:
            return None
        try:
            return result_type.model_validate(stored)
        except ValidationError as e:
            raise store.CorruptCache(f"{directory / store.RESULT_FILE} is not a {result_type.__name__}: "
                                     f"{e.errors()[0]['msg']}") from None
    except store.CorruptCache as e:
        logger.warning("%s: cached result not used, rebuilding it: %s", name, e)
        store.discard(directory)
        return None


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


def _build(build: Callable[..., StageResult], name: str, result_type: type, key: str, directory: Path,
           arguments: dict, wants_scratch: bool, logger) -> StageResult:
    logger.info("%s: building %s", name, directory)
    del arguments["work_dir"]
    # Scratch space that outlives a crash (checkpoints), removed once the stage completes.
    scratch = directory.with_name(directory.name + ".partial")
    if wants_scratch:
        scratch.mkdir(parents=True, exist_ok=True)
        arguments["scratch"] = scratch
    started = time.perf_counter()
    with store.building(directory) as tmp:
        try:
            result = build(tmp, **arguments)
            if not isinstance(result, result_type):
                raise TypeError(f"stage {name} returned {type(result).__name__}, not its {result_type.__name__}")
            # The flow run that built it: a later run's lineage links cache hits back to their builder.
            result = result.model_copy(update=dict(hash=key, dir=str(directory.resolve()), built_by_flow_run=_flow_run_id()))
            store.write_result(tmp, result.model_dump(mode="json", exclude={"cache_hit"}))
        except Exception as e:
            if is_disk_full(e):  # one line, where and how much; the partial directory goes (building())
                raise DiskFull(name, directory, store.dir_size(tmp)) from None
            raise
    shutil.rmtree(scratch, ignore_errors=True)
    inputs = {k: v.hash for k, v in arguments.items() if isinstance(v, Keyed)}
    lineage.stage_summary(name, key, directory, time.perf_counter() - started, inputs, result)
    _describe_assets(key, directory)
    return result


def stage(name: str, ignore: tuple[str, ...] = (), modules: tuple[str, ...] = (),
          libraries: tuple[str, ...] = store.STAGE_LIBRARIES):
    def decorate(build: Callable[..., StageResult]):
        module = sys.modules[build.__module__]
        result_type = typing.get_type_hints(build)["return"]
        # The stage's module and every project module it imports (found by reading the code, so no
        # list can drift), `modules` it loads otherwise (metric scripts), the libraries' versions.
        source = store.source_fingerprint(module.__name__, *modules, libraries=libraries)
        params = [p for p in list(inspect.signature(build).parameters.values())[1:]  # drop `out`
                  if p.name != "scratch"]
        wants_scratch = "scratch" in inspect.signature(build).parameters
        skip = set(ignore) | {"work_dir"}

        def key_of(arguments: dict) -> tuple[str, Path]:
            parts = {k: _key_part(v) for k, v in arguments.items() if k not in skip}
            key = store.hash_value({"stage": name, "source": source, "inputs": parts})
            return key, store.stage_dir(arguments["work_dir"], name, key)

        @functools.wraps(build)
        def run_stage(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            key, directory = key_of(arguments)
            logger = run_logger()
            lock = store.stage_lock(directory)
            store.hold_stage_lock(lock, name, logger)
            try:
                cached = _intact_result(name, directory, result_type, logger)
                if cached is not None:
                    logger.info("%s: cache hit %s", name, directory)
                    cached = cached.model_copy(update={"cache_hit": True})
                    if TaskRunContext.get() is None:  # called as a plain function (.fn)
                        return cached
                    # Shown as Cached in the Prefect UI, as Prefect's own cache hits are.
                    return Completed(data=cached, name="Cached", message=f"cache hit {directory}")
                return _build(build, name, result_type, key, directory, arguments, wants_scratch, logger)
            finally:
                lock.release()

        signature = inspect.Signature(
            params + [inspect.Parameter("work_dir", inspect.Parameter.KEYWORD_ONLY, annotation=str)])
        run_stage.__signature__ = signature
        # log_prints stays off: libraries that capture stdout (dill's globals detection, used by
        # datasets' fingerprints) would otherwise have their captures turned into log lines.
        # No Prefect result persistence or cache policy: Prefect would pickle results into its
        # store and unpickle them on a later run. The content-addressed directory is the cache,
        # its result plain JSON, checked against its manifest before it is used.
        prefect_task = task(name=name, cache_policy=NO_CACHE, persist_result=False)(run_stage)
        prefect_task.key_of = key_of
        prefect_task.code_fingerprint = source
        return prefect_task

    return decorate


def materializing(stage_task, assets: list, asset_deps: list):
    """The stage task as a Prefect MaterializingTask: a completed run emits materialization events
    for `assets`, with `asset_deps` upstream (given explicitly: a cached upstream stage emits none)."""
    from prefect.tasks import MaterializingTask

    task_ = MaterializingTask(fn=stage_task.fn, assets=assets, asset_deps=asset_deps, name=stage_task.name,
                              cache_policy=NO_CACHE, persist_result=False,
                              task_run_name=stage_task.task_run_name)
    task_.key_of = stage_task.key_of
    return task_


def _describe_assets(key: str, directory: Path) -> None:
    from prefect.context import AssetContext

    context = AssetContext.get()
    for asset in (context.downstream_assets if context else ()):
        context.add_asset_metadata(asset.key, {"content_key": key, "directory": str(directory.resolve())})


def run_logger():
    import logging

    try:
        return get_run_logger()
    except Exception:  # called outside a flow (tests, benchmarks)
        return logging.getLogger("qlora")
