"""Python's garbage collector, run at step boundaries instead of whenever it likes.

Left to itself the collector starts a full pass at an arbitrary allocation, and a full pass over a
training process's objects (the model, the compiled layers' graphs) takes a good part of a second.
Under data parallelism every rank then waits at the step's all-reduce for the one that paused, so
each rank's pauses cost all of them: the 2-GPU step stalls about twice as often as one GPU's. So,
as torchtitan does: the objects alive after set-up are frozen (never scanned again), automatic
collection is off while training, and every rank collects the young generation at the same steps
(a short pause, aligned across ranks) and everything now and then.
"""
from __future__ import annotations

import gc
import threading
import time

_lock = threading.Lock()
_holders = 0  # StepCollections open in this process
_was_enabled = True  # the collector's state before the first of them


class StepCollection:
    """collect(step) after each optimizer step; close() (or the `with` block's end) turns the
    collector back on as it was. The collector is the process's: trainings running at once in
    threads (a sweep's trials) share one hold on it, released when the last one ends."""

    def __init__(self, every: int = 50, full_every: int = 1000):
        global _holders, _was_enabled
        self.every, self.full_every = every, full_every
        self._closed = False
        with _lock:
            if _holders == 0:
                _was_enabled = gc.isenabled()
                gc.collect()
                gc.freeze()  # what set-up built stays: later passes skip it
                gc.disable()
            _holders += 1

    def collect(self, step: int) -> None:
        if step % self.full_every == 0:
            gc.collect(2)
        elif step % self.every == 0:
            gc.collect(1)

    def close(self) -> None:
        global _holders
        with _lock:
            if self._closed:
                return
            self._closed = True
            _holders -= 1
            if _holders == 0:
                gc.unfreeze()
                if _was_enabled:
                    gc.enable()

    def __enter__(self) -> "StepCollection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PauseLog:
    """The collector's own passes timed, as they happen (gc.callbacks): what a run pays for leaving
    collection to Python."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._began))

    def close(self) -> None:
        gc.callbacks.remove(self._callback)
