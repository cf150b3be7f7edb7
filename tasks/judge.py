"""The judge: a sequence classifier (a reward model) that scores generated answers. It comes from the
registry (models:/NAME/VERSION or models:/NAME@ALIAS, e.g. a classifier another recipe trained) or a
local directory; it is checked before anything runs (a classifier, with the recipe's label) and
fingerprinted by content, so an alias moved to another version re-judges and nothing else does.

Figures: the share of answers put in the label's class, the mean probability of that class, and the
win rate of one model's answers against another's on the same prompts (a tie counts half)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from qlora.runtime.secrets import reveal
from qlora.tasks import store
from qlora.tasks.recipe import JudgeSection, RecipeError, shorten
from qlora.tasks.results import JudgeModel
from qlora.tasks.upstream import checkpoint_dirs, download_upstream, is_registered, registered_version
from qlora.tasks.weights import safetensors_files

FIELD = "evaluate.judge.model"


def _registered_source(location: str, tracking_uri: str) -> str:
    """The artifact location of a registered version: models:/NAME/VERSION or models:/NAME@ALIAS."""
    return registered_version(location, tracking_uri, FIELD).source


def _download(source: str, tracking_uri: str, into: Path, path: str) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/{path}", dst_path=str(into),
                                                    tracking_uri=tracking_uri))


def _check_classifier(config_file: Path, label: str) -> None:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RecipeError(f"no readable config.json for the judge ({config_file}): {str(e)[:120]}", FIELD) from None
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise RecipeError(f"the judge is not a sequence classifier (its architectures: {architectures or 'none'})",
                          FIELD, hint="name a classifier, e.g. the quickstart recipe's registered model")
    labels = [str(v) for v in (config.get("id2label") or {}).values()]
    if label not in labels:
        raise RecipeError(f"the judge has no class '{shorten(label, 40)}' (its classes: {', '.join(labels[:10])})",
                          "evaluate.judge.label")


def check_judge(cfg: JudgeSection, tracking_uri: str) -> None:
    """The preflight's check: the judge exists and is a classifier with the label (for a registered
    model, only its config.json is fetched, into a temporary directory)."""
    if cfg.model is None:
        return
    location = reveal(cfg.model)
    if is_registered(location):
        source = _registered_source(location, tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            for path in ("model/config.json", "config.json"):
                try:
                    _check_classifier(_download(source, tracking_uri, Path(tmp), path), cfg.label)
                    return
                except RecipeError:
                    raise
                except Exception:  # noqa: BLE001 - not at this path: the other layout
                    continue
        raise RecipeError(f"{shorten(location, 80)} holds no model config.json", FIELD)
    _check_classifier(checkpoint_dirs(_local_directory(location))[0] / "config.json", cfg.label)


def _local_directory(location: str) -> Path:
    path = store.resolve_location(location, FIELD)
    if path is None or not path.is_dir():
        raise RecipeError(f"not a model directory: {shorten(location, 120)}", FIELD,
                          hint="a directory with config.json, or models:/NAME@ALIAS")
    return path


def resolve_judge(cfg: JudgeSection, tracking_uri: str, work_dir: str) -> JudgeModel | None:
    """The judge as a local directory with its content fingerprint (a registered version downloaded
    once into <work_dir>/upstream/), checked to be a classifier with the label."""
    if cfg.model is None:
        return None
    location = reveal(cfg.model)
    if is_registered(location):
        directory = download_upstream(location, tracking_uri, work_dir, FIELD)[0]
    else:
        directory = _local_directory(location)
    model_dir, tokenizer = checkpoint_dirs(directory)
    _check_classifier(model_dir / "config.json", cfg.label)
    weights = [p.name for p in safetensors_files(model_dir, FIELD)]
    return JudgeModel(hash=store.hash_value([store.tree_fingerprint(model_dir, ["config.json"] + weights),
                                             store.tree_fingerprint(tokenizer), cfg.label]),
                      path=str(model_dir), tokenizer=str(tokenizer), label=cfg.label)


def judge_scores(judge: JudgeModel, texts: list[str], dev, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """For each text: the probability the judge gives its label's class, and whether that class is
    the judge's answer (its most probable)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(judge.tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(judge.path, use_safetensors=True).to(dev).eval()
    index = {str(v): int(k) for k, v in model.config.id2label.items()}[judge.label]
    probs = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], padding=True, truncation=True, max_length=256,
                      return_tensors="pt").to(dev)
            probs.append(torch.softmax(model(**enc).logits.float(), -1).cpu().numpy())
    probs = np.concatenate(probs) if probs else np.zeros((0, len(model.config.id2label)))
    return probs[:, index], probs.argmax(-1) == index


def win_rate(scores: np.ndarray, against: np.ndarray) -> float:
    """The share of prompts where these answers score above the other model's (ties count half)."""
    return float(np.mean((scores > against) + 0.5 * (scores == against)))
