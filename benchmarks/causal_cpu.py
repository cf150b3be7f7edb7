"""chat-smollm2 on CPU: before vs after training, packing vs padding, and the merge variants,
side by side in one run.

    python benchmarks/causal_cpu.py [--train-rows 600] [--epochs 1]

Runs the chat-smollm2 recipe twice in one project (shared cached stages: GGUF conversion, data,
quantized base): once with packing (one 256-token row of several examples per step) and once with
every example padded to max_length, as the tutorial recipe pads (four examples per step), so both
take about the same number of optimizer steps over the same examples. Prints held-out loss and
ROUGE-L before and after training, real (non-pad) tokens per second, and for the packed run the
adapter vs merged variants (identical greedy continuations, max next-token logit difference).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(project: Path, *overrides: str) -> dict:
    args = [sys.executable, "-m", "qlora.cli", "run", str(REPO / "recipes" / "chat-smollm2.yaml"), "--json",
            str(project / "summary.json")] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "QLORA_PROGRESS": "0", "PREFECT_HOME": str(project / ".prefect")}
    done = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-4000:])
    return json.loads((project / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-rows", type=int, default=600)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--project")
    args = parser.parse_args()
    common = [f"data.sample.train={args.train_rows}", f"train.num_train_epochs={args.epochs}"]
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(args.project or tmp)
        project.mkdir(parents=True, exist_ok=True)
        packed = run(project, *common, "tokenize.packing=true", "train.per_device_train_batch_size=1",
                     "merge.enabled=true", "merge.compare=true")
        padded = run(project, *common, "tokenize.packing=false", "tokenize.padding=max_length",
                     "train.per_device_train_batch_size=4", "merge.enabled=false")
    rows = []
    for name, s in (("packed", packed), ("padded", padded)):
        t, m, b = s["train"], s["test_metrics"], s["base_test_metrics"]
        rows.append((name, t.steps, t.train_samples / t.steps, t.train_runtime_s, t.tokens_per_s,
                     b["loss"], m["loss"], b["rougeL"], m["rougeL"]))
    print(f"\nchat-smollm2 on CPU ({os.cpu_count()} cores), {args.train_rows} training pairs, {args.epochs} epoch(s)")
    print(f"{'run':<8}{'steps':>7}{'ex/step':>8}{'train s':>9}{'tokens/s':>10}{'loss before':>13}{'loss after':>12}"
          f"{'ROUGE-L before':>16}{'ROUGE-L after':>15}")
    for r in rows:
        print(f"{r[0]:<8}{r[1]:>7}{r[2]:>8.1f}{r[3]:>9.0f}{r[4]:>10.1f}{r[5]:>13.4f}{r[6]:>12.4f}{r[7]:>16.4f}{r[8]:>15.4f}")
    (*_, tps_p, _, loss_p, _, _), (*_, tps_d, _, loss_d, _, _) = rows
    print(f"\npacking: real tokens/s {tps_p / tps_d:.2f}x the padded run's (target >= 2x); held-out loss "
          f"{100 * (loss_p - loss_d) / loss_d:+.2f}% vs padded (target <= +2%)")

    if packed.get("comparison"):
        import pandas as pd

        from qlora.tasks.comparison import format_table

        print("\nmerge variants of the packed run (same held-out prompts, greedy decoding)")
        print(format_table(pd.DataFrame(packed["comparison"])))


if __name__ == "__main__":
    main()
