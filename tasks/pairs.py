"""Preference rows as the load stage keeps them: a prompt with a chosen and a rejected completion (or,
for KTO, one completion and whether it is desirable), from plain text or from conversations (lists of
role/content messages, as TRL documents its datasets). Conversations without a prompt column are
split at the first turn where chosen and rejected differ (Anthropic HH-style data); messages are kept
as JSON text until the tokenizer's chat template renders them. Every dropped row is counted."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

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


def pair_up(rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Unpaired rows (prompt, completion, label) as pairs: each prompt's desirable and undesirable
    completions shuffled (a fixed seed) and zipped. Returns the pairs and the rows left without one."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    pairs, left = [], 0
    for prompt, group in rows.groupby("prompt", sort=False):
        good = group.loc[group["label"] == 1, "completion"].tolist()
        bad = group.loc[group["label"] == 0, "completion"].tolist()
        rng.shuffle(good)
        rng.shuffle(bad)
        n = min(len(good), len(bad))
        pairs += [{"prompt": prompt, "chosen": c, "rejected": r} for c, r in zip(good[:n], bad[:n])]
        left += len(good) + len(bad) - 2 * n
    return pd.DataFrame(pairs, columns=["prompt", "chosen", "rejected"]), left


def clean_preference(frames: dict[str, pd.DataFrame], data: DataSection, pref: PreferenceSection,
                     prompt: PromptSection):
    """Each split as prompt/chosen/rejected (paired losses) or prompt/completion/label (kto), text or JSON
    messages; rows with an empty part, identical chosen and rejected, or (optionally) duplicates dropped and
    counted. A mistake that leaves nothing to learn is one error naming its field."""
    import pandas as pd

    out, stats = {}, {}
    for split, df in frames.items():
        has_prompt = prompt.template is not None or pref.prompt_column in df.columns
        counts = {"rows_read": len(df), "dropped_empty_text": 0}
        if pref.unpaired_rows and (pref.desirable_labels and pref.undesirable_labels):
            counts["dropped_other_label"] = 0
        if not pref.unpaired_rows:
            counts["dropped_identical_pair"] = 0
        rows, conversational = [], None
        for row in df.to_dict(orient="records"):
            parts = [row[pref.completion_column]] if pref.unpaired_rows else [row[pref.chosen_column], row[pref.rejected_column]]
            p = _prompt_of(row, pref, prompt, has_prompt)
            conv = any(_is_messages(x) for x in parts) or isinstance(p, list)
            field = "preference.completion_column" if pref.unpaired_rows else "preference.chosen_column"
            if conversational is None:
                conversational = conv
            elif conv != conversational:
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
                continue
            if pref.unpaired_rows:
                desirable = _desirable(row[pref.label_column], pref)
                if desirable is None and "dropped_other_label" in counts:
                    counts["dropped_other_label"] += 1
                    continue
                if desirable is None:
                    raise RecipeError(f"{split} has a label {shorten(repr(row[pref.label_column]), 40)}: labels say "
                                      f"whether the completion is desirable", "preference.label_column",
                                      hint="use true/false, 1/0 or yes/no, or name the values in "
                                           "preference.desirable_labels and undesirable_labels")
                rows.append({"prompt": texts[0], "completion": texts[1], "label": int(desirable)})
            else:
                if texts[1] == texts[2]:
                    counts["dropped_identical_pair"] += 1
                    continue
                rows.append({"prompt": texts[0], "chosen": texts[1], "rejected": texts[2]})
        columns = ["prompt", "completion", "label"] if pref.unpaired_rows else ["prompt", "chosen", "rejected"]
        cleaned = pd.DataFrame(rows, columns=columns)
        if data.drop_duplicates:
            dup = cleaned.duplicated()
            counts["dropped_duplicates"] = int(dup.sum())
            cleaned = cleaned[~dup]
        if pref.pair_unpaired:
            cleaned, counts["dropped_without_a_pair"] = pair_up(cleaned)
        cleaned = cleaned.reset_index(drop=True)
        cleaned[CONVERSATION] = bool(conversational)
        out[split] = cleaned
        counts["rows_kept"] = len(cleaned)
        stats[split] = counts
    _check_learnable(out, stats, pref)
    return out, stats


def _check_learnable(out: dict, stats: dict, pref: PreferenceSection) -> None:
    train = out["train"]
    if not len(train):
        if pref.pair_unpaired and stats["train"].get("dropped_without_a_pair"):
            raise RecipeError(f"no prompt has both a desirable and an undesirable completion to pair "
                              f"({stats['train']})", "preference.pair_unpaired",
                              hint="pairs need both kinds of completion for the same prompt")
        if pref.paired and stats["train"].get("dropped_identical_pair"):
            raise RecipeError(f"the chosen and rejected completions are the same on every training row "
                              f"({stats['train']})", "preference.chosen_column",
                              hint="chosen_column and rejected_column must name two different completions")
        raise RecipeError(f"no training rows left after dropping empty ones ({stats['train']})", "data.path")
    if not pref.paired and train["label"].nunique() < 2:
        kind = "desirable" if int(train["label"].iloc[0]) else "undesirable"
        raise RecipeError(f"every training row is {kind}: KTO learns from desirable and undesirable completions",
                          "preference.label_column", hint="include rows of both kinds")
