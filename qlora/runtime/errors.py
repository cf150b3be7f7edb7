"""The error for a mistake the user can fix, apart from the recipe's schema: the command line and
the MLflow recording process raise and report it without importing pydantic and the recipe's models
(a tenth of a second before `qlora run` can start anything)."""
from __future__ import annotations

from qlora.runtime.secrets import mask


class RecipeError(Exception):
    """A mistake the user can fix: carries the file, the field path and a hint.

    The CLI prints it as one line and exits with code 2. Anything else is a bug."""

    def __init__(self, message: str, field: str | None = None, file: str | None = None,
                 hint: str | None = None):
        self.message, self.field, self.file, self.hint = message, field, file, hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.field) if p)
        text = f"{where}: {self.message}" if where else self.message
        text = f"{text} ({self.hint})" if self.hint else text
        # Masked whatever the message quotes: a mistyped URI or path may carry a password.
        return shorten(mask(" ".join(text.split("\n"))), MAX_MESSAGE_CHARS)


MAX_MESSAGE_CHARS = 600  # an offending value is quoted, never pasted whole (a YAML anchor bomb is megabytes)


def shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit - 40]} ... [{len(text) - limit + 40} more characters]"
