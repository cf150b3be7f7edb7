"""AG News on MiniLM: merge variants against the adapter, and QLoRA vs LoRA vs full fine-tuning,
all measured in one `qlora methods` run of the agnews-minilm recipe.

    python benchmarks/merge_and_methods.py --data ../shared/data/ag_news

Prints the variant table (agreement, accuracy, latency at batch 1, size) and the method table
(trainable parameters, peak training memory, training time, accuracy), then the targets.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ag_news"))
    parser.add_argument("--project", help="project directory to run in (default: a temporary one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for all three runs, e.g. train.num_train_epochs=1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(args.project or tmp)
        project.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "QLORA_PROGRESS": "0", "PREFECT_HOME": str(project / ".prefect")}
        done = subprocess.run([sys.executable, "-m", "qlora.cli", "methods", str(REPO / "recipes" / "agnews-minilm.yaml"),
                               "--set", f"data.path={Path(args.data).resolve()}",
                               *[a for o in args.overrides for a in ("--set", o)]], cwd=project, env=env,
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-4000:])
        print(done.stdout, flush=True)
        parent = done.stdout.strip().splitlines()[-1].split()[3]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
        raw = json.loads(Path(client.download_artifacts(parent, "methods/table.json", tmp)).read_text())
        methods = pd.DataFrame(raw["data"], columns=raw["columns"])
        qlora_run = methods.set_index("method").loc["qlora", "run_id"]
        variants = None
        if "comparison/variants.json" in {a.path for a in client.list_artifacts(qlora_run, "comparison")}:
            raw = json.loads(Path(client.download_artifacts(qlora_run, "comparison/variants.json", tmp)).read_text())
            variants = pd.DataFrame(raw["data"], columns=raw["columns"]).set_index("variant")
    pd.set_option("display.width", 200)
    m = methods.set_index("method")
    if variants is not None:
        print("\nMerge variants (agnews-minilm, QLoRA run; CPU, one process, same test split)")
        print(variants.round(4).to_string())
        a, d = variants.loc["adapter"], variants.loc["merged-dequant"]
        print(f"  merged-dequant agreement with adapter: {d['agreement_pct']:.2f}% (>= 99.5%)")
        print(f"  merged-dequant accuracy - adapter: {100 * (d['accuracy'] - a['accuracy']):+.2f} points (within 0.3)")
        print(f"  adapter / merged-dequant latency p50 at batch 1: {a['latency_p50_ms'] / d['latency_p50_ms']:.2f}x (>= 1.2x)")
    print("\nMethods (same recipe, one switch apart)")
    print(methods.drop(columns=["run_id"]).round(4).to_string(index=False))
    print(f"  QLoRA - LoRA test accuracy: {100 * (m.loc['qlora', 'accuracy'] - m.loc['lora', 'accuracy']):+.2f} points "
          f"(within 1.5)")


if __name__ == "__main__":
    main()
