"""Data stages: load (read and clean the source), split, tokenize.

Loaded and split data are parquet files of two columns, `text` (str) and `label` (class id);
tokenized data is a datasets DatasetDict on disk. Every dropped row is counted, never silent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from tasks import store
from tasks.recipe import SPLITS, DataSection, RecipeError, SplitSection, TokenizeSection
from tasks.stage import stage

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2")
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


# --- finding and reading the source ----------------------------------------------------------

def _format_of(path: Path) -> tuple[str, str] | None:
    """(format, stem) of a data file name such as train.csv.bz2, or None if not a data file."""
    name = path.name
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    stem, ext = os.path.splitext(name)
    return (FORMATS[ext], stem) if ext in FORMATS else None


def source_files(data: DataSection) -> dict[str, Path]:
    """The local file behind each source split ({'train': ..., 'validation': ..., 'test': ...})."""
    path = store.resolve_location(data.path, "data.path")
    if path is None:
        raise RecipeError(f"path does not exist: {data.path}", "data.path",
                          hint="for a Hub dataset use data.hub instead")
    if path.is_file():
        if _format_of(path) is None:
            raise RecipeError(f"unsupported file type: {path.name}", "data.path",
                              hint="csv, tsv, json, jsonl or parquet, optionally .gz or .bz2")
        return {"train": path}
    wanted = {v: k for k, v in (data.splits or {}).items()}  # source stem -> our split
    files: dict[str, Path] = {}
    for f in sorted(path.iterdir()):
        fmt = _format_of(f)
        if fmt is None:
            continue
        split = wanted.get(fmt[1]) or (None if data.splits and fmt[1] in SPLIT_ALIASES and
                                       SPLIT_ALIASES[fmt[1]] in data.splits else SPLIT_ALIASES.get(fmt[1]))
        if split and split not in files:
            files[split] = f
    for split, stem in (data.splits or {}).items():
        if split not in files:
            raise RecipeError(f"no data file named '{stem}' (csv, json, jsonl or parquet) in {path}",
                              f"data.splits.{split}")
    if "train" not in files:
        raise RecipeError(f"no training file in directory {path}", "data.path",
                          hint="name it train.csv (or .json, .jsonl, .parquet), or map it with data.splits.train")
    return files


def read_table(path: Path, nrows: int | None = None) -> pd.DataFrame:
    fmt, _ = _format_of(path)
    if path.stat().st_size == 0:
        raise RecipeError(f"data file is empty: {path}", "data.path")
    try:
        if fmt == "csv":
            sep = "\t" if ".tsv" in path.name else ","
            df = pd.read_csv(path, sep=sep, nrows=nrows, encoding="utf-8", keep_default_na=False,
                             na_values=[""], dtype_backend="numpy_nullable")
        elif fmt == "json":
            lines = ".jsonl" in path.name
            if not lines:  # a .json file may hold JSON lines too
                with (pd.io.common.get_handle(path, "r", compression="infer", encoding="utf-8")) as h:
                    lines = h.handle.read(1).strip() != "["
            df = pd.read_json(path, lines=lines, nrows=nrows if lines else None, encoding="utf-8")
        else:
            df = pd.read_parquet(path)
            df = df.head(nrows) if nrows else df
    except UnicodeDecodeError as e:
        raise RecipeError(f"data file is not UTF-8 text ({e.reason} at byte {e.start}): {path}", "data.path") from None
    except (ValueError, pd.errors.ParserError, OSError, EOFError) as e:
        raise RecipeError(f"cannot read data file {path}: {str(e).splitlines()[0]}", "data.path") from None
    if df.empty:
        raise RecipeError(f"data file has no rows: {path}", "data.path")
    return df


def check_columns(df: pd.DataFrame, data: DataSection, where: str) -> None:
    for field, column in (("data.text_column", data.text_column), ("data.label_column", data.label_column)):
        if column not in df.columns:
            raise RecipeError(f"column '{column}' not found in {where}", field,
                              hint=f"columns there: {', '.join(map(str, df.columns))}")


def read_source(data: DataSection) -> dict[str, pd.DataFrame]:
    if data.hub:
        return _read_hub(data)
    frames = {}
    for split, path in source_files(data).items():
        df = read_table(path)
        check_columns(df, data, str(path))
        frames[split] = df
    return frames


def _read_hub(data: DataSection) -> dict[str, pd.DataFrame]:
    import datasets
    from tasks.hub import hub_error

    try:
        dd = datasets.load_dataset(data.hub, data.config, revision=data.revision)
    except Exception as e:  # noqa: BLE001 - every Hub failure is the user's to fix (id, network)
        raise hub_error(e, data.hub, "data.hub") from None
    wanted = {v: k for k, v in (data.splits or {}).items()}
    frames = {}
    for name, ds in dd.items():
        split = wanted.get(name) or SPLIT_ALIASES.get(name)
        if split and split not in frames:
            df = ds.to_pandas()
            check_columns(df, data, f"Hub dataset {data.hub} split {name}")
            if hasattr(ds.features.get(data.label_column), "names") and data.label_map is None:
                names = ds.features[data.label_column].names
                df[data.label_column] = [names[i] for i in df[data.label_column]]
            frames[split] = df
    if "train" not in frames:
        raise RecipeError(f"Hub dataset {data.hub} has no train split (has {', '.join(dd)})", "data.splits")
    return frames


def describe_source(data: DataSection) -> dict:
    """The source's identity and content fingerprint: the load stage's cache input."""
    if data.hub:
        from tasks.hub import dataset_commit

        commit = dataset_commit(data.hub, data.revision)
        return {"hash": store.hash_value([data.hub, data.config, commit]), "hub": data.hub, "commit": commit}
    files = source_files(data)
    fingerprint = store.hash_value({s: store.file_fingerprint(p) for s, p in files.items()})
    return {"hash": fingerprint, "files": {s: str(p) for s, p in files.items()}}


def check_data(data: DataSection) -> dict:
    """Preflight: the files exist, are readable UTF-8 and have the named columns (first rows only)."""
    if data.hub:
        from tasks.hub import check_hub_repo

        check_hub_repo(data.hub, "dataset", data.revision, "data.hub")
        return {"hub": data.hub}
    for split, path in source_files(data).items():
        check_columns(read_table(path, nrows=50), data, str(path))
    return describe_source(data)


# --- cleaning ----------------------------------------------------------------------------------

def _all_label_names(frames: dict[str, pd.DataFrame], labels: list[str] | None) -> list[str]:
    if labels:
        return list(labels)
    values = pd.concat([f["label"] for f in frames.values()]).dropna()
    if pd.api.types.is_numeric_dtype(values):
        return [str(i) for i in range(int(values.max()) + 1)]
    return sorted(values.astype(str).unique())


def clean(frames: dict[str, pd.DataFrame], data: DataSection, labels: list[str] | None):
    """Map and filter labels, drop empty texts, unknown labels and (optionally) duplicates.
    Returns the cleaned frames (text, label id), the class names and per-split counts."""
    renamed = {}
    for split, df in frames.items():
        df = pd.DataFrame({"text": df[data.text_column], "label": df[data.label_column]})
        if data.label_map is not None:
            mapping = {str(k): v for k, v in data.label_map.items()}
            df["label"] = df["label"].map(lambda v: mapping.get(str(v), v) if pd.notna(v) else v)
        renamed[split] = df
    all_names = _all_label_names(renamed, labels)
    names = all_names
    if data.keep_labels:
        if labels:
            missing = [n for n in data.keep_labels if n not in all_names]
            if missing:
                raise RecipeError(f"{missing} not among model.labels {all_names}", "data.keep_labels")
        names = [n for n in data.keep_labels if n in all_names] if labels else list(data.keep_labels)
    class_id = {n: i for i, n in enumerate(names)}
    out, stats = {}, {}
    for split, df in renamed.items():
        counts = {"rows_read": len(df)}
        if pd.api.types.is_numeric_dtype(df["label"]):  # class ids: check the range, then name them
            ids = pd.to_numeric(df["label"], errors="coerce")
            bad = ids[(ids < 0) | (ids >= len(all_names)) | (ids % 1 != 0)].dropna()
            if len(bad):
                raise RecipeError(
                    f"{split} has labels outside 0..{len(all_names) - 1} (num_labels={len(all_names)}): "
                    f"{sorted(set(bad.astype(int).tolist()))[:5]}", "model.labels",
                    hint="name every class in model.labels, in label order, or map them with data.label_map")
            df["label"] = [all_names[int(i)] if pd.notna(i) else None for i in ids]
        text = df["text"].astype("string").str.strip()
        empty = (text.isna() | (text == "")).astype(bool)
        counts["dropped_empty_text"] = int(empty.sum())
        df = df[~empty].assign(text=text[~empty].astype(str))
        label = df["label"].astype("string")
        kept = label.isin(names).fillna(False).astype(bool)
        known = label.isin(all_names).fillna(False).astype(bool) | (bool(data.keep_labels) and not labels)
        counts["dropped_filtered_label"] = int((~kept & known).sum())
        counts["dropped_unknown_label"] = int((~kept & ~known).sum())
        df = df[kept]
        if data.drop_duplicates:
            dup = df.duplicated(subset=["text"])
            counts["dropped_duplicates"] = int(dup.sum())
            df = df[~dup]
        df = pd.DataFrame({"text": df["text"].astype(str).values,
                           "label": df["label"].astype(str).map(class_id).astype("int64").values})
        counts["rows_kept"] = len(df)
        out[split], stats[split] = df, counts
    if not len(out["train"]):
        raise RecipeError(f"no training rows left after cleaning ({stats['train']}): the label values "
                          f"in the data do not match the label names {names}", "model.labels",
                          hint="label names must match the data's values (or use data.label_map)")
    absent = [n for i, n in enumerate(names) if i not in set(out["train"]["label"])]
    if absent:
        raise RecipeError(f"label names {absent} never occur in the training data", "model.labels",
                          hint="label names must match the data's values (or use data.label_map)")
    return out, names, stats


# --- stages ------------------------------------------------------------------------------------

@stage("load")
def load(out: Path, source: dict, data: DataSection, labels: list[str] | None) -> dict:
    frames, names, stats = clean(read_source(data), data, labels)
    for split, df in frames.items():
        df.to_parquet(out / f"{split}.parquet", index=False)
    return {"splits": sorted(frames), "label_names": names, "stats": stats}


@stage("split")
def split(out: Path, loaded: dict, cfg: SplitSection, sample: dict | None) -> dict:
    from sklearn.model_selection import train_test_split

    frames = {s: pd.read_parquet(Path(loaded["dir"]) / f"{s}.parquet") for s in loaded["splits"]}
    train = frames["train"]
    for name, size, field in (("test", cfg.test_size, "split.test_size"),
                              ("validation", cfg.validation_size, "split.validation_size")):
        if name in frames:
            continue
        n = round(len(frames["train"]) * size)  # fractions are of the source's training rows
        if n < 1 or n >= len(train):
            raise RecipeError(f"{size} of {len(frames['train'])} rows leaves the {name} split "
                              f"{'empty' if n < 1 else 'with all rows'}", field,
                              hint="the source has no such split: give a fraction that leaves rows on both sides")
        labels = train["label"] if cfg.stratify and train["label"].value_counts().min() >= 2 else None
        train, frames[name] = train_test_split(train, test_size=n, random_state=cfg.seed, stratify=labels)
    frames["train"] = train
    counts = {}
    for name in SPLITS:
        df = frames[name]
        limit = (sample or {}).get(name)
        if limit and len(df) > limit:
            df = df.sample(n=limit, random_state=cfg.seed)
        if df.empty:
            raise RecipeError(f"the {name} split is empty", "split")
        df.reset_index(drop=True).to_parquet(out / f"{name}.parquet", index=False)
        counts[name] = len(df)
    return {"rows": counts, "label_names": loaded["label_names"]}


@stage("tokenize")
def tokenize(out: Path, split_result: dict, tokenizer: dict, cfg: TokenizeSection) -> dict:
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer["path"])
    splits, stats = {}, {}
    for name in SPLITS:
        df = pd.read_parquet(Path(split_result["dir"]) / f"{name}.parquet")
        # Tokenize without truncation first, to count what truncation cuts.
        enc = tok(df["text"].tolist(), return_token_type_ids=False, truncation=False, verbose=False)
        lengths = [len(ids) for ids in enc["input_ids"]]
        too_long = sum(n > cfg.max_length for n in lengths)
        keep = list(range(len(df)))
        if cfg.truncation:
            enc = tok(df["text"].tolist(), return_token_type_ids=False, truncation=True,
                      max_length=cfg.max_length, padding="max_length" if cfg.padding == "max_length" else False)
        else:
            keep = [i for i, n in enumerate(lengths) if n <= cfg.max_length]
        ds = Dataset.from_dict({
            "text": [df["text"].iloc[i] for i in keep],
            "input_ids": [enc["input_ids"][i] for i in keep],
            "attention_mask": [enc["attention_mask"][i] for i in keep],
            "labels": [int(df["label"].iloc[i]) for i in keep],
        })
        ds = ds.map(lambda b: {"length": [sum(m) for m in b["attention_mask"]]}, batched=True)
        splits[name] = ds
        stats[name] = {"rows": len(ds), "truncated" if cfg.truncation else "dropped_too_long": too_long,
                       "tokens": int(sum(ds["length"])), "mean_length": round(sum(ds["length"]) / max(len(ds), 1), 1)}
        if not len(ds):
            raise RecipeError(f"every {name} row is longer than max_length={cfg.max_length}",
                              "tokenize.max_length", hint="raise it or set tokenize.truncation: true")
    DatasetDict(splits).save_to_disk(str(out / "dataset"))
    return {"stats": stats, "label_names": split_result["label_names"]}
