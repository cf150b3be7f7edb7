"""The data source: which files (or which Hub dataset), read into tables, fingerprinted, checked.

Sources: local files (csv, tsv, json, jsonl, parquet, optionally .gz/.bz2, read by `datasets`' own
builders; yaml, read here; a directory of split-named files), the first rows only for `qlora
validate`, the line of an undecodable byte found for the message; or a Hub dataset through
`datasets`. The stages that use it: load (tasks/load.py), split, tokenize.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from qlora.tasks import store
from qlora.tasks.recipe import SPLITS, DataSection, RecipeError, read_yaml, shorten
from qlora.tasks.results import DataSource

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
    for f in data_files:
        if not f.is_file():
            raise RecipeError(f"{f} is not a regular file", "data.path", hint="a data directory holds data files")
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
    from qlora.tasks.remote import is_url, remote_file

    path = remote_file(location, field) if is_url(location) else store.resolve_location(location, field)
    if path is None:
        raise RecipeError(f"path does not exist: {location}", field, hint="for a Hub dataset use data.hub instead")
    if path.is_dir() and not directory_ok:
        raise RecipeError(f"{location} is a directory; give a data file", field)
    if not path.is_dir() and not path.is_file():  # a FIFO, a device such as /dev/zero, a socket
        raise RecipeError(f"{location} is not a regular file (a pipe, device or socket never ends or cannot be "
                          f"read twice)", field, hint="copy the data into a file")
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
    fmt = _check_readable(path, data)
    with _reading(path, data):
        if fmt == "yaml":
            df = _read_yaml(path, data.encoding)
            df = df.head(nrows) if nrows else df
        else:
            df = _read_with_datasets(path, fmt, data, nrows)
    if df.empty:
        raise RecipeError(f"data file has no rows: {path}", _field_of(path, data))
    return df


class Chunks:
    """A table read chunk by chunk, as often as asked: a file `datasets` built into memory-mapped Arrow
    (its rows are paged in as read, so a file larger than memory passes), or a table already in memory.
    class_names: (column, names) of a Hub dataset's ClassLabel column, its ids read as names."""

    def __init__(self, table, where: str, class_names: tuple[str, list[str]] | None = None):
        self.table, self.where, self.class_names = table, where, class_names  # datasets.Dataset or DataFrame

    @property
    def columns(self) -> list[str]:
        return list(self.table.columns if self._in_memory else self.table.column_names)

    @property
    def _in_memory(self) -> bool:
        import pandas as pd

        return isinstance(self.table, pd.DataFrame)

    def __iter__(self):
        # pandas frames of CHUNK_ROWS rows, typed as the whole table's to_pandas types them
        chunks = [self.table] if self._in_memory else self.table.with_format("pandas").iter(batch_size=self.chunk_rows)
        for df in chunks:
            if self.class_names and self.class_names[0] in df.columns:
                column, names = self.class_names
                df[column] = [names[i] for i in df[column]]
            yield df

    @property
    def chunk_rows(self) -> int:
        rows = len(self.table)
        return rows_per_chunk(rows, self.table.data.nbytes if rows else 0, CHUNK_ROWS)

    def select(self, columns: list[str]) -> "Chunks":
        table = self.table[columns] if self._in_memory else self.table.select_columns(columns)
        return Chunks(table, self.where, self.class_names)


def chunked_tables(frames: dict) -> dict[str, list[Chunks]]:
    """split -> its tables read in chunks (a DataFrame given is one table of one chunk)."""
    import pandas as pd

    return {split: [Chunks(f, split)] if isinstance(f, pd.DataFrame) else list(f) for split, f in frames.items()}


def keep_chunk(split: str, df: pd.DataFrame, sink, parts: list) -> None:
    """A cleaned chunk to the sink (written as it comes), or kept to return."""
    if sink is None:
        parts.append(df)
    else:
        sink(split, df)


class Duplicates:
    """Rows seen earlier in the split, across chunks, first occurrence kept. Each row is remembered by
    a 128-bit digest (two of pandas' 64-bit row hashes under different keys), not its text, so
    memory grows by digests, not by the data."""

    KEYS = ("qlora-dedup-key1", "qlora-dedup-key2")  # 16 characters each, as pandas asks

    def __init__(self):
        self.seen: set[int] = set()

    @classmethod
    def digests(cls, df: pd.DataFrame):
        """Each row's 128-bit digest, as two unsigned 64-bit columns."""
        import numpy as np
        import pandas as pd

        if not len(df):
            return np.zeros((0, 2), dtype=np.uint64)
        return np.stack([pd.util.hash_pandas_object(df, index=False, hash_key=k).to_numpy() for k in cls.KEYS], axis=1)

    def seen_before(self, df: pd.DataFrame):
        import numpy as np

        digests = [int(x) << 64 | int(y) for x, y in self.digests(df).tolist()]
        dup = np.zeros(len(digests), dtype=bool)
        for i, d in enumerate(digests):
            dup[i] = d in self.seen
            self.seen.add(d)
        return dup


CHUNK_ROWS = 100_000  # rows cleaned at a time: bounded memory whatever the file's size
CHUNK_BYTES = 16 * 2**20  # and at most about this much of the table's (Arrow, uncompressed) data


def rows_per_chunk(rows: int, nbytes: int, most: int) -> int:
    """Rows to read at a time from a table of `rows` rows holding `nbytes`: `most`, fewer where rows are
    long (about CHUNK_BYTES a chunk, which pandas' strings and the cleaning's copies make several times
    larger)."""
    return max(1, min(most, CHUNK_BYTES * rows // nbytes)) if nbytes else most


def open_table(path: Path, data: DataSection, cache: Path) -> Chunks:
    """One data file for reading in chunks: built by `datasets`' reader of its format into Arrow files
    under cache (the caller's own directory, removed with it), memory-mapped; YAML read here."""
    fmt = _check_readable(path, data)
    with _reading(path, data):
        if fmt == "yaml":
            table = _read_yaml(path, data.encoding)
        else:
            import datasets

            with quiet_datasets():
                table = datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=str(cache),
                                              **_reader_options(path, fmt, data))
    if not len(table):
        raise RecipeError(f"data file has no rows: {path}", _field_of(path, data))
    return Chunks(table, str(path))


def _check_readable(path: Path, data: DataSection) -> str:
    """The file's format, once the mistakes found without reading it are ruled out."""
    fmt, _ = _format_of(path)
    if path.stat().st_size == 0:
        raise RecipeError(f"data file is empty: {path}", _field_of(path, data))
    if data.column_names is not None and fmt != "csv":
        raise RecipeError(f"data.column_names names the columns of header-less CSV/TSV files; {path.name} is {fmt}",
                          "data.column_names")
    return fmt


@contextlib.contextmanager
def _reading(path: Path, data: DataSection):
    """Whatever a reader raises on a file, one line naming the file and the recipe field behind it."""
    field, encoding = _field_of(path, data), data.encoding
    try:
        yield
    except RecipeError:
        raise
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


def _read_with_datasets(path: Path, fmt: str, data: DataSection, nrows: int | None) -> pd.DataFrame:
    """A CSV, JSON or Parquet file read by `datasets`' packaged builder of that format (compressed
    files too). Missing cells are missing (an empty CSV cell, not the text "NA"). The first rows are
    streamed; a whole file is built into a temporary directory, so nothing lands in the user's
    datasets cache and no stale copy of an edited file is ever read back."""
    import datasets
    import pandas as pd

    options = _reader_options(path, fmt, data)
    with quiet_datasets():
        if nrows:
            rows = datasets.load_dataset(fmt, data_files=str(path), split="train", streaming=True, **options)
            return pd.DataFrame.from_records(list(rows.take(nrows)))
        with tempfile.TemporaryDirectory(prefix="qlora-read-") as cache:
            return datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True, **options).to_pandas()


def _reader_options(path: Path, fmt: str, data: DataSection) -> dict:
    """`datasets`' reader options for the recipe's encoding and header-less columns; missing CSV cells
    are missing (an empty cell, not the text "NA")."""
    if fmt == "csv":
        options = {"sep": "\t" if ".tsv" in path.name else ",", "encoding": data.encoding,
                   "keep_default_na": False, "na_values": [""]}
        if data.column_names:
            options["column_names"] = data.column_names
        return options
    return {"encoding": data.encoding} if fmt == "json" else {}


@contextlib.contextmanager
def quiet_datasets():
    """`datasets` without its progress bars (a bar per file read or column cast says nothing the
    stage's log does not) and its error logging (a file it cannot read: we raise one line)."""
    import datasets

    quiet = logging.getLogger("datasets")
    level, bars = quiet.level, not datasets.are_progress_bars_disabled()
    quiet.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
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
        doc = read_yaml(h.handle.read())
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


def check_columns(present: list, columns: dict[str, str], where: str) -> None:
    """present: the table's column names."""
    present = list(present)
    for field, column in columns.items():
        if column not in present:
            field = "prompt.template" if field.startswith("prompt (") else field
            shown = ", ".join(shorten(str(c), 40) for c in present[:20])
            hint = f"columns there: {shown}"
            if any(str(c) not in columns.values() and len(str(c)) > 30 for c in present):
                hint += "; a file without a header row: name its columns with data.column_names"
            raise RecipeError(f"column '{column}' not found in {where}", field, hint=hint)


def open_source(data: DataSection, columns: dict[str, str], cache: Path) -> dict[str, list[Chunks]]:
    """Each split of the source as its files' tables, read in chunks, their columns checked. cache: a
    directory of the caller's for the Arrow files `datasets` builds (a Hub dataset uses its own cache)."""
    if data.hub:
        return _open_hub(data, columns)
    tables = {}
    for split, paths in source_files(data).items():
        tables[split] = [open_table(p, data, cache / f"{split}-{i}") for i, p in enumerate(paths)]
        for table in tables[split]:
            check_columns(table.columns, columns, table.where)
    return tables


def read_source(data: DataSection, columns: dict[str, str]) -> dict[str, pd.DataFrame]:
    """Each split whole, in memory: for rows cleaned as a whole (preference pairs) and the preflight."""
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="qlora-read-") as cache:
        return {split: pd.concat([chunk for table in tables for chunk in table], ignore_index=True)
                for split, tables in open_source(data, columns, Path(cache)).items()}


def _open_hub(data: DataSection, columns: dict[str, str]) -> dict[str, list[Chunks]]:
    import datasets

    from qlora.tasks.hub import hub_error

    try:
        dd = datasets.load_dataset(data.hub, data.config, revision=data.revision)
    except Exception as e:  # noqa: BLE001 - every Hub failure is the user's to fix (id, network)
        raise hub_error(e, data.hub, "data.hub") from None
    wanted = {v: k for k, v in (data.splits or {}).items()}
    tables = {}
    for name, ds in dd.items():
        split = wanted.get(name) or SPLIT_ALIASES.get(name)
        if split and split not in tables:
            check_columns(ds.column_names, columns, f"Hub dataset {data.hub} split {name}")
            names = getattr(ds.features.get(data.label_column), "names", None) if data.label_map is None else None
            tables[split] = [Chunks(ds, f"Hub dataset {data.hub} split {name}",
                                    (data.label_column, names) if names else None)]
    if "train" not in tables:
        raise RecipeError(f"Hub dataset {data.hub} has no train split (has {', '.join(dd)})", "data.splits")
    return tables


def describe_source(data: DataSection) -> DataSource:
    """The source's identity and content fingerprint: the load stage's cache input."""
    if data.hub:
        from qlora.tasks.hub import dataset_commit

        commit = dataset_commit(data.hub, data.revision)
        return DataSource(hash=store.hash_value([data.hub, data.config, commit]), hub=data.hub, commit=commit)
    files = source_files(data)
    fingerprint = store.hash_value({s: [store.file_fingerprint(p) for p in ps] for s, ps in files.items()})
    return DataSource(hash=fingerprint, files={s: [str(p) for p in ps] for s, ps in files.items()})


def check_data(data: DataSection, columns: dict[str, str] | list[str] | None = None) -> DataSource | None:
    """Preflight: the files exist, are readable UTF-8 and have the columns (first rows only): recipe field ->
    column, or a causal LM's prompt columns, or (None) a classifier's text and label."""
    if data.hub:
        from qlora.tasks.hub import check_hub_repo

        check_hub_repo(data.hub, "dataset", data.revision, "data.hub")
        return None
    if not isinstance(columns, dict):
        columns = required_columns(data, columns)
    for split, paths in source_files(data).items():
        for path in paths:
            check_columns(read_table(path, data, nrows=50).columns, columns, str(path))
    return describe_source(data)
