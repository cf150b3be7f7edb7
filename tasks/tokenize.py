"""tokenize: rows into token ids, a datasets DatasetDict on disk. A classifier's text; a causal LM's
prompt (a template, or the tokenizer's chat template) and response, the prompt masked from the loss;
or preference rows: the prompt, and the chosen and rejected completions (KTO: one completion, and
another row's as its KL term). Rows longer than max_length are truncated or dropped, and counted."""
from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from pathlib import Path

from qlora.tasks.pairs import CONVERSATION
from qlora.tasks.recipe import SPLITS, PreferenceSection, PromptSection, RecipeError, TokenizeSection
from qlora.tasks.results import Split, Tokenized, TokenizerFiles
from qlora.tasks.stage import run_logger, stage

# Rows tokenized together: enough for the tokenizer to use every core, few enough that the fast
# tokenizer's encodings and their ids as Python lists (tens of bytes per token) stay small beside the
# Arrow table they go into (benchmarks/data_scale.py: a tenth of the chunk in the stage's peak memory,
# the same speed).
CHUNK_ROWS = 2_000
# What the evaluate stage's generations read from a causal LM's test rows; training and the validation
# loss read input_ids, labels and length, so the other splits do not keep them (half their size).
GENERATION_COLUMNS = ("prompt_ids", "reference", "prompt_text")
# A causal LM's split is tokenized by tokenize.num_proc processes from this many rows: below, starting
# them (each imports the stage's libraries and loads the tokenizer) costs more than they save.
POOL_FROM_ROWS = 80_000


def render_prompt(row: dict, prompt: PromptSection, tok) -> tuple[str, str]:
    """(prompt text, response text) of one row: the template or the chat template; the response
    ends the way the model must learn to stop (end of turn, or end of sequence)."""
    return render_prompts([row], prompt, tok)[0]


def render_prompts(rows: list[dict], prompt: PromptSection, tok) -> list[tuple[str, str]]:
    """render_prompt of many rows; the chat template renders them in one call each for the prompts and
    the whole conversations (the tokenizer's batched form: the same text, about half the time per row)."""
    users = [prompt.template.format(**row) if prompt.template is not None else row[prompt.prompt_column]
             for row in rows]
    if not prompt.chat_template:
        return [(user, row[prompt.response_column] + (tok.eos_token or "")) for user, row in zip(users, rows)]
    if not getattr(tok, "chat_template", None):
        raise RecipeError("the tokenizer has no chat template", "prompt.chat_template",
                          hint="set prompt.chat_template: false and give prompt.template")
    system = [{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []
    conversations = [system + [{"role": "user", "content": user}] for user in users]
    prompt_texts = _render(tok, conversations, add_generation_prompt=True)
    fulls = _render(tok, [c + [{"role": "assistant", "content": row[prompt.response_column]}]
                          for c, row in zip(conversations, rows)])
    return [(prompt_text, full[len(prompt_text):].rstrip("\n") if full.startswith(prompt_text) else
             row[prompt.response_column] + (tok.eos_token or ""))
            for prompt_text, full, row in zip(prompt_texts, fulls, rows)]


def _render(tok, conversations: list[list[dict]], **options) -> list[str]:
    return tok.apply_chat_template(conversations, tokenize=False, **options) if conversations else []


def _tokenize_causal(records: list[dict], tok, cfg: TokenizeSection, prompt: PromptSection, generation: bool = True):
    """input_ids = prompt + response; labels mask the prompt (unless train_on_prompt). Rows longer
    than max_length are truncated (the response's end) or dropped, per tokenize.truncation; rows
    whose prompt alone fills max_length are always dropped. Both counted. `generation`: also the
    columns the evaluate stage's generations read (GENERATION_COLUMNS; the test split's only)."""
    chat = prompt.chat_template
    rows = {"input_ids": [], "labels": [], **({c: [] for c in GENERATION_COLUMNS} if generation else {})}
    counts = {"truncated": 0, "dropped_too_long": 0}
    texts = render_prompts(records, prompt, tok)
    prompts = _ids(tok, [p for p, _ in texts], add_special_tokens=not chat)
    responses = _ids(tok, [r for _, r in texts], add_special_tokens=False)
    for row, (prompt_text, _), p_ids, r_ids in zip(records, texts, prompts, responses):
        if len(p_ids) >= cfg.max_length or (len(p_ids) + len(r_ids) > cfg.max_length and not cfg.truncation):
            counts["dropped_too_long"] += 1
            continue
        if len(p_ids) + len(r_ids) > cfg.max_length:
            counts["truncated"] += 1
            r_ids = r_ids[: cfg.max_length - len(p_ids)]
        rows["input_ids"].append(p_ids + r_ids)
        rows["labels"].append((p_ids if prompt.train_on_prompt else [-100] * len(p_ids)) + r_ids)
        if generation:
            rows["prompt_ids"].append(p_ids)
            rows["reference"].append(row[prompt.response_column])
            rows["prompt_text"].append(prompt_text)
    rows["length"] = [len(ids) for ids in rows["input_ids"]]
    return rows, counts


def _ids(tok, texts: list[str], **options) -> list[list[int]]:
    """Token ids of many texts in one call (a fast tokenizer encodes them on every core)."""
    return tok(texts, verbose=False, **options)["input_ids"] if texts else []


def _tokenize_classification(records: list[dict], tok, cfg: TokenizeSection):
    """The text's ids and the label, in one tokenizer pass. With truncation, a fast tokenizer returns
    each cut text's overflow as extra encodings (`return_overflowing_tokens`), which count the rows it
    cut; a slow one tokenizes again, in full, the rows that came out exactly max_length long."""
    texts = [r["text"] for r in records]
    if cfg.truncation:
        enc = tok(texts, return_token_type_ids=False, truncation=True, max_length=cfg.max_length, verbose=False,
                  padding="max_length" if cfg.padding == "max_length" else False,
                  **({"return_overflowing_tokens": True} if tok.is_fast else {}))
        if tok.is_fast:  # each encoding's text, in order: a text's first encoding is its own, the rest its overflow
            sample = enc["overflow_to_sample_mapping"]
            first = [i for i in range(len(sample)) if i == 0 or sample[i] != sample[i - 1]]
            counts = {"truncated": len({sample[i] for i in range(1, len(sample)) if sample[i] == sample[i - 1]})}
            enc = {k: [enc[k][i] for i in first] for k in ("input_ids", "attention_mask")}
        lengths = [sum(m) for m in enc["attention_mask"]] if cfg.padding == "max_length" else \
            [len(ids) for ids in enc["input_ids"]]
        if not tok.is_fast:
            full = _ids(tok, [t for t, n in zip(texts, lengths) if n == cfg.max_length], return_token_type_ids=False)
            counts = {"truncated": sum(len(ids) > cfg.max_length for ids in full)}
        keep = range(len(texts))
    else:
        enc = tok(texts, return_token_type_ids=False, verbose=False)
        lengths = [len(ids) for ids in enc["input_ids"]]
        keep = [i for i, n in enumerate(lengths) if n <= cfg.max_length]
        counts = {"dropped_too_long": len(texts) - len(keep)}
    ids = enc["input_ids"]
    rows = {"text": [texts[i] for i in keep], "input_ids": [ids[i] for i in keep],
            "labels": [int(records[i]["label"]) for i in keep], "length": [lengths[i] for i in keep]}
    return rows, counts


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


def _tokenize_preference(records: list[dict], tok, cfg: TokenizeSection, prompt: PromptSection,
                         pref: PreferenceSection):
    """Prompt ids and completion ids per row. The prompt keeps its end (past preference.max_prompt_length),
    the completions their start (cut to max_length less the prompt); with tokenize.truncation false such
    rows are dropped instead, as are rows whose prompt alone fills max_length. KTO rows also get the next
    row's completion (within the chunk), truncated alike, as the KL term's completion (fixed here, so the
    reference stage scores it once)."""
    names = ["chosen", "rejected"] if pref.paired else ["completion"]
    rows = {"prompt_ids": [], **{f"{n}_ids": [] for n in names}, "reference": [], "prompt_text": []}
    if not pref.paired:
        rows["label"] = []
    counts = {"truncated": 0, "dropped_too_long": 0}
    rendered = [render_completions(row, [row[n] for n in names], prompt, tok) for row in records]
    plain = [_ids(tok, [p for p, _, chat in rendered if chat == wanted], add_special_tokens=not wanted)
             for wanted in (False, True)]  # prompts rendered by a chat template carry their own special tokens
    each = [iter(ids) for ids in plain]
    prompts = [next(each[chat]) for *_, chat in rendered]
    completions = list(zip(*[_ids(tok, [texts[k] for _, texts, _ in rendered], add_special_tokens=False)
                             for k in range(len(names))]))
    for row, (prompt_text, _, _), p_ids, c_ids in zip(records, rendered, prompts, completions):
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
    if not pref.paired:  # the KL term: each prompt with the next row's completion in its chunk (the last with
        # the first), a mismatched completion as TRL's KTO takes the previous one in its batch
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
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer.path)
    with _tokenizer_threads():
        stats = _tokenize_splits(out, split_result, tok, cfg, prompt, preference, tokenizer.path)
    return Tokenized(stats=stats, label_names=split_result.label_names)


@contextlib.contextmanager
def _tokenizer_threads():
    """The fast tokenizer's batched calls on every core while this stage runs. The CLI turns that off
    for the whole process (tokenizers' documented TOKENIZERS_PARALLELISM), so that a process forked
    after a tokenizer ran does not warn or risk its thread pool; set, and set back afterwards, it
    stays configured and a later fork neither warns nor inherits it on."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = before if before is not None else "false"


def _tokenize_splits(out: Path, split_result: Split, tok, cfg: TokenizeSection, prompt: PromptSection | None,
                     preference: PreferenceSection | None, tokenizer_path: str) -> dict:
    """Each split tokenized and saved under out/dataset; the per-split counts."""
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    splits, stats = {}, {}
    spool = out / "spool"  # each split's rows as tokenized, streamed to disk chunk by chunk
    spool.mkdir()
    with _ChunkPool(cfg.processes(), tokenizer_path, (cfg, prompt, preference)) as pool:
        for name in SPLITS:
            source = pq.ParquetFile(split_result.file(f"{name}.parquet"))
            # In chunks: the Python lists of one chunk's ids in memory at a time, memory flat in the data's size.
            chunks = source.iter_batches(batch_size=CHUNK_ROWS)
            # Prompt/response and preference rows: most of their time is each row's (chat) template rendered
            # in Python, which the processes share out. A classifier's texts go to the tokenizer in one batched
            # call that already runs on every core; shipping chunks to processes only added to it (measured).
            in_pool = prompt is not None and source.metadata.num_rows > POOL_FROM_ROWS
            counts, tokens, writer, schema = Counter(), 0, None, None
            for table, counted in pool.map(chunks, tok, in_pool, generation=name == "test"):
                counts.update(counted)
                if table is None:
                    continue
                tokens += pc.sum(table["length"]).as_py()
                if writer is None:  # every chunk as the first (a chunk can infer other types, e.g. of empty lists)
                    schema = table.schema
                    writer = pa.ipc.new_stream(str(spool / f"{name}.arrow"), schema)
                writer.write_table(table.cast(schema) if table.schema != schema else table)
            if writer is None:
                raise RecipeError(f"every {name} row is longer than max_length={cfg.max_length}",
                                  "tokenize.max_length", hint="raise it or set tokenize.truncation: true")
            writer.close()
            ds = splits[name] = Dataset.from_file(str(spool / f"{name}.arrow"))  # memory-mapped
            stats[name] = {"rows": len(ds), **{k: counts[k] for k in counted}, "tokens": int(tokens),
                           "mean_length": round(tokens / len(ds), 1)}
    DatasetDict(splits).save_to_disk(str(out / "dataset"))
    shutil.rmtree(spool)
    return stats


def _tokenize_chunk(batch, tok, cfg: TokenizeSection, prompt: PromptSection | None,
                    preference: PreferenceSection | None, generation: bool = True):
    """One chunk of a split (an Arrow record batch): its tokenized rows as an Arrow table (None when
    every row was dropped) and its counts. `generation`: a causal LM's generation columns too."""
    import pyarrow as pa

    records = batch.to_pylist()
    if preference is not None:
        rows, counted = _tokenize_preference(records, tok, cfg, prompt or PromptSection(), preference)
    elif prompt is None:
        rows, counted = _tokenize_classification(records, tok, cfg)
    else:
        rows, counted = _tokenize_causal(records, tok, cfg, prompt, generation)
    return (pa.Table.from_pydict(rows) if rows["length"] else None), dict(counted)


class _ChunkPool:
    """Chunks tokenized by tokenize.num_proc worker processes, results in the chunks' order, a few
    chunks ahead at most (memory stays flat). Workers are spawned (a fork of a process running threads
    can inherit a held lock) on the first split that needs them, each loading the tokenizer once and
    running it single-threaded: the processes are the parallelism. Where they cannot start (a script
    that calls the flow outside an `if __name__ == "__main__":` block cannot be spawned), the chunks
    are tokenized in this process, saying so."""

    def __init__(self, processes: int, tokenizer_path: str, job: tuple):
        self.processes, self.tokenizer_path, self.job, self.pool = processes, tokenizer_path, job, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def started(self) -> bool:
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool
        from multiprocessing import get_context

        if self.pool is None and self.processes > 1:
            self.pool = ProcessPoolExecutor(self.processes, mp_context=get_context("spawn"),
                                            initializer=_start_worker, initargs=(self.tokenizer_path,))
            try:
                self.pool.submit(os.getpid).result()
            except BrokenProcessPool as e:
                run_logger().warning("tokenize: worker processes could not start (%s); tokenizing in this process "
                                     "(tokenize.num_proc: 1 says so up front)", e)
                self.pool.shutdown(cancel_futures=True)
                self.pool, self.processes = None, 1
        return self.pool is not None

    def map(self, chunks, tok, parallel: bool, generation: bool):
        """(table, counts) of each chunk, in order: by the workers when parallel, else in this process with tok."""
        from collections import deque

        job = (*self.job, generation)
        if not (parallel and self.started()):
            yield from (_tokenize_chunk(b, tok, *job) for b in chunks)
            return
        pending = deque()
        for batch in chunks:
            pending.append(self.pool.submit(_worker_chunk, batch, job))
            if len(pending) > 2 * self.processes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_worker_tokenizer = None


def _start_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _worker_tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)


def _worker_chunk(batch, job: tuple):
    return _tokenize_chunk(batch, _worker_tokenizer, *job)
