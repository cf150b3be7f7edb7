"""`qlora ui`: a Prefect server (UI, API and the scheduler that deployments need) and the MLflow UI
on 127.0.0.1, over the project's own stores, stopped together on Ctrl-C. The shared team set-up
(PostgreSQL, S3-compatible artifacts) is `mlflow/compose.yaml`; see docs/production.md."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from qlora.runtime import signals
from qlora.runtime.errors import RecipeError

# Set in a run's environment while it reports to the temporary Prefect server it started (qlora/cli.py):
# the MLflow run then says that the server's pages went with it (tasks/tracking.py).
TEMPORARY_PREFECT_SERVER = "QLORA_TEMPORARY_PREFECT_SERVER"
OFFLINE = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_UI_SHOW_PROMOTIONAL_CONTENT": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Nothing listens on the port (connections left in TIME_WAIT do not count, as for the servers)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_healthy(url: str, process: subprocess.Popen, what: str, timeout: float = 90, poll_s: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before answering at {url}:\n"
                               f"{log_tail(process)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s")


def logged_process(args: list[str], env: dict, name: str, log_dir: str | Path | None) -> subprocess.Popen:
    """Start a server with its output in a log file: a pipe nobody reads fills up after a while and
    then blocks the server mid-request (a long-lived server logs a lot)."""
    log_dir = Path(log_dir or tempfile.gettempdir())
    log_dir.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=log_dir)
    with os.fdopen(fd, "wb") as log:
        process = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=signals.child_dies_with_parent)
    process.log_path = Path(path)
    return process


def log_tail(process: subprocess.Popen, chars: int = 3000) -> str:
    path = getattr(process, "log_path", None)
    return path.read_text(errors="replace")[-chars:] if path and path.exists() else ""


def start_prefect_server(port: int, env: dict | None = None, log_dir: str | Path | None = None) -> subprocess.Popen:
    # The UI (in the browser) must call this server's API, not the default port's.
    ui_api = {"PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    return logged_process([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                          {**os.environ, **OFFLINE, **ui_api, **(env or {})}, "prefect-server", log_dir)


def start_mlflow_ui(port: int, backend_uri: str, artifacts: str | None = None,
                    env: dict | None = None, log_dir: str | Path | None = None) -> subprocess.Popen:
    """The MLflow tracking server (UI included) over a store. artifacts: where new experiments' artifacts
    go and are served from (a directory, or s3://... for a team server)."""
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]
    if artifacts:
        args += ["--artifacts-destination", artifacts]
    return logged_process(args, {**os.environ, **OFFLINE, **(env or {})}, "mlflow-server", log_dir)


def stop(process: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a server and the workers it started (its own process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def ui(prefect_port: int, mlflow_port: int, tracking_uri: str) -> int:
    for port, flag in ((prefect_port, "--prefect-port"), (mlflow_port, "--mlflow-port")):
        if not port_free(port):
            raise RecipeError(f"port {port} on 127.0.0.1 is in use", flag, hint="choose another port")
    artifacts = None
    if tracking_uri.startswith("sqlite:///"):
        artifacts = str(Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts")
    logs = Path(".qlora") / "logs"
    prefect = start_prefect_server(prefect_port, log_dir=logs)
    mlflow = start_mlflow_ui(mlflow_port, tracking_uri, artifacts, log_dir=logs)
    for server in (prefect, mlflow):
        signals.on_emergency(lambda server=server: stop(server, timeout=3))
    try:
        prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
        wait_healthy(f"{prefect_url}/api/health", prefect, "the Prefect server")
        wait_healthy(f"{mlflow_url}/health", mlflow, "the MLflow server")
        from qlora.tasks.lineage import mlflow_page

        print(f"Prefect UI: {prefect_url}\nMLflow UI:  {mlflow_page(mlflow_url, 'experiments')}  (store: {tracking_uri})\n"
              f"Runs from another shell report here after:\n"
              f"  export PREFECT_API_URL={prefect_url}/api QLORA_MLFLOW_UI_URL={mlflow_url}\n"
              f"Server logs: {prefect.log_path}, {mlflow.log_path}\n"
              f"Ctrl-C stops both.", flush=True)
        while prefect.poll() is None and mlflow.poll() is None:
            time.sleep(0.5)
        name, dead = ("Prefect server", prefect) if prefect.poll() is not None else ("MLflow server", mlflow)
        print(f"the {name} stopped; stopping the other. Its log ends:\n{log_tail(dead)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping the Prefect and MLflow servers", file=sys.stderr)
        return 0
    finally:
        stop(prefect)
        stop(mlflow)
