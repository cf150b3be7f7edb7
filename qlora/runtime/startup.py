"""A process's start with Python's cyclic garbage collector paused.

Importing Prefect, MLflow or pydantic-heavy code builds hundreds of thousands of objects, and the
collector walks the growing heap again and again while it does: a fifth to a quarter of the import
time of Prefect's server, of MLflow, of the CLI's own imports (measured in benchmarks/RESULTS.md). An
unchanged re-run is mostly such imports. So the collector waits until they are done; what they
built is then frozen (moved where the collector never walks it: it lives as long as the process
anyway) and collection resumes as before. A process that goes on to other work afterwards (a test
calling the CLI in-process) thaws it again.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def thaw() -> None:
    """What `collector_paused` froze is collected as usual again."""
    gc.unfreeze()
