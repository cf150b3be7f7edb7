"""Preference rows as the load stage keeps them: a prompt with a chosen and a rejected completion (or,
for KTO, one completion and whether it is desirable), from plain text or from conversations (lists of
role/content messages, as TRL documents its datasets). Conversations without a prompt column are
split at the first turn where chosen and rejected differ (Anthropic HH-style data); messages are kept
as JSON text until the tokenizer's chat template renders them. Every dropped row is counted."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.tasks.data import Duplicates, chunked_tables, keep_chunk
from qlora.tasks.recipe import DataSection, PreferenceSection, PromptSection, RecipeError, shorten

if TYPE_CHECKING:
    import pandas as pd

CONVERSATION = "conversation"  # the cleaned frame's column saying its texts are JSON messages
TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes", "desirable"}, {"false", "0", "no", "undesirable"}


def preference_columns(pref: PreferenceSection, prompt: PromptSection) -> dict[str, str]:
    """Recipe field -> data column, for the columns every file must have. The prompt column is checked
    when the rows are read: conversations may do without it."""
    columns = ({"preference.completion_column": pref.completion_column, "preference.label_column": pref.label_column}
               if pref.unpaired_rows else
               {"preference.chosen_column": pref.chosen_column, "preference.rejected_column": pref.rejected_column})
    if prompt.template is not None:
        columns |= {f"prompt ({c})": c for c in prompt.columns[:-1]}
    return columns


def _is_messages(value) -> bool:
    import numpy as np

    return isinstance(value, (list, tuple, np.ndarray))


def _messages(value, field: str) -> list[dict]:
    """A conversation cell as a list of {role, content} (JSON, parquet and Hub rows alike)."""
    out = []
    for m in list(value):
        if not (hasattr(m, "get") and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise RecipeError(f"a conversation holds {shorten(repr(m), 60)}, not a {{role, content}} message", field,
                              hint="each message needs a role (user, assistant, system) and a text content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt_of(row: dict, pref: PreferenceSection, prompt: PromptSection, has_prompt: bool):
    """The row's prompt: the template rendered, the prompt column (text or messages), or None (a
    conversation whose first turns are its prompt)."""
    if prompt.template is not None:
        return prompt.template.format(**row)
    if not has_prompt:
        return None
    value = row[pref.prompt_column]
    return _messages(value, "preference.prompt_column") if _is_messages(value) else value


def _split_shared_prefix(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _as_text(value) -> str | None:
    import pandas as pd

    if value is None or (not _is_messages(value) and pd.isna(value)):
        return None
    return str(value).strip()


def _desirable(value, pref: PreferenceSection) -> bool | None:
    """True, False, or None for a label value that is neither (an error, or with the recipe's own
    lists, a row dropped)."""
    if pref.desirable_labels or pref.undesirable_labels:
        word = str(value).strip()
        good, bad = set(pref.desirable_labels or ()), set(pref.undesirable_labels or ())
        if word in good or (not good and word not in bad):
            return True
        return False if word in bad or not bad else None
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None


def pair_up(prompt_digests, labels) -> tuple[list[int], list[int], int]:
    """Unpaired rows as pairs, by row index: within each prompt (its digest, in order of first
    appearance), the desirable (label 1) and undesirable completions shuffled (a fixed seed) and
    zipped. Returns the chosen rows, the rejected rows and the number of rows left without a pair.
    O(rows) in numpy, and a step per distinct prompt."""
    import numpy as np

    rng = np.random.default_rng(0)
    if not len(labels):
        return [], [], 0
    _, first, group = np.unique(prompt_digests, axis=0, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    group = rank[group.reshape(-1)]  # groups numbered by their first row
    rows = np.argsort(group, kind="stable")  # grouped, each group's rows in order
    bounds = np.flatnonzero(np.diff(group[rows])) + 1
    chosen, rejected, left = [], [], 0
    for members in np.split(rows, bounds):
        good = members[labels[members] == 1].tolist()
        bad = members[labels[members] == 0].tolist()
        rng.shuffle(good)
        rng.shuffle(bad)
        n = min(len(good), len(bad))
        chosen += good[:n]
        rejected += bad[:n]
        left += len(good) + len(bad) - 2 * n
    return chosen, rejected, left


def pair_schema(pref: PreferenceSection):
    """The load stage's columns for preference rows: prompt/chosen/rejected (paired losses, unpaired
    rows paired up included), or KTO's prompt/completion/label, and whether the split's texts are JSON messages."""
    import pyarrow as pa

    columns = ([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())] if pref.paired
               else [("prompt", pa.string()), ("completion", pa.string()), ("label", pa.int64())])
    return pa.schema(columns + [(CONVERSATION, pa.bool_())])


class _RowCleaner:
    """One split's rows cleaned chunk by chunk, remembering across chunks whether the split holds
    conversations or plain text (never both) and what was dropped, and why."""

    def __init__(self, split: str, pref: PreferenceSection, prompt: PromptSection):
        self.split, self.pref, self.prompt, self.conversational = split, pref, prompt, None
        self.counts = {"rows_read": 0, "dropped_empty_text": 0}
        if pref.unpaired_rows and (pref.desirable_labels and pref.undesirable_labels):
            self.counts["dropped_other_label"] = 0
        if not pref.unpaired_rows:
            self.counts["dropped_identical_pair"] = 0
        self.columns = ["prompt", "completion", "label"] if pref.unpaired_rows else ["prompt", "chosen", "rejected"]

    def clean(self, df: pd.DataFrame, has_prompt: bool) -> pd.DataFrame:
        import pandas as pd

        self.counts["rows_read"] += len(df)
        rows = [r for r in map(lambda row: self._row(row, has_prompt), df.to_dict(orient="records")) if r]
        return pd.DataFrame(rows, columns=self.columns)

    def _row(self, row: dict, has_prompt: bool) -> dict | None:
        pref, split, counts = self.pref, self.split, self.counts
        parts = [row[pref.completion_column]] if pref.unpaired_rows else [row[pref.chosen_column], row[pref.rejected_column]]
        p = _prompt_of(row, pref, self.prompt, has_prompt)
        conv = any(_is_messages(x) for x in parts) or isinstance(p, list)
        field = "preference.completion_column" if pref.unpaired_rows else "preference.chosen_column"
        if self.conversational is None:
            self.conversational = conv
        elif conv != self.conversational:
            raise RecipeError(f"{split} mixes conversations (lists of messages) and plain text", field)
        if conv:  # a text completion beside messages is the assistant's answer
            parts = [_messages(x, field) if _is_messages(x) else
                     [{"role": "assistant", "content": _as_text(x)}] if _as_text(x) else [] for x in parts]
            if p is None:
                if pref.unpaired_rows:
                    raise RecipeError(f"column '{pref.prompt_column}' not found in the {split} data: KTO rows "
                                      f"need a prompt", "preference.prompt_column")
                p, *parts = _split_shared_prefix(*parts)
                if not p:
                    raise RecipeError(f"the {split} conversations' chosen and rejected share no first turns, and "
                                      f"there is no '{pref.prompt_column}' column to give the prompt",
                                      "preference.prompt_column",
                                      hint="add a prompt column, or give whole conversations that differ only "
                                           "in their last answer")
            elif isinstance(p, str):
                p = [{"role": "user", "content": p}]
            texts = [json.dumps(p)] + [json.dumps(x) if any(m["content"].strip() for m in x) else None for x in parts]
        else:
            if p is None:
                raise RecipeError(f"column '{pref.prompt_column}' not found in the {split} data",
                                  "preference.prompt_column",
                                  hint="name the prompt's column, or give conversations (lists of messages)")
            texts = [_as_text(p)] + [_as_text(x) for x in parts]
        if any(t is None or t == "" or t == "[]" for t in texts):
            counts["dropped_empty_text"] += 1
            return None
        if pref.unpaired_rows:
            desirable = _desirable(row[pref.label_column], pref)
            if desirable is None and "dropped_other_label" in counts:
                counts["dropped_other_label"] += 1
                return None
            if desirable is None:
                raise RecipeError(f"{split} has a label {shorten(repr(row[pref.label_column]), 40)}: labels say "
                                  f"whether the completion is desirable", "preference.label_column",
                                  hint="use true/false, 1/0 or yes/no, or name the values in "
                                       "preference.desirable_labels and undesirable_labels")
            return {"prompt": texts[0], "completion": texts[1], "label": int(desirable)}
        if texts[1] == texts[2]:
            counts["dropped_identical_pair"] += 1
            return None
        return {"prompt": texts[0], "chosen": texts[1], "rejected": texts[2]}


PAIRS_PER_WRITE = 20_000  # pairs built and written at a time from the unpaired rows on disk


def clean_preference(frames: dict, data: DataSection, pref: PreferenceSection, prompt: PromptSection, sink=None):
    """Each split as prompt/chosen/rejected (paired losses) or prompt/completion/label (kto), text or JSON
    messages; rows with an empty part, identical chosen and rejected, or (optionally) duplicates dropped and
    counted. A mistake that leaves nothing to learn is one error naming its field.
    frames: split -> a DataFrame, or a list of tables read in chunks (tasks/data.py's Chunks). sink: called
    (split, cleaned chunk) as chunks are cleaned, so no split is held whole; without one the cleaned frames
    are returned. Returns (frames, per-split counts)."""
    import tempfile

    import pandas as pd

    out, stats, label_values = {}, {}, {}
    for split, split_tables in chunked_tables(frames).items():
        cleaner, parts = _RowCleaner(split, pref, prompt), []
        dedup = Duplicates() if data.drop_duplicates else None
        dropped_duplicates, kept, labels = 0, 0, set()
        with tempfile.TemporaryDirectory(prefix="qlora-pairing-") as scratch:
            unpaired = _UnpairedRows(Path(scratch)) if pref.pair_unpaired else None
            emit = unpaired.add if unpaired else (lambda df: keep_chunk(split, df, sink, parts))
            for table in split_tables:
                has_prompt = prompt.template is not None or pref.prompt_column in table.columns
                for chunk in table:
                    df = cleaner.clean(chunk, has_prompt)
                    if dedup is not None:
                        dup = dedup.seen_before(df)
                        dropped_duplicates += int(dup.sum())
                        df = df[~dup].reset_index(drop=True)
                    kept += len(df)
                    if pref.unpaired_rows:
                        labels.update(df["label"].unique().tolist())
                    df[CONVERSATION] = bool(cleaner.conversational)
                    emit(df)
            counts = cleaner.counts
            if dedup is not None:
                counts["dropped_duplicates"] = dropped_duplicates
            if unpaired is not None:
                kept, counts["dropped_without_a_pair"] = unpaired.pairs(lambda df: keep_chunk(split, df, sink, parts),
                                                                        bool(cleaner.conversational))
        counts["rows_kept"] = kept
        stats[split], label_values[split] = counts, labels
        if sink is None:
            columns = ["prompt", "chosen", "rejected"] if pref.paired else cleaner.columns
            out[split] = (pd.concat(parts, ignore_index=True) if parts else
                          pd.DataFrame(columns=columns + [CONVERSATION]))
    _check_learnable(stats, label_values["train"], pref)
    return out, stats


class _UnpairedRows:
    """KTO rows to be paired (preference.pair_unpaired): pairing groups each prompt's completions across
    the whole split, so the cleaned rows go to an Arrow file on disk first, then are read back
    memory-mapped, the prompts as digests, a batch of pairs at a time."""

    def __init__(self, scratch: Path):
        self.path, self.writer, self.digests = scratch / "unpaired.arrow", None, []

    def add(self, df: pd.DataFrame) -> None:
        import pyarrow as pa

        table = pa.Table.from_pandas(df[["prompt", "completion", "label"]], preserve_index=False,
                                     schema=pa.schema([("prompt", pa.string()), ("completion", pa.string()),
                                                       ("label", pa.int64())]))
        if self.writer is None:
            self.writer = pa.ipc.new_file(str(self.path), table.schema)
        self.writer.write_table(table)
        self.digests.append(Duplicates.digests(df[["prompt"]]))

    def pairs(self, sink, conversational: bool) -> tuple[int, int]:
        """Each batch of pairs to sink; returns (pairs, rows left without one)."""
        import numpy as np
        import pandas as pd
        import pyarrow as pa

        if self.writer is None:
            sink(pd.DataFrame(columns=["prompt", "chosen", "rejected", CONVERSATION]))
            return 0, 0
        self.writer.close()
        with pa.memory_map(str(self.path)) as source:
            table = pa.ipc.open_file(source).read_all()
            chosen, rejected, left = pair_up(np.concatenate(self.digests), table["label"].to_numpy())
            if not chosen:
                sink(pd.DataFrame(columns=["prompt", "chosen", "rejected", CONVERSATION]))
            for i in range(0, len(chosen), PAIRS_PER_WRITE):
                good, bad = (table.take(pa.array(x[i:i + PAIRS_PER_WRITE])) for x in (chosen, rejected))
                sink(pd.DataFrame({"prompt": good["prompt"].to_pylist(), "chosen": good["completion"].to_pylist(),
                                   "rejected": bad["completion"].to_pylist(), CONVERSATION: conversational}))
            del table
        return len(chosen), left


def _check_learnable(stats: dict, train_labels: set, pref: PreferenceSection) -> None:
    if not stats["train"]["rows_kept"]:
        if pref.pair_unpaired and stats["train"].get("dropped_without_a_pair"):
            raise RecipeError(f"no prompt has both a desirable and an undesirable completion to pair "
                              f"({stats['train']})", "preference.pair_unpaired",
                              hint="pairs need both kinds of completion for the same prompt")
        if pref.paired and stats["train"].get("dropped_identical_pair"):
            raise RecipeError(f"the chosen and rejected completions are the same on every training row "
                              f"({stats['train']})", "preference.chosen_column",
                              hint="chosen_column and rejected_column must name two different completions")
        raise RecipeError(f"no training rows left after dropping empty ones ({stats['train']})", "data.path")
    if not pref.paired and len(train_labels) < 2:
        kind = "desirable" if int(next(iter(train_labels))) else "undesirable"
        raise RecipeError(f"every training row is {kind}: KTO learns from desirable and undesirable completions",
                          "preference.label_column", hint="include rows of both kinds")
