"""SIGTERM and SIGINT: how schedulers (timeout, systemd, Kubernetes, Prefect workers) stop work.

The first signal asks the run to stop: outside training it raises `Interrupted` at once (a
KeyboardInterrupt, so every `except KeyboardInterrupt` cleans up as for Ctrl-C); inside training
(`deferred()`) it only sets a flag that the loop reads between micro-batches, so the checkpoint it
writes is that of the last finished step. Python can swallow an exception raised from a signal
handler (one that lands in a `__del__`), so a watchdog makes the stop bounded whatever happens:
`GRACE_S` after the first signal, or at a second one, it runs the emergency cleanups (mark the
MLflow run KILLED, stop child servers) and ends the process.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

GRACE_S = float(os.environ.get("QLORA_STOP_GRACE_S", "25"))

_stop = threading.Event()
_received: list[int] = []
_deferred = 0
_cleanups: dict[int, Callable[[], None]] = {}
_lock = threading.Lock()


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop (SIGTERM or SIGINT)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_requested() -> bool:
    return _stop.is_set()


def received_signal() -> int:
    return _received[0] if _received else signal.SIGINT


def exit_code() -> int:
    return 128 + received_signal()


def on_emergency(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Register a cleanup for a stop that the normal unwinding did not finish in time; returns a
    function that unregisters it (call it once the normal path has done the same work)."""
    key = id(cleanup)
    with _lock:
        _cleanups[key] = cleanup
    return lambda: _cleanups.pop(key, None)


def _emergency_exit() -> None:
    with _lock:
        cleanups = list(_cleanups.values())
        _cleanups.clear()
    for cleanup in reversed(cleanups):
        try:
            cleanup()
        except BaseException:  # noqa: BLE001 - the process is going; the others must still run
            pass
    print(f"\nstopped by {signal.Signals(received_signal()).name}: run the same command again to resume",
          file=sys.stderr, flush=True)
    os._exit(exit_code())


def _watchdog() -> None:
    threading.Event().wait(GRACE_S)  # a clean stop ends the process first (this thread is a daemon)
    _emergency_exit()


def _handler(signum, frame) -> None:
    if _stop.is_set():  # a second signal: no more waiting
        _emergency_exit()
    _received.append(signum)
    _stop.set()
    threading.Thread(target=_watchdog, name="qlora-stop-watchdog", daemon=True).start()
    if _deferred == 0:
        raise Interrupted(signum)


def install() -> None:
    """Handle SIGTERM and SIGINT in this (main) thread. Called by the CLI, and again inside the
    flow, where Prefect's own SIGTERM handler would otherwise take the signal."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block a signal only sets the flag (`stop_requested`); the block polls it."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1


def raise_if_requested() -> None:
    if _stop.is_set():
        raise Interrupted(received_signal())


def child_dies_with_parent() -> None:
    """preexec_fn for child servers: Linux sends them SIGTERM when this process dies, even by
    SIGKILL, so none is left orphaned under PID 1."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
