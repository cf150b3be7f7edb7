"""tokenize: rows into token ids, a datasets DatasetDict on disk. A classifier's text; a causal LM's
prompt (a template, or the tokenizer's chat template) and response, the prompt masked from the loss;
or preference rows: the prompt, and the chosen and rejected completions (KTO: one completion, and
another row's as its KL term). Rows longer than max_length are truncated or dropped, and counted."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.tasks.pairs import CONVERSATION
from qlora.tasks.recipe import SPLITS, PreferenceSection, PromptSection, RecipeError, TokenizeSection
from qlora.tasks.results import Split, Tokenized, TokenizerFiles
from qlora.tasks.stage import stage

if TYPE_CHECKING:
    import pandas as pd


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
    texts, labels = df["text"].tolist(), df["label"].astype(int).tolist()  # columns fetched once, not per row
    rows = {"text": [texts[i] for i in keep],
            "input_ids": [enc["input_ids"][i] for i in keep],
            "labels": [labels[i] for i in keep],
            "length": [sum(enc["attention_mask"][i]) for i in keep]}
    return rows, {"truncated" if cfg.truncation else "dropped_too_long": too_long}


def _chat(tok, messages: list[dict], system_prompt: str | None, generation_prompt: bool) -> str:
    if not getattr(tok, "chat_template", None):
        raise RecipeError("the tokenizer has no chat template to render conversations", "prompt.chat_template",
                          hint="give the prompt and completions as plain text, or use a model with a chat template")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_completions(row: dict, completions: list[str], prompt: PromptSection, tok) -> tuple[str, list[str], bool]:
    """(prompt text, completion texts, chat-rendered): conversations (JSON messages) and, with
    prompt.chat_template, plain text through the chat template; plain text otherwise, each completion
    ending with end-of-sequence."""
    conversation = bool(row[CONVERSATION])
    if not conversation and not prompt.chat_template:
        return row["prompt"], [c + (tok.eos_token or "") for c in completions], False
    if conversation:
        messages = json.loads(row["prompt"])
        answers = [json.loads(c) for c in completions]
    else:
        messages = [{"role": "user", "content": row["prompt"]}]
        answers = [[{"role": "assistant", "content": c}] for c in completions]
    prompt_text = _chat(tok, messages, prompt.system_prompt, True)
    texts = []
    for answer in answers:
        full = _chat(tok, messages + answer, prompt.system_prompt, False)
        texts.append(full[len(prompt_text):].rstrip("\n") if full.startswith(prompt_text) else
                     "".join(m["content"] for m in answer) + (tok.eos_token or ""))
    return prompt_text, texts, True


def _answer_text(value: str, conversation: bool) -> str:
    """A completion as a reader sees it (the reference of generated answers)."""
    return "\n".join(m["content"] for m in json.loads(value)) if conversation else value


def _tokenize_preference(df: pd.DataFrame, tok, cfg: TokenizeSection, prompt: PromptSection, pref: PreferenceSection):
    """Prompt ids and completion ids per row. The prompt keeps its end (past preference.max_prompt_length),
    the completions their start (cut to max_length less the prompt); with tokenize.truncation false such
    rows are dropped instead, as are rows whose prompt alone fills max_length. KTO rows also get the next
    row's completion, truncated alike, as the KL term's completion (fixed here, so the reference stage
    scores it once)."""
    names = ["chosen", "rejected"] if pref.paired else ["completion"]
    rows = {"prompt_ids": [], **{f"{n}_ids": [] for n in names}, "reference": [], "prompt_text": []}
    if not pref.paired:
        rows["label"] = []
    counts = {"truncated": 0, "dropped_too_long": 0}
    for row in df.to_dict(orient="records"):
        prompt_text, texts, chat = render_completions(row, [row[n] for n in names], prompt, tok)
        p_ids = tok(prompt_text, add_special_tokens=not chat)["input_ids"]
        c_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        cut = False
        if pref.max_prompt_length and len(p_ids) > pref.max_prompt_length:
            p_ids, cut = p_ids[-pref.max_prompt_length:], True
        room = cfg.max_length - len(p_ids)
        if room <= 0 or ((cut or any(len(c) > room for c in c_ids)) and not cfg.truncation):
            counts["dropped_too_long"] += 1
            continue
        if cut or any(len(c) > room for c in c_ids):
            counts["truncated"] += 1
        rows["prompt_ids"].append(p_ids)
        for n, c in zip(names, c_ids):
            rows[f"{n}_ids"].append(c[:room])
        rows["prompt_text"].append(prompt_text)
        rows["reference"].append(_answer_text(row[names[0]], bool(row[CONVERSATION])))
        if not pref.paired:
            rows["label"].append(int(row["label"]))
    if not pref.paired:  # the KL term: each prompt with the next row's completion (the last with the first)
        completions = rows["completion_ids"]
        rows["kl_ids"] = [completions[(i + 1) % len(completions)][:cfg.max_length - len(p)]
                          for i, p in enumerate(rows["prompt_ids"])]
    parts = [rows[f"{n}_ids"] for n in names] + ([] if pref.paired else [rows["kl_ids"]])
    rows["length"] = [len(p) + max(len(c) for c in cs) for p, *cs in zip(rows["prompt_ids"], *parts)]
    return rows, counts


@stage("tokenize")
def tokenize(out: Path, split_result: Split, tokenizer: TokenizerFiles, cfg: TokenizeSection,
             prompt: PromptSection | None = None, preference: PreferenceSection | None = None) -> Tokenized:
    """Classification rows (prompt None), causal-lm prompt/response rows, or preference rows."""
    import pandas as pd
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer.path)
    splits, stats = {}, {}
    for name in SPLITS:
        df = pd.read_parquet(split_result.file(f"{name}.parquet"))
        if preference is not None:
            rows, counts = _tokenize_preference(df, tok, cfg, prompt or PromptSection(), preference)
        elif prompt is None:
            rows, counts = _tokenize_classification(df, tok, cfg)
        else:
            rows, counts = _tokenize_causal(df, tok, cfg, prompt)
        ds = Dataset.from_dict(rows)
        if not len(ds):
            raise RecipeError(f"every {name} row is longer than max_length={cfg.max_length}",
                              "tokenize.max_length", hint="raise it or set tokenize.truncation: true")
        splits[name] = ds
        stats[name] = {"rows": len(ds), **counts, "tokens": int(sum(rows["length"])),
                       "mean_length": round(sum(rows["length"]) / len(ds), 1)}
    DatasetDict(splits).save_to_disk(str(out / "dataset"))
    return Tokenized(stats=stats, label_names=split_result.label_names)
