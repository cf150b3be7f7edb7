"""MLflow tracking, the one way this project writes to MLflow: its public `MlflowClient`, one run per
pipeline run, addressed by run id (MLflow's active run is per thread, and Prefect may run tasks in
other threads), resumed rather than orphaned after a crash. Metrics and parameters go in batches
that do not wait for the store (`synchronous=False`); `end_run` waits for them before it marks the
run's final status, so a failed write still fails the run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import numbers
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from qlora.runtime.secrets import mask, reveal
from qlora.tasks.recipe import Recipe, RecipeError, flatten
from qlora.tasks.results import Evaluated, Loaded, LoraPlan, Merged, Packaged, Split, Tokenized, Trained

log = logging.getLogger("qlora")

MAX_PARAM_CHARS = 6000  # MLflow rejects longer parameter values
RECIPE_KEY_TAG = "qlora.recipe_key"


def default_tracking_uri() -> str:
    return f"sqlite:///{Path('mlflow').resolve() / 'mlflow.db'}"


def tracking_uri_of(recipe: Recipe) -> str:
    """The tracking store's URI, credentials included (what MLflow connects with): print `mask(uri)`."""
    return reveal(recipe.tracking.tracking_uri) or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_tracking(uri: str, field: str = "tracking.tracking_uri", existing: bool = False) -> None:
    """The tracking store answers (servers and databases within a few seconds), or a RecipeError.
    existing: for commands that only read (predict, export, compare): a local store must be there
    already; nothing is created for them."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(_health_request(uri), timeout=5) as r:
                if r.status != 200:
                    raise RecipeError(f"MLflow server at {uri} answered {r.status} to /health", field)
        except (urllib.error.URLError, OSError) as e:
            raise RecipeError(f"cannot reach the MLflow tracking server at {uri}: {getattr(e, 'reason', e)}", field,
                              hint="start it, or leave tracking.tracking_uri unset for the local store") from None
    elif uri.startswith("sqlite:///"):
        # Nothing is created here: a recipe refused later leaves no empty store behind.
        database = Path(uri[len("sqlite:///"):])
        if database.exists():
            _check_sqlite_file(database, field)
        elif existing:
            raise RecipeError(f"no MLflow tracking store at {database}", field,
                              hint="run from the directory you ran the recipe in, or name the store with "
                                   "--tracking-uri")
        parent = database.parent
        writable = next(p for p in [parent, *parent.parents] if p.exists())
        if not writable.is_dir() or not os.access(writable, os.W_OK | os.X_OK):
            raise RecipeError(f"tracking store directory {parent} cannot be created: {writable} is not a "
                              f"writable directory", field)
    elif uri.split(":", 1)[0].split("+", 1)[0] in _DATABASES:
        _check_database_driver(uri, field)
        _check_database_listens(uri, field)
    elif "://" in uri and not uri.startswith(("file://", "databricks")):
        raise RecipeError(f"unsupported tracking URI scheme '{uri.split('://', 1)[0]}'", field,
                          hint="http(s)://, sqlite:///, postgresql://, mysql://, mssql:// or file://")


_DATABASES = ("postgresql", "mysql", "mssql")


def _health_request(uri: str) -> urllib.request.Request:
    """GET /health of an MLflow server, its credentials (in the URI, as `user:password@`, or in
    MLFLOW_TRACKING_USERNAME/_PASSWORD, as MLflow takes them) sent as HTTP basic auth, never
    left in the host name for the resolver."""
    import base64
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    user = urllib.parse.unquote(parts.username or "") or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = urllib.parse.unquote(parts.password or "") or os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    headers = {}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.request.Request(url, headers=headers)


SQLITE_MAGIC = b"SQLite format 3\0"


def _check_sqlite_file(path: Path, field: str) -> None:
    """A local store's file is a whole SQLite database: its schema reads (first, so that a crashed
    writer's hot journal is rolled back, as MLflow's first read would), then its header (the magic
    string, and as many pages as it counts). A truncated or overwritten store is named here, not as
    a DatabaseError traceback mid-run."""
    import sqlite3

    broken = "restore it from a backup, or move it away to start a new store"
    if not path.is_file():
        raise RecipeError(f"tracking store {path} is not a file", field)
    if path.stat().st_size == 0:
        return  # an empty file is an empty database: MLflow creates its tables
    with path.open("rb") as f:
        if not f.read(16).startswith(SQLITE_MAGIC):
            raise RecipeError(f"tracking store {path} is not a SQLite database", field, hint=broken)
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        unreadable = None
    except sqlite3.DatabaseError as e:
        unreadable = e
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(100)
    page_size = int.from_bytes(header[16:18], "big")
    expected = int.from_bytes(header[28:32], "big") * (65536 if page_size == 1 else page_size)
    if size < expected:
        raise RecipeError(f"tracking store {path} is truncated ({size} of the {expected} bytes its header "
                          f"counts)", field, hint=broken)
    if unreadable is not None:
        raise RecipeError(f"tracking store {path} is not a readable SQLite database ({unreadable})", field,
                          hint=broken)


_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _check_database_listens(uri: str, field: str) -> None:
    """Something listens at the database's host and port (within seconds; MLflow's own connection
    retries take minutes). A Unix-socket URI (no host) is left to the driver."""
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    if not url.host:
        return
    port = url.port or _DEFAULT_PORTS[url.get_backend_name()]
    try:
        socket.create_connection((url.host, port), timeout=5).close()
    except OSError as e:
        raise RecipeError(f"cannot reach the database at {url.host}:{port}: {e.strerror or e}", field,
                          hint="start the database, or leave tracking.tracking_uri unset for the local store") from None


def _check_database_driver(uri: str, field: str) -> None:
    """A database URI whose SQLAlchemy dialect or Python driver is not installed fails here, not
    after training."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except (NoSuchModuleError, ArgumentError) as e:
        raise RecipeError(f"not a usable database URI: {str(e).splitlines()[0][:200]}", field) from None
    except ImportError as e:
        raise RecipeError(f"the database driver for {uri.split(':', 1)[0]} is not installed ({e.name or e})", field,
                          hint="pip install it (postgresql://: psycopg[binary], or postgresql+psycopg2:// with "
                               "psycopg2-binary; mysql: mysqlclient, or mysql+pymysql:// with pymysql)") from None


def store_lock(uri: str):
    """One process at a time creates a sqlite store's tables and experiments (two runs started
    together in a fresh directory raced on it)."""
    from contextlib import nullcontext

    if not uri.startswith("sqlite:///"):
        return nullcontext()
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock")


def import_mlflow() -> None:
    """MLflow's client and SQL store imported (a second or more), quieted as the CLI is."""
    import warnings

    # MLflow's dataset-schema hints about integer label columns are noise in a CLI run.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import mlflow.tracking  # noqa: F401


def mlflow_client(uri: str):
    """MLflow's public client for a tracking (and registry) URI."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


def store_exists(uri: str) -> bool:
    """A local sqlite store's file is there (any other store is a server or a database: assumed)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).is_file()
    return True


def prepare_store(uri: str) -> None:
    """Open the tracking store once (a new sqlite store creates its tables: seconds), one process at a
    time, before the run's first write needs it."""
    try:
        with store_lock(uri):
            mlflow_client(uri).search_experiments(max_results=1)
    except Exception:  # noqa: BLE001 - start_run reports store problems where they matter
        pass


_pending: dict[str, list] = {}  # run id -> MLflow's RunOperations of writes not waited for yet
_pending_lock = threading.Lock()


def log_batch(uri: str, run_id: str, metrics=(), params=(), tags=()) -> None:
    """A batch written by MLflow in the background (`synchronous=False`): the caller goes on, and
    `wait_for_writes` (which `end_run` calls) waits for it and raises what failed."""
    operations = mlflow_client(uri).log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=False)
    with _pending_lock:
        _pending.setdefault(run_id, []).append(operations)


def wait_for_writes(run_id: str) -> None:
    """Every background write of the run done; the first that failed is raised (after all are done)."""
    with _pending_lock:
        operations = _pending.pop(run_id, [])
    failures = []
    for pending in operations:
        try:
            pending.wait()
        except Exception as e:  # noqa: BLE001 - raised below, once every write has ended
            failures.append(e)
    if failures:
        raise failures[0]


class Tracker:
    """Logs into one MLflow run by id; does nothing when there is no run (tests, benchmarks).
    background: metrics and tags written by MLflow in the background (a training loop's per-step
    metrics: the step does not wait for the store), `flush` waits for them. Otherwise each write is
    done when the call returns (a few writes in a row: on a sqlite store, a background writer
    beside them only contends for its lock)."""

    def __init__(self, uri: str | None, run_id: str | None, background: bool = False):
        self.uri, self.run_id, self.background = uri, run_id, background
        self.client = mlflow_client(uri) if uri and run_id else None
        self.logged_through: dict[str, int] = {}

    def skip_logged(self, keys: list[str]) -> None:
        """Steps already logged for these metrics (by a run killed after logging them, before its
        next checkpoint) are not logged again when the resumed training recomputes them."""
        if self.client is not None:
            for key in keys:
                steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
                if steps:
                    self.logged_through[key] = max(steps)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), step or 0
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and step > self.logged_through.get(k, -1)]
        if batch:
            self._write(metrics=batch)

    def log_text(self, text: str) -> None:
        log.info(text)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.client is not None and tags:
            from mlflow.entities import RunTag

            self._write(tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def _write(self, **batch) -> None:
        if self.background:
            log_batch(self.uri, self.run_id, **batch)
        else:
            self.client.log_batch(self.run_id, **batch)

    def flush(self) -> None:
        if self.client is not None:
            wait_for_writes(self.run_id)


# --- the pipeline's run ------------------------------------------------------------------------

def start_run(recipe: Recipe, recipe_key: str, uri: str, flow_run_id: str | None,
              parent_run_id: str | None = None) -> tuple[str, str, bool]:
    """A new run, or the unfinished run of the same recipe (resumed: same id, status RUNNING).
    Returns (experiment_id, run_id, resumed)."""
    found = find_unfinished_runs(uri, recipe.tracking.experiment_name, recipe_key)
    unfinished = [r for r in found["runs"] if not _owned_by_a_live_flow_run(r, flow_run_id)][:1]
    tags = {"prefect.flow_run_id": flow_run_id or "", "qlora.recipe": recipe.name, "qlora.method": recipe.method,
            OWNER_TAG: process_owner()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if unfinished:
        run_id = unfinished[0]["run_id"]
        resume_run(uri, run_id)
        previous = unfinished[0]["tags"].get("prefect.flow_run_id")
        if previous and previous != flow_run_id:
            mark_flow_run_crashed(previous, f"its process ended without finishing; resumed by flow run {flow_run_id}")
        from mlflow.entities import RunTag

        # Written before the run goes on: another run of this recipe decides by these tags whether it is taken.
        mlflow_client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    else:
        # Named per configuration: runs of one recipe with other settings or data are told apart. Created
        # with its owner's tags in one write: a run of the same recipe starting at that moment never
        # sees it unowned (and takes it over) between its creation and a second write.
        run_id = create_run(uri, found["experiment_id"], run_name(recipe.name, recipe_key),
                            {RECIPE_KEY_TAG: recipe_key, **{k: str(v) for k, v in tags.items()}})
    return found["experiment_id"], run_id, bool(unfinished)


def find_unfinished_runs(uri: str, experiment_name: str, recipe_key: str) -> dict:
    """The experiment (created if new) and its unfinished runs of this recipe key, newest first."""
    client = mlflow_client(uri)
    exp_id = experiment_id(client, experiment_name, uri)
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{RECIPE_KEY_TAG}` = '{recipe_key}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=20)
    return {"experiment_id": exp_id, "runs": [
        {"run_id": r.info.run_id, "status": r.info.status,
         "tags": {k: r.data.tags[k] for k in ("prefect.flow_run_id", OWNER_TAG) if k in r.data.tags}} for r in runs]}


def resume_run(uri: str, run_id: str) -> None:
    mlflow_client(uri).update_run(run_id, status="RUNNING")


def create_run(uri: str, exp_id: str, name: str, tags: dict[str, str]) -> str:
    return mlflow_client(uri).create_run(exp_id, run_name=name, tags=tags).info.run_id


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    Tracker(uri, run_id).set_tags(tags)


def run_name(recipe_name: str, recipe_key: str) -> str:
    return f"{recipe_name}-{recipe_key[:7]}"


def mark_all_cached(uri: str, run_id: str, recipe_name: str, recipe_key: str) -> None:
    """A run whose every stage was a cache hit: said in its name and a tag, so the runs list tells
    an unchanged scheduled run from one that trained."""
    client = mlflow_client(uri)
    client.set_tag(run_id, "qlora.all_cached", "true")
    client.update_run(run_id, name=f"{run_name(recipe_name, recipe_key)}-cached")


OWNER_TAG = "qlora.owner"  # host:pid:process start time of the process reporting to the run


def process_owner(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def _process_start(pid: int) -> str:
    """The process's start time (clock ticks since boot), so that a reused pid is not taken for it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owned_by_a_live_flow_run(run: dict, flow_run_id: str | None) -> bool:
    """A RUNNING MLflow run (as find_unfinished_runs describes it) that another live pipeline run still
    reports to: two runs of the same recipe at once (a deployment serving several) must not share it.
    On this machine: is its process alive (a killed run's Prefect state stays Running, its process does
    not); elsewhere: is its Prefect flow run still going."""
    owner_flow = run["tags"].get("prefect.flow_run_id")
    if run["status"] != "RUNNING" or (owner_flow and owner_flow == flow_run_id):
        return False
    host, _, rest = run["tags"].get(OWNER_TAG, "").partition(":")
    pid, _, started = rest.partition(":")
    if host == socket.gethostname() and pid.isdigit():
        return int(pid) != os.getpid() and os.path.exists(f"/proc/{pid}") and _process_start(int(pid)) == started
    return bool(owner_flow) and flow_run_is_active(owner_flow)


def flow_run_is_active(flow_run_id: str) -> bool:
    """Whether the Prefect server knows this flow run and it has not reached a final state. Unknown
    (another, temporary server; no server) counts as not active: its MLflow run was left unfinished."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():  # no server: none to ask (and none worth starting for this)
            return False
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
        return state is not None and not state.is_final()
    except Exception:  # noqa: BLE001 - not found, unreachable: nothing alive owns the run
        return False


# MLflow 3's UI opens an experiment of this kind on its runs (model training), not on traces (GenAI).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client, name: str, uri: str) -> str:
    with store_lock(uri):
        exp = client.get_experiment_by_name(name)
        if exp is None:
            return client.create_experiment(name, artifact_location=_artifact_root(uri), tags=EXPERIMENT_KIND)
        if "mlflow.experimentKind" not in exp.tags:  # made by an earlier version, or by hand
            client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id


def mark_flow_run_crashed(flow_run_id: str, message: str) -> None:
    """A flow run whose process was killed (kill -9) stays Running in Prefect forever: the run that
    resumes its work says it crashed."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL
        from prefect.states import Crashed

        if not PREFECT_API_URL.value():
            return
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and not state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
    except Exception:  # noqa: BLE001 - not known to this server: nothing to mark
        pass


def start_parent_run(recipe: Recipe, uri: str, name: str, tags: dict[str, str]) -> str:
    """The run a comparison or sweep nests its pipeline runs under."""
    client = mlflow_client(uri)
    exp_id = experiment_id(client, recipe.tracking.experiment_name, uri)
    return client.create_run(exp_id, run_name=name, tags={"qlora.recipe": recipe.name, **tags}).info.run_id


def end_run(uri: str, run_id: str, status: str) -> None:
    """The run's final status, once its background writes are done: a write that failed ends a run
    that would have finished FAILED, and is raised."""
    try:
        wait_for_writes(run_id)
    except Exception:
        mlflow_client(uri).set_terminated(run_id, status="FAILED" if status == "FINISHED" else status)
        raise
    mlflow_client(uri).set_terminated(run_id, status=status)


def recipe_params(recipe: Recipe) -> dict[str, str]:
    """The recipe as MLflow parameters: flattened, secrets masked, each value within MLflow's limit
    (the logged recipe file has it all)."""
    params = {}
    for k, v in flatten(recipe).items():
        v = mask(v)
        params[k] = v if len(v) <= MAX_PARAM_CHARS else v[: MAX_PARAM_CHARS - 15] + "...[truncated]"
    return params


def recipe_texts(recipe: Recipe, recipe_file: str | None) -> dict[str, str]:
    """The resolved recipe, and the file it came from, as logged artifacts (secrets masked)."""
    import yaml

    texts = {"recipe/resolved.yaml": mask(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))}
    if recipe_file and Path(recipe_file).is_file():
        texts[f"recipe/{Path(recipe_file).name}"] = mask(Path(recipe_file).read_text(encoding="utf-8"))
    return texts


def log_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    """Parameters the run has not logged yet (a resumed run keeps its own)."""
    from mlflow.entities import Param

    existing = mlflow_client(uri).get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), 100):  # MLflow's limit of parameters per batch
        mlflow_client(uri).log_batch(run_id, params=new[i:i + 100])


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    mlflow_client(uri).log_text(run_id, text, artifact_file)


def log_datasets(uri: str, run_id: str, split_result: Split, source: str) -> None:
    import mlflow.data
    import pandas as pd
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client = mlflow_client(uri)
    inputs = []
    for name in ("train", "validation", "test"):
        df = pd.read_parquet(split_result.file(f"{name}.parquet"))
        ds = mlflow.data.from_pandas(df, source=source, name=name, targets="label" if "label" in df else None)
        context = {"train": "training", "validation": "validation", "test": "testing"}[name]
        fields = ds.to_dict()  # the dataset's public description: name, digest, source, schema, profile
        entity = Dataset(**{k: fields.get(k) for k in ("name", "digest", "source_type", "source", "schema", "profile")})
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)]))
    with store_lock(uri):  # MLflow checks, then inserts, each dataset: two runs at once raced here
        client.log_inputs(run_id, datasets=inputs)


def log_history(uri: str, run_id: str, history_file: str) -> None:
    """Per-step train metrics, unless training already logged them live into this run."""
    wait_for_writes(run_id)  # what training logged live, written before it is looked for
    client = mlflow_client(uri)
    if client.get_metric_history(run_id, "train_loss"):
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for line in Path(history_file).read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        metrics += [Metric(k, float(v), now, step) for k, v in record.items() if v is not None]
    for i in range(0, len(metrics), 1000):  # one call per MLflow batch limit, not one per step
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_summary(uri: str, run_id: str, metrics: dict[str, Any], prefix: str = "") -> None:
    numeric = {f"{prefix}{k}": float(v) for k, v in metrics.items()  # numpy scalars are numbers.Real too
               if isinstance(v, numbers.Real) and not isinstance(v, bool)}
    Tracker(uri, run_id).log_metrics(numeric)


def log_artifacts(uri: str, run_id: str, local_dir: str, artifact_path: str) -> None:
    mlflow_client(uri).log_artifacts(run_id, str(local_dir), artifact_path)


def log_dict(uri: str, run_id: str, data: dict, artifact_file: str) -> None:
    mlflow_client(uri).log_dict(run_id, data, artifact_file)


def log_parquet_table(uri: str, run_id: str, parquet_file: str, artifact_file: str) -> None:
    import pandas as pd

    mlflow_client(uri).log_table(run_id, data=pd.read_parquet(parquet_file), artifact_file=artifact_file)


def log_comparison(uri: str, run_id: str, rows: list[dict], work_dir: str) -> None:
    """The variant table (MLflow table + CSV), its chart, and one nested run per variant."""
    import pandas as pd

    from qlora.tasks.comparison import TABLE_FILE, comparison_chart

    table, work = pd.DataFrame(rows), Path(work_dir)
    client = mlflow_client(uri)
    client.log_table(run_id, data=table, artifact_file=TABLE_FILE)
    table.to_csv(work / "variants.csv", index=False)
    comparison_chart(table, work / "variants.png")
    client.log_artifact(run_id, str(work / "variants.csv"), "comparison")
    client.log_artifact(run_id, str(work / "variants.png"), "comparison")
    experiment = client.get_run(run_id).info.experiment_id
    children = {r.data.tags.get("qlora.variant"): r.info.run_id for r in client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")}
    for row in table.to_dict(orient="records"):
        variant = row.pop("variant")
        child = children.get(variant) or client.create_run(
            experiment, run_name=variant, tags={"mlflow.parentRunId": run_id, "qlora.variant": variant,
                                                "qlora.dtype": str(row.get("dtype"))}).info.run_id
        Tracker(uri, child).log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float))})
        end_run(uri, child, "FINISHED")


# --- the recorder a pipeline run talks to -------------------------------------------------------

class RunRecorder:
    """Everything a pipeline run records outside its stages, behind one object: the MLflow run
    (parameters, data, metrics, artifacts, registered versions, promotion); the Prefect artifacts a person
    browsing the UI reads (metrics tables, links, the lineage, the outcome); and the summary the CLI
    prints. The flow calls it after each stage; it never decides what runs."""

    def __init__(self, recipe: Recipe, uri: str, experiment: str, run_id: str, resumed: bool,
                 flow_run_id: str | None):
        self.r, self.uri, self.run_id, self.flow_run_id = recipe, uri, run_id, flow_run_id
        self.experiment = experiment
        self.registered = recipe.tracking.registered_model_name or recipe.name
        self.summary: dict[str, Any] = {"run_id": run_id, "tracking_uri": mask(uri), "resumed_run": resumed,
                                        "method": recipe.method}

    def _write(self, write, *args: Any) -> None:
        write(self.uri, self.run_id, *args)

    def inputs(self, recipe_file: str | None, loaded: Loaded, splits: Split, tokenized: Tokenized, lora: LoraPlan,
               source_uri: str) -> None:
        """The recipe, its data (datasets, counts) and what LoRA will train; links between the runs."""
        from qlora.servers import TEMPORARY_PREFECT_SERVER
        from qlora.tasks import lineage

        page = lineage.prefect_ui_url(self.flow_run_id)
        if page:
            tags = {"prefect.flow_run_url": page}
            if os.environ.get(TEMPORARY_PREFECT_SERVER):
                tags["qlora.prefect_server"] = ("temporary: started for this run and stopped with it; the flow run "
                                                "stays in the project's Prefect database, whose pages `qlora ui` "
                                                "serves at prefect.flow_run_url")
            self._write(set_tags, tags)
        lineage.link_or_note(lineage.mlflow_run_url(self.uri, self.experiment, self.run_id),
                             f"MLflow run {self.run_id}", f"{self.r.name}-mlflow-run",
                             "the MLflow run of this flow run", self.uri)
        self._write(set_tags, {"qlora.labels": json.dumps(loaded.label_names), "qlora.task": self.r.model.task})
        self._write(log_params, recipe_params(self.r))
        for artifact_file, text in recipe_texts(self.r, recipe_file).items():
            self._write(log_text, text, artifact_file)
        if not self.summary["resumed_run"]:
            self._write(log_datasets, splits, source_uri)
        counts = {f"data_{split}_{k}": v for split, stats in loaded.stats.items() for k, v in stats.items()}
        counts.update({f"tokens_{split}_{k}": v for split, stats in tokenized.stats.items() for k, v in stats.items()})
        self._write(log_summary, counts)
        self._write(log_summary, lora.model_dump(include={"trainable_params", "base_params", "trainable_percent"}))
        self.summary.update(lora=lora.model_dump(mode="json"), data=loaded.stats,
                            tokenize=tokenized.stats)

    def training(self, trained: Trained) -> None:
        self._write(log_history, str(trained.file(trained.history)))
        self._write(log_summary, trained.model_dump(include={
            "train_runtime_s", "samples_per_s", "tokens_per_s", "peak_memory_bytes", "steps", "weights_bytes",
            "gradient_bytes", "optimizer_state_bytes"}))
        self.summary.update(train=trained.model_dump(mode="json"),
                            adapter_dir=str(trained.weights_dir))

    def evaluation(self, evaluated: Evaluated, variant: str) -> None:
        """Metrics, the stage's files (confusion matrix...) and its predictions (for a causal LM: prompt,
        reference and generated text) as an MLflow table; the metrics as a Prefect table artifact too.
        variant: base (the untrained causal LM), start (the adapter it continues), adapter or merged."""
        from qlora.tasks import lineage

        prefix, artifact_dir = {"base": ("base_test_", "eval_base"), "start": ("start_test_", "eval_start"),
                                "adapter": ("test_", "eval"),
                                "merged": ("merged_test_", "eval_merged")}[variant]
        directory = Path(evaluated.dir)
        self._write(log_summary, evaluated.metrics, prefix)
        lineage.metrics_table(evaluated.metrics, f"{self.r.name}-{artifact_dir}",
                              f"{prefix}metrics of MLflow run {self.run_id}")
        self._write(log_artifacts, str(directory), artifact_dir)
        self._write(log_parquet_table, str(evaluated.file(evaluated.predictions)),
                    f"{artifact_dir}/predictions_table.json")
        self.summary[f"{prefix}metrics"] = evaluated.metrics
        self.summary.setdefault("evaluation_dirs", {})[variant] = evaluated.dir

    def upstream(self, upstream: dict) -> None:
        """The run started from a model another run produced (a registered version, or a recipe's latest
        finished run): the version and run as tags, and a Prefect link to that run's MLflow page (the
        chain's lineage) where it is in this run's tracking store."""
        from mlflow.exceptions import MlflowException

        from qlora.tasks import lineage

        named = f"{upstream['name']}/{upstream['version']}" if upstream["version"] else f"recipe {upstream['name']}"
        self._write(set_tags, {"qlora.upstream_model": upstream["uri"], "qlora.upstream_model_version": named,
                               "qlora.upstream_run_id": upstream["run_id"] or ""})
        self.summary["upstream"] = upstream
        if upstream["run_id"]:
            try:
                experiment = mlflow_client(self.uri).get_run(upstream["run_id"]).info.experiment_id
            except MlflowException:  # a recipe of another tracking store: the tags say which run
                return
            lineage.link_or_note(lineage.mlflow_run_url(self.uri, experiment, upstream["run_id"]),
                                 f"upstream MLflow run {upstream['run_id']} ({named})",
                                 f"{self.r.name}-upstream-run", "the run that produced this run's starting model",
                                 self.uri)

    def merged(self, merged: Merged) -> None:
        self.summary["merged_dir"] = str(merged.weights_dir)

    def packages(self, packaged: Packaged, merged: bool) -> None:
        """What users take away, logged where the registry's versions point: the portable adapter, and
        the merged (or fully fine-tuned) model as an MLflow model."""
        for name, logged_as in (("adapter", "adapter"), ("mlflow_model", "merged_model" if merged else "model")):
            folder = getattr(packaged, name)
            if folder:
                self._write(log_artifacts, str(packaged.file(folder)), logged_as)
                self.summary[f"{logged_as}_package"] = str(packaged.file(folder))

    def register(self, trained: Trained, merged: Merged | None) -> None:
        """One registry version per content: the adapter (or fully fine-tuned model), the merged model."""
        from qlora.tasks import lineage, promotion

        artifact = "adapter" if self.r.lora.enabled else "model"
        versions = [(artifact, artifact, trained.hash, f"{artifact}_version")]
        if merged is not None:
            versions.append(("merged_model", "merged", merged.hash, "merged_version"))
        for logged_as, suffix, content_hash, key in versions:
            name = f"{self.registered}-{suffix}"
            self.summary[key] = version = promotion.register(self.uri, self.run_id, logged_as, name, content_hash)
            self.summary.setdefault("registered_models", {})[name] = {"version": version,
                                                                      "mlflow_model": logged_as != "adapter"}
            lineage.link_or_note(lineage.mlflow_model_url(self.uri, name, version), f"registered model {name} v{version}",
                                 f"{name}-version", f"registered model {name}, version {version}", self.uri)

    def comparison(self, table, work: Path) -> None:
        rows = table.to_dict(orient="records")
        self._write(log_comparison, rows, str(work))
        self.summary["comparison"] = rows

    def promote(self) -> None:
        """Champion or not, by the recipe's metric and margin; the decision and its reason recorded in
        MLflow (tags, promotion.json) and Prefect (markdown artifact), either way."""
        from qlora.tasks import lineage, promotion
        from qlora.tasks.stage import run_logger

        p, r = self.r.tracking.promotion, self.r
        merges = r.merge.enabled and r.lora.enabled
        suffix = "merged" if p.model_for(merges) == "merged" else ("adapter" if r.lora.enabled else "model")
        name = f"{self.registered}-{suffix}"
        decision = promotion.promote(self.uri, name, p.metric_for(merges, r.model.task), p.margin,
                                     p.mode_for(merges, r.model.task))
        self._write(set_tags, {"qlora.promotion.promoted": decision["promoted"],
                                 "qlora.promotion.reason": decision["reason"]})
        self._write(log_dict, decision, "promotion.json")
        lineage.markdown(f"### promotion: {'promoted' if decision['promoted'] else 'not promoted'}\n\n"
                         f"{decision['reason']}\n\nMLflow run `{self.run_id}`, registered model `{name}`",
                         f"{r.name}-promotion", f"promotion decision for {name}")
        run_logger().info("promotion: %s", decision["reason"])
        self.summary["promotion"] = decision

    def finish(self, stages: list[dict], seconds: dict[str, float], recipe_key: str) -> dict:
        """The outcome (above all: was anything retrained?) in the log, as Prefect artifacts (summary
        and lineage) and as MLflow tags; returns the run's summary."""
        from qlora.tasks import lineage
        from qlora.tasks.stage import run_logger

        cached = {s["stage"]: s["cached"] for s in stages}
        self.summary.update(cached=cached, stage_seconds=seconds, all_cached=all(cached.values()))
        if self.summary["all_cached"]:
            text = "unchanged data and recipe: every stage was a cache hit, nothing retrained"
        else:
            text = (f"built: {', '.join(k for k, v in cached.items() if not v)}; "
                    f"cached: {', '.join(k for k, v in cached.items() if v) or 'none'}")
        run_logger().info(text)
        lines = [f"### {self.r.name}: {text}", "", f"MLflow run `{self.run_id}` ({self.uri})"]
        if "promotion" in self.summary:
            lines.append(f"\npromotion: {self.summary['promotion']['reason']}")
        lineage.markdown("\n".join(lines), f"{self.r.name}-run-summary", "what this run built")
        lineage.run_lineage(self.r.name, stages, self.flow_run_id)
        self._write(set_tags, {"qlora.cached_stages": ",".join(k for k, v in cached.items() if v)})
        if self.summary["all_cached"]:
            self._write(mark_all_cached, self.r.name, recipe_key)
        return self.summary
