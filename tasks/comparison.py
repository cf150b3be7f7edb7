"""Adapter vs merged variants, side by side: task metrics, agreement with the adapter's predictions,
latency, throughput, memory and size. One table (MLflow table artifact + CSV), one chart, and a
nested MLflow run per variant so the MLflow compare view lines them up."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qlora.tasks.recipe import RecipeError
from qlora.tasks.results import Evaluated

if TYPE_CHECKING:  # imported where used: a cached run never loads pandas
    import pandas as pd

VARIANTS = ["adapter", "merged-dequant", "merged-original", "merged-4bit"]
TABLE_FILE = "comparison/variants.json"
COLUMNS = ["variant", "dtype", "accuracy", "f1_macro", "agreement_pct", "max_abs_logit_diff", "latency_p50_ms",
           "latency_p95_ms", "throughput_per_s", "peak_memory_mb", "weights_mb", "size_mb", "deploy_size_mb"]
# A causal LM: held-out loss and ROUGE; agreement = identical greedy continuations of the same
# prompts; logits = the next-token logits at the end of those prompts.
CAUSAL_COLUMNS = ["variant", "dtype", "loss", "perplexity", "rougeL", "agreement_pct", "max_abs_logit_diff",
                  "generation_s_per_example", "peak_memory_mb", "weights_mb", "size_mb", "deploy_size_mb"]


def _logits(frame: pd.DataFrame) -> np.ndarray:
    return frame[[c for c in frame.columns if c.startswith("logit_")]].to_numpy(dtype=np.float64)


def agreement(reference: pd.DataFrame, other: pd.DataFrame, reference_logits: np.ndarray | None = None,
              other_logits: np.ndarray | None = None) -> dict[str, float]:
    """% of identical predictions (labels, or greedy continuations), and the largest logit difference,
    over the same rows."""
    column = "prediction" if "prediction" in reference else "greedy"
    same = (reference[column].to_numpy() == other[column].to_numpy()).mean()
    if reference_logits is None:
        reference_logits, other_logits = _logits(reference), _logits(other)
    diff = np.abs(reference_logits.astype(np.float64) - other_logits.astype(np.float64)).max()
    return {"agreement_pct": 100 * float(same), "max_abs_logit_diff": float(diff)}


def _read(result: Evaluated) -> tuple[pd.DataFrame, np.ndarray | None]:
    import pandas as pd

    logits = np.load(result.file(result.logits)) if result.logits else None
    return pd.read_parquet(result.file(result.predictions)), logits


def comparison_table(evaluations: dict[str, Evaluated], sizes: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """evaluations: variant -> evaluate-stage result; sizes: variant -> (artifact bytes, deploy bytes)."""
    import pandas as pd

    reference, reference_logits = _read(evaluations["adapter"])
    causal = "greedy" in reference
    rows = []
    for variant in [v for v in VARIANTS if v in evaluations]:
        result = evaluations[variant]
        m = result.metrics
        preds, logits = _read(result)
        row = {"variant": variant, "dtype": result.dtype, **agreement(reference, preds, reference_logits, logits),
               "peak_memory_mb": m["peak_memory_bytes"] / 2**20, "weights_mb": m["weights_bytes"] / 2**20,
               "size_mb": sizes[variant][0] / 2**20, "deploy_size_mb": sizes[variant][1] / 2**20}
        if causal:
            row.update({k: m.get(k) for k in ("loss", "perplexity", "rougeL", "generation_s_per_example")})
            row.update({k: v for k, v in m.items() if k.startswith("harness.")})  # evaluate.harness's figures
        else:
            row.update(accuracy=m["accuracy"], f1_macro=m.get("f1_macro"), latency_p50_ms=m["latency_p50_ms"],
                       latency_p95_ms=m["latency_p95_ms"], throughput_per_s=m["examples_per_s"])
        rows.append(row)
    harness = sorted({k for row in rows for k in row if k.startswith("harness.")})
    return pd.DataFrame(rows, columns=(CAUSAL_COLUMNS + harness) if causal else COLUMNS)


def comparison_chart(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "accuracy" in table:
        panels = [("accuracy", "test accuracy"), ("agreement_pct", "agreement with adapter (%)"),
                  ("latency_p50_ms", "latency p50, batch 1 (ms)"), ("deploy_size_mb", "deploy size (MB)")]
    else:
        panels = [("loss", "held-out loss"), ("agreement_pct", "identical greedy continuations (%)"),
                  ("generation_s_per_example", "generation (s per example)"), ("deploy_size_mb", "deploy size (MB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (column, title) in zip(axes, panels):
        ax.bar(table["variant"], table[column], color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"][: len(table)])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        if column in ("accuracy", "agreement_pct"):
            low = float(table[column].min())
            ax.set_ylim(max(0.0, low - (5 if column == "agreement_pct" else 0.05)), None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(table: pd.DataFrame) -> str:
    import pandas as pd

    shown = table.copy()
    for column, digits in (("accuracy", 4), ("f1_macro", 4), ("agreement_pct", 2), ("max_abs_logit_diff", 4),
                           ("latency_p50_ms", 2), ("latency_p95_ms", 2), ("throughput_per_s", 1), ("loss", 4),
                           ("perplexity", 2), ("rougeL", 4), ("generation_s_per_example", 3),
                           ("peak_memory_mb", 1), ("weights_mb", 1), ("size_mb", 1), ("deploy_size_mb", 1)):
        if column in shown:
            shown[column] = shown[column].map(lambda v, d=digits: "" if pd.isna(v) else f"{v:.{d}f}")
    return shown.to_string(index=False)


# --- reading back from MLflow -----------------------------------------------------------------

def load_comparison(client, run_id: str) -> pd.DataFrame:
    """The variant table of a run, read back from MLflow; a clear error when it has none."""
    import json
    import tempfile

    import pandas as pd
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RecipeError(f"no MLflow run with id {run_id} in this tracking store", "RUN_ID") from None
    recipe = run.data.params.get("name", "RECIPE")
    names = [a.path for a in client.list_artifacts(run_id, "comparison")]
    if TABLE_FILE not in names:
        if not any(k.startswith("merged_test_") for k in run.data.metrics):
            raise RecipeError(f"run {run_id} has no merged model", "RUN_ID",
                              hint=f"make one with: qlora run recipes/{recipe}.yaml --set merge.enabled=true "
                                   f"--set merge.compare=true")
        raise RecipeError(f"run {run_id} merged without measuring the variants", "RUN_ID",
                          hint=f"measure them with: qlora run recipes/{recipe}.yaml --set merge.compare=true")
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, TABLE_FILE, tmp)
        data = json.loads(Path(local).read_text())
    table = pd.DataFrame(data["data"], columns=data["columns"])
    table.insert(0, "run", run_id[:8])
    return table


def check_comparable(runs: list) -> None:
    """Runs compared side by side must share the task and the label set."""
    first = runs[0]
    for other in runs[1:]:
        for key in ("model.task", "qlora.labels"):
            a = first.data.params.get(key) or first.data.tags.get(key)
            b = other.data.params.get(key) or other.data.tags.get(key)
            if a != b:
                raise RecipeError(f"runs {first.info.run_id[:8]} and {other.info.run_id[:8]} differ in "
                                  f"{key.split('.')[-1]} ({a} vs {b}): their metrics are not comparable", "RUN_ID")
