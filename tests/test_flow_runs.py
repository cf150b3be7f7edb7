"""How `qlora run` starts its flow run: the temporary Prefect server's start (its migration check
skipped once this Prefect has migrated the database), and heartbeats sent by the flow itself, which
stop with the run instead of holding its end for up to a second."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.request

import pytest

from qlora import prefect_database


def _database_at(home, revision: str) -> None:
    with sqlite3.connect(home / "prefect.db") as db:
        db.execute("CREATE TABLE IF NOT EXISTS alembic_version (version_num VARCHAR(32) NOT NULL)")
        db.execute("DELETE FROM alembic_version")
        db.execute("INSERT INTO alembic_version VALUES (?)", (revision,))


def test_the_migration_check_is_skipped_only_for_a_database_this_prefect_migrated(tmp_path, monkeypatch):
    for name in prefect_database.DATABASE_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    assert not prefect_database.migrated(tmp_path)  # no database yet
    _database_at(tmp_path, "aaa")
    assert not prefect_database.migrated(tmp_path)  # never migrated by us: no note
    prefect_database.remember(tmp_path)
    assert prefect_database.migrated(tmp_path)
    assert not list(tmp_path.glob("*.partial"))

    _database_at(tmp_path, "bbb")  # another Prefect migrated it since
    assert not prefect_database.migrated(tmp_path)
    prefect_database.remember(tmp_path)
    monkeypatch.setattr(prefect_database, "prefect_build", lambda: "another build")  # Prefect upgraded
    assert not prefect_database.migrated(tmp_path)
    monkeypatch.undo()

    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://db/prefect")
    assert not prefect_database.migrated(tmp_path)  # a database configured elsewhere: Prefect decides
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL")
    (tmp_path / prefect_database.NOTE).write_text("{not json")
    assert not prefect_database.migrated(tmp_path)
    (tmp_path / "prefect.db").write_bytes(b"not a database")
    assert prefect_database.revision(tmp_path / "prefect.db") is None


@pytest.mark.slow
def test_a_second_temporary_server_starts_without_migrating_and_serves(tmp_path, monkeypatch):
    """The real server, twice on a new Prefect home: the first migrates the new database and notes
    it, the second skips the check and still answers the API on that database."""
    from qlora.cli import TemporaryPrefectServer

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    for name in ("PREFECT_API_URL", *prefect_database.DATABASE_SETTINGS):
        monkeypatch.delenv(name, raising=False)
    first = TemporaryPrefectServer()
    try:
        assert first.migrating
        first.wait()
    finally:
        first.stop()
    assert prefect_database.migrated(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL")
    second = TemporaryPrefectServer()
    try:
        assert not second.migrating
        second.wait()
        body = json.dumps({"limit": 1}).encode()
        request = urllib.request.Request(second.url + "/flow_runs/filter", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200 and json.loads(answer.read()) == []
    finally:
        second.stop()


def test_the_flow_sends_its_own_heartbeats_and_they_stop_with_the_run(monkeypatch):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    from flows import heartbeats

    sent = []
    monkeypatch.setattr("prefect.events.emit_event", lambda **event: sent.append(event))
    monkeypatch.setattr(heartbeats, "_identity", lambda context: ({"prefect.resource.id": "prefect.flow-run.x"}, []))
    heartbeats.start()  # not asked (a flow started by a worker or a test): Prefect's own heartbeats
    assert not sent
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        with heartbeats.sent_by_the_flow():
            assert get_current_settings().flows.heartbeat_frequency is None  # Prefect's thread off
            heartbeats.start()
            deadline = time.monotonic() + 10
            while not sent and time.monotonic() < deadline:
                time.sleep(0.01)
            beating = [t for t in threading.enumerate() if t.name == "qlora-heartbeat"]
        assert get_current_settings().flows.heartbeat_frequency == 30
    assert sent[0]["event"] == "prefect.flow-run.heartbeat"
    assert sent[0]["resource"] == {"prefect.resource.id": "prefect.flow-run.x"}
    beating[0].join(timeout=1)  # it stops when the run returns, not at its next beat 30 s later
    assert not beating[0].is_alive()


def test_the_collector_waits_for_the_imports_then_resumes():
    import gc

    from tasks.startup import collector_paused, thaw

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        built = [[i] for i in range(1000)]  # what imports build
    assert gc.isenabled() and gc.get_freeze_count() >= len(built)
    thaw()
    assert gc.get_freeze_count() == 0
