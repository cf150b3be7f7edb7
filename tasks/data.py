"""Data stages: load (read and clean the source), split, tokenize.

Sources: local files (csv, tsv, json, jsonl, parquet, optionally .gz/.bz2, read by `datasets`' own
builders; yaml, read here; a directory of split-named files), the first rows only for `qlora
validate`, the line of an undecodable byte found for the message; or a Hub dataset through
`datasets`. Split through `datasets` (stratified by class for a classifier). Loaded and split data
are parquet files: for a classifier `text` (str) and `label` (class id); for a causal LM the prompt
template's columns and the response, as text. Tokenized data is a datasets DatasetDict on disk.
Every dropped row is counted, never silent.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from qlora.tasks import store
from qlora.tasks.recipe import SPLITS, DataSection, PromptSection, RecipeError, SplitSection, TokenizeSection, shorten
from qlora.tasks.stage import stage

if TYPE_CHECKING:  # imported where used: a cached run never loads pandas
    import pandas as pd

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
           ".yml": "yaml", ".yaml": "yaml"}
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


def source_files(data: DataSection) -> dict[str, list[Path]]:
    """The local files behind each source split ({'train': [...], 'validation': [...], ...}). A
    directory whose files have no split names is one split (train) of all its files."""
    if data.files is not None:
        return {split: [_data_file(f, f"data.files.{split}") for f in data.file_list(split)]
                for split in SPLITS if data.file_list(split)}
    path = _data_file(data.path, "data.path", directory_ok=True)
    if path.is_file():
        if data.splits:
            raise RecipeError("data.splits names files inside a data.path directory, but data.path is one file",
                              "data.splits", hint="give each split its own file with data.files: {train: ..., "
                                                  "validation: ..., test: ...}")
        return {"train": [path]}
    data_files = [f for f in sorted(path.iterdir()) if _format_of(f) is not None]
    mapped = data.splits or {}
    wanted = {stem: split for split, stem in mapped.items()}  # source stem -> our split
    files: dict[str, list[Path]] = {}
    for f in data_files:
        stem = _format_of(f)[1]
        alias = SPLIT_ALIASES.get(stem)
        # A name the recipe maps wins; a conventional name counts unless the recipe maps that split elsewhere.
        split = wanted.get(stem) or (alias if alias not in mapped else None)
        if split and split not in files:
            files[split] = [f]
    if not files and not mapped and data_files:
        return {"train": data_files}
    for split, stem in (data.splits or {}).items():
        if split not in files:
            raise RecipeError(f"no data file named '{stem}' (csv, tsv, json, jsonl, parquet or yaml) in {path}",
                              f"data.splits.{split}")
    if "train" not in files:
        raise RecipeError(f"no training file in directory {path}", "data.path",
                          hint="name it train.csv (or .json, .jsonl, .parquet), or map it with data.splits.train")
    return files


def _data_file(location: str, field: str, directory_ok: bool = False) -> Path:
    path = store.resolve_location(location, field)
    if path is None:
        raise RecipeError(f"path does not exist: {location}", field, hint="for a Hub dataset use data.hub instead")
    if path.is_dir() and not directory_ok:
        raise RecipeError(f"{location} is a directory; give a data file", field)
    if path.is_file() and _format_of(path) is None:
        raise RecipeError(f"unsupported file type: {path.name}", field,
                          hint="csv, tsv, json, jsonl, parquet or yaml, optionally .gz or .bz2")
    return path


def _field_of(path: Path, data: DataSection) -> str:
    """The recipe field that named this file (for messages)."""
    for split in SPLITS:
        if any(Path(f).name == path.name for f in data.file_list(split)):
            return f"data.files.{split}"
    return "data.path"


def _decode_error(path: Path, encoding: str) -> str | None:
    """Where the file stops being `encoding` text: line and byte offset in the file (pandas
    reports the offset inside its read buffer or cell)."""
    import pandas as pd

    with pd.io.common.get_handle(path, "rb", compression="infer", is_text=False) as h:
        raw = h.handle.read()
    try:
        raw.decode(encoding)
        return None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return f"{e.reason} at line {line}, byte {e.start} of the file"


def read_table(path: Path, data: DataSection, nrows: int | None = None) -> pd.DataFrame:
    """One data file as a table: CSV/TSV, JSON (an array or JSON lines), JSON lines and Parquet through
    `datasets`' own readers, YAML (records or a conversation corpus) here; nrows: the first rows only."""
    fmt, _ = _format_of(path)
    field, encoding = _field_of(path, data), data.encoding
    if path.stat().st_size == 0:
        raise RecipeError(f"data file is empty: {path}", field)
    if data.column_names is not None and fmt != "csv":
        raise RecipeError(f"data.column_names names the columns of header-less CSV/TSV files; {path.name} is {fmt}",
                          "data.column_names")
    try:
        if fmt == "yaml":
            df = _read_yaml(path, encoding)
            df = df.head(nrows) if nrows else df
        else:
            df = _read_with_datasets(path, fmt, data, nrows)
    except yaml.YAMLError as e:
        raise RecipeError(f"not valid YAML: {path}: {str(e).splitlines()[0]}", field) from None
    except Exception as e:  # noqa: BLE001 - whatever the reader raises, the file is the user's to fix
        cause = _root_cause(e)
        if isinstance(cause, UnicodeDecodeError) or "utf8" in str(cause).lower().replace("-", ""):
            where = _decode_error(path, encoding) or "undecodable bytes"
            name = "UTF-8" if encoding.lower().replace("-", "").replace("_", "") == "utf8" else encoding
            raise RecipeError(f"data file is not {name} text ({where}): {path}", field,
                              hint="set data.encoding to the file's encoding (e.g. latin-1, cp1252)" if
                              name == "UTF-8" else None) from None
        message = (str(cause).strip() or type(cause).__name__).splitlines()[0]
        raise RecipeError(f"cannot read data file {path}: {shorten(message, 200)}", field) from None
    if df.empty:
        raise RecipeError(f"data file has no rows: {path}", field)
    return df


def _read_with_datasets(path: Path, fmt: str, data: DataSection, nrows: int | None) -> pd.DataFrame:
    """A CSV, JSON or Parquet file read by `datasets`' packaged builder of that format (compressed
    files too). Missing cells are missing (an empty CSV cell, not the text "NA"). The first rows are
    streamed; a whole file is built into a temporary directory, so nothing lands in the user's
    datasets cache and no stale copy of an edited file is ever read back."""
    import datasets
    import pandas as pd

    options: dict = {}
    if fmt == "csv":
        options = {"sep": "\t" if ".tsv" in path.name else ",", "encoding": data.encoding,
                   "keep_default_na": False, "na_values": [""]}
        if data.column_names:
            options["column_names"] = data.column_names
    elif fmt == "json":
        options = {"encoding": data.encoding}
    quiet = logging.getLogger("datasets")  # a file it cannot read is logged there too; we raise one line
    level, bars = quiet.level, not datasets.are_progress_bars_disabled()
    quiet.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()  # a bar per file read says nothing the load stage's log does not
    try:
        if nrows:
            rows = datasets.load_dataset(fmt, data_files=str(path), split="train", streaming=True, **options)
            return pd.DataFrame.from_records(list(rows.take(nrows)))
        with tempfile.TemporaryDirectory(prefix="qlora-read-") as cache:
            return datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True, **options).to_pandas()
    finally:
        quiet.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _root_cause(error: BaseException) -> BaseException:
    """The error a reader's wrapper (datasets' DatasetGenerationError) was raised from."""
    seen = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return error


def _read_yaml(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    """A list of records, or a conversation corpus ({categories, conversations: [[q, a, ...]]}, as
    chatterbot-corpus ships): each consecutive pair of turns becomes a (prompt, response) row."""
    import pandas as pd

    with pd.io.common.get_handle(path, "r", compression="infer", encoding=encoding) as h:
        doc = yaml.safe_load(h.handle)
    if isinstance(doc, dict) and "conversations" in doc:
        category = (doc.get("categories") or [path.stem])[0]
        rows = [{"prompt": str(turns[i]), "response": str(turns[i + 1]), "category": str(category)}
                for turns in doc["conversations"] if isinstance(turns, list) for i in range(len(turns) - 1)]
        return pd.DataFrame(rows, columns=["prompt", "response", "category"])
    if isinstance(doc, list) and all(isinstance(r, dict) for r in doc):
        return pd.DataFrame(doc)
    raise ValueError("expected a list of records or a {conversations: [...]} corpus")


def required_columns(data: DataSection, prompt_columns: list[str] | None) -> dict[str, str]:
    """Recipe field -> data column, for the columns the task reads."""
    if prompt_columns is not None:  # causal-lm: the template's fields and the response
        return {f"prompt ({c})": c for c in prompt_columns}
    return {"data.text_column": data.text_column, "data.label_column": data.label_column}


def check_columns(df: pd.DataFrame, columns: dict[str, str], where: str) -> None:
    for field, column in columns.items():
        if column not in df.columns:
            field = "prompt.template" if field.startswith("prompt (") else field
            shown = ", ".join(shorten(str(c), 40) for c in df.columns[:20])
            hint = f"columns there: {shown}"
            if any(str(c) not in columns.values() and len(str(c)) > 30 for c in df.columns):
                hint += "; a file without a header row: name its columns with data.column_names"
            raise RecipeError(f"column '{column}' not found in {where}", field, hint=hint)


def read_source(data: DataSection, columns: dict[str, str]) -> dict[str, pd.DataFrame]:
    import pandas as pd

    if data.hub:
        return _read_hub(data, columns)
    frames = {}
    for split, paths in source_files(data).items():
        parts = [read_table(p, data) for p in paths]
        for p, df in zip(paths, parts):
            check_columns(df, columns, str(p))
        frames[split] = pd.concat(parts, ignore_index=True)
    return frames


def _read_hub(data: DataSection, columns: dict[str, str]) -> dict[str, pd.DataFrame]:
    import datasets

    from qlora.tasks.hub import hub_error

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
            check_columns(df, columns, f"Hub dataset {data.hub} split {name}")
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
        from qlora.tasks.hub import dataset_commit

        commit = dataset_commit(data.hub, data.revision)
        return {"hash": store.hash_value([data.hub, data.config, commit]), "hub": data.hub, "commit": commit}
    files = source_files(data)
    fingerprint = store.hash_value({s: [store.file_fingerprint(p) for p in ps] for s, ps in files.items()})
    return {"hash": fingerprint, "files": {s: [str(p) for p in ps] for s, ps in files.items()}}


def check_data(data: DataSection, prompt_columns: list[str] | None = None) -> dict:
    """Preflight: the files exist, are readable UTF-8 and have the named columns (first rows only)."""
    if data.hub:
        from qlora.tasks.hub import check_hub_repo

        check_hub_repo(data.hub, "dataset", data.revision, "data.hub")
        return {"hub": data.hub}
    columns = required_columns(data, prompt_columns)
    for split, paths in source_files(data).items():
        for path in paths:
            check_columns(read_table(path, data, nrows=50), columns, str(path))
    return describe_source(data)


# --- cleaning ----------------------------------------------------------------------------------

def _all_label_names(frames: dict[str, pd.DataFrame], labels: list[str] | None) -> list[str]:
    import pandas as pd

    if labels:
        return list(labels)
    values = pd.concat([f["label"] for f in frames.values()]).dropna()
    if pd.api.types.is_numeric_dtype(values):
        return [str(i) for i in range(int(values.max()) + 1)]
    return sorted(values.astype(str).unique())


def clean(frames: dict[str, pd.DataFrame], data: DataSection, labels: list[str] | None):
    """Map and filter labels, drop empty texts, unknown labels and (optionally) duplicates.
    Returns the cleaned frames (text, label id), the class names and per-split counts."""
    renamed = _mapped_labels(frames, data)
    all_names = _all_label_names(renamed, labels)
    names = _kept_label_names(all_names, data, labels)
    out, stats = {}, {}
    for split, df in renamed.items():
        out[split], stats[split] = _clean_split(split, df, data, labels, all_names, names)
    if not len(out["train"]):
        raise RecipeError(f"no training rows left after cleaning ({stats['train']}): the label values "
                          f"in the data do not match the label names {names}", "model.labels",
                          hint="label names must match the data's values (or use data.label_map)")
    absent = [n for i, n in enumerate(names) if i not in set(out["train"]["label"])]
    if absent:
        raise RecipeError(f"label names {absent} never occur in the training data", "model.labels",
                          hint="label names must match the data's values (or use data.label_map)")
    return out, names, stats


def _mapped_labels(frames: dict[str, pd.DataFrame], data: DataSection) -> dict[str, pd.DataFrame]:
    """Each split as (text, label), its raw label values mapped through data.label_map; a value the
    map misses is an error unless data.keep_labels filters (its rows are then dropped and counted)."""
    import pandas as pd

    renamed = {}
    unmapped: dict[str, int] = {}
    for split, df in frames.items():
        df = pd.DataFrame({"text": df[data.text_column], "label": df[data.label_column]})
        if data.label_map is not None:
            mapping = {str(k): v for k, v in data.label_map.items()}
            raw = df["label"].dropna().astype(str)
            for value, n in raw[~raw.isin(list(mapping))].value_counts().items():
                unmapped[value] = unmapped.get(value, 0) + int(n)
            df["label"] = df["label"].map(lambda v: mapping.get(str(v), v) if pd.notna(v) else v)
        renamed[split] = df
    if unmapped and not data.keep_labels:
        listed = ", ".join(f"{shorten(v, 40)!r} ({n} rows)" for v, n in sorted(unmapped.items(), key=lambda x: -x[1])[:10])
        raise RecipeError(f"raw label values not mapped: {listed}", "data.label_map",
                          hint="map every value the label column holds, or keep only some with data.keep_labels")
    return renamed


def _kept_label_names(all_names: list[str], data: DataSection, labels: list[str] | None) -> list[str]:
    """The classes trained on: every label, or those data.keep_labels names (each checked to exist)."""
    if not data.keep_labels:
        return all_names
    missing = [n for n in data.keep_labels if n not in all_names]
    if missing:
        where = "model.labels" if labels else "the data's labels"
        raise RecipeError(f"{[shorten(m, 40) for m in missing]} not among {where} "
                          f"{[shorten(n, 40) for n in all_names[:20]]}", "data.keep_labels")
    return [n for n in data.keep_labels if n in all_names] if labels else list(data.keep_labels)


def _clean_split(split: str, df: pd.DataFrame, data: DataSection, labels: list[str] | None, all_names: list[str],
                 names: list[str]) -> tuple[pd.DataFrame, dict]:
    """One split cleaned (text, label id) and the counts of what was dropped and why."""
    import pandas as pd

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
    class_id = {n: i for i, n in enumerate(names)}
    df = pd.DataFrame({"text": df["text"].astype(str).values,
                       "label": df["label"].astype(str).map(class_id).astype("int64").values})
    counts["rows_kept"] = len(df)
    return df, counts


# --- stages ------------------------------------------------------------------------------------

def clean_pairs(frames: dict[str, pd.DataFrame], data: DataSection, columns: list[str]):
    """causal-lm rows: the template's columns and the response as text; rows with an empty one
    dropped (and, optionally, duplicates), all counted."""
    import pandas as pd

    out, stats = {}, {}
    for split, df in frames.items():
        counts = {"rows_read": len(df)}
        df = pd.DataFrame({c: df[c].astype("string").str.strip() for c in columns})
        empty = df.isna().any(axis=1) | (df == "").any(axis=1)
        counts["dropped_empty_text"] = int(empty.sum())
        df = df[~empty.astype(bool)]
        if data.drop_duplicates:
            dup = df.duplicated()
            counts["dropped_duplicates"] = int(dup.sum())
            df = df[~dup]
        out[split] = df.astype(str).reset_index(drop=True)
        counts["rows_kept"] = len(out[split])
        stats[split] = counts
    if not len(out["train"]):
        raise RecipeError(f"no training rows left after dropping empty ones ({stats['train']})", "data.path")
    return out, stats


@stage("load")
def load(out: Path, source: dict, data: DataSection, labels: list[str] | None,
         prompt_columns: list[str] | None = None) -> dict:
    """Classification (prompt_columns None): text and label id. causal-lm: the prompt's columns."""
    raw = read_source(data, required_columns(data, prompt_columns))
    if prompt_columns is None:
        frames, names, stats = clean(raw, data, labels)
    else:
        (frames, stats), names = clean_pairs(raw, data, prompt_columns), []
    for split, df in frames.items():
        df.to_parquet(out / f"{split}.parquet", index=False)
    return {"splits": sorted(frames), "label_names": names, "stats": stats}


def _split_off(train: pd.DataFrame, n: int, seed: int, stratify: bool, field: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """n rows of train split off at random (datasets' train_test_split), in the classes' proportions
    when stratify."""
    import datasets

    table = datasets.Dataset.from_pandas(train, preserve_index=False)
    if stratify:
        table = table.cast_column("label", datasets.ClassLabel(num_classes=int(train["label"].max()) + 1))
    try:
        parts = table.train_test_split(test_size=n, seed=seed, stratify_by_column="label" if stratify else None)
    except ValueError as e:  # e.g. fewer rows split off than there are classes
        raise RecipeError(f"cannot split {n} of {len(train)} rows off by class: {str(e).splitlines()[0]}", field,
                          hint="a larger fraction, or split.stratify: false") from None
    return parts["train"].to_pandas(), parts["test"].to_pandas()


@stage("split")
def split(out: Path, loaded: dict, cfg: SplitSection, sample: dict | None) -> dict:
    import pandas as pd

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
        stratify = cfg.stratify and "label" in train and train["label"].value_counts().min() >= 2
        train, frames[name] = _split_off(train, n, cfg.seed, stratify, field)
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


def render_prompt(row: dict, prompt: PromptSection, tok) -> tuple[str, str]:
    """(prompt text, response text) of one row: the template or the chat template; the response
    ends the way the model must learn to stop (end of turn, or end of sequence)."""
    user = prompt.template.format(**row) if prompt.template is not None else row[prompt.prompt_column]
    if not prompt.chat_template:
        return user, row[prompt.response_column] + (tok.eos_token or "")
    if not getattr(tok, "chat_template", None):
        raise RecipeError("the tokenizer has no chat template", "prompt.chat_template",
                          hint="set prompt.chat_template: false and give prompt.template")
    messages = ([{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []) + \
        [{"role": "user", "content": user}]
    prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": row[prompt.response_column]}],
                                   tokenize=False)
    if full.startswith(prompt_text):
        return prompt_text, full[len(prompt_text):].rstrip("\n")
    return prompt_text, row[prompt.response_column] + (tok.eos_token or "")


def _tokenize_causal(df: pd.DataFrame, tok, cfg: TokenizeSection, prompt: PromptSection):
    """input_ids = prompt + response; labels mask the prompt (unless train_on_prompt). Rows longer
    than max_length are truncated (the response's end) or dropped, per tokenize.truncation; rows
    whose prompt alone fills max_length are always dropped. Both counted."""
    chat = prompt.chat_template
    rows = {"input_ids": [], "labels": [], "prompt_ids": [], "reference": [], "prompt_text": []}
    counts = {"truncated": 0, "dropped_too_long": 0}
    for row in df.to_dict(orient="records"):
        prompt_text, response_text = render_prompt(row, prompt, tok)
        p_ids = tok(prompt_text, add_special_tokens=not chat)["input_ids"]
        r_ids = tok(response_text, add_special_tokens=False)["input_ids"]
        if len(p_ids) >= cfg.max_length or (len(p_ids) + len(r_ids) > cfg.max_length and not cfg.truncation):
            counts["dropped_too_long"] += 1
            continue
        if len(p_ids) + len(r_ids) > cfg.max_length:
            counts["truncated"] += 1
            r_ids = r_ids[: cfg.max_length - len(p_ids)]
        rows["input_ids"].append(p_ids + r_ids)
        rows["labels"].append((p_ids if prompt.train_on_prompt else [-100] * len(p_ids)) + r_ids)
        rows["prompt_ids"].append(p_ids)
        rows["reference"].append(row[prompt.response_column])
        rows["prompt_text"].append(prompt_text)
    rows["length"] = [len(ids) for ids in rows["input_ids"]]
    return rows, counts


def _tokenize_classification(df: pd.DataFrame, tok, cfg: TokenizeSection):
    # Tokenize without truncation first, to count what truncation cuts.
    lengths = [len(ids) for ids in tok(df["text"].tolist(), return_token_type_ids=False, verbose=False)["input_ids"]]
    too_long = sum(n > cfg.max_length for n in lengths)
    keep = list(range(len(df)))
    if cfg.truncation:
        enc = tok(df["text"].tolist(), return_token_type_ids=False, truncation=True,
                  max_length=cfg.max_length, padding="max_length" if cfg.padding == "max_length" else False)
    else:
        enc = tok(df["text"].tolist(), return_token_type_ids=False)
        keep = [i for i, n in enumerate(lengths) if n <= cfg.max_length]
    rows = {"text": [df["text"].iloc[i] for i in keep],
            "input_ids": [enc["input_ids"][i] for i in keep],
            "labels": [int(df["label"].iloc[i]) for i in keep],
            "length": [sum(enc["attention_mask"][i]) for i in keep]}
    return rows, {"truncated" if cfg.truncation else "dropped_too_long": too_long}


@stage("tokenize")
def tokenize(out: Path, split_result: dict, tokenizer: dict, cfg: TokenizeSection,
             prompt: PromptSection | None = None) -> dict:
    """Classification rows (prompt None), or causal-lm prompt/response rows."""
    import pandas as pd
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer["path"])
    splits, stats = {}, {}
    for name in SPLITS:
        df = pd.read_parquet(Path(split_result["dir"]) / f"{name}.parquet")
        rows, counts = (_tokenize_classification(df, tok, cfg) if prompt is None
                        else _tokenize_causal(df, tok, cfg, prompt))
        ds = Dataset.from_dict(rows)
        if not len(ds):
            raise RecipeError(f"every {name} row is longer than max_length={cfg.max_length}",
                              "tokenize.max_length", hint="raise it or set tokenize.truncation: true")
        splits[name] = ds
        stats[name] = {"rows": len(ds), **counts, "tokens": int(sum(rows["length"])),
                       "mean_length": round(sum(rows["length"]) / len(ds), 1)}
    DatasetDict(splits).save_to_disk(str(out / "dataset"))
    return {"stats": stats, "label_names": split_result["label_names"]}
