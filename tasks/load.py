"""load: the source read and cleaned. For a classifier `text` (str) and `label` (class id): labels
mapped, filtered and named, empty texts dropped (and, optionally, duplicates); for a causal LM the
prompt template's columns and the response, as text. One parquet file per split the source has.
Every dropped row is counted, never silent."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qlora.tasks.data import Chunks, Duplicates, chunked_tables, keep_chunk, open_source, read_source, required_columns
from qlora.tasks.pairs import clean_preference, pair_schema, preference_columns
from qlora.tasks.recipe import DataSection, PreferenceSection, PromptSection, Recipe, RecipeError, shorten
from qlora.tasks.results import DataSource, Loaded
from qlora.tasks.stage import stage

if TYPE_CHECKING:
    import pandas as pd


def _all_label_names(seen: _LabelValues, labels: list[str] | None, mixed_ok: bool = False) -> list[str]:
    if labels:
        return list(labels)
    if seen.numeric:
        return [str(i) for i in range(int(seen.max) + 1)] if seen.max is not None else []
    names = sorted({str(v) for v in seen.values})
    ids = [n for n in names if n.strip().lstrip("-").isdigit()]
    if ids and len(ids) < len(names) and not mixed_ok:
        words = [shorten(n, 30) for n in names if n not in ids]
        raise RecipeError(f"the label column mixes class ids ({', '.join(ids[:4])}) and class names "
                          f"({', '.join(words[:4])})", "data.label_column",
                          hint="map every value to a class name with data.label_map, e.g. {0: neg, 1: pos}")
    return names


class _LabelValues:
    """What one pass over the label columns (nothing else read) finds: the values, whether every
    split's labels are numbers (class ids), per split whether its are, and raw values label_map misses."""

    def __init__(self):
        self.split_values: dict[str, set] = {}
        self.max = None
        self.split_numeric: dict[str, bool] = {}
        self.unmapped: dict[str, int] = {}

    @property
    def values(self) -> set:
        return set().union(*self.split_values.values())

    @property
    def numeric(self) -> bool:
        return all(self.split_numeric.values())

    def add(self, split: str, labels: pd.Series) -> None:
        import pandas as pd

        numeric = pd.api.types.is_numeric_dtype(labels)
        self.split_numeric[split] = self.split_numeric.get(split, True) and numeric
        present = labels.dropna()
        self.split_values.setdefault(split, set()).update(present.unique().tolist())
        if numeric and len(present):
            self.max = present.max() if self.max is None else max(self.max, present.max())


def clean(frames: dict, data: DataSection, labels: list[str] | None, sink=None):
    """Map and filter labels, drop empty texts, unknown labels and (optionally) duplicates.
    frames: split -> a DataFrame, or a list of tables read in chunks (tasks/data.py's Chunks). sink:
    called (split, cleaned chunk) as chunks are cleaned, so no split is held whole; without one the
    cleaned frames are returned. Returns the cleaned frames (text, label id), the class names and
    per-split counts."""
    tables = chunked_tables(frames)
    seen = _label_pass(tables, data)
    # Without a label_map, "1" and "pos" in one column are two spellings, not two classes (with
    # one, values it leaves unmapped are refused, or dropped by keep_labels).
    all_names = _all_label_names(seen, labels, mixed_ok=data.label_map is not None or bool(data.keep_labels))
    names = _kept_label_names(all_names, data, labels)
    for split in tables:
        if seen.split_numeric[split]:
            _check_class_ids(split, seen.split_values[split], all_names)
    kept, stats, present = {}, {}, set()
    for split, split_tables in tables.items():
        stats[split], parts, dedup = {}, [], Duplicates() if data.drop_duplicates else None
        for table in split_tables:
            for chunk in _texts_and_labels(table, data):
                df, counts = _clean_chunk(chunk, data, labels, all_names, names, seen.split_numeric[split], dedup)
                _add_counts(stats[split], counts)
                if split == "train":
                    present.update(df["label"].unique().tolist())
                keep_chunk(split, df, sink, parts)
        if not sink:
            kept[split] = _concat(parts, {"text": "object", "label": "int64"})
    _check_trained_classes(stats, names, present)
    return kept, names, stats


def _label_pass(tables: dict[str, list[Chunks]], data: DataSection) -> _LabelValues:
    """The label columns alone, mapped through data.label_map: a value the map misses is an error
    unless data.keep_labels filters (its rows are then dropped and counted)."""
    seen = _LabelValues()
    for split, split_tables in tables.items():
        for table in split_tables:
            for chunk in table.select([data.label_column]):
                seen.add(split, _mapped(chunk[data.label_column], data, seen.unmapped))
    if seen.unmapped and not data.keep_labels:
        listed = ", ".join(f"{shorten(v, 40)!r} ({n} rows)"
                           for v, n in sorted(seen.unmapped.items(), key=lambda x: -x[1])[:10])
        raise RecipeError(f"raw label values not mapped: {listed}", "data.label_map",
                          hint="map every value the label column holds, or keep only some with data.keep_labels")
    return seen


def _mapped(labels: pd.Series, data: DataSection, unmapped: dict[str, int] | None = None) -> pd.Series:
    """Raw label values through data.label_map (keys compared as text); unmapped: counts what it misses."""
    import pandas as pd

    if data.label_map is None:
        return labels
    mapping = {str(k): v for k, v in data.label_map.items()}
    if unmapped is not None:
        raw = labels.dropna().astype(str)
        for value, n in raw[~raw.isin(list(mapping))].value_counts().items():
            unmapped[value] = unmapped.get(value, 0) + int(n)
    return labels.map(lambda v: mapping.get(str(v), v) if pd.notna(v) else v)


def _texts_and_labels(table, data: DataSection):
    """A table's chunks as (text, label) frames, labels mapped."""
    import pandas as pd

    for chunk in table.select(list(dict.fromkeys([data.text_column, data.label_column]))):
        yield pd.DataFrame({"text": chunk[data.text_column].to_numpy(),
                            "label": _mapped(chunk[data.label_column], data).to_numpy()})


def _check_class_ids(split: str, values: set, all_names: list[str]) -> None:
    """Numeric labels are class ids: each in 0..num_labels-1, whole numbers (values: the split's
    distinct labels, as the label pass found them)."""
    bad = {int(v) for v in values if v < 0 or v >= len(all_names) or v % 1 != 0}
    if bad:
        raise RecipeError(
            f"{split} has labels outside 0..{len(all_names) - 1} (num_labels={len(all_names)}): "
            f"{sorted(bad)[:5]}", "model.labels",
            hint="name every class in model.labels, in label order, or map them with data.label_map")


def _check_trained_classes(stats: dict, names: list[str], present: set) -> None:
    if not stats["train"]["rows_kept"]:
        raise RecipeError(f"no training rows left after cleaning ({stats['train']}): the label values "
                          f"in the data do not match the label names {names}", "model.labels",
                          hint="label names must match the data's values (or use data.label_map)")
    if len(present) < 2:
        raise RecipeError(f"the training rows hold one class ({shorten(names[present.pop()], 40)!r}): a classifier "
                          f"learns to tell two or more apart", "data.label_column",
                          hint="check the label column, data.keep_labels and data.label_map")
    absent = [n for i, n in enumerate(names) if i not in present]
    if absent:
        raise RecipeError(f"label names {absent} never occur in the training data", "model.labels",
                          hint="label names must match the data's values (or use data.label_map)")


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


def _clean_chunk(df: pd.DataFrame, data: DataSection, labels: list[str] | None, all_names: list[str],
                 names: list[str], numeric: bool, dedup: Duplicates | None) -> tuple[pd.DataFrame, dict]:
    """Rows of one split cleaned (text, label id), and the counts of what was dropped and why.
    numeric: the split's labels are class ids (checked in range before)."""
    import pandas as pd

    counts = {"rows_read": len(df)}
    if numeric:
        ids = pd.to_numeric(df["label"], errors="coerce")
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
    if dedup is not None:
        dup = dedup.seen_before(df[["text"]])
        counts["dropped_duplicates"] = int(dup.sum())
        df = df[~dup]
    class_id = {n: i for i, n in enumerate(names)}
    df = pd.DataFrame({"text": df["text"].astype(str).values,
                       "label": df["label"].astype(str).map(class_id).astype("int64").values})
    counts["rows_kept"] = len(df)
    return df, counts


def _add_counts(total: dict, counts: dict) -> None:
    for key, n in counts.items():
        total[key] = total.get(key, 0) + n


def _concat(parts: list, dtypes: dict) -> pd.DataFrame:
    import pandas as pd

    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()})
    return pd.concat(parts, ignore_index=True)


def clean_pairs(frames: dict, data: DataSection, columns: list[str], sink=None):
    """causal-lm rows: the template's columns and the response as text; rows with an empty one
    dropped (and, optionally, duplicates), all counted. frames and sink as for clean()."""
    import pandas as pd

    out, stats = {}, {}
    for split, split_tables in chunked_tables(frames).items():
        stats[split], parts, dedup = {}, [], Duplicates() if data.drop_duplicates else None
        for table in split_tables:
            for chunk in table.select(columns):
                counts = {"rows_read": len(chunk)}
                df = pd.DataFrame({c: chunk[c].astype("string").str.strip() for c in columns})
                empty = df.isna().any(axis=1) | (df == "").any(axis=1)
                counts["dropped_empty_text"] = int(empty.sum())
                df = df[~empty.astype(bool)]
                if dedup is not None:
                    dup = dedup.seen_before(df)
                    counts["dropped_duplicates"] = int(dup.sum())
                    df = df[~dup]
                df = df.astype(str).reset_index(drop=True)
                counts["rows_kept"] = len(df)
                _add_counts(stats[split], counts)
                keep_chunk(split, df, sink, parts)
        if not sink:
            out[split] = _concat(parts, {c: "object" for c in columns})
    if not stats["train"]["rows_kept"]:
        raise RecipeError(f"no training rows left after dropping empty ones ({stats['train']})", "data.path")
    return out, stats


def load_arguments(recipe: Recipe) -> dict:
    """The load stage's inputs from a recipe (the flow's call, and the preflight's cache probe)."""
    causal, pref = recipe.model.task == "causal-lm", recipe.preference
    return {"data": recipe.data, "labels": recipe.model.labels,
            "prompt_columns": recipe.prompt.columns if causal and not pref.enabled else None,
            "preference": pref.data_view() if pref.enabled else None, "prompt": recipe.prompt if pref.enabled else None}


def read_and_clean(data: DataSection, labels: list[str] | None, prompt_columns: list[str] | None = None,
                   preference: PreferenceSection | None = None, prompt: PromptSection | None = None):
    """The source read and cleaned as the task reads it: (frames, class names, counts per split)."""
    if preference is not None:
        prompt = prompt or PromptSection()
        frames, stats = clean_preference(read_source(data, preference_columns(preference, prompt)), data,
                                         preference, prompt)
        return frames, [], stats
    return _clean_rows(read_source(data, required_columns(data, prompt_columns)), data, labels, prompt_columns)


def _clean_rows(frames: dict, data: DataSection, labels: list[str] | None, prompt_columns: list[str] | None,
                sink=None):
    """A classifier's rows (prompt_columns None) or a causal LM's prompt rows, cleaned: (frames, class
    names, counts per split); frames and sink as for clean()."""
    if prompt_columns is None:
        return clean(frames, data, labels, sink=sink)
    frames, stats = clean_pairs(frames, data, prompt_columns, sink=sink)
    return frames, [], stats


@stage("load")
def load(out: Path, source: DataSource, data: DataSection, labels: list[str] | None,
         prompt_columns: list[str] | None = None, preference: PreferenceSection | None = None,
         prompt: PromptSection | None = None) -> Loaded:
    """Classification: text and label id. causal-lm: the prompt's columns (prompt_columns), or preference
    rows (preference, with the prompt section that renders their prompts). Every kind streams: read
    memory-mapped, cleaned and written a chunk at a time (unpaired rows paired up go through a file of
    their own first: pairing groups a prompt's completions across the whole split)."""
    import shutil

    cache = out / "source-arrow"  # the Arrow files datasets builds from the source, removed below
    if preference is not None:
        prompt = prompt or PromptSection()
        tables = open_source(data, preference_columns(preference, prompt), cache)
        with _ParquetSplits(out, pair_schema(preference)) as sink:
            names, (_, stats) = [], clean_preference(tables, data, preference, prompt, sink=sink)
    else:
        tables = open_source(data, required_columns(data, prompt_columns), cache)
        with _ParquetSplits(out, _schema(prompt_columns)) as sink:
            _, names, stats = _clean_rows(tables, data, labels, prompt_columns, sink=sink)
    del tables
    shutil.rmtree(cache, ignore_errors=True)
    return Loaded(splits=sorted(stats), label_names=names, stats=stats)


def _schema(prompt_columns: list[str] | None):
    import pyarrow as pa

    if prompt_columns is None:
        return pa.schema([("text", pa.string()), ("label", pa.int64())])
    return pa.schema([(c, pa.string()) for c in prompt_columns])


class _ParquetSplits:
    """The sink clean() writes to: one parquet file per split, a row group per cleaned chunk; a split
    whose rows were all dropped still gets its (empty) file."""

    def __init__(self, out: Path, schema):
        self.out, self.schema, self.writers = out, schema, {}

    def __call__(self, split: str, df: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if split not in self.writers:
            self.writers[split] = pq.ParquetWriter(self.out / f"{split}.parquet", self.schema)
        self.writers[split].write_table(pa.Table.from_pandas(df, schema=self.schema, preserve_index=False))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for writer in self.writers.values():
            writer.close()
