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
    columns = ({"preference.chosen_column": pref.chosen_column, "preference.rejected_column": pref.rejected_column}
               if pref.paired else
               {"preference.completion_column": pref.completion_column, "preference.label_column": pref.label_column})
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


def _desirable(value) -> bool | None:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None


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
        if pref.paired:
            counts["dropped_identical_pair"] = 0
        rows, conversational = [], None
        for row in df.to_dict(orient="records"):
            parts = [row[pref.chosen_column], row[pref.rejected_column]] if pref.paired else [row[pref.completion_column]]
            p = _prompt_of(row, pref, prompt, has_prompt)
            conv = any(_is_messages(x) for x in parts) or isinstance(p, list)
            field = "preference.chosen_column" if pref.paired else "preference.completion_column"
            if conversational is None:
                conversational = conv
            elif conv != conversational:
                raise RecipeError(f"{split} mixes conversations (lists of messages) and plain text", field)
            if conv:  # a text completion beside messages is the assistant's answer
                parts = [_messages(x, field) if _is_messages(x) else
                         [{"role": "assistant", "content": _as_text(x)}] if _as_text(x) else [] for x in parts]
                if p is None:
                    if not pref.paired:
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
            if pref.paired:
                if texts[1] == texts[2]:
                    counts["dropped_identical_pair"] += 1
                    continue
                rows.append({"prompt": texts[0], "chosen": texts[1], "rejected": texts[2]})
            else:
                desirable = _desirable(row[pref.label_column])
                if desirable is None:
                    raise RecipeError(f"{split} has a label {shorten(repr(row[pref.label_column]), 40)}: KTO labels say "
                                      f"whether the completion is desirable", "preference.label_column",
                                      hint="use true/false, 1/0 or yes/no")
                rows.append({"prompt": texts[0], "completion": texts[1], "label": int(desirable)})
        columns = ["prompt", "chosen", "rejected"] if pref.paired else ["prompt", "completion", "label"]
        cleaned = pd.DataFrame(rows, columns=columns)
        if data.drop_duplicates:
            dup = cleaned.duplicated()
            counts["dropped_duplicates"] = int(dup.sum())
            cleaned = cleaned[~dup]
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
        if pref.paired and stats["train"]["dropped_identical_pair"]:
            raise RecipeError(f"the chosen and rejected completions are the same on every training row "
                              f"({stats['train']})", "preference.chosen_column",
                              hint="chosen_column and rejected_column must name two different completions")
        raise RecipeError(f"no training rows left after dropping empty ones ({stats['train']})", "data.path")
    if not pref.paired and train["label"].nunique() < 2:
        kind = "desirable" if int(train["label"].iloc[0]) else "undesirable"
        raise RecipeError(f"every training row is {kind}: KTO learns from desirable and undesirable completions",
                          "preference.label_column", hint="include rows of both kinds")
