"""Secrets in recipes: token-like values and passwords in URIs never reach MLflow params, the
recipe artifacts or the Prefect flow-run parameters.

Each secret is replaced by a placeholder `***redacted-<digest>***`. The process that redacts keeps
the real values (and hands them to the processes it starts, such as the runs a served deployment
starts, through QLORA_REDACTED), so the flow it runs restores them; a process that has not got
them (a work-pool worker) says which field to set through its environment instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

ENV = "QLORA_REDACTED"
_TOKEN = re.compile(r"\*\*\*redacted-[0-9a-f]{8}\*\*\*")
# Whole values that are secrets: Hugging Face, OpenAI/Anthropic-style, GitHub, Slack tokens, AWS key ids.
_PATTERNS = [
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
]
# Parts of values: the password of scheme://user:password@host, and key=value pairs of secret names.
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/:@\s]*:)(?P<secret>[^@/\s]+)(?=@)")
_KEY_VALUE = re.compile(r"(?i)(?P<head>\b(?:password|passwd|pwd|token|secret|api[_-]?key|access[_-]?key|"
                        r"aws_secret_access_key|sig|signature)=)(?P<secret>[^&\s;]+)")

_known: dict[str, str] = {}


def _placeholder(secret: str) -> str:
    token = f"***redacted-{hashlib.sha256(secret.encode()).hexdigest()[:8]}***"
    _known[token] = secret
    return token


def redact_text(text: str) -> str:
    """The text with every secret replaced by its placeholder (remembered in this process)."""
    if _TOKEN.fullmatch(text):
        return text
    for pattern in (_URI_PASSWORD, _KEY_VALUE):
        text = pattern.sub(lambda m: m.group("head") + (m.group("secret") if _TOKEN.fullmatch(m.group("secret"))
                                                         else _placeholder(m.group("secret"))), text)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: _placeholder(m.group(0)), text)
    return text


def redact(value: Any) -> Any:
    """A recipe dict (or any JSON-like value) with its secrets redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def share_with_children() -> None:
    """Processes started from now on (served deployment runs) can restore what this one redacted."""
    if _known:
        os.environ[ENV] = json.dumps(_known)


def restore(value: Any, path: str = "") -> Any:
    """The value with placeholders replaced by the secrets they stand for; a placeholder this process
    does not know is an error naming the field."""
    from qlora.tasks.recipe import RecipeError

    if isinstance(value, str):
        def real(m: re.Match) -> str:
            secret = _known.get(m.group(0)) or json.loads(os.environ.get(ENV, "{}")).get(m.group(0))
            if secret is None:
                raise RecipeError("holds a secret that was redacted from the flow run's parameters and is not "
                                  "known to this process", path or None,
                                  hint="give it through the environment of the process that runs the flow (e.g. "
                                       "MLFLOW_TRACKING_URI, HF_TOKEN) instead of the recipe")
            return secret
        return _TOKEN.sub(real, value)
    if isinstance(value, dict):
        return {k: restore(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [restore(v, f"{path}.{i}") for i, v in enumerate(value)]
    return value
