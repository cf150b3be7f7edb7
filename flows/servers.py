"""`qlora ui`: a Prefect server (UI, API and the scheduler that deployments need) and the MLflow UI
on 127.0.0.1, over the project's own stores, stopped together on Ctrl-C. The shared team set-up
(PostgreSQL, S3-compatible artifacts) is `mlflow/compose.yaml`; see the README."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.recipe import RecipeError

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


def wait_healthy(url: str, process: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = process.stderr.read()[-2000:] if process.stderr else ""
            said = said.decode(errors="replace") if isinstance(said, bytes) else said
            raise RuntimeError(f"{what} exited with code {process.returncode} before answering at {url}:\n{said}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s")


def start_prefect_server(port: int, env: dict | None = None) -> subprocess.Popen:
    # The UI (in the browser) must call this server's API, not the default port's.
    ui_api = {"PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    return subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env={**os.environ, **OFFLINE, **ui_api, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def start_mlflow_ui(port: int, backend_uri: str, artifacts: str | None = None,
                    env: dict | None = None) -> subprocess.Popen:
    """The MLflow tracking server (UI included) over a store. artifacts: where new experiments' artifacts
    go and are served from (a directory, or s3://... for a team server)."""
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]
    if artifacts:
        args += ["--artifacts-destination", artifacts]
    return subprocess.Popen(args, env={**os.environ, **OFFLINE, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


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
    prefect = start_prefect_server(prefect_port)
    mlflow = start_mlflow_ui(mlflow_port, tracking_uri, artifacts)
    try:
        prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
        wait_healthy(f"{prefect_url}/api/health", prefect, "the Prefect server")
        wait_healthy(f"{mlflow_url}/health", mlflow, "the MLflow server")
        print(f"Prefect UI: {prefect_url}\nMLflow UI:  {mlflow_url}  (store: {tracking_uri})\n"
              f"Runs from another shell report here after:\n"
              f"  export PREFECT_API_URL={prefect_url}/api QLORA_MLFLOW_UI_URL={mlflow_url}\n"
              f"Ctrl-C stops both.", flush=True)
        while prefect.poll() is None and mlflow.poll() is None:
            time.sleep(0.5)
        dead = "Prefect server" if prefect.poll() is not None else "MLflow server"
        print(f"the {dead} stopped; stopping the other", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping the Prefect and MLflow servers", file=sys.stderr)
        return 0
    finally:
        stop(prefect)
        stop(mlflow)
