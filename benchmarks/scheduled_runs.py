"""Scheduled retraining against real servers on 127.0.0.1 (a Prefect server and an MLflow tracking
server started here): a small AG News recipe deployed and served by `qlora deploy`, then

1. the first run (trains), timed;
2. a run on unchanged data (every stage a cache hit), timed;
3. ten runs triggered back to back through the deployment: all must complete, none lost, none
   duplicated: Prefect's and MLflow's run counts must be equal.

    python benchmarks/scheduled_runs.py [--data ../shared/data/ag_news]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ag_news"))
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    from qlora.servers import free_port, start_mlflow_ui, start_prefect_server, stop, wait_healthy

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "news"
        data.mkdir()
        for name, rows in (("train", 400), ("dev", 100), ("test", 200)):
            pd.read_csv(Path(args.data) / f"{name}.csv").iloc[:rows].to_csv(data / f"{name}.csv", index=False)
        prefect_port, mlflow_port = free_port(), free_port()
        prefect = start_prefect_server(prefect_port, {"PREFECT_HOME": str(tmp / ".prefect")})
        mlflow = start_mlflow_ui(mlflow_port, f"sqlite:///{tmp / 'mlflow.db'}", str(tmp / "artifacts"))
        serve = None
        try:
            api, tracking = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
            wait_healthy(f"{api}/health", prefect, "Prefect server", 180)
            wait_healthy(f"{tracking}/health", mlflow, "MLflow server", 180)
            os.environ.update(PREFECT_API_URL=api, PREFECT_RUNNER_POLL_FREQUENCY="1")
            recipe = yaml.safe_load((REPO / "recipes" / "agnews-minilm.yaml").read_text())
            recipe["data"]["path"] = str(data)
            recipe["train"].update(num_train_epochs=1, save_steps=1000)
            recipe["merge"]["compare"] = False
            recipe["tracking"].update(experiment_name="scheduled", tracking_uri=tracking)
            (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
            serve_log = open(tmp / "serve.log", "wb")  # a pipe nobody reads would block it when full
            serve = subprocess.Popen([sys.executable, "-m", "qlora.cli", "deploy", "r.yaml", "--interval", "86400",
                                      "--name", "bench"], cwd=tmp, env={**os.environ, "PYTHONPATH": str(REPO)},
                                     stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True)
            from prefect.client.orchestration import get_client
            from prefect.deployments import run_deployment

            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        deployment = client.read_deployment_by_name("qlora-finetune/bench")
                        break
                    except Exception:  # noqa: BLE001 - not registered yet
                        if serve.poll() is not None or time.monotonic() > deadline:
                            sys.exit((tmp / "serve.log").read_text()[-3000:])
                        time.sleep(1)

            def timed_run() -> tuple[float, object]:
                start = time.monotonic()
                flow_run = run_deployment(deployment.id, timeout=1800, poll_interval=0.5)
                return time.monotonic() - start, flow_run

            first_s, first = timed_run()
            second_s, second = timed_run()
            print(f"first run (trains):            {first_s:6.1f} s  {first.state.name}")
            print(f"run on unchanged data:         {second_s:6.1f} s  {second.state.name}  (target < 15 s)")

            start = time.monotonic()
            triggered = [run_deployment(deployment.id, timeout=0) for _ in range(args.runs)]
            ids = {r.id for r in triggered}
            import httpx

            with get_client(sync_client=True) as client:
                while True:
                    try:  # the server answers slowly while runs start on two cores: ask again
                        states = [client.read_flow_run(i).state for i in ids]
                    except httpx.TimeoutException:
                        time.sleep(2)
                        continue
                    if all(s.is_final() for s in states):
                        break
                    time.sleep(3)
            burst_s = time.monotonic() - start
            from mlflow.tracking import MlflowClient

            ml = MlflowClient(tracking)
            runs = ml.search_runs([ml.get_experiment_by_name("scheduled").experiment_id], max_results=1000)
            tagged = [r.data.tags.get("prefect.flow_run_id") for r in runs]
            with get_client(sync_client=True) as client:
                prefect_runs = client.read_flow_runs()
            completed = sum(s.is_completed() for s in states)
            print(f"{args.runs} runs back to back:       {burst_s:6.1f} s  {completed}/{args.runs} completed")
            print(f"Prefect flow runs: {len(prefect_runs)}, MLflow runs: {len(runs)}, "
                  f"distinct flow run ids in MLflow: {len(set(tagged))}, "
                  f"each triggered run in MLflow once: {all(tagged.count(str(i)) == 1 for i in ids)}")
        finally:
            if serve is not None:
                serve.send_signal(signal.SIGINT)
                try:
                    serve.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(serve.pid, signal.SIGKILL)
            stop(prefect)
            stop(mlflow)


if __name__ == "__main__":
    main()
