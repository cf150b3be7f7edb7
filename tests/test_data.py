"""Data stages: formats, cleaning counts, label checks, splits, tokenization, content cache keys."""
from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import minilm_dir

from qlora.tasks.data import check_data, describe_source, read_source, required_columns
from qlora.tasks.load import clean, load
from qlora.tasks.model import resolve_model
from qlora.tasks.recipe import DataSection, ModelSection, PromptSection, RecipeError, SplitSection, TokenizeSection
from qlora.tasks.split import split
from qlora.tasks.tokenize import tokenize

ROWS = [("good film", "pos"), ("bad film", "neg"), ("", "pos"), ("fine", "meh"), ("good film", "pos"),
        ("great", "pos"), ("awful", "neg"), ("   ", "neg"), ("superb", "pos"), ("dull", "neg")]


def _frame(rows=ROWS) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["review", "sentiment"])


def _data(path, **kw) -> DataSection:
    return DataSection(path=str(path), text_column="review", label_column="sentiment", **kw)


@pytest.mark.parametrize("name", ["d.csv", "d.csv.gz", "d.csv.bz2", "d.jsonl", "d.json", "d.jsonl.gz", "d.parquet"])
def test_reads_every_format(tmp_path, name):
    df, path = _frame(), tmp_path / name
    if name.startswith("d.csv"):
        text = df.to_csv(index=False)
        opener = gzip.open if name.endswith(".gz") else bz2.open if name.endswith(".bz2") else open
        with opener(path, "wt", encoding="utf-8") as f:
            f.write(text)
    elif ".jsonl" in name:
        lines = df.to_json(orient="records", lines=True)
        (gzip.open(path, "wt") if name.endswith(".gz") else open(path, "w")).write(lines)
    elif name.endswith(".json"):
        path.write_text(json.dumps(df.to_dict(orient="records")))
    else:
        df.to_parquet(path)
    frames = read_source(_data(path), required_columns(_data(path), None))
    assert list(frames) == ["train"] and len(frames["train"]) == len(ROWS)


def test_cleaning_drops_and_counts(tmp_path):
    frames = {"train": _frame()}
    out, names, stats = clean({"train": _frame().rename(columns={"review": "text", "sentiment": "label"})},
                              DataSection(path="x", keep_labels=["neg", "pos"], drop_duplicates=True), None)
    s = stats["train"]
    assert names == ["neg", "pos"]
    assert s == {"rows_read": 10, "dropped_empty_text": 2, "dropped_filtered_label": 1,
                 "dropped_unknown_label": 0, "dropped_duplicates": 1, "rows_kept": 6}
    assert sorted(out["train"]["label"].tolist()) == [0, 0, 0, 1, 1, 1]
    del frames


def test_unknown_labels_are_counted_not_silent():
    df = _frame().rename(columns={"review": "text", "sentiment": "label"})
    _, names, stats = clean({"train": df}, DataSection(path="x"), ["neg", "pos"])
    assert names == ["neg", "pos"] and stats["train"]["dropped_unknown_label"] == 1  # "meh"


def test_label_map_and_numeric_labels():
    df = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 1]})
    out, names, _ = clean({"train": df}, DataSection(path="x", label_map={0: "neg", 1: "pos"}), None)
    assert names == ["neg", "pos"] and out["train"]["label"].tolist() == [0, 1, 1]
    with pytest.raises(RecipeError, match=r"outside 0\.\.1") as e:
        clean({"train": pd.DataFrame({"text": ["a", "b"], "label": [0, 7]})}, DataSection(path="x"), ["a", "b"])
    assert e.value.field == "model.labels"


def test_label_names_that_do_not_match_the_data():
    df = pd.DataFrame({"text": ["a", "b"], "label": ["fresh", "rotten"]})
    with pytest.raises(RecipeError, match="do not match") as e:
        clean({"train": df}, DataSection(path="x"), ["positive", "negative"])
    assert e.value.field == "model.labels"
    with pytest.raises(RecipeError, match="never occur"):
        clean({"train": df}, DataSection(path="x"), ["fresh", "rotten", "plot"])


def test_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(RecipeError, match="empty"):
        check_data(_data(empty))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("review,sentiment\ncaf\xe9 cr\xe8me,pos\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8") as e:
        check_data(_data(latin))
    assert "latin.csv" in str(e.value)
    ok = tmp_path / "ok.csv"
    _frame().to_csv(ok, index=False)
    with pytest.raises(RecipeError, match="column 'text' not found") as e:
        check_data(DataSection(path=str(ok)))
    assert e.value.field == "data.text_column" and "review" in str(e.value)
    with pytest.raises(RecipeError, match="does not exist"):
        check_data(_data(tmp_path / "missing.csv"))
    with pytest.raises(RecipeError, match="unsupported"):
        (tmp_path / "x.xlsx").write_text("x")
        check_data(_data(tmp_path / "x.xlsx"))


def test_reading_leaves_no_cache_and_sees_every_edit(tmp_path, monkeypatch):
    """Files are read by datasets' builders into a temporary directory: nothing lands in the user's
    datasets cache, and a file edited in place (same name, same size) is read afresh."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # where load_dataset caches by default
    path = tmp_path / "d.csv"
    _frame().to_csv(path, index=False)
    columns = required_columns(_data(path), None)
    assert read_source(_data(path), columns)["train"]["review"].iloc[0] == "good film"
    _frame([("gold film", "pos")] + ROWS[1:]).to_csv(path, index=False)
    assert read_source(_data(path), columns)["train"]["review"].iloc[0] == "gold film"
    assert not cache.exists() or not any(cache.rglob("*.arrow"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"review": "good", "sentiment": "pos"}\n{"review": \n')
    with pytest.raises(RecipeError, match="cannot read data file .*broken.jsonl") as e:
        read_source(_data(broken), columns)
    assert e.value.field == "data.path" and "\n" not in str(e.value)


def test_directory_splits_and_aliases(tmp_path):
    for name in ("train", "dev", "test"):
        _frame().to_csv(tmp_path / f"{name}.csv", index=False)
    files = describe_source(DataSection(path=str(tmp_path))).files
    assert sorted(files) == ["test", "train", "validation"] and files["validation"][0].endswith("dev.csv")


def test_source_fingerprint_follows_content(tmp_path):
    path = tmp_path / "d.csv"
    _frame().to_csv(path, index=False)
    before = describe_source(_data(path)).hash
    path.write_text(path.read_text() + "more,pos\n")
    assert describe_source(_data(path)).hash != before


def _stages(tmp_path, rows=200, split_cfg=None):
    df = pd.DataFrame({"text": [f"row number {i} " + "word " * (i % 40) for i in range(rows)],
                       "label": ["a", "b"] * (rows // 2)})
    path = tmp_path / "data.csv"
    df.to_csv(path, index=False)
    data = DataSection(path=str(path))
    work = str(tmp_path / "work")
    loaded = load.fn(describe_source(data), data, None, work_dir=work)
    splitted = split.fn(loaded, split_cfg or SplitSection(), None, work_dir=work)
    return loaded, splitted, work


def test_stratified_split_and_cache(tmp_path):
    loaded, splitted, work = _stages(tmp_path)
    assert splitted.rows == {"train": 160, "validation": 20, "test": 20}
    test = pd.read_parquet(f"{splitted.dir}/test.parquet")
    assert test["label"].value_counts().tolist() == [10, 10]  # stratified
    again = split.fn(loaded, SplitSection(), None, work_dir=work)
    assert again.hash == splitted.hash and again.cache_hit
    other = split.fn(loaded, SplitSection(seed=1), None, work_dir=work)
    assert other.hash != splitted.hash


def test_split_that_leaves_a_split_empty(tmp_path):
    with pytest.raises(RecipeError, match="leaves the test split empty") as e:
        _stages(tmp_path, split_cfg=SplitSection(test_size=0.001))
    assert e.value.field == "split.test_size"
    assert not list((tmp_path / "work" / "split").glob("*")), "nothing half-written"


def test_tokenize_dynamic_padding_and_truncation_counted(tmp_path):
    _, splitted, work = _stages(tmp_path)
    model = resolve_model(ModelSection(name_or_path=str(minilm_dir())))
    tok = tokenize.fn(splitted, model.tokenizer, TokenizeSection(max_length=16), work_dir=work)
    from datasets import load_from_disk

    ds = load_from_disk(f"{tok.dir}/dataset")["train"]
    lengths = [len(x) for x in ds["input_ids"]]
    assert max(lengths) == 16 and min(lengths) < 16, "rows are not padded to max_length"
    from transformers import AutoTokenizer

    texts = pd.read_parquet(f"{splitted.dir}/train.parquet")["text"].tolist()
    full = AutoTokenizer.from_pretrained(model.path)(texts)["input_ids"]
    assert tok.stats["train"]["truncated"] == sum(len(ids) > 16 for ids in full) > 0
    padded = tokenize.fn(splitted, model.tokenizer, TokenizeSection(max_length=16, padding="max_length"), work_dir=work)
    assert padded.hash != tok.hash
    # a changed tokenizer (its files' content) re-tokenizes
    changed = model.tokenizer.model_copy(update={"hash": "different-tokenizer"})
    assert tokenize.key_of({"split_result": splitted, "tokenizer": changed, "cfg": TokenizeSection(max_length=16),
                            "work_dir": work})[0] != tok.hash


class _WithoutOverflow:
    """A tokenizer as one without a fast backend is seen (no overflow mapping): the second-pass path."""
    is_fast = False

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, *args, **options):
        assert "return_overflowing_tokens" not in options
        return self.tok(*args, **options)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("padding", ["dynamic", "max_length"])
def test_a_classifiers_rows_are_cut_and_counted_in_one_pass(fast, padding):
    """Texts up to several times max_length: each row's ids are the tokenizer's own truncation (padded
    or not), and the count of cut rows is that of a full tokenization, with a fast tokenizer's overflow
    (one pass) as with a slow one's second pass."""
    import numpy as np
    from transformers import AutoTokenizer

    from qlora.tasks.tokenize import _tokenize_classification

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    rng = np.random.default_rng(0)
    words = "a film that moves slowly but lands every scene with warmth and wit".split()
    records = [{"text": " ".join(rng.choice(words, rng.integers(1, 60))), "label": i % 2} for i in range(200)]
    cfg = TokenizeSection(max_length=12, padding=padding)
    rows, counts = _tokenize_classification(records, tok if fast else _WithoutOverflow(tok), cfg)
    texts = [r["text"] for r in records]
    want = tok(texts, truncation=True, max_length=12, return_token_type_ids=False,
               padding="max_length" if padding == "max_length" else False)["input_ids"]
    assert rows["input_ids"] == want and rows["labels"] == [r["label"] for r in records]
    assert counts == {"truncated": sum(len(ids) > 12 for ids in tok(texts)["input_ids"])}
    assert any(len(ids) > 36 for ids in tok(texts)["input_ids"]), "some texts overflow several times"
    assert rows["length"] == [min(len(ids), 12) for ids in tok(texts)["input_ids"]]


def test_the_preflight_carves_as_the_split_stage_does():
    """The preflight carves the rows as the split stage will (indices and labels only, so at any
    size), with the stage's messages."""
    import pandas as pd

    from qlora.tasks import split
    from qlora.tasks.recipe import RecipeError, SplitSection

    frames = {"train": pd.DataFrame({"text": [f"row {i}" for i in range(40)], "label": [i % 2 for i in range(40)]})}
    split.check_split(frames, SplitSection(test_size=0.1, validation_size=0.1))  # carved: fine
    with pytest.raises(RecipeError, match="cannot split 1 of 12 rows off by class"):
        split.check_split({"train": frames["train"].head(12)}, SplitSection(test_size=0.05, validation_size=0.1))
    split.check_split({"train": frames["train"].head(12)}, SplitSection(test_size=0.05, validation_size=0.1,
                                                                        stratify=False))
    with pytest.raises(RecipeError, match="0.01 of 40 rows leaves the test split empty") as e:
        split.check_split(frames, SplitSection(test_size=0.01))
    assert e.value.field == "split.test_size"


def test_a_stratified_carve_keeps_every_class_share_and_uses_each_row_once():
    """Each class's share of every split is its share of the data (to a row), no row is in two
    splits or lost, and the same seed carves the same rows."""
    import numpy as np

    from qlora.tasks.recipe import SplitSection
    from qlora.tasks.split import carve

    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=1_000_000, p=[0.5, 0.3, 0.15, 0.05])
    parts = carve(len(labels), labels, set(), SplitSection(test_size=0.1, validation_size=0.1, seed=3))
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(labels)))
    shares = np.bincount(labels) / len(labels)
    for name, rows in parts.items():
        assert np.all(np.diff(rows) > 0)  # the source's order
        assert np.abs(np.bincount(labels[rows], minlength=4) - shares * len(rows)).max() <= 1.5, name
    assert len(parts["test"]) == 100_000 and len(parts["validation"]) == 100_000
    again = carve(len(labels), labels, set(), SplitSection(test_size=0.1, validation_size=0.1, seed=3))
    assert all(np.array_equal(parts[n], again[n]) for n in parts)
    other = carve(len(labels), labels, set(), SplitSection(test_size=0.1, validation_size=0.1, seed=4))
    assert not np.array_equal(parts["test"], other["test"])
    # a rare class keeps a row on each side, and a source's own split is not carved again
    small = np.array([0] * 30 + [1] * 2)
    parts = carve(len(small), small, {"validation"}, SplitSection(test_size=0.5))
    assert set(parts) == {"train", "test"} and set(small[parts["train"]]) == {0, 1} == set(small[parts["test"]])


@pytest.mark.parametrize("cfg, prompt", [
    (TokenizeSection(max_length=16), None), (TokenizeSection(max_length=16, truncation=False), None),
    (TokenizeSection(max_length=16, padding="max_length"), None),
    pytest.param(TokenizeSection(max_length=16), PromptSection(template="Say: {text}", response_column="text"),
                 marks=pytest.mark.slow),  # worker processes
], ids=["cut", "drop", "pad", "prompt-response"])
def test_tokenize_in_chunks_writes_what_one_pass_writes(tmp_path, monkeypatch, cfg, prompt):
    """The rows streamed to disk in chunks (here of 7 rows, so the splits take several), in this process
    or (prompt/response rows) by two worker processes, are the rows, columns, types and counts of one
    pass over the whole split; the number of processes is not part of the stage's cache key."""
    from datasets import load_from_disk

    from qlora.tasks import tokenize as tokenize_module

    model = resolve_model(ModelSection(name_or_path=str(minilm_dir())))
    started, start = [], tokenize_module._ChunkPool.started
    monkeypatch.setattr(tokenize_module._ChunkPool, "started", lambda self: started.append(start(self)) or started[-1])
    results = []
    for chunk, processes in ((10_000, 1), (7, 1), (7, 2)):
        monkeypatch.setattr(tokenize_module, "CHUNK_ROWS", chunk)
        monkeypatch.setattr(tokenize_module, "POOL_FROM_ROWS", 0)
        (tmp_path / f"{chunk}-{processes}").mkdir()
        _, splitted, work = _stages(tmp_path / f"{chunk}-{processes}")
        done = tokenize.fn(splitted, model.tokenizer, cfg.model_copy(update={"num_proc": processes}), prompt,
                           work_dir=work)
        results.append((done.stats, load_from_disk(f"{done.dir}/dataset")))
    assert tokenize.fn(splitted, model.tokenizer, cfg.model_copy(update={"num_proc": 1}), prompt,
                       work_dir=work).cache_hit
    assert started == ([False] * 6 + [True] * 3 if prompt else []), started  # per split; processes for prompt/response rows
    whole_stats, whole = results[0]
    assert whole_stats["train"].get("truncated", whole_stats["train"].get("dropped_too_long")) > 0
    for stats, chunked in results[1:]:
        assert stats == whole_stats
        for name in whole:
            assert chunked[name].features == whole[name].features
            assert chunked[name].to_dict() == whole[name].to_dict()


def test_a_causal_lms_generation_columns_are_made_for_the_test_split_only(tmp_path):
    """The prompt ids, prompt text and reference the evaluate stage's generations read exist in the
    test split, with the training columns; the other splits hold only what training reads."""
    from datasets import load_from_disk

    from qlora.tasks.tokenize import GENERATION_COLUMNS

    model = resolve_model(ModelSection(name_or_path=str(minilm_dir())))
    _, splitted, work = _stages(tmp_path)
    done = tokenize.fn(splitted, model.tokenizer, TokenizeSection(max_length=16, num_proc=1),
                       PromptSection(template="Say: {text}", response_column="text"), work_dir=work)
    ds = load_from_disk(f"{done.dir}/dataset")
    training = {"input_ids", "labels", "length"}
    assert set(ds["train"].column_names) == set(ds["validation"].column_names) == training
    assert set(ds["test"].column_names) == training | set(GENERATION_COLUMNS)
    first = ds["test"][0]
    assert first["input_ids"][:len(first["prompt_ids"])] == first["prompt_ids"]
    assert first["prompt_text"].startswith("Say: ") and first["reference"] in first["prompt_text"]


@pytest.mark.parametrize("kind", ["classification", "prompt"])
def test_the_load_and_split_stages_stream_chunks_with_the_whole_tables_result(tmp_path, monkeypatch, kind):
    """Chunk by chunk (chunks of 7 rows here, 100,000 in use) the load stage writes the rows, counts
    and messages it writes reading each file whole, duplicates found across chunks; the split stage,
    a batch at a time, the rows it takes from whole tables."""
    import numpy as np
    import pyarrow.parquet as pq

    import qlora.tasks.data
    import qlora.tasks.split

    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "dull", "", "  "]
    rows = [(" ".join(rng.choice(words, 2)), rng.choice(["pos", "neg", "meh"])) for _ in range(90)]
    _frame(rows).to_csv(tmp_path / "d.csv", index=False)
    data = _data(tmp_path / "d.csv", drop_duplicates=True, keep_labels=["pos", "neg"])
    args = ({"labels": None} if kind == "classification" else
            {"labels": None, "prompt_columns": ["review", "sentiment"]})
    if kind == "prompt":
        data = DataSection(path=str(tmp_path / "d.csv"), drop_duplicates=True)
    results = {}
    for chunk in (100_000, 7):
        monkeypatch.setattr(qlora.tasks.data, "CHUNK_ROWS", chunk)
        monkeypatch.setattr(qlora.tasks.split, "BATCH_ROWS", chunk)
        work = tmp_path / f"work-{chunk}"
        loaded = load.fn(describe_source(data), data, **args, work_dir=str(work))
        splits = split.fn(loaded, SplitSection(validation_size=0.2, test_size=0.2), {"test": 9}, work_dir=str(work))
        results[chunk] = (loaded.stats, loaded.label_names, splits.rows,
                          {s: pq.read_table(splits.file(f"{s}.parquet")).to_pylist() for s in splits.rows})
        assert len(pq.ParquetFile(loaded.file("train.parquet")).metadata.to_dict()["row_groups"]) == (1 if chunk > 90 else 13)
    assert results[7] == results[100_000]
    stats = results[7][0]["train"]
    assert stats["dropped_duplicates"] > 0 and stats["rows_read"] == 90 and stats["dropped_empty_text"] > 0
    assert sum(v for k, v in stats.items() if k.startswith("dropped")) + stats["rows_kept"] == 90


@pytest.mark.slow  # a fresh interpreter and its spawned workers
def test_a_script_without_a_main_guard_tokenizes_in_its_own_process(tmp_path):
    """A script that runs the stages at import, with no `if __name__ == "__main__":`: each spawned
    worker re-runs it and reaches the tokenize stage its parent is building. It fails there, saying
    why (rather than waiting for its parent's lock forever), and the parent tokenizes the rows itself."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_data, qlora.tasks.tokenize as tokenize_module
from pathlib import Path
from qlora.tasks.model import resolve_model
from qlora.tasks.recipe import ModelSection, PromptSection, TokenizeSection
tokenize_module.POOL_FROM_ROWS = 0
(Path({str(tmp_path)!r}) / "rows").mkdir(exist_ok=True)
_, splitted, work = test_data._stages(Path({str(tmp_path)!r}) / "rows")
model = resolve_model(ModelSection(name_or_path={str(minilm_dir())!r}))
done = test_data.tokenize.fn(splitted, model.tokenizer, TokenizeSection(max_length=16, num_proc=2),
                             PromptSection(template="Say: {{text}}", response_column="text"), work_dir=work)
print("tokenized", done.stats["train"]["rows"])
""")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("tokenized ")
    assert "must do so under `if __name__ == \"__main__\":`" in done.stderr, done.stderr[-3000:]
    assert "worker processes could not start" in done.stderr, done.stderr[-3000:]
