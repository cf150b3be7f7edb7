"""Data files named by URL: `s3://`, `gs://`, `az://`, `hf://`, `https://`, anything fsspec reads (as
`datasets` reads them). Each is fetched once, streamed to disk in blocks (never whole into memory),
into a local cache keyed by the remote file's identity, and is from then on a local file like any
other: the same readers, checks and fingerprint.

The identity is what the store says of the file without reading it (its ETag, checksum or
modification time, and size), so an unchanged re-run costs one metadata request. A server that says
none of these (a plain HTTP server) is fetched again each time and keyed by the content's hash:
slower, never stale.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path, PurePosixPath

from qlora.runtime.secrets import mask, reveal
from qlora.tasks.recipe import RecipeError, shorten

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
# What fsspec's filesystems report of a file that changes when its content does.
_IDENTITY = ("ETag", "etag", "e_tag", "Content-MD5", "md5Hash", "crc32c", "checksum", "Digest", "content_settings",
             "LastModified", "last_modified", "mtime", "updated", "version_id", "VersionId", "generation")


def is_url(location: str) -> bool:
    """A location with a scheme other than file:// (those are local paths)."""
    m = _URL.match(reveal(location))
    return bool(m) and m.group("scheme").lower() != "file"


def data_cache() -> Path:
    """Where fetched files are kept: $QLORA_DATA_CACHE, or the user's cache directory."""
    root = os.environ.get("QLORA_DATA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "qlora" / "remote-data"
    return Path(root).expanduser()


def remote_file(url: str, field: str) -> Path:
    """The local copy of the file at url (fetched if the remote's identity is new). Errors name the
    field and the URL, its credentials masked."""
    import fsspec

    from qlora.tasks.store import hash_value

    url, shown = reveal(url), mask(url)
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec names the package a protocol needs ("Install s3fs to access S3")
        raise RecipeError(f"{shown}: {shorten(str(e).splitlines()[0], 200)}", field,
                          hint="pip install the filesystem package the URL's scheme needs") from None
    except ValueError as e:  # a scheme fsspec does not know
        raise RecipeError(f"{shown}: {shorten(str(e).splitlines()[0], 200)}", field) from None
    try:
        info = fs.info(path)
    except FileNotFoundError as e:
        unreachable = _connection_error(e)  # fsspec's HTTP filesystem reports a refused connection so
        if unreachable is None:
            raise RecipeError(f"no such file: {shown}", field) from None
        raise RecipeError(f"cannot reach {shown}: {mask(shorten(str(unreachable), 200))}", field) from None
    except Exception as e:  # noqa: BLE001 - unreachable host, refused credentials: the user's to fix
        raise RecipeError(f"cannot reach {shown}: {mask(shorten(str(e).splitlines()[0] if str(e) else type(e).__name__, 200))}",
                          field) from None
    if info.get("type") == "directory":
        raise RecipeError(f"{shown} is a directory; name each data file by URL", field,
                          hint="data.files: {train: URL, validation: URL, test: URL}")
    name = PurePosixPath(path).name
    identity = {k: str(info[k]) for k in _IDENTITY if info.get(k)}
    where = data_cache()
    if identity:
        known = where / hash_value([mask(url), info.get("size"), identity]) / name
        if known.is_file():
            return known
    where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=where, prefix=".fetching-") as tmp:
        partial = Path(tmp) / name
        try:
            fs.get_file(path, str(partial))
        except Exception as e:  # noqa: BLE001
            raise RecipeError(f"cannot fetch {shown}: {mask(shorten(str(e).splitlines()[0] if str(e) else type(e).__name__, 200))}",
                              field) from None
        target = known if identity else where / _content_hash(partial) / name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)  # whole or not at all: a killed fetch leaves only its temporary folder
    return target


def _content_hash(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:20]


def _connection_error(error: BaseException) -> BaseException | None:
    """The refused or failed connection an error was raised from, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConnectionError) or type(error).__name__.startswith("ClientConnector"):
            return error
        error = error.__cause__ or error.__context__
    return None
