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


class DiskFull(Exception):
    """The file system under a stage's directory filled while the stage wrote: not a mistake in the
    recipe, but one line saying where, how much the stage had written, and that the same command
    resumes (finished stages stay cached; the partial directory is removed)."""

    def __init__(self, stage: str, directory, written_bytes: int):
        self.stage, self.directory, self.written_bytes = stage, directory, written_bytes
        super().__init__(stage, str(directory), written_bytes)

    def __str__(self) -> str:
        import shutil
        from pathlib import Path

        existing = next(p for p in [Path(self.directory), *Path(self.directory).parents] if p.exists())
        free = shutil.disk_usage(existing).free  # after the partial directory was removed
        return (f"no space left on the device holding {existing}: the {self.stage} stage had written "
                f"{self.written_bytes / 2**20:.1f} MiB when it filled ({free / 2**20:.1f} MiB free now); free space "
                f"or set work_dir elsewhere, then run the same command again: finished stages are kept")


def is_disk_full(error: BaseException) -> bool:
    """Whether an error (or what it was raised from) is the file system out of space or quota; some
    writers (safetensors) report it as text only."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
