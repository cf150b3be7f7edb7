"""`qlora`: run or validate a recipe.

    qlora run recipes/quickstart.yaml [--set train.learning_rate=1e-3 ...]
    qlora validate recipes/agnews-minilm.yaml --set data.path=../shared/data/ag_news

A mistake in the recipe or its inputs prints one line naming the field or file, and exits 2.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.runtime import signals
from qlora.runtime.errors import DiskFull, RecipeError
from qlora.runtime.secrets import mask
from qlora.runtime.startup import collector_paused, thaw
from qlora.servers import TEMPORARY_PREFECT_SERVER, free_port, logged_process, wait_healthy
from qlora.tasks.training.memory import OutOfMemory

if TYPE_CHECKING:
    from qlora.tasks.recipe import Recipe

EXIT_USER_ERROR = 2


def _quiet_environment() -> None:
    """Offline-friendly defaults, set before Prefect or MLflow are imported (they read them once)."""
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",  # nothing pickled into a result store
    }.items():
        os.environ.setdefault(key, value)
    if not sys.stderr.isatty():  # into a log file each bar redraw is a line: the libraries' bars off
        for key in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(key, "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # MLflow's dataset-schema hints about integer label columns are noise in a CLI run.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    # bitsandbytes announces an optional Hub-fetched CPU kernel at import; it can't be had offline.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # A user's mistake found inside the flow is logged by Prefect as a crash, traceback and all:
    # keep its one-line message, drop the traceback (the CLI ends with the same line and exit 2).
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_without_user_error_traceback)


def _without_user_error_traceback(record: logging.LogRecord) -> bool:
    if record.exc_info and isinstance(record.exc_info[1], (RecipeError, OutOfMemory, DiskFull)):
        record.exc_info, record.exc_text = None, None
    return True


DEFAULT_PREFECT_PORT = 4200  # `qlora ui`'s Prefect server


def import_for_the_flow() -> None:
    """What the flow's start and its first MLflow write import, imported while the start-up's
    collector pause lasts (collected as it grows, the same imports take a fifth longer)."""
    import fastapi.encoders  # noqa: F401 - Prefect serializes flow parameters with it
    import prefect.artifacts  # noqa: F401
    import prefect.flow_engine  # noqa: F401
    import prefect.task_engine  # noqa: F401

    from qlora.tasks.tracking import import_mlflow

    import_mlflow()


class TemporaryPrefectServer:
    """With no Prefect server configured, Prefect starts a temporary one at the first flow run and
    waits for it (seconds of a short run). We start the same server (Prefect's API app under uvicorn)
    before the heavy imports, so it boots on the other core meanwhile, and stop it at exit. Prefect
    migrates its database at each start, as its own temporary server does."""

    def __init__(self):
        # Two runs started together on a fresh machine would both migrate Prefect's new database:
        # one server starts at a time (until it answers).
        from filelock import FileLock

        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
        home.mkdir(parents=True, exist_ok=True)
        self.starting = FileLock(str(home / "qlora-server-start.lock"))
        self.starting.acquire()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0"}
        # Its own session: a SIGTERM sent to our process group must not kill it while the run still
        # reports to it (the run would hang at exit draining its log queue to a dead server); it
        # dies with us instead, however we die. Its output goes to a file, not to our stdout and
        # stderr: whoever reads those (a pipe, a scheduler capturing the run's output) would
        # otherwise wait for the server's shutdown too.
        self.process = logged_process(
            [sys.executable, "-m", "uvicorn", "--factory", "qlora.prefect_app:create_app", "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"], env,
            "qlora-prefect-server", None)
        os.environ["PREFECT_API_URL"] = self.url
        # The flow run pages this server would show go away with it; its database stays, and
        # `qlora ui` serves it on its default port: the links the run leaves point there.
        os.environ.setdefault("PREFECT_UI_URL", f"http://127.0.0.1:{DEFAULT_PREFECT_PORT}")
        os.environ[TEMPORARY_PREFECT_SERVER] = "1"
        atexit.register(self.stop)
        signals.on_emergency(self.stop)

    def wait(self, timeout: float = 60) -> None:
        import_for_the_flow()  # meanwhile: this process would otherwise idle
        try:
            # Polled often: every tenth of a second counts on an unchanged re-run.
            wait_healthy(self.url + "/health", self.process, "the temporary Prefect server", timeout, poll_s=0.05)
        finally:
            self.starting.release()

    def stop(self) -> None:
        """Asked to stop, not waited for (its shutdown takes a few tenths of a second of every run):
        it has answered every request, so nothing of the run is in it but what its database holds.
        If it is still shutting down when this process ends, the second SIGTERM it then gets
        (child_dies_with_parent) ends it at once."""
        if self.starting.is_locked:
            self.starting.release(force=True)
        if self.process.poll() is None:
            self.process.terminate()
        log = self.process.log_path
        if log.exists() and log.stat().st_size == 0:  # kept when it has something to say
            log.unlink()


def _prefect_server() -> TemporaryPrefectServer | None:
    ephemeral = os.environ.get("PREFECT_SERVER_EPHEMERAL_ENABLED", "true").lower() not in ("0", "false")
    if os.environ.get("PREFECT_API_URL") or not ephemeral or _profile_has_api_url():
        return None
    return TemporaryPrefectServer()


def _profile_has_api_url() -> bool:
    """A Prefect profile (prefect config set PREFECT_API_URL=...) names a server: use it."""
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or
                    Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / "profiles.toml")
    return profiles.is_file() and "PREFECT_API_URL" in profiles.read_text()


def preflight(recipe: Recipe, produced: set[str] = frozenset()) -> None:
    """The checks `run` makes before starting the flow: the ones that need no model library, so an
    unchanged re-run stays fast. Model checks happen in the stages, before any MLflow run. produced:
    registered model names (and `recipe:` references, tasks.upstream.upstream_name) an earlier recipe of a
    chain will create: a model named so is resolved when the chain reaches this recipe."""
    from qlora.tasks.data import check_data
    from qlora.tasks.evaluate import check_metrics, check_promotion
    from qlora.tasks.model import resolve_model
    from qlora.tasks.tracking import check_tracking, tracking_uri_of
    from qlora.tasks.upstream import continued_lora, upstream_name

    check_work_dir(recipe.work_dir)
    if upstream_name(recipe.model.name_or_path, "model.name_or_path") not in produced:
        continued_lora(recipe.lora, resolve_model(recipe.model, tracking_uri_of(recipe), recipe.work_dir).start)
    if not data_already_loaded(recipe):
        check_data(recipe.data, _data_columns(recipe))  # files, encoding, columns: the first rows
        if source_bytes(recipe) <= PREFLIGHT_READS_EVERY_ROW_UP_TO:
            check_rows(recipe)
    check_metrics(recipe.evaluate, recipe.model.task)
    if recipe.evaluate.harness.enabled:
        from qlora.tasks.harness import check_harness

        check_harness(recipe.evaluate.harness)
    check_promotion(recipe)
    check_tracking(tracking_uri_of(recipe))
    if recipe.evaluate.judge.model is not None:
        from qlora.tasks.judge import check_judge

        check_judge(recipe.evaluate.judge, tracking_uri_of(recipe))


def _abandon(server: TemporaryPrefectServer | None) -> None:
    """A recipe refused before its flow started: the server started for it stops, having written nothing."""
    if server is not None:
        server.stop()


def _preflight(recipe: Recipe, server: TemporaryPrefectServer | None, produced: set[str] = frozenset()) -> None:
    """The recipe's checks while the server boots. A refused recipe stops what was started."""
    try:
        preflight(recipe, produced)
    except RecipeError:
        _abandon(server)
        raise


@contextlib.contextmanager
def _without_heartbeats():
    """Around a flow run reporting to the temporary Prefect server: no heartbeats (that server dies
    with the run, so nothing would ever read them), through Prefect's public settings."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def data_already_loaded(recipe: Recipe) -> bool:
    """Whether the load stage has already read and cleaned exactly this data (the same files' content,
    the same data section and labels): its checks passed then and would pass again, so a re-run does
    not read the data twice before the flow takes it from the cache. A Hub dataset is always checked."""
    if recipe.data.hub:
        return False
    from qlora.tasks import store
    from qlora.tasks.data import describe_source
    from qlora.tasks.load import load, load_arguments

    source = describe_source(recipe.data)  # names a missing file or directory, as the checks would
    _, directory = load.key_of({"source": source, **load_arguments(recipe), "work_dir": recipe.work_dir})
    return (directory / store.RESULT_FILE).is_file() and (directory / store.MANIFEST_FILE).is_file()


def check_work_dir(work_dir: str) -> None:
    """The stage cache can be written (checked before any work, creating nothing)."""
    from qlora.tasks.store import check_writable

    path = check_writable(Path(work_dir), "work_dir", "the stage cache")
    locks = path / ".locks"
    if locks.exists() and not locks.is_dir():
        raise RecipeError(f"{locks} is a file, where the stage cache keeps its lock files", "work_dir",
                          hint="move that file away, or choose another work_dir")


# Up to this much data the preflight reads every row (a second of work), so that a mistake in the
# labels or the split fractions is reported before the flow, or a chain, starts. Above it the load and
# split stages are the first to read every row: they fail with the same one-line messages, before any
# MLflow run exists, without the data having been read twice.
PREFLIGHT_READS_EVERY_ROW_UP_TO = 16 * 2**20


def source_bytes(recipe: Recipe) -> int:
    """The size of the recipe's data files (0 for a Hub dataset: its rows are not read here)."""
    from qlora.tasks.data import source_files

    return 0 if recipe.data.hub else sum(p.stat().st_size for ps in source_files(recipe.data).values() for p in ps)


def check_rows(recipe: Recipe) -> None:
    """Every row as the load and split stages will see them (label_map, keep_labels, model.labels,
    empty rows, preference pairs, the split fractions): a mistake there is reported before any stage runs."""
    if recipe.data.hub:
        return
    from qlora.tasks.load import load_arguments, read_and_clean
    from qlora.tasks.split import check_split

    check_split(read_and_clean(**load_arguments(recipe))[0], recipe.split)


def _data_columns(recipe: Recipe) -> dict[str, str]:
    """Recipe field -> column, for the columns every data file must have."""
    from qlora.tasks.data import required_columns
    from qlora.tasks.pairs import preference_columns

    if recipe.preference.enabled:
        return preference_columns(recipe.preference, recipe.prompt)
    return required_columns(recipe.data, recipe.prompt.columns if recipe.model.task == "causal-lm" else None)


def validate(recipe: Recipe) -> dict:
    """Everything that can be checked without training. The run's own preflight first (paths,
    columns, labels, metrics, tracking store: seconds), then what needs the model's config
    (quantization, LoRA targets, the memory plan)."""
    from qlora.tasks.lora_plan import resolve_lora_targets
    from qlora.tasks.model import check_model

    preflight(recipe)
    from qlora.tasks.data import check_data
    from qlora.tasks.tracking import tracking_uri_of

    from qlora.tasks.upstream import continued_lora

    model = check_model(recipe.model, recipe.quantization, tracking_uri_of(recipe), recipe.work_dir)
    lora_cfg = continued_lora(recipe.lora, model.start)  # continuing an adapter: its shape
    data = check_data(recipe.data, _data_columns(recipe))
    info = {"model": model.path or model.gguf, "data": data.files if data else recipe.data.hub}
    from qlora.tasks.training.plan import check_memory_budget, training_processes

    processes, d = training_processes(recipe.distributed), recipe.distributed
    strategy = "none" if processes == 1 else "fsdp" if d.strategy == "fsdp" else "ddp"
    info["distributed"] = {"strategy": strategy, "processes": processes,
                           "nodes": d.nnodes, **({"rendezvous": d.rdzv_endpoint} if d.rdzv_endpoint else {})}
    if model.gguf is None and recipe.lora.enabled:  # a GGUF file's architecture is read when converted
        labels = [] if recipe.model.task == "causal-lm" else (recipe.model.labels or ["a", "b"])
        lora = resolve_lora_targets(model.path, lora_cfg, labels, recipe.model.task, recipe.model.trust_remote_code)
        info.update(target_modules=lora.target_modules, trainable_params=lora.trainable_params)
        plan = check_memory_budget(model.path, recipe.train, recipe.quantization, lora, recipe.tokenize.max_length,
                                   recipe.model.task == "causal-lm", recipe.model.trust_remote_code, d,
                                   with_estimate=True, dropout=lora_cfg.drops_inputs,
                                   preference=recipe.preference if recipe.preference.enabled else None)
        if plan.pop("strategy", strategy) != strategy:  # auto, on GPUs: fsdp where one GPU cannot hold the model
            info["distributed"]["strategy"] = "fsdp"
        info["distributed"]["host_memory_per_node_gib"] = plan.pop("host_per_node_gib")
        info["memory_plan"] = plan  # per GPU (per process)
    return {**info, "tracking_uri": tracking_uri_of(recipe)}


def _checkpointing(plan: dict) -> str:
    if not plan["gradient_checkpointing"]:
        return "off"
    return f"on ({plan['checkpointed_layers']} layers)" if "checkpointed_layers" in plan else "on"


# The evaluations a run summary holds: its key, the summary's line label, the variant's short name.
EVALUATIONS = (("base_test_metrics", "before training", "base"), ("start_test_metrics", "the adapter it continues", "start"),
               ("test_metrics", "test", "adapter"), ("merged_test_metrics", "merged model test", "merged"))


def _harness_lines(result: dict) -> list[str]:
    """evaluate.harness's figures per variant (value ± stderr)."""
    lines = []
    for key, _, label in EVALUATIONS:
        m = result.get(key) or {}
        figures = [f"{k[len('harness.'):]}={v:.4f}" + (f"±{m[k + '_stderr']:.4f}" if k + "_stderr" in m else "")
                   for k, v in sorted(m.items()) if k.startswith("harness.") and not k.endswith("_stderr")]
        if figures:
            lines.append(f"harness, {label}: " + ", ".join(figures))
    return lines


def _summary(result: dict) -> str:
    lines = ["", "== qlora run complete =="]
    shown = ("accuracy", "f1_macro", "loss", "perplexity", "preference_accuracy", "reward_margin", "logp_accuracy",
             "rouge1", "rougeL", "judge_rate", "judge_win_rate")
    for key, label, _ in EVALUATIONS:
        if key in result:
            figures = result[key]
            lines.append(f"{label}: " + ", ".join(f"{k}={figures[k]:.4f}" for k in shown if k in figures))
    lines += _harness_lines(result)
    if "comparison" in result:
        import pandas as pd

        from qlora.tasks.comparison import format_table

        lines += ["merge variants against the adapter:", format_table(pd.DataFrame(result["comparison"]))]
    t = result["train"]
    cached = [k for k, v in result["cached"].items() if v]
    lines.append(f"train: {t['steps']} steps, {t['train_runtime_s']:.1f} s, {t['samples_per_s']:.1f} samples/s, "
                 f"trainable {result['lora']['trainable_params']:,} params ({result['lora']['trainable_percent']:.2f}%)"
                 + (" [cached]" if result["cached"].get("train") else ""))
    plan = t.get("memory_plan") or {}
    if "estimated_peak_gib" in plan:  # chosen for train.max_memory_gib
        lines.append(f"memory plan: micro-batch {plan['micro_batch']} x {plan['accumulation']} accumulated, "
                     f"checkpointing {_checkpointing(plan)}, offload "
                     f"{'on' if plan['offload_activations'] else 'off'}; estimated peak {plan['estimated_peak_gib']} GiB, "
                     f"measured {t['peak_memory_bytes'] / 2**30:.2f} GiB above the start")
    if t.get("fast_paths"):
        lines.append(f"fast paths: {', '.join(t['fast_paths'])}")
    if result.get("all_cached"):
        lines.append("unchanged data and recipe: every stage was a cache hit, nothing retrained")
    else:
        lines.append(f"cache hits: {', '.join(cached) if cached else 'none, every stage was built'}")
    if "promotion" in result:
        lines.append(f"promotion: {result['promotion']['reason']}")
    dropped = {s: {k: v for k, v in c.items() if k.startswith("dropped") and v} for s, c in result["data"].items()}
    dropped = {s: c for s, c in dropped.items() if c}
    if dropped:
        lines.append(f"rows dropped: {json.dumps(dropped)}")
    # The packaged adapter names its original base (the train stage's own copy names the cache's).
    lines.append(f"adapter: {result.get('adapter_package') or result['adapter_dir']}")
    if "merged_dir" in result:
        lines.append(f"merged model: {result['merged_dir']}")
    uri = mask(result["tracking_uri"])
    lines.append(f"MLflow run: {result['run_id']} ({uri})")
    lines.append(f"  browse: mlflow ui --backend-store-uri {uri}")
    lines += _registered_lines(result.get("registered_models") or {}, uri)
    return "\n".join(lines)


def _registered_lines(registered: dict, uri: str) -> list[str]:
    """The registry versions the run made (or found: one version per content), and the one line that
    loads each: MLflow looks for its store in MLFLOW_TRACKING_URI, so the line sets it."""
    if not registered:
        return []
    lines = ["registered: " + ", ".join(f"{name} v{v['version']}" for name, v in registered.items())]
    for name, v in registered.items():
        source = f"models:/{name}/{v['version']}"
        load = (f"mlflow.pyfunc.load_model('{source}')" if v["mlflow_model"] else
                f"mlflow.artifacts.download_artifacts('{source}')")  # the adapter folder peft loads
        lines.append(f"  MLFLOW_TRACKING_URI={uri} python -c \"import mlflow; print({load})\"")
    return lines


def _tracking_uri(explicit: str | None, existing: bool = True) -> str:
    """The store a command reads: --tracking-uri, MLFLOW_TRACKING_URI, or the local one. existing: the
    command only reads (or changes what is there), so a store that is not there is an error, not created."""
    from qlora.tasks.tracking import check_tracking, default_tracking_uri

    from_environment = not explicit and os.environ.get("MLFLOW_TRACKING_URI")
    uri = explicit or from_environment or default_tracking_uri()
    check_tracking(uri, "MLFLOW_TRACKING_URI" if from_environment else "--tracking-uri", existing)
    return uri


def _read_texts(args) -> list[str]:
    texts = list(args.texts)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise RecipeError("file not found", file=args.file)
        try:
            texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise RecipeError("not UTF-8 text", file=args.file) from None
    if not texts:
        raise RecipeError("no texts to classify", "TEXT", hint="give texts as arguments or --file with one per line")
    return texts


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qlora-pipeline")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown (not installed)"


def _recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe and its --set overrides: the same for every command that runs or checks a recipe."""
    p.add_argument("recipe", help="recipe YAML file, or the name of a shipped recipe (qlora recipes lists them)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.learning_rate=1e-3 (repeatable)")


def command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora", description="Declarative QLoRA fine-tuning pipelines.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run a recipe (cached stages are skipped, a failed run resumes)")
    _recipe_arguments(p)
    p.add_argument("then", nargs="*", metavar="RECIPE",
                   help="more recipes, run after it in order as one flow run (a chain: a later recipe may start from "
                        "a model an earlier one registers, models:/NAME-merged@candidate); --set applies to each")
    p.add_argument("--json", dest="json_out", help="also write the run summary to this JSON file")
    p = sub.add_parser("validate", help="check a recipe and its inputs without running it (cheap checks first)")
    _recipe_arguments(p)
    p = sub.add_parser("methods", help="run a recipe as QLoRA (plain, LoftQ, DoRA), LoRA and full fine-tuning; "
                                       "print them side by side")
    _recipe_arguments(p)
    p.add_argument("--full-learning-rate", type=float, default=5e-5,
                   help="learning rate of the full fine-tuning run (default 5e-5)")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="train each method once per seed (train.seed), then report mean and spread "
                        "(default: the recipe's seed)")
    p = sub.add_parser("sweep", help="run a recipe over a grid of field values, each trial a nested MLflow run")
    _recipe_arguments(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2,...]", required=True,
                   help="a recipe field and its values, e.g. --grid lora.r=[4,8,16] (repeatable)")
    p.add_argument("--parallel", type=int, default=1, help="trials at a time (default 1: one CPU run uses every core)")
    p = sub.add_parser("deploy", help="deploy a recipe for scheduled retraining (serve it here, or on a work pool)")
    _recipe_arguments(p)
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron schedule, e.g. "0 3 * * 1" (Mondays 03:00)')
    when.add_argument("--interval", type=float, help="seconds between runs")
    p.add_argument("--name", help="deployment name (default: the recipe name)")
    p.add_argument("--pool", help="register with this Prefect work pool instead of serving from this process")
    p.add_argument("--limit", type=int, default=1, help="served runs at a time (default 1)")
    p.add_argument("--no-promote", action="store_true",
                   help="never move the champion alias (default: promote by tracking.promotion's metric)")
    p = sub.add_parser("ui", help="start the Prefect server and the MLflow UI on 127.0.0.1 (Ctrl-C stops both)")
    p.add_argument("--prefect-port", type=int, default=DEFAULT_PREFECT_PORT, help="Prefect UI and API port (default 4200)")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (default 5000)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store under mlflow/)")
    p = sub.add_parser("recipes", help="list the shipped recipes; `qlora recipes copy NAME [DEST]` copies one to edit")
    p.add_argument("action", nargs="?", choices=["list", "copy"], default="list")
    p.add_argument("name", nargs="?", metavar="NAME", help="with copy: the shipped recipe")
    p.add_argument("dest", nargs="?", metavar="DEST", help="with copy: file or directory (default: ./NAME.yaml)")
    p = sub.add_parser("compare", help="print the adapter vs merged variants table of runs made with merge.compare")
    p.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store under mlflow/)")
    p = sub.add_parser("predict", help="classify texts (or answer them, for a causal LM) with a trained model "
                                       "from a run or the registry")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", dest="run_id", help="MLflow run id")
    source.add_argument("--model", help="registered model as NAME/VERSION or NAME@ALIAS (e.g. agnews-minilm-merged@champion)")
    p.add_argument("--variant", choices=["merged", "adapter"], default="merged", help="with --run: which model")
    p.add_argument("--file", help="a UTF-8 text file, one text per line")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store under mlflow/)")
    p = sub.add_parser("export", help="a trained model as a self-contained folder (hf) or one GGUF file (llama.cpp)")
    p.add_argument("source", metavar="SOURCE", help="MLflow run id, or registered model NAME@ALIAS / NAME/VERSION")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf: a transformers folder (default); "
                   "gguf: one file for llama.cpp (Llama-family causal LMs)")
    p.add_argument("--quant", default="f16", help="GGUF tensor type: f16 (default), bf16, q8_0, f32")
    p.add_argument("--out", required=True, help="folder (hf) or file (gguf) to write")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store under mlflow/)")
    p = sub.add_parser("merge", help="fold an exported adapter into its original base, saved in 16-bit")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder (as a run logs it: adapter_config.json names the base)")
    p.add_argument("--out", required=True, help="folder to write the merged model to")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p = sub.add_parser("chat", help="chat in the terminal with a trained causal LM (/reset, /exit)")
    p.add_argument("source", metavar="SOURCE", help="MLflow run id, or registered model NAME@ALIAS / NAME/VERSION")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store under mlflow/)")
    p = sub.add_parser("join", help="on another machine: join a multi-node training (distributed.nnodes) that "
                                    "`qlora run` started, with this machine's GPUs")
    p.add_argument("--rdzv-endpoint", required=True, metavar="HOST:PORT", help="the recipe's distributed.rdzv_endpoint")
    p.add_argument("--work-dir", default=".qlora", help="the run's work_dir, on storage every node shares")
    p.add_argument("--nproc-per-node", default="auto", help="processes here (default auto: one per visible GPU)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the training to start")
    p = sub.add_parser("promote", help="make the registry's candidate the champion if it beats it")
    p.add_argument("name", metavar="NAME", help="registered model name, e.g. agnews-minilm-merged")
    p.add_argument("--metric", help="run metric to compare (default: merged_test_accuracy for a *-merged model, "
                                    "test_accuracy for an adapter); --mode says which way is better")
    p.add_argument("--min-delta", type=float, default=0.0, help="margin the candidate must win by")
    p.add_argument("--mode", choices=["max", "min"],
                   help="max: higher is better; min: lower (default: min for losses and perplexity, else max)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store under mlflow/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = command_parser().parse_args(argv)
    signals.install()
    try:
        if args.command in ("compare", "predict", "promote", "export", "merge", "chat"):
            return _registry_command(args)
        if args.command == "ui":
            from qlora.servers import ui

            return ui(args.prefect_port, args.mlflow_port, _tracking_uri(args.tracking_uri, existing=False))
        if args.command == "recipes":
            return _recipes(args)
        if args.command == "join":
            return _join(args)
        _quiet_environment()  # before Prefect and MLflow are imported, here and in the processes started next
        return _run(args) if args.command == "run" else _recipe_command(args, _read_recipe(args))
    except RecipeError as e:
        if e.file is None and getattr(args, "recipe", None):
            e.file = args.recipe
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (OutOfMemory, DiskFull) as e:  # not a mistake in the recipe, but no traceback either: what to do
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nstopped by {signal.Signals(signals.received_signal()).name}: run the same command again to resume",
              file=sys.stderr)
        return signals.exit_code()


def _read_recipe(args) -> Recipe:
    from qlora.tasks.recipe import find_recipe, load_recipe

    args.recipe = str(find_recipe(args.recipe))  # a file, or a shipped recipe's name
    return load_recipe(args.recipe, args.overrides)


def _recipe_command(args, recipe: Recipe) -> int:
    """validate, deploy, methods, sweep: commands that read a recipe but do not run it as `run` does."""
    if args.command in ("methods", "sweep"):
        return _experiment(args, recipe)
    if args.command == "deploy":
        return _deploy(args, recipe)
    info = validate(recipe)
    print(f"{args.recipe}: ok")
    for k, v in info.items():
        print(f"  {k}: {mask(v)}")
    return 0


def _run(args) -> int:
    """`qlora run`: the temporary Prefect server (when none is configured) boots while the recipe is
    read and checked, with the garbage collector paused until the flow starts (mostly imports,
    qlora/runtime/startup.py); then the flow, and its summary. Several recipes: a chain, one flow run
    whose subflows run them in order, every recipe checked first."""
    with contextlib.ExitStack() as starting:
        try:
            starting.enter_context(collector_paused())
            server = _prefect_server()
            try:
                recipes = [_read_recipe(args)]
                files = [args.recipe]
                for then in args.then:
                    args.recipe = then
                    recipes.append(_read_recipe(args))
                    files.append(args.recipe)
            except RecipeError:
                _abandon(server)
                raise
            produced: set[str] = set()
            for recipe, file in zip(recipes, files):
                _preflight(recipe, server, produced)
                if len(recipes) > 1:
                    from qlora.flows.chain import registered_names
                    from qlora.tasks.upstream import recipe_reference

                    produced |= registered_names(recipe) | {recipe_reference(file)}
            if server is not None:
                server.wait()
            else:
                import_for_the_flow()
            starting.close()
            with _without_heartbeats() if server else contextlib.nullcontext():
                files = [str(Path(f).resolve()) for f in files]
                if len(recipes) == 1:
                    from qlora.flows.finetune import finetune

                    results = [finetune(recipes[0], files[0])]
                else:
                    from qlora.flows.chain import chain

                    results = chain(recipes, files)
        finally:
            starting.close()
            thaw()
    for result in results:
        print(_summary(result))
    if args.json_out:
        out = results[0] if len(results) == 1 else results
        Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))
    return 0


def _recipes(args) -> int:
    """List the shipped recipes with their descriptions, or copy one out to edit."""
    import shutil

    import yaml

    from qlora.tasks.recipe import shipped_recipes

    shipped = shipped_recipes()
    if args.action == "list":
        for name, path in shipped.items():
            description = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("description", "")
            print(f"{name:28} {description}")
        print("\nrun one: qlora run NAME; edit one: qlora recipes copy NAME [DEST]")
        return 0
    if args.name not in shipped:
        raise RecipeError(f"no shipped recipe '{args.name}'", "NAME", hint=f"shipped: {', '.join(shipped)}")
    dest = Path(args.dest or f"{args.name}.yaml")
    if dest.is_dir():
        dest = dest / f"{args.name}.yaml"
    if dest.exists():
        raise RecipeError("exists already: not overwritten", file=str(dest))
    if not dest.parent.is_dir():
        raise RecipeError("no such directory", file=str(dest.parent))
    shutil.copyfile(shipped[args.name], dest)
    print(f"copied {args.name} to {dest}: edit it, then qlora run {dest}")
    return 0


def _experiment(args, recipe: Recipe) -> int:
    from qlora.tasks.recipe import parse_override

    file = str(Path(args.recipe).resolve())
    seeds = None
    if args.command == "methods":
        _check_number(args.full_learning_rate, "--full-learning-rate", positive=True)
        if args.seeds is not None:
            try:
                seeds = [int(s) for s in args.seeds.split(",")]
            except ValueError:
                raise RecipeError(f"integers separated by commas (e.g. 1,2,3), got '{args.seeds}'", "--seeds") \
                    from None
    if args.command == "sweep":
        grid = {}
        for text in args.grid:
            path, values = parse_override(text)
            grid[".".join(path)] = values
        from qlora.flows.experiments import expand_grid

        trials = expand_grid(recipe.with_secrets(), grid, args.recipe)  # every trial valid before anything runs
    server = _prefect_server()
    _preflight(recipe, server)
    from qlora.flows import experiments

    if server is not None:
        server.wait()
    with _without_heartbeats() if server else contextlib.nullcontext():
        if args.command == "methods":
            result = experiments.compare_methods(recipe, file, args.full_learning_rate, seeds)
        else:
            print(f"sweep: {len(trials)} trials, {args.parallel} at a time")
            result = experiments.sweep_with_workers(max(1, args.parallel))(recipe, grid, file)
    import pandas as pd

    with pd_options():
        print(pd.DataFrame(result["table"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        if "summary" in result:
            print("\nper method, over its seeds:")
            print(pd.DataFrame(result["summary"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"MLflow parent run: {result['run_id']} ({result['tracking_uri']})")
    return 0


def _deploy(args, recipe: Recipe) -> int:
    from qlora.flows.deploy import deploy

    preflight(recipe)
    served = args.pool is None
    if served:
        print(f"serving {recipe.name} ({'cron ' + args.cron if args.cron else f'every {args.interval:g} s'}); "
              f"Ctrl-C stops serving", flush=True)
    if args.limit < 1:
        raise RecipeError(f"--limit must be at least 1, got {args.limit}", "--limit")
    deployment = deploy(recipe, args.recipe, args.overrides, args.name, args.cron, args.interval, args.pool,
                        not args.no_promote, args.limit)
    if not served:
        print(f"deployment {deployment} on work pool '{args.pool}'; start a worker with: "
              f"prefect worker start --pool {args.pool}")
    return 0


def _registry_command(args) -> int:
    for key, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("HF_HUB_OFFLINE", "1"),
                       ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")):  # a bar per download is noise here
        os.environ.setdefault(key, value)
    from qlora import registry
    from qlora.tasks.comparison import format_table

    if args.command == "promote":
        _check_number(args.min_delta, "--min-delta", positive=False)
    if args.command == "merge":
        print(f"merged model: {registry.merge_adapter(Path(args.adapter), Path(args.out), args.dtype)}")
        return 0
    uri = _tracking_uri(args.tracking_uri)
    if args.command == "export":
        print(f"exported: {registry.export(uri, args.source, args.format, Path(args.out), args.quant)}")
    elif args.command == "chat":
        registry.chat(uri, args.source, args.max_new_tokens)
    elif args.command == "compare":
        print(format_table(registry.compare_runs(uri, args.run_ids)))
    elif args.command == "predict":
        table = registry.predict_texts(uri, _read_texts(args), args.run_id, args.variant, args.model)
        with pd_options():
            formats = {"confidence": "{:.3f}".format} if "confidence" in table else {}
            print(table.to_string(index=False, formatters=formats))
    else:
        print(registry.promote(uri, args.name, args.metric, args.min_delta, args.mode)["reason"])
    return 0


def _check_number(value: float, option: str, positive: bool) -> None:
    """A flag's number: finite, and above (or at least) 0, as the recipe field it stands for."""
    import math

    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise RecipeError(f"must be a finite number {'above' if positive else 'of at least'} 0, got {value}", option)


def _join(args) -> int:
    from pydantic import ValidationError

    from qlora.tasks.recipe import DistributedSection
    from qlora.tasks.training.distributed import join

    nproc = args.nproc_per_node
    if nproc != "auto" and not nproc.isdigit():
        raise RecipeError(f"must be auto or a number of processes, got {nproc!r}", "--nproc-per-node")
    try:
        DistributedSection(nnodes=2, rdzv_endpoint=args.rdzv_endpoint, nproc_per_node=nproc if nproc == "auto" else int(nproc))
    except ValidationError as e:
        error = e.errors()[0]
        option = "--nproc-per-node" if "nproc_per_node" in error["loc"] else "--rdzv-endpoint"
        raise RecipeError(error["msg"].removeprefix("Value error, "), option) from None
    try:
        return join(args.work_dir, args.rdzv_endpoint, nproc, args.timeout)
    except TimeoutError as e:
        raise RecipeError(str(e), "--rdzv-endpoint", hint="start `qlora run` with distributed.nnodes on the "
                                                          "first machine, with the same work_dir") from None


def pd_options():
    import pandas as pd

    return pd.option_context("display.max_colwidth", 80, "display.width", 200)


def entry_point() -> None:
    """The `qlora` command: main(), then a normal interpreter exit (exit handlers run: Prefect drains
    its logs and events to the API, the temporary server stops). What the run built is frozen first
    (gc.freeze): the interpreter's last collections then skip it instead of walking every object."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
