"""load: the source read and cleaned. For a classifier `text` (str) and `label` (class id): labels
mapped, filtered and named, empty texts dropped (and, optionally, duplicates); for a causal LM the
prompt template's columns and the response, as text. One parquet file per split the source has.
Every dropped row is counted, never silent."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qlora.tasks.data import read_source, required_columns
from qlora.tasks.pairs import clean_preference, preference_columns
from qlora.tasks.recipe import DataSection, PreferenceSection, PromptSection, Recipe, RecipeError, shorten
from qlora.tasks.results import DataSource, Loaded
from qlora.tasks.stage import stage

if TYPE_CHECKING:
    import pandas as pd


def _all_label_names(frames: dict[str, pd.DataFrame], labels: list[str] | None, mixed_ok: bool = False) -> list[str]:
    import pandas as pd

    if labels:
        return list(labels)
    values = pd.concat([f["label"] for f in frames.values()]).dropna()
    if pd.api.types.is_numeric_dtype(values):
        return [str(i) for i in range(int(values.max()) + 1)]
    names = sorted(values.astype(str).unique())
    ids = [n for n in names if n.strip().lstrip("-").isdigit()]
    if ids and len(ids) < len(names) and not mixed_ok:
        words = [shorten(n, 30) for n in names if n not in ids]
        raise RecipeError(f"the label column mixes class ids ({', '.join(ids[:4])}) and class names "
                          f"({', '.join(words[:4])})", "data.label_column",
                          hint="map every value to a class name with data.label_map, e.g. {0: neg, 1: pos}")
    return names


def clean(frames: dict[str, pd.DataFrame], data: DataSection, labels: list[str] | None):
    """Map and filter labels, drop empty texts, unknown labels and (optionally) duplicates.
    Returns the cleaned frames (text, label id), the class names and per-split counts."""
    renamed = _mapped_labels(frames, data)
    # Without a label_map, "1" and "pos" in one column are two spellings, not two classes (with
    # one, values it leaves unmapped are refused, or dropped by keep_labels).
    all_names = _all_label_names(renamed, labels, mixed_ok=data.label_map is not None or bool(data.keep_labels))
    names = _kept_label_names(all_names, data, labels)
    out, stats = {}, {}
    for split, df in renamed.items():
        out[split], stats[split] = _clean_split(split, df, data, labels, all_names, names)
    if not len(out["train"]):
        raise RecipeError(f"no training rows left after cleaning ({stats['train']}): the label values "
                          f"in the data do not match the label names {names}", "model.labels",
                          hint="label names must match the data's values (or use data.label_map)")
    present = set(out["train"]["label"])
    if len(present) < 2:
        raise RecipeError(f"the training rows hold one class ({shorten(names[present.pop()], 40)!r}): a classifier "
                          f"learns to tell two or more apart", "data.label_column",
                          hint="check the label column, data.keep_labels and data.label_map")
    absent = [n for i, n in enumerate(names) if i not in present]
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
    raw = read_source(data, required_columns(data, prompt_columns))
    if prompt_columns is None:
        return clean(raw, data, labels)
    frames, stats = clean_pairs(raw, data, prompt_columns)
    return frames, [], stats


@stage("load")
def load(out: Path, source: DataSource, data: DataSection, labels: list[str] | None,
         prompt_columns: list[str] | None = None, preference: PreferenceSection | None = None,
         prompt: PromptSection | None = None) -> Loaded:
    """Classification: text and label id. causal-lm: the prompt's columns (prompt_columns), or preference
    rows (preference, with the prompt section that renders their prompts)."""
    frames, names, stats = read_and_clean(data, labels, prompt_columns, preference, prompt)
    for split, df in frames.items():
        df.to_parquet(out / f"{split}.parquet", index=False)
    return Loaded(splits=sorted(frames), label_names=names, stats=stats)
