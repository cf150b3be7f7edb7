"""Secrets: a type for recipe fields that can carry credentials, and one masking function for
everything that is printed or logged.

Fields that name a location (the tracking URI, the model and data paths) are `SecretText` by schema.
The value itself is what code opens and connects with (`Path(value)`, `value.startswith(...)`,
`reveal(value)`); printing, formatting, logging and JSON serialisation show it masked: the password
or token of `scheme://user:password@host` and `scheme://token@host`, secret `key=value` pairs,
`Bearer` tokens and token-shaped values. So the recipe's JSON (MLflow parameters and artifacts,
Prefect's flow-run parameters, model cards) never holds them, and neither does an error message.
`mask` is the one masking function; on free text (a description, a recipe file) its patterns are a
second net.

Every pattern here runs in time linear in the text: a long description costs milliseconds.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"
# key=value or key: value, where the key names a secret (alone, or as the end of a longer name).
_SECRET_KEYS = (r"password|passwd|pwd|passphrase|token|secret|api[_-]?key|apikey|access[_-]?key|private[_-]?key|"
                r"client[_-]?secret|credentials?|sig|signature|auth")
_KEY_VALUE = re.compile(r"(?i)(?<![A-Za-z0-9_-])(?P<head>(?:[A-Za-z0-9]+[_-])*(?:" + _SECRET_KEYS + r")"
                        r"[\"']?\s*[=:]\s*[\"']?)(?P<secret>[^\s&;,\"']+)")
_BEARER = re.compile(r"(?i)(?<![A-Za-z0-9_-])(?P<head>bearer\s+)(?P<secret>[A-Za-z0-9._~+/=-]{8,})")
# Whole values that are secrets: Hugging Face, OpenAI/Anthropic-style, GitHub, Slack tokens, AWS key ids.
_TOKENS = re.compile(r"(?<![A-Za-z0-9_-])(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{30,}|"
                     r"xox[abpr]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9]))")
# AWS secret access keys: 40 characters of base64, with upper and lower case letters and digits
# (a 40-character hex digest, such as a git commit, is not one).
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def _userinfo_masked(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`; `scheme://token@host` ->
    `scheme://***@host`. Found with str.find: each `://` is looked at once, up to the next `/`."""
    out, start = [], 0
    while (i := text.find("://", start)) >= 0:
        authority_start = i + 3
        end = authority_start
        while end < len(text) and text[end] not in "/?#@ \t\r\n":
            end += 1
        if end < len(text) and text[end] == "@":
            userinfo = text[authority_start:end]
            user, colon, _ = userinfo.partition(":")
            masked = f"{user}:{MASK}" if colon else MASK
            out.append(text[start:authority_start] + masked + "@")
            start = end + 1
        else:
            out.append(text[start:authority_start])
            start = authority_start
    out.append(text[start:])
    return "".join(out)


def _aws_secret(m: re.Match) -> str:
    value = m.group(0)
    mixed = any(c.isupper() for c in value) and any(c.islower() for c in value) and any(c.isdigit() for c in value)
    return MASK if mixed else value


def mask(text: Any) -> str:
    """The text with every credential it holds masked. The one function through which anything that
    may hold a secret is printed or logged."""
    text = reveal(text) if isinstance(text, SecretText) else str(text)
    if "://" in text:
        text = _userinfo_masked(text)
    text = _KEY_VALUE.sub(lambda m: m.group("head") + (m.group("secret") if m.group("secret") == MASK else MASK), text)
    text = _BEARER.sub(lambda m: m.group("head") + MASK, text)
    text = _TOKENS.sub(MASK, text)
    return _AWS_SECRET.sub(_aws_secret, text)


def holds_secret(text: str) -> bool:
    return mask(text) != text


def reveal(value: Any) -> Any:
    """The real value of a SecretText (a plain str), for the code that opens or connects with it."""
    return str.__str__(value) if isinstance(value, SecretText) else value


class SecretText(str):
    """A recipe value that may carry credentials: itself for string methods and comparisons, masked
    when printed, formatted or serialised (pydantic's JSON, unless the context asks to reveal).
    pathlib takes str() of its argument: give it `reveal(value)`."""

    def __str__(self) -> str:
        return mask(self)

    def __repr__(self) -> str:
        return repr(mask(self))

    def __format__(self, spec: str) -> str:
        return format(mask(self), spec)

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(
            cls, core_schema.str_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(_serialize, info_arg=True))


def _serialize(value: SecretText, info) -> str:
    """Masked, except where the dump is one the process keeps to itself (`revealing`)."""
    return reveal(value) if (info.context or {}).get("reveal") else mask(value)


REVEALING = {"reveal": True}
"""model_dump(mode="json", context=REVEALING): the recipe with its secrets, for a copy kept in this
process (a sweep's trials, a methods comparison's variants), never for anything written or logged."""
