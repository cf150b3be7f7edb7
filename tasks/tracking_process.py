"""A pipeline run's MLflow writes, done by a process of its own.

Importing MLflow and opening its store costs about as much CPU as an unchanged re-run's whole flow,
and in one process both hold the interpreter lock, so they run one after the other. The run records
through a child process instead: `qlora run` starts it first thing, it imports MLflow on the other
core while Prefect is imported and the cached stages are checked, and it then works through the
run's writes in the order they were sent while the flow goes on. The flow waits only where it needs
an answer (the run id, a registered version, the promotion decision) and at the end of the run, so a
write that failed still fails the run, with the error MLflow gave.

Requests and replies are JSON lines over the child's stdin and a pipe of its own (whatever MLflow
prints goes to stderr). The child runs the operations named in OPERATIONS (of tasks.tracking and
tasks.promotion) and nothing else, in the working directory the request was sent from.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tasks import signals
from tasks.errors import RecipeError

# The operations the child runs, and their modules; each takes and returns JSON values only.
OPERATIONS = {**dict.fromkeys(("prepare_store", "find_unfinished_runs", "resume_run", "create_run", "set_tags",
                               "log_params", "log_text", "log_datasets", "log_summary", "log_history", "log_artifacts",
                               "log_parquet_table", "log_dict", "log_comparison", "mark_all_cached", "end_run"),
                              "tasks.tracking"),
              "register": "tasks.promotion", "promote": "tasks.promotion", "flush": None}


class TrackingProcessError(RuntimeError):
    """MLflow failed in the recording process (its message and the operation's name), or the process
    ended."""


class TrackingProcess:
    """The child process, shared by the runs of this process (a sweep's trials run in threads): each
    run writes through a session of its own, so one run's failed write fails that run only."""

    def __init__(self):
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        # Its own session: Ctrl-C or a SIGTERM sent to the run's process group must not stop it before
        # the run has recorded that it was stopped; it dies with us instead, however we die.
        self.process = subprocess.Popen([sys.executable, "-m", "tasks.tracking_process"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, start_new_session=True,
                                        preexec_fn=signals.child_dies_with_parent)
        self._sent = self._sessions = 0
        self._written = False  # by a run's session
        self._asked: set[int] = set()
        self._replies: dict[int, dict] = {}
        self._failures: dict[int, Exception] = {}  # the first failed write of each session
        self._ended = False
        self._changed = threading.Condition()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read_replies, name="qlora-tracking-replies", daemon=True).start()

    def session(self) -> "Session":
        with self._changed:
            self._sessions += 1
            return Session(self, self._sessions)

    def call(self, operation: str, *args: Any) -> None:
        """A write outside any run's session (opening the store ahead of the run)."""
        self._send(0, operation, args, answer=False)

    def close(self, timeout: float = 30) -> None:
        """No more writes: the child finishes the ones sent and exits. One that no run has written
        through (a recipe refused in the flow's first stages) is stopped at once, mid-import maybe."""
        if not self._written:
            self.process.kill()
        try:
            self.process.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def alive(self) -> bool:
        return self.process.poll() is None and not self._ended

    def _send(self, session: int, operation: str, args: tuple, answer: bool) -> int:
        if operation not in OPERATIONS:
            raise ValueError(f"not a tracking operation: {operation}")
        with self._send_lock:
            self._sent += 1
            number = self._sent
            self._written = self._written or session != 0
            line = json.dumps({"id": number, "session": session, "op": operation, "args": args, "cwd": os.getcwd(),
                               "answer": answer}, default=_plain) + "\n"
            if answer:
                with self._changed:
                    self._asked.add(number)
            try:
                self.process.stdin.write(line.encode())
                self.process.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                raise TrackingProcessError(f"the MLflow recording process has ended (exit code "
                                           f"{self.process.poll()}): see its error above") from None
        return number

    def _wait(self, number: int, operation: str, timeout: float | None) -> dict:
        with self._changed:
            if not self._changed.wait_for(lambda: number in self._replies or self._ended, timeout):
                raise TrackingProcessError(f"MLflow did not answer {operation} within {timeout:.0f} s")
            self._asked.discard(number)
            if number not in self._replies:
                raise TrackingProcessError(f"the MLflow recording process ended (exit code {self.process.poll()}) "
                                           f"before answering {operation}: see its error above")
            return self._replies.pop(number)

    def _take_failure(self, session: int) -> Exception | None:
        with self._changed:
            return self._failures.pop(session, None)

    def _read_replies(self) -> None:
        for line in self.process.stdout:
            reply = json.loads(line)
            with self._changed:
                if reply["id"] in self._asked:
                    self._replies[reply["id"]] = reply
                else:
                    self._failures.setdefault(reply["session"], _error_of(reply["error"]))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()


class Session:
    """One pipeline run's writes. `call` sends a write and goes on (an error it meets is raised by
    the run's next call or ask); `ask` waits for an answer, by when the writes sent before it are done."""

    def __init__(self, process: TrackingProcess, number: int):
        self.process, self.number = process, number

    def call(self, operation: str, *args: Any) -> None:
        self._raise_failure()
        self.process._send(self.number, operation, args, answer=False)

    def ask(self, operation: str, *args: Any, timeout: float | None = None) -> Any:
        self._raise_failure()
        reply = self.process._wait(self.process._send(self.number, operation, args, answer=True), operation, timeout)
        self._raise_failure()  # a write sent before it failed: reported before this answer
        if "error" in reply:
            raise _error_of(reply["error"])
        return reply["result"]

    def flush(self) -> None:
        """Wait until every write sent is done (raising the first that failed)."""
        self.ask("flush")

    def end_run(self, uri: str, run_id: str, status: str, timeout: float | None = None) -> None:
        """The run's last write, sent whatever failed before it: the run then ends FAILED, and the
        failure is raised once the run is marked."""
        earlier = self.process._take_failure(self.number)
        status = "FAILED" if earlier and status == "FINISHED" else status
        reply = self.process._wait(self.process._send(self.number, "end_run", (uri, run_id, status), answer=True),
                                   "end_run", timeout)
        failure = earlier or self.process._take_failure(self.number) or (
            _error_of(reply["error"]) if "error" in reply else None)
        if failure:
            raise failure

    def _raise_failure(self) -> None:
        failure = self.process._take_failure(self.number)
        if failure is not None:
            raise failure


def _plain(value: Any) -> Any:
    """numpy scalars and paths, as JSON has them."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _error_of(error: dict) -> Exception:
    if error["type"] == "RecipeError":
        return RecipeError(error["message"], error.get("field"), error.get("file"), error.get("hint"))
    return TrackingProcessError(f"MLflow {error['operation']}: {error['type']}: {error['message']}")


_shared: TrackingProcess | None = None
_shared_lock = threading.Lock()


def shared() -> TrackingProcess:
    """This process's recording process (started by `qlora run` before anything heavy, or here), kept
    for the runs that follow it in this process (a sweep's, a comparison's). A run writes through
    `shared().session()`."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.alive():
            _shared = TrackingProcess()
            atexit.register(_shared.close)
        return _shared


def discard() -> None:
    """Stop this process's recording process without waiting for it (a refused recipe: it has
    written nothing)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.process.kill()
            _shared.process.wait()
            _shared = None


# --- the child -----------------------------------------------------------------------------------

def _serve() -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything printed goes to stderr, not into the replies
    import importlib

    from tasks import tracking
    from tasks.startup import collector_paused

    with collector_paused():
        tracking.import_mlflow()
        operations = {name: getattr(importlib.import_module(module), name) for name, module in OPERATIONS.items()
                      if module}
    operations["flush"] = lambda: True
    for line in sys.stdin:
        request = json.loads(line)
        number, session = request["id"], request["session"]
        os.chdir(request["cwd"])
        try:
            result = operations[request["op"]](*request["args"])
        except Exception as e:  # noqa: BLE001 - sent to the flow, which raises it
            error = {"type": type(e).__name__, "operation": request["op"], "message": str(e).strip()[:4000]}
            if isinstance(e, RecipeError):
                error.update(message=e.message, field=e.field, file=e.file, hint=e.hint)
            replies.write(json.dumps({"id": number, "session": session, "error": error}) + "\n")
        else:
            if not request["answer"]:
                continue
            replies.write(json.dumps({"id": number, "session": session, "result": result}, default=_plain) + "\n")
        replies.flush()
    # Every write is done and answered: skip the interpreter's teardown of MLflow's modules (a second).
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _serve()
