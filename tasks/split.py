"""split: train, validation and test. Splits the source lacks are carved out of its training rows
(stratified by class for a classifier), then optionally sampled. The carving works on row indices
and the label column alone, in numpy: O(rows), whatever the width of the rows; the tables
themselves go from parquet to parquet through Arrow a batch at a time, in the order the source had
them."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qlora.tasks.recipe import SPLITS, RecipeError, SplitSection
from qlora.tasks.results import Loaded, Split
from qlora.tasks.stage import stage

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


def _class_shares(counts: np.ndarray, n: int) -> np.ndarray:
    """How many rows of each class go into a split of n rows: each class's share of n, rounded down,
    the rest given to the largest remainders (ties to the earlier class), never a class's every row."""
    import numpy as np

    exact = counts * n / counts.sum()
    take = np.minimum(np.floor(exact).astype(np.int64), counts - 1)
    by_remainder = sorted(range(len(counts)), key=lambda c: (take[c] - exact[c], c))
    while take.sum() < n:  # reached: n leaves a row of every class behind (checked by the caller)
        for c in by_remainder:
            if take.sum() < n and take[c] < counts[c] - 1:
                take[c] += 1
    return take


def _split_off(rows: np.ndarray, labels: np.ndarray | None, n: int, rng, field: str) -> tuple[np.ndarray, np.ndarray]:
    """n of rows (indices) split off at random, in the classes' proportions when labels are given.
    Returns (kept, split off), each in the rows' own order."""
    import numpy as np

    order = rng.permutation(len(rows))
    if labels is None:
        taken = np.zeros(len(rows), dtype=bool)
        taken[order[:n]] = True
        return rows[~taken], rows[taken]
    classes, of_row, counts = np.unique(labels[rows], return_inverse=True, return_counts=True)
    if n < len(classes) or len(rows) - n < len(classes):
        raise RecipeError(f"cannot split {n} of {len(rows)} rows off by class: {len(classes)} classes need a row "
                          f"each on both sides", field, hint="a larger fraction, or split.stratify: false")
    by_class = order[np.argsort(of_row[order], kind="stable")]  # grouped by class, shuffled within
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(rows)) - starts[of_row[by_class]]  # a row's place within its class
    taken = np.zeros(len(rows), dtype=bool)
    taken[by_class[position < _class_shares(counts, n)[of_row[by_class]]]] = True
    return rows[~taken], rows[taken]


def _carved_rows(rows: int, remaining: int, size: float, name: str, field: str) -> int:
    """Rows carved off for a split: a fraction of the source's training rows, leaving rows on both sides."""
    n = round(rows * size)
    if n < 1 or n >= remaining:
        raise RecipeError(f"{size} of {rows} rows leaves the {name} split {'empty' if n < 1 else 'with all rows'}",
                          field, hint="the source has no such split: give a fraction that leaves rows on both sides")
    return n


def carve(rows: int, labels: np.ndarray | None, present: set[str], cfg: SplitSection) -> dict[str, np.ndarray]:
    """The rows of the source's training split each split takes: train, and each split the source
    lacks (present: the splits it has), as indices. labels: the training rows' label column, or None."""
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    train, carved = np.arange(rows), {}
    if labels is not None:
        counts = np.unique(labels, return_counts=True)[1]
        if not cfg.stratify or counts.min() < 2:  # a class of one row cannot be on both sides
            labels = None
    for name, size, field in (("test", cfg.test_size, "split.test_size"),
                              ("validation", cfg.validation_size, "split.validation_size")):
        if name not in present:
            n = _carved_rows(rows, len(train), size, name, field)
            train, carved[name] = _split_off(train, labels, n, rng, field)
    return {"train": train, **carved}


def check_split(frames: dict[str, pd.DataFrame], cfg: SplitSection) -> None:
    """The preflight's check that the cleaned rows can be split as the recipe says: the split stage's
    own carving (indices and labels only), with its messages."""
    train = frames["train"]
    carve(len(train), train["label"].to_numpy() if "label" in train else None, set(frames), cfg)


@stage("split")
def split(out: Path, loaded: Loaded, cfg: SplitSection, sample: dict | None) -> Split:
    """Which rows each split takes is decided on indices (the label column the only data read); then
    each source file is read once, a batch of rows at a time, each batch's rows written to the splits
    that take them: memory stays one batch, whatever the data's size."""
    import numpy as np
    import pyarrow.parquet as pq

    files = {s: pq.ParquetFile(loaded.file(f"{s}.parquet")) for s in loaded.splits}
    train = files["train"]
    labels = (train.read(columns=["label"]).column("label").to_numpy()
              if "label" in train.schema_arrow.names else None)
    carved = carve(train.metadata.num_rows, labels, set(files) - {"train"}, cfg)
    rng = np.random.default_rng(cfg.seed)
    plan, counts = {}, {}  # split -> (source split, its rows in order, or None for every row)
    for name in SPLITS:
        source, rows = ("train", carved[name]) if name in carved else (name, None)
        n = len(rows) if rows is not None else files[source].metadata.num_rows
        limit = (sample or {}).get(name)
        if limit and n > limit:
            picked = np.sort(rng.choice(n, limit, replace=False))
            rows, n = (picked if rows is None else rows[picked]), limit
        if not n:
            raise RecipeError(f"the {name} split is empty", "split")
        plan[name], counts[name] = (source, rows), n
    for source in sorted({source for source, _ in plan.values()}):
        _write_rows(files[source], {name: rows for name, (s, rows) in plan.items() if s == source}, out)
    return Split(rows=counts, label_names=loaded.label_names)


BATCH_ROWS = 100_000  # at most; fewer where rows are long (tasks/data.py's rows_per_chunk)


def _write_rows(source, takes: dict[str, np.ndarray | None], out: Path) -> None:
    """One pass over a parquet file: each split in takes gets its rows (ascending indices, or None
    for all of them), in the file's order."""
    import numpy as np
    import pyarrow.parquet as pq

    from qlora.tasks.data import rows_per_chunk

    writers = {name: pq.ParquetWriter(out / f"{name}.parquet", source.schema_arrow) for name in takes}
    meta = source.metadata
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    batch_rows = rows_per_chunk(meta.num_rows, size, BATCH_ROWS)
    try:
        start = 0
        for batch in source.iter_batches(batch_size=batch_rows):
            end = start + batch.num_rows
            for name, rows in takes.items():
                if rows is None:
                    writers[name].write_batch(batch)
                    continue
                lo, hi = np.searchsorted(rows, [start, end])
                if hi > lo:
                    writers[name].write_batch(batch.take(rows[lo:hi] - start))
            start = end
    finally:
        for writer in writers.values():
            writer.close()
