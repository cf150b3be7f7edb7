"""Evaluate: a trained model (the quantized base plus its adapter, or a merged model) on the test
split, scored by `evaluate` metric modules; predictions, a confusion matrix and latency kept."""
from __future__ import annotations

import difflib
import json
import re
import time
from pathlib import Path
from typing import Union

import numpy as np

from qlora.tasks.batches import collate, pad_token_id
from qlora.tasks.inference import completion_scores, lm_loss, predict_logits
from qlora.tasks.measure import PeakMemory, weights_bytes
from qlora.tasks.recipe import EvaluateSection, PreferenceSection, QuantizationSection, RecipeError
from qlora.tasks.judge import judge_scores, win_rate
from qlora.tasks.results import (Evaluated, HarnessTasks, JudgeModel, Merged, Quantized, ReferenceScores,
                                 StartingAdapter, Tokenized, Trained, UntrainedBase)
from qlora.tasks.stage import stage
from qlora.tasks.training import loading
from qlora.tasks.training.preference import PAIR_METRICS, UNPAIRED_METRICS, preference_metrics


Variant = Union[Trained, Merged, UntrainedBase, StartingAdapter]
METRICS_DIR = Path(__file__).parent / "metrics"
# How each bundled metric is called: macro average, and per class where it has one.
PER_CLASS = {"f1", "precision", "recall"}


def metric_path(name: str) -> Path:
    path = METRICS_DIR / f"{name}.py" if (METRICS_DIR / f"{name}.py").is_file() else Path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in METRICS_DIR.glob("*.py")))
        raise RecipeError(f"unknown metric '{name}'", "evaluate.metrics",
                          hint=f"bundled: {known}; or the path of an evaluate metric script")
    return path


def check_metrics(cfg: EvaluateSection, task: str) -> None:
    """Every metric names a bundled module, or a script the recipe trusts that loads (it is run to
    see: a broken script fails here, not after training)."""
    for name in cfg.metric_names(task):
        path = metric_path(name)
        if path.parent == METRICS_DIR:
            continue
        if not cfg.trust_metric_code:
            raise RecipeError(f"'{name}' is a Python file, run as code to score the model", "evaluate.metrics",
                              hint="set evaluate.trust_metric_code: true for a script you trust")
        _load_metric(path, name)


def _load_metric(path: Path, name: str):
    import evaluate

    try:
        return evaluate.load(str(path.resolve()))
    except Exception as e:  # noqa: BLE001 - the user's script: whatever it raises is theirs to fix
        message = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise RecipeError(f"metric script {name} cannot be loaded: {type(e).__name__}: {message[:200]}",
                          "evaluate.metrics") from None


def logged_metrics(recipe) -> set[str] | None:
    """The test metrics a run of this recipe logs to MLflow (None when a custom metric script makes
    the set unknowable before running)."""
    task = recipe.model.task
    names: set[str] = {"loss"}
    for metric in recipe.evaluate.metric_names(task):
        stem = Path(metric).stem
        if not (METRICS_DIR / f"{stem}.py").is_file() or Path(metric).suffix:
            return None
        if stem in PER_CLASS:
            names |= {f"{stem}_macro"} | {f"{stem}_{key}" for key in label_keys(recipe.model.labels or [])}
        elif stem == "rouge":
            names |= {"rouge1", "rouge2", "rougeL", "rougeLsum"}
        else:
            names.add(stem)
    if task == loading.CAUSAL:
        if recipe.evaluate.judge.model is not None:
            names |= {"judge_rate", "judge_score", "judged_examples", "judge_win_rate"}
        if recipe.preference.enabled:
            names |= set(PAIR_METRICS if recipe.preference.paired else UNPAIRED_METRICS)
        if recipe.evaluate.generation.temperature:
            names |= {f"sampled_{n}" for n in names if n.startswith("rouge")}
        names |= {"generation_s_per_example"} | (set() if recipe.preference.enabled else {"perplexity"})
    else:
        names |= {"examples_per_s", "latency_p50_ms", "latency_p95_ms"}
    prefixes = ["test_"] + (["merged_test_"] if recipe.merge.enabled and recipe.lora.enabled else [])
    return {p + n for p in prefixes for n in names}


def check_promotion(recipe) -> None:
    """A promotion metric the evaluation does not produce is an error before anything runs."""
    promotion = recipe.tracking.promotion
    if not promotion.enabled:
        return
    if not recipe.tracking.register_models:
        raise RecipeError("promotion needs registered models", "tracking.register_models",
                          hint="set tracking.register_models: true")
    if promotion.model == "merged" and not (recipe.merge.enabled and recipe.lora.enabled):
        raise RecipeError("promotion of the merged model, but the recipe does not merge", "tracking.promotion.model",
                          hint="set merge.enabled: true, or promotion.model: adapter")
    known = logged_metrics(recipe)
    per_class = tuple(f"_{key}" for key in label_keys(recipe.model.labels or [])) or ("\0",)
    metric = promotion.metric_for(recipe.merge.enabled and recipe.lora.enabled, recipe.model.task)
    if known is not None and metric not in known:
        close = difflib.get_close_matches(metric, sorted(known), n=1)
        raise RecipeError(f"the evaluation does not produce '{metric}'"
                          + (f" (did you mean '{close[0]}'?)" if close else ""), "tracking.promotion.metric",
                          hint="logged: " + ", ".join(sorted(k for k in known if not k.endswith(per_class))))


def compute_metrics(names: list[str], predictions, references, label_names: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        metric = _load_metric(metric_path(name), name)
        if Path(name).stem in PER_CLASS:
            key = Path(name).stem
            labels = list(range(len(label_names)))
            out[f"{key}_macro"] = metric.compute(predictions=predictions, references=references,
                                                 labels=labels, average="macro")[key]
            per_class = metric.compute(predictions=predictions, references=references, labels=labels, average=None)[key]
            out.update({f"{key}_{label}": v for label, v in zip(label_keys(label_names), per_class)})
        else:
            out.update({metric_key(k): v for k, v in metric.compute(predictions=predictions, references=references).items()})
    return {k: float(v) for k, v in out.items()}


# MLflow's metric names: word characters, '.', '-', ' ', ':' and '/' ('/' left out here: a path
# MLflow normalises, "a/../b", is refused), at most 250 characters.
_METRIC_NAME_CHARACTER = re.compile(r"[\w.\- :]")
MAX_LABEL_KEY = 180  # room for merged_test_precision_ before MLflow's 250


def metric_key(text: str, limit: int = MAX_LABEL_KEY) -> str:
    """A name MLflow takes as a metric key: other characters (emoji, '&', '!') become '_'."""
    return "".join(c if _METRIC_NAME_CHARACTER.fullmatch(c) else "_" for c in str(text))[:limit] or "_"


def label_keys(label_names: list[str]) -> list[str]:
    """Each class's part of its per-class metric names (test_f1_LABEL): the label where MLflow takes
    it, else made safe; labels that become the same key get their class id appended."""
    keys = [metric_key(n) for n in label_names]
    clashing = {k for k in keys if keys.count(k) > 1}
    return [f"{k[:MAX_LABEL_KEY - 6]}_{i}" if k in clashing else k for i, k in enumerate(keys)]


def confusion_plot(references, predictions, label_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(1.2 * len(label_names) + 2, 1.2 * len(label_names) + 1.5))
    ConfusionMatrixDisplay.from_predictions(references, predictions, labels=list(range(len(label_names))),
                                            display_labels=label_names, ax=ax, colorbar=False,
                                            xticks_rotation=30)
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_for_eval(variant: Variant, quantized: Quantized, q: QuantizationSection, label_names: list[str]):
    """variant: a train result (adapter on the quantized base, or a fully fine-tuned model), a merge
    result (a whole model), or the base before training."""
    from peft import PeftModel

    if isinstance(variant, UntrainedBase):
        return loading.load_base(quantized, label_names, q)
    if isinstance(variant, StartingAdapter) or isinstance(variant, Trained) and variant.adapter:
        base = loading.load_base(quantized, label_names, q)
        return PeftModel.from_pretrained(base, str(variant.weights_dir))
    return loading.load_model(str(variant.weights_dir), quantized.task, label_names, run_dtype(variant, q))


def run_dtype(variant: Variant, q: QuantizationSection):
    """Merged 16-bit models run in their saved dtype, as deployed, where the device computes it
    natively; the adapter, the base and a 4-bit merge (its own quantization config) in the compute dtype."""
    if not isinstance(variant, Merged) or variant.strategy == "4bit":
        return loading.dtype_of(q.bnb_4bit_compute_dtype)
    return loading.inference_dtype(variant.dtype, q.bnb_4bit_compute_dtype)


def latency(model, dataset, pad_id: int, dev, n: int = 64) -> dict:
    """Per-example latency at batch 1 over the first n test rows (after 3 warm-up calls)."""
    import torch

    with torch.no_grad():
        return _latency(model, dataset, pad_id, dev, n)


def _latency(model, dataset, pad_id: int, dev, n: int) -> dict:
    model.eval()
    rows = [dataset[i] for i in range(min(n, len(dataset)))]
    for r in rows[:3]:
        model(**collate([r], pad_id, dev))
    times = []
    for r in rows:
        start = time.perf_counter()
        model(**collate([r], pad_id, dev))
        times.append(time.perf_counter() - start)
    return {"latency_p50_ms": 1000 * float(np.percentile(times, 50)),
            "latency_p95_ms": 1000 * float(np.percentile(times, 95))}


def left_padded(prompts: list[list[int]], pad_id: int):
    """Token-id prompts as one batch padded on the left (generation continues from the end)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def generate(model, tok, prompts: list[list[int]], pad_id: int, dev, max_new_tokens: int,
             temperature: float | None = None, top_p: float = 1.0, batch_size: int = 8) -> list[str]:
    """Continuations of token-id prompts (left-padded batches): greedy, or sampled at a temperature."""
    import torch

    from qlora.runtime.progress import bar as progress_bar

    model.eval()
    texts = []
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature else {"do_sample": False}
    with torch.no_grad(), progress_bar(len(prompts), "generate", "prompt") as shown:
        for start in range(0, len(prompts), batch_size):
            shown.update(len(prompts[start:start + batch_size]))
            ids, mask = left_padded(prompts[start:start + batch_size], pad_id)
            width = ids.shape[1]
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id, **sampling)
            texts += tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def next_token_logits(model, prompts: list[list[int]], pad_id: int, dev, batch_size: int = 8) -> np.ndarray:
    """The logits of the first token each prompt would generate (float32, prompts x vocabulary):
    variants of one model are compared on these, beside their greedy continuations."""
    import torch

    rows = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_padded(prompts[start:start + batch_size], pad_id)  # every prompt ends last
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev))
            rows.append(out.logits[:, -1, :].float().cpu().numpy())
    return np.concatenate(rows)


def _evaluate_causal(out: Path, model, tok, test, pad_id: int, dev, cfg: EvaluateSection, batch_size: int,
                     preference: PreferenceSection | None = None, reference: dict | None = None,
                     judge: JudgeModel | None = None, against: Evaluated | None = None) -> dict:
    """Held-out loss and perplexity (preference rows: the loss, preference accuracy, reward margins and
    log-probabilities, against the reference's scores); generations for the first held-out prompts,
    scored (ROUGE, against the chosen completion for pairs) and judged (judge: the classifier's
    figures, and the win rate against the `against` evaluation's answers to the same prompts); the
    next-token logits of those prompts kept for comparing variants."""
    import math

    import pandas as pd
    import torch

    torch.manual_seed(0)  # sampled decoding: the same draws for every model evaluated
    if preference is None:
        loss = lm_loss(model, test, batch_size, pad_id, dev, desc="evaluate")
        figures = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    else:
        figures = preference_metrics(preference, completion_scores(model, test, batch_size, pad_id, dev,
                                                                   desc="evaluate"), reference)
    g = cfg.generation
    examples = test.select(range(min(g.num_examples, len(test))))
    np.save(out / "next_token_logits.npy", next_token_logits(model, examples["prompt_ids"], pad_id, dev))
    start = time.perf_counter()
    greedy = generate(model, tok, examples["prompt_ids"], pad_id, dev, g.max_new_tokens)
    seconds = time.perf_counter() - start
    references = examples["reference"]
    metrics = {**figures, "generation_s_per_example": seconds / len(greedy), "weights_bytes": weights_bytes(model)}
    metrics.update(compute_metrics(cfg.metric_names(loading.CAUSAL), greedy, references, []))
    table = {"prompt": examples["prompt_text"], "reference": references, "greedy": greedy}
    if g.temperature:
        sampled = generate(model, tok, examples["prompt_ids"], pad_id, dev, g.max_new_tokens, g.temperature, g.top_p)
        metrics.update({f"sampled_{k}": v for k, v in
                        compute_metrics(cfg.metric_names(loading.CAUSAL), sampled, references, []).items()})
        table["sampled"] = sampled
    if judge is not None:  # the sampled answers when there are some: one prompt may be asked many times
        scores, judged = judge_scores(judge, table.get("sampled", greedy), dev)
        table["judge_score"] = scores
        metrics.update(judge_rate=float(judged.mean()), judge_score=float(scores.mean()),
                       judged_examples=len(scores))
        if against is not None:
            theirs = pd.read_parquet(against.file(against.predictions), columns=["judge_score"])["judge_score"]
            metrics["judge_win_rate"] = win_rate(scores, theirs.to_numpy())
    pd.DataFrame(table).to_parquet(out / "predictions.parquet", index=False)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"metrics": metrics, "predictions": "predictions.parquet", "logits": "next_token_logits.npy",
            "examples": len(test)}


@stage("evaluate", modules=("qlora.tasks.metrics",))  # metric scripts are loaded by path
def evaluate_model(out: Path, variant: Variant, tokenized: Tokenized, quantized: Quantized, q: QuantizationSection,
                   cfg: EvaluateSection, batch_size: int, preference: PreferenceSection | None = None,
                   reference: ReferenceScores | None = None, judge: JudgeModel | None = None,
                   against: Evaluated | None = None, harness: HarnessTasks | None = None) -> Evaluated:
    """One variant on the test split. judge: the classifier that judges generated answers; against: the
    starting model's evaluation, whose judged answers this variant's are compared with; harness: the
    lm-evaluation-harness tasks (cfg.harness) run on the same loaded model."""
    import pandas as pd
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    dtype = str(run_dtype(variant, q)).removeprefix("torch.")
    if quantized.task == loading.CAUSAL:
        test = load_from_disk(str(tokenized.dataset_dir))["test"]
        tok = AutoTokenizer.from_pretrained(quantized.original_path)
        dev = loading.device()
        with PeakMemory(dev) as memory:
            model = load_for_eval(variant, quantized, q, [])
            result = _evaluate_causal(out, model, tok, test, pad_token_id(tok), dev, cfg, batch_size, preference,
                                      reference.scores("test") if reference is not None else None, judge, against)
        result["metrics"]["peak_memory_bytes"] = memory.peak
        if harness is not None:
            from qlora.tasks.harness import run_harness

            result["metrics"].update(run_harness(model, tok, cfg.harness, out))
        (out / "metrics.json").write_text(json.dumps(result["metrics"], indent=2))
        return Evaluated(**result, dtype=dtype)
    label_names = tokenized.label_names
    test = load_from_disk(str(tokenized.dataset_dir))["test"]
    tok = AutoTokenizer.from_pretrained(quantized.original_path)
    pad_id = pad_token_id(tok)
    dev = loading.device()
    with PeakMemory(dev) as memory:
        model = load_for_eval(variant, quantized, q, label_names)
        start = time.perf_counter()
        logits, loss = predict_logits(model, test, batch_size, pad_id, dev, desc="evaluate")
        seconds = time.perf_counter() - start
    preds = logits.argmax(-1)
    refs = np.asarray(test["labels"])
    metrics = compute_metrics(cfg.metric_names(quantized.task), preds.tolist(), refs.tolist(), label_names)
    metrics.update(loss=loss, examples_per_s=len(test) / seconds, **latency(model, test, pad_id, dev),
                   peak_memory_bytes=memory.peak, weights_bytes=weights_bytes(model))
    probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
    pd.DataFrame({"text": test["text"], "label": [label_names[i] for i in refs], "prediction": [label_names[i] for i in preds],
                  "confidence": probs.max(-1), **{f"logit_{n}": logits[:, i] for i, n in enumerate(label_names)}}
                 ).to_parquet(out / "predictions.parquet", index=False)
    confusion_plot(refs, preds, label_names, out / "confusion_matrix.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return Evaluated(metrics=metrics, predictions="predictions.parquet", confusion_matrix="confusion_matrix.png",
                     examples=len(test), dtype=dtype)
