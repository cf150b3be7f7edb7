"""Scheduled retraining against real servers started here on 127.0.0.1: a Prefect server (API, UI,
scheduler) and an MLflow tracking server. A recipe deployed with a schedule and served by
`qlora deploy`; runs triggered through the server; artifacts, cache hits and promotion decisions
read back through both APIs. Bad input at deploy time fails fast with exit code 2."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pytest
from conftest import labelled_corpus, small_recipe, write_recipe

REPO = Path(__file__).resolve().parent.parent


def _cli(cwd: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


# --- bad input: no server needed --------------------------------------------------------------

def test_malformed_cron_is_refused(project):
    write_recipe(project / "r.yaml", small_recipe())
    done = _cli(project, "deploy", "r.yaml", "--cron", "61 * * *", env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert done.returncode == 2 and "--cron: '61 * * *' is not a valid cron expression" in done.stderr, done.stderr


def test_invalid_recipe_is_not_deployed(project):
    recipe = small_recipe()
    recipe["train"]["learning_rte"] = 1e-3
    write_recipe(project / "r.yaml", recipe)
    done = _cli(project, "deploy", "r.yaml", "--cron", "0 3 * * 1")
    assert done.returncode == 2 and "train.learning_rte" in done.stderr and "learning_rate" in done.stderr


def test_unknown_promotion_metric_is_refused(project):
    write_recipe(project / "r.yaml", small_recipe())
    done = _cli(project, "deploy", "r.yaml", "--interval", "3600", "--set", "tracking.promotion.metric=test_bleu",
                env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert done.returncode == 2 and "tracking.promotion.metric: the evaluation does not produce 'test_bleu'" in done.stderr


def test_server_that_does_not_answer(project):
    from qlora.servers import free_port

    write_recipe(project / "r.yaml", small_recipe())
    start = time.monotonic()
    done = _cli(project, "deploy", "r.yaml", "--interval", "3600",
                env={"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"})
    assert done.returncode == 2 and "cannot reach the Prefect server" in done.stderr, done.stderr
    assert time.monotonic() - start < 60  # a few seconds of checking, not a hang


# --- real servers ------------------------------------------------------------------------------

@contextlib.contextmanager
def running_servers(home: Path, prefect_database: str | None = None, mlflow_store: str | None = None):
    """A Prefect server and an MLflow tracking server on free ports (sqlite stores under `home`
    unless database URLs are given), stopped at the end."""
    from qlora.servers import free_port, start_mlflow_ui, start_prefect_server, stop, wait_healthy

    prefect_port, mlflow_port = free_port(), free_port()
    prefect_env = {"PREFECT_HOME": str(home / ".prefect")}
    if prefect_database:
        prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_database
    prefect = start_prefect_server(prefect_port, prefect_env)
    mlflow = start_mlflow_ui(mlflow_port, mlflow_store or f"sqlite:///{home / 'mlflow.db'}", str(home / "artifacts"))
    try:
        wait_healthy(f"http://127.0.0.1:{prefect_port}/api/health", prefect, "Prefect server", timeout=180)
        wait_healthy(f"http://127.0.0.1:{mlflow_port}/health", mlflow, "MLflow server", timeout=180)
        yield {"prefect": f"http://127.0.0.1:{prefect_port}/api", "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    finally:
        stop(prefect)
        stop(mlflow)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with running_servers(tmp_path_factory.mktemp("servers")) as urls:
        yield urls


def _reviews_data(directory: Path, shift: int = 0) -> Path:
    """A small labelled source; `shift` changes which training rows it holds (new data arriving)."""
    directory.mkdir(exist_ok=True)
    for name, rows in (("train", 160), ("dev", 64), ("test", 64)):
        frame = pd.read_csv(labelled_corpus() / f"{name}.csv")
        start = shift if name == "train" else 0
        frame.iloc[start:start + rows].to_csv(directory / f"{name}.csv", index=False)
    return directory


def _client_env(servers) -> dict:
    return {"PREFECT_API_URL": servers["prefect"], "PREFECT_RUNNER_POLL_FREQUENCY": "2"}


@contextlib.contextmanager
def prefect_api(url: str):
    """Prefect reads its settings once per process: point this process's client at a server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def _wait_for_deployment(name: str, process: subprocess.Popen, timeout: float = 120):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()[-3000:]
            try:
                return client.read_deployment_by_name(name)
            except Exception:  # noqa: BLE001 - not registered yet
                time.sleep(1)
    raise AssertionError(f"deployment {name} never appeared")


def _trigger(deployment_id, timeout: float = 600):
    """A run created through the server, picked up by the serving process, waited for."""
    from prefect.deployments import run_deployment

    return run_deployment(deployment_id, timeout=timeout, poll_interval=1)


def _materializations(api: str, timeout: float = 60) -> dict[str, set[str]]:
    """Asset -> its upstream assets, from the server's asset materialization events (written
    asynchronously: polled)."""
    import json
    import urllib.request

    body = json.dumps({"filter": {"event": {"prefix": ["prefect.asset.materialization.succeeded"]}},
                       "limit": 50}).encode()
    deadline = time.monotonic() + timeout
    found: dict[str, set[str]] = {}
    while time.monotonic() < deadline:
        request = urllib.request.Request(f"{api}/events/filter", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            events = json.loads(r.read())["events"]
        found = {e["resource"]["prefect.resource.id"]: {rel["prefect.resource.id"] for rel in e.get("related", [])
                                                        if rel.get("prefect.resource.role") == "asset"}
                 for e in events}
        if "qlora://reviews-test/adapter" in found:
            return found
        time.sleep(1)
    return found


def _mlflow_run_of(tracking: str, flow_run_id) -> object:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking, registry_uri=tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs for flow run {flow_run_id}"
    return runs[0]


@pytest.fixture
def against_servers(servers, monkeypatch):
    """This process, and the ones it starts, talk to the test's servers."""
    for k, v in _client_env(servers).items():
        monkeypatch.setenv(k, v)
    with prefect_api(servers["prefect"]):
        yield servers


@pytest.mark.slow
def test_served_deployment_retrains_only_on_new_data(project, against_servers):
    servers = against_servers
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    data = _reviews_data(project / "news")
    recipe = small_recipe(data={"path": str(data), "sample": None},
                                 tracking={"experiment_name": "scheduled", "tracking_uri": servers["mlflow"],
                                           "promotion": {"model": "adapter", "metric": "test_accuracy"}})
    write_recipe(project / "r.yaml", recipe)
    serve = subprocess.Popen([sys.executable, "-m", "qlora.cli", "deploy", "r.yaml", "--cron", "0 3 * * 1",
                              "--name", "weekly"], cwd=project, env={**os.environ},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deployment = _wait_for_deployment("qlora-finetune/weekly", serve)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"]
        # The recipe file and the overrides that pin its paths: a run reads the file as `qlora run` does.
        overrides = deployment.parameters["overrides"]
        assert deployment.parameters["recipe_file"] == str((project / "r.yaml").resolve())
        assert "tracking.promotion.enabled=true" in overrides and f"data.path={data.resolve()}" in overrides

        first = _trigger(deployment.id)
        assert first.state.is_completed(), first.state
        run1 = _mlflow_run_of(servers["mlflow"], first.id)
        assert run1.data.tags["qlora.promotion.promoted"] == "True"
        assert "no champion before" in run1.data.tags["qlora.promotion.reason"]
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first.id])))
        kinds = {a.type for a in artifacts}
        assert {"markdown", "table"} <= kinds, kinds
        texts = " ".join(str(a.data) for a in artifacts)
        assert run1.info.run_id in texts, "the Prefect artifacts lead to the MLflow run"
        links = {a.key: str(a.data) for a in artifacts if str(a.data).startswith("[")}  # link artifacts: [text](url)
        assert f"{servers['mlflow']}/#/experiments/" in links["reviews-test-mlflow-run"]
        assert run1.info.run_id in links["reviews-test-mlflow-run"]
        assert "/#/models/reviews-test-adapter/versions/1" in links["reviews-test-adapter-version"]
        assert "content key" in texts and "train" in texts
        assert run1.data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{first.id}")
        lineage = _materializations(servers["prefect"])
        # Upstream: what each asset was made from (Prefect may add what those were made from).
        assert "qlora://reviews-test/tokenized" in lineage.get("qlora://reviews-test/adapter", ()), lineage
        assert lineage.get("qlora://reviews-test/tokenized") == {"qlora://reviews-test/dataset"}, lineage

        # The same data again: every stage a cache hit, nothing retrained, the run says so.
        start = time.monotonic()
        second = _trigger(deployment.id)
        print(f"scheduled run on unchanged data: {time.monotonic() - start:.1f} s")
        assert second.state.is_completed()
        run2 = _mlflow_run_of(servers["mlflow"], second.id)
        assert set(run2.data.tags["qlora.cached_stages"].split(",")) >= {"load", "split", "tokenize", "train",
                                                                        "evaluate"}
        assert "already the champion" in run2.data.tags["qlora.promotion.reason"]

        # New rows arrive: the data fingerprint changes, training runs, the decision is recorded.
        _reviews_data(data, shift=160)
        third = _trigger(deployment.id)
        assert third.state.is_completed()
        run3 = _mlflow_run_of(servers["mlflow"], third.id)
        assert "train" not in run3.data.tags.get("qlora.cached_stages", "").split(",")
        reason = run3.data.tags["qlora.promotion.reason"]
        assert reason.startswith(("promoted v2", "kept champion v1")), reason
        assert run3.data.metrics["train_runtime_s"] > 0
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)


@pytest.mark.slow
def test_work_pool_deployment_runs_on_a_worker(project, against_servers):
    servers = against_servers
    data = _reviews_data(project / "news")
    recipe = small_recipe(data={"path": str(data), "sample": None},
                                 tracking={"experiment_name": "pool", "tracking_uri": servers["mlflow"]})
    write_recipe(project / "r.yaml", recipe)
    env = {**os.environ}
    subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "local", "--type", "process"],
                   env=env, check=True, capture_output=True, timeout=120)
    done = _cli(project, "deploy", "r.yaml", "--interval", "3600", "--pool", "local", "--name", "hourly",
                "--no-promote")
    assert done.returncode == 0, done.stderr[-3000:]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("qlora-finetune/hourly")
    assert deployment.work_pool_name == "local"
    assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [3600]
    assert "tracking.promotion.enabled=true" not in deployment.parameters["overrides"]

    from prefect.deployments import run_deployment

    flow_run = run_deployment(deployment.id, timeout=0)  # scheduled now; the worker picks it up
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", "local", "--run-once"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert worker.returncode == 0, worker.stderr[-3000:]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_completed(), state
    _mlflow_run_of(servers["mlflow"], flow_run.id)


@pytest.mark.slow
def test_ui_starts_both_servers_and_stops_them_on_ctrl_c(project):
    from qlora.servers import free_port, port_free

    prefect_port, mlflow_port = free_port(), free_port()
    ui = subprocess.Popen([sys.executable, "-m", "qlora.cli", "ui", "--prefect-port", str(prefect_port),
                           "--mlflow-port", str(mlflow_port)], cwd=project,
                          env={**os.environ, "PREFECT_HOME": str(project / ".prefect")},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
        line = ui.stdout.readline()
        assert line or ui.poll() is None, ui.stderr.read()[-3000:]
        lines.append(line)
    text = "".join(lines)
    assert f"Prefect UI: http://127.0.0.1:{prefect_port}" in text and f"MLflow UI:  http://127.0.0.1:{mlflow_port}" in text
    import urllib.request

    for url in (f"http://127.0.0.1:{prefect_port}/api/health", f"http://127.0.0.1:{mlflow_port}/health"):
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200
    ui.send_signal(signal.SIGINT)
    assert ui.wait(timeout=60) == 0
    deadline = time.monotonic() + 20  # the servers' worker processes exit just after their parents
    while not (port_free(prefect_port) and port_free(mlflow_port)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert port_free(prefect_port) and port_free(mlflow_port)


POSTGRES = os.environ.get("QLORA_TEST_POSTGRES")  # postgresql://USER:PASSWORD@127.0.0.1:5432


def _heartbeats_of(api: str, flow_run_id, wait_s: float = 30) -> list[dict]:
    """The flow run's heartbeat events, as the server stored them (its event persister writes them
    in batches, seconds after they arrive)."""
    body = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                       "any_resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 50}
    deadline = time.monotonic() + wait_s
    while True:
        request = urllib.request.Request(f"{api}/events/filter", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            events = json.loads(answer.read())["events"]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(1)


@pytest.mark.slow
@pytest.mark.skipif(not POSTGRES, reason="no PostgreSQL: scripts/postgres.sh starts one (.ci/run does)")
def test_pipeline_against_postgresql_backed_servers(project):
    """The team set-up: Prefect and MLflow servers on PostgreSQL; one pipeline run reported to both."""
    import psycopg2

    suffix = uuid.uuid4().hex[:8]
    databases = [f"prefect_{suffix}", f"mlflow_{suffix}"]
    admin = psycopg2.connect(f"{POSTGRES}/postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        for name in databases:
            cursor.execute(f"CREATE DATABASE {name}")
    host = POSTGRES.split("://", 1)[1]
    try:
        with running_servers(project, f"postgresql+asyncpg://{host}/{databases[0]}",
                             f"postgresql+psycopg2://{host}/{databases[1]}") as urls:
            recipe = small_recipe(tracking={"experiment_name": "postgres", "tracking_uri": urls["mlflow"]})
            write_recipe(project / "r.yaml", recipe)
            done = _cli(project, "run", "r.yaml", env={"PREFECT_API_URL": urls["prefect"]}, timeout=900)
            assert done.returncode == 0, done.stderr[-3000:]
            from prefect.client.orchestration import get_client

            with prefect_api(urls["prefect"]), get_client(sync_client=True) as client:
                flow_runs = client.read_flow_runs()
            assert len(flow_runs) == 1 and flow_runs[0].state.is_completed()
            run = _mlflow_run_of(urls["mlflow"], flow_runs[0].id)
            assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
            # Prefect's own heartbeats reach a running server (the first is sent as the flow starts).
            assert _heartbeats_of(urls["prefect"], flow_runs[0].id), "no heartbeat reached the server"
    finally:
        with admin.cursor() as cursor:
            for name in databases:
                cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_every_prefect_yaml_deployment_and_the_k8s_nodes_are_valid():
    """prefect.yaml's deployments name recipes whose overrides validate (the multi-node one too), and
    the Kubernetes nodes' command is a `qlora join` this CLI accepts, at the rendezvous the
    multi-node deployment names."""
    import yaml

    from qlora.cli import command_parser
    from qlora.tasks.recipe import load_recipe

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    endpoints = set()
    for d in deployments:
        params = d["parameters"]
        recipe = load_recipe(str(REPO / params["recipe_file"]), params.get("overrides", []))
        assert d["entrypoint"] == "flows/finetune.py:finetune"
        if recipe.distributed.nnodes > 1:
            endpoints.add(recipe.distributed.rdzv_endpoint)
            assert recipe.work_dir.startswith("/shared/")
    nodes = [doc for doc in yaml.safe_load_all((REPO / "scripts" / "k8s" / "train-nodes.yaml").read_text())
             if doc["kind"] == "StatefulSet"][0]
    command = nodes["spec"]["template"]["spec"]["containers"][0]["command"]
    args = command_parser().parse_args(command[1:])
    assert args.command == "join" and {args.rdzv_endpoint} == endpoints and args.work_dir == "/shared/.qlora"
