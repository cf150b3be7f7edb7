"""tokenize: rows into token ids, a datasets DatasetDict on disk. A classifier's text; a causal LM's
prompt (a template, or the tokenizer's chat template) and response, the prompt masked from the loss.
Rows longer than max_length are truncated or dropped, and counted."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qlora.tasks.recipe import SPLITS, PromptSection, RecipeError, TokenizeSection
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


@stage("tokenize")
def tokenize(out: Path, split_result: Split, tokenizer: TokenizerFiles, cfg: TokenizeSection,
             prompt: PromptSection | None = None) -> Tokenized:
    """Classification rows (prompt None), or causal-lm prompt/response rows."""
    import pandas as pd
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer.path)
    splits, stats = {}, {}
    for name in SPLITS:
        df = pd.read_parquet(split_result.file(f"{name}.parquet"))
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
    return Tokenized(stats=stats, label_names=split_result.label_names)
