"""Whether the temporary Prefect server may start without checking its database's migrations.

Prefect's server runs its migrations (Alembic, reading every migration script) at each start, even
when the database is already at their head: a few tenths of a second of every `qlora run` without a
configured server, an unchanged re-run included. After a start that migrated, we note which Prefect
build did it and the revision the database reached; a later start by the same build, finding the
database still at that revision, skips the check. Anything else (another Prefect, a database changed
or replaced since, a database configured elsewhere, an unreadable note) migrates as Prefect would.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sqlite3
import tempfile
from pathlib import Path

NOTE = "qlora-server-schema.json"
DATABASE_SETTINGS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")


def prefect_build() -> str | None:
    """The installed Prefect's version and commit, read without importing it (its import takes a second)."""
    spec = importlib.util.find_spec("prefect")
    info = Path(spec.origin).with_name("_build_info.py") if spec is not None and spec.origin else None
    return info.read_text() if info is not None and info.is_file() else None


def default_database(home: Path) -> Path | None:
    """Prefect's own SQLite file, when no other database is configured (environment or profile)."""
    if any(os.environ.get(name) for name in DATABASE_SETTINGS):
        return None
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    if profiles.is_file() and "DATABASE_CONNECTION_URL" in profiles.read_text().upper():
        return None
    return home / "prefect.db"


def revision(database: Path) -> str | None:
    """The migration the database is at (Alembic's table), read-only; None if it cannot be read."""
    if not database.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1)) as db:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def migrated(home: Path) -> bool:
    """Whether this Prefect build migrated the database to the revision it is at now."""
    database = default_database(home)
    if database is None:
        return False
    try:
        note = json.loads((home / NOTE).read_text())
    except (OSError, ValueError):
        return False
    current = revision(database)
    return current is not None and note.get("revision") == current and note.get("build") == prefect_build()


def remember(home: Path) -> None:
    """After a start that migrated: note the build and the revision reached (whole or not at all)."""
    database = default_database(home)
    build, current = prefect_build(), revision(database) if database is not None else None
    if build is None or current is None:
        return
    with tempfile.NamedTemporaryFile("w", dir=home, prefix=NOTE, suffix=".partial", delete=False) as f:
        json.dump({"build": build, "revision": current}, f)
    os.replace(f.name, home / NOTE)
