"""split: train, validation and test. Splits the source lacks are carved out of its training rows
through `datasets` (stratified by class for a classifier), then optionally sampled."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qlora.tasks.data import quiet_datasets
from qlora.tasks.recipe import SPLITS, RecipeError, SplitSection
from qlora.tasks.results import Loaded, Split
from qlora.tasks.stage import stage

if TYPE_CHECKING:
    import pandas as pd


def _split_off(train: pd.DataFrame, n: int, seed: int, stratify: bool, field: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """n rows of train split off at random (datasets' train_test_split), in the classes' proportions
    when stratify."""
    import datasets

    try:
        with quiet_datasets():
            table = datasets.Dataset.from_pandas(train, preserve_index=False)
            if stratify:
                table = table.cast_column("label", datasets.ClassLabel(num_classes=int(train["label"].max()) + 1))
            parts = table.train_test_split(test_size=n, seed=seed, stratify_by_column="label" if stratify else None)
    except ValueError as e:  # e.g. fewer rows split off than there are classes
        raise RecipeError(f"cannot split {n} of {len(train)} rows off by class: {str(e).splitlines()[0]}", field,
                          hint="a larger fraction, or split.stratify: false") from None
    return parts["train"].to_pandas(), parts["test"].to_pandas()


def _carved_rows(rows: int, remaining: int, size: float, name: str, field: str) -> int:
    """Rows carved off for a split: a fraction of the source's training rows, leaving rows on both sides."""
    n = round(rows * size)
    if n < 1 or n >= remaining:
        raise RecipeError(f"{size} of {rows} rows leaves the {name} split {'empty' if n < 1 else 'with all rows'}",
                          field, hint="the source has no such split: give a fraction that leaves rows on both sides")
    return n


def carve(frames: dict[str, pd.DataFrame], cfg: SplitSection) -> dict[str, pd.DataFrame]:
    """Every split: the source's own, and those it lacks carved out of its training rows. Also the
    preflight's check (on the cleaned rows) that the data is large enough for the fractions."""
    frames = dict(frames)
    train = frames["train"]
    for name, size, field in (("test", cfg.test_size, "split.test_size"),
                              ("validation", cfg.validation_size, "split.validation_size")):
        if name in frames:
            continue
        n = _carved_rows(len(frames["train"]), len(train), size, name, field)
        stratify = cfg.stratify and "label" in train and train["label"].value_counts().min() >= 2
        train, frames[name] = _split_off(train, n, cfg.seed, stratify, field)
    frames["train"] = train
    return frames


# Up to this many training rows the preflight carves the splits for real (a small data set is where
# a fraction or a stratified split can fail); above it, where a split can only fail by a fraction
# leaving a side empty, it checks that arithmetic alone instead of splitting the data a second time.
CARVE_IN_PREFLIGHT_ROWS = 20_000


def check_split(frames: dict[str, pd.DataFrame], cfg: SplitSection) -> None:
    """The preflight's check that the cleaned rows can be split as the recipe says, with the split
    stage's own messages."""
    if len(frames["train"]) <= CARVE_IN_PREFLIGHT_ROWS:
        carve(frames, cfg)
        return
    rows = remaining = len(frames["train"])
    for name, size, field in (("test", cfg.test_size, "split.test_size"),
                              ("validation", cfg.validation_size, "split.validation_size")):
        if name not in frames:
            remaining -= _carved_rows(rows, remaining, size, name, field)


@stage("split")
def split(out: Path, loaded: Loaded, cfg: SplitSection, sample: dict | None) -> Split:
    import pandas as pd

    frames = carve({s: pd.read_parquet(loaded.file(f"{s}.parquet")) for s in loaded.splits}, cfg)
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
    return Split(rows=counts, label_names=loaded.label_names)
