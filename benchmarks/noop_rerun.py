"""How long an unchanged re-run takes: the path a scheduled retraining takes every time the data
has not changed. Every stage is a cache hit; the run is still recorded (a Prefect flow run whose
task runs end `Cached`, an MLflow run tagged with the cached stages).

    python benchmarks/noop_rerun.py [--project DIR] [--repeat 5]

Runs `qlora run recipes/quickstart.yaml` once to fill the cache (minutes; skipped when --project
already holds a finished run), then times unchanged re-runs two ways, side by side:
  embedded   no Prefect server configured: the run starts a temporary one (the default)
  server     against a Prefect server already running on 127.0.0.1 (started here)
and prints the median wall time of each, where the time goes (process start to the flow's first
log line, the flow itself, flow end to exit), and what the pieces cost on their own (importing
Prefect and MLflow, booting the temporary server). Writes noop_rerun.json under $OUT (or ./).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qlora.servers import free_port, wait_healthy  # noqa: E402

RECIPE = REPO / "recipes" / "quickstart.yaml"
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
         "HF_HUB_OFFLINE": "1", "QLORA_PROGRESS": "0"}
STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| \w+\s+\| Flow run '[^']+' - (Beginning flow run|Finished in state)")


def qlora_run(project: Path, env: dict) -> dict:
    """One `qlora run` as a user types it; wall time and the flow's own start and end."""
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "qlora.cli", "run", str(RECIPE), "--json", "summary.json"],
                          cwd=project, env=env, capture_output=True, text=True)
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"qlora run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    stamps = {}
    day = datetime.fromtimestamp(started).date()
    for line in done.stdout.splitlines() + done.stderr.splitlines():
        m = STAMP.match(line)
        if m:
            at = datetime.combine(day, datetime.strptime(m.group(1), "%H:%M:%S.%f").time()).timestamp()
            stamps["begin" if m.group(2).startswith("Beginning") else "end"] = at
    summary = json.loads((project / "summary.json").read_text())
    return {"wall_s": ended - started, "to_flow_s": stamps["begin"] - started, "flow_s": stamps["end"] - stamps["begin"],
            "exit_s": ended - stamps["end"], "all_cached": summary["all_cached"], "run_id": summary["run_id"]}


def import_seconds(module: str, env: dict) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)


def server_boot_seconds(env: dict, home: Path, factory: str = "qlora.prefect_app:create_app") -> float:
    """A temporary server on its own: process start to /health answering. By default the one the
    run starts (Prefect's app as its own temporary server builds it, migrations checked at start)."""
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env={**env, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/api/health", server, "prefect server", 120, poll_s=0.05)
        return time.perf_counter() - started
    finally:
        server.terminate()
        server.wait()


def check_recorded(project: Path, run_id: str, api_url: str) -> dict:
    """The cache-hit answer is in MLflow (the run, its cached-stages tag) and in Prefect (task runs
    in state Cached)."""
    env = {**os.environ, **QUIET, "PREFECT_API_URL": api_url}
    code = f"""
import json
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
uri = "sqlite:///{project / 'mlflow' / 'mlflow.db'}"
run = MlflowClient(uri).get_run("{run_id}")
flow_run_id = run.data.tags["prefect.flow_run_id"]
with get_client(sync_client=True) as c:
    tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
print(json.dumps({{"mlflow_status": run.info.status, "cached_stages": run.data.tags.get("qlora.cached_stages", ""),
                  "prefect_task_states": sorted({{t.state.name for t in tasks}})}}))
"""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, help="project directory (default: a new temporary one)")
    parser.add_argument("--repeat", type=int, default=5, help="timed re-runs per way (default 5)")
    args = parser.parse_args()
    project = (args.project or Path(tempfile.mkdtemp(prefix="qlora-noop-"))).resolve()
    project.mkdir(parents=True, exist_ok=True)
    home = project / ".prefect"
    env = {**os.environ, **QUIET, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)

    first = qlora_run(project, env)
    print(f"first run: {first['wall_s']:.1f} s (all cached: {first['all_cached']})", flush=True)

    results = {"machine": f"{os.cpu_count()} CPU cores", "project": str(project)}
    embedded = [qlora_run(project, env) for _ in range(args.repeat)]
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env={**env, "PREFECT_UI_ENABLED": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(api + "/health", server, "prefect server", 120)
        served = [qlora_run(project, {**env, "PREFECT_API_URL": api}) for _ in range(args.repeat)]
        recorded = check_recorded(project, served[-1]["run_id"], api)
    finally:
        server.terminate()
        server.wait()
    assert all(r["all_cached"] for r in embedded + served), "a re-run rebuilt something: not a no-op"
    assert recorded["mlflow_status"] == "FINISHED" and recorded["prefect_task_states"] == ["Cached"], recorded

    print(f"\nunchanged re-run of recipes/quickstart.yaml, {args.repeat} times each, on {results['machine']}")
    print(f"{'':10} {'median':>8} {'min':>7} {'to flow':>8} {'flow':>6} {'exit':>6}")
    for name, runs in (("embedded", embedded), ("server", served)):
        row = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "to_flow_s", "flow_s", "exit_s")}
        row["min_s"] = min(r["wall_s"] for r in runs)
        results[name] = row
        print(f"{name:10} {row['wall_s']:7.2f}s {row['min_s']:6.2f}s {row['to_flow_s']:7.2f}s {row['flow_s']:5.2f}s "
              f"{row['exit_s']:5.2f}s")
    results["pieces"] = {
        "import prefect": import_seconds("prefect", env),
        "import mlflow client + sql store": import_seconds("mlflow.tracking, mlflow.store.tracking.sqlalchemy_store", env),
        "import pandas": import_seconds("pandas", env),
        "temporary server boot": server_boot_seconds(env, home),
        "Prefect's app with its services": server_boot_seconds(env, home, "prefect.server.api.server:create_app"),
    }
    print("pieces on their own: " + ", ".join(f"{k} {v:.2f} s" for k, v in results["pieces"].items()))
    results["recorded"] = recorded
    print(f"recorded: MLflow run {recorded['mlflow_status']}, cached stages {recorded['cached_stages']}; "
          f"Prefect task states {recorded['prefect_task_states']}")
    out = Path(os.environ.get("OUT", ".")) / "noop_rerun.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
