"""What the CLI does with finished runs: compare their variants, predict with a trained model from a
run or the model registry, and promote a registry candidate to champion."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd

from tasks.recipe import RecipeError

CANDIDATE, CHAMPION = "candidate", "champion"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def compare(uri: str, run_ids: list[str]) -> pd.DataFrame:
    from tasks.compare import check_comparable, load_comparison

    c = client(uri)
    tables = [load_comparison(c, run_id) for run_id in run_ids]
    check_comparable([c.get_run(run_id) for run_id in run_ids])
    return pd.concat(tables, ignore_index=True)


def _download(uri: str, artifact_uri: str, into: str) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=into, tracking_uri=uri))


def resolve_model(uri: str, into: str, run_id: str | None, variant: str, model: str | None) -> Path:
    """A local directory holding the chosen model: a run's merged model or adapter, or a registry
    version given as NAME/VERSION or NAME@ALIAS."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        if model:
            name, sep, ref = model.partition("@") if "@" in model else model.rpartition("/")
            if not sep or not name or not ref:
                raise RecipeError(f"'{model}' is not NAME/VERSION or NAME@ALIAS", "--model")
            version = c.get_model_version_by_alias(name, ref) if "@" in model else c.get_model_version(name, ref)
            return _download(uri, version.source, into)
        run = c.get_run(run_id)
    except MlflowException as e:
        raise RecipeError(f"not found in the tracking store {uri}: {str(e).splitlines()[0]}",
                          "--model" if model else "--run") from None
    artifact = "merged_model" if variant == "merged" else "adapter"
    if artifact not in {a.path for a in c.list_artifacts(run_id)}:
        recipe = run.data.params.get("name", "RECIPE")
        raise RecipeError(f"run {run_id} has no {variant} model", "--variant",
                          hint=f"make it with: qlora run recipes/{recipe}.yaml --set merge.enabled=true")
    return _download(uri, f"{run.info.artifact_uri}/{artifact}", into)


def _is_causal(directory: Path) -> bool:
    if (directory / "adapter_config.json").is_file():
        return json.loads((directory / "adapter_config.json").read_text()).get("task_type") == "CAUSAL_LM"
    architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    return any(a.endswith("ForCausalLM") for a in architectures)


def load_predictor(directory: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        from tasks.model import load_model

        config = json.loads((directory / "adapter_config.json").read_text())
        base_dir = config.get("base_model_name_or_path")
        if not base_dir or not Path(base_dir).is_dir():
            raise RecipeError(f"the adapter's base model {base_dir!r} is not on this machine", "--variant",
                              hint="predict with the merged model (--variant merged), which is self-contained")
        labels = json.loads((Path(base_dir) / "config.json").read_text()).get("id2label", {})
        names = [labels[k] for k in sorted(labels, key=int)]
        task = "causal-lm" if config.get("task_type") == "CAUSAL_LM" else "sequence-classification"
        model = PeftModel.from_pretrained(load_model(base_dir, task, names, _compute_dtype(base_dir)), str(directory))
    else:
        cls = AutoModelForCausalLM if _is_causal(directory) else AutoModelForSequenceClassification
        model = cls.from_pretrained(directory)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def _respond(net, tok, texts: list[str], max_new_tokens: int = 128) -> list[dict]:
    """A causal LM's answers: each text as the user turn of its chat template (or as is)."""
    import torch

    rows = []
    chat = bool(getattr(tok, "chat_template", None))
    with torch.no_grad():
        for text in texts:
            prompt = (tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True) if chat else text)
            ids = tok(prompt, return_tensors="pt", add_special_tokens=not chat).to(net.device)
            out = net.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id or tok.eos_token_id)
            rows.append({"text": text, "response": tok.decode(out[0, ids["input_ids"].shape[1]:],
                                                               skip_special_tokens=True).strip()})
    return rows


def _compute_dtype(base_dir: str):
    import torch

    q = json.loads((Path(base_dir) / "config.json").read_text()).get("quantization_config") or {}
    return getattr(torch, q.get("bnb_4bit_compute_dtype", "float32"))


def predict(uri: str, texts: list[str], run_id: str | None, variant: str, model: str | None,
            batch_size: int = 32) -> pd.DataFrame:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        directory = resolve_model(uri, tmp, run_id, variant, model)
        net, tok = load_predictor(directory)
        if _is_causal(directory):
            return pd.DataFrame(_respond(net, tok, texts))
        id2label = net.config.id2label
        rows = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                chunk = texts[i:i + batch_size]
                batch = tok(chunk, padding=True, truncation=True, max_length=512, return_tensors="pt")
                batch = {k: v.to(net.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                probs = torch.softmax(net(**batch).logits.float(), -1)
                conf, ids = probs.max(-1)
                rows += [{"label": id2label[int(j)], "confidence": float(p), "text": t}
                         for t, j, p in zip(chunk, ids, conf)]
    return pd.DataFrame(rows)


def promote(uri: str, name: str, metric: str, min_delta: float = 0.0, mode: str = "max") -> dict:
    """Point `champion` at the `candidate` version if it beats the champion on the metric (higher is
    better with mode max, lower with min) by more than min_delta. Returns the decision and its reason."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        candidate = c.get_model_version_by_alias(name, CANDIDATE)
    except MlflowException:
        raise RecipeError(f"registered model '{name}' has no '{CANDIDATE}' version", "NAME") from None
    cand_metrics = c.get_run(candidate.run_id).data.metrics
    if metric not in cand_metrics:
        raise RecipeError(f"metric '{metric}' was not logged by the candidate's run", "--metric",
                          hint=f"logged: {', '.join(sorted(k for k in cand_metrics if k.startswith(('test_', 'merged_test_'))))}")
    try:
        champion = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    value = cand_metrics[metric]
    decision = {"model": name, "metric": metric, "candidate_version": candidate.version, "candidate_value": value,
                "champion_version": champion.version if champion else None, "promoted": False}
    if champion is not None and champion.version == candidate.version:
        return {**decision, "champion_value": value, "reason": f"version {candidate.version} is already the champion"}
    if champion is not None:
        sign = 1 if mode == "max" else -1
        best = c.get_run(champion.run_id).data.metrics.get(metric, -sign * float("inf"))
        decision["champion_value"] = best
        if sign * (value - best) <= min_delta:
            return {**decision, "reason": f"kept champion v{champion.version}: candidate v{candidate.version} "
                                          f"{metric}={value:.4f} does not beat {best:.4f} by more than {min_delta}"}
    c.set_registered_model_alias(name, CHAMPION, candidate.version)
    return {**decision, "promoted": True,
            "reason": f"promoted v{candidate.version} to {CHAMPION} ({metric}={value:.4f}"
                      + (f", champion v{champion.version} had {decision['champion_value']:.4f})" if champion else
                         ", no champion before)")}
