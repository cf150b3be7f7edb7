"""How `qlora run` starts its flow run: the temporary Prefect server (Prefect's own app, migrating its
database at each start as Prefect does), and no heartbeats towards that server, through Prefect's
public settings."""
from __future__ import annotations

import json
import urllib.request

import pytest


@pytest.mark.slow
def test_the_temporary_server_serves_the_api_again_on_the_same_home(tmp_path, monkeypatch):
    """The real server, twice on a new Prefect home: the first creates the database, the second
    starts on it and answers the API."""
    from qlora.cli import TemporaryPrefectServer

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    for name in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(name, raising=False)
    for attempt in range(2):
        server = TemporaryPrefectServer()
        try:
            server.wait()
            body = json.dumps({"limit": 1}).encode()
            request = urllib.request.Request(server.url + "/flow_runs/filter", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200 and json.loads(answer.read()) == []
        finally:
            server.stop()
            server.process.wait(timeout=30)
        monkeypatch.delenv("PREFECT_API_URL")
    assert (tmp_path / "prefect.db").is_file()


def test_no_heartbeats_towards_the_temporary_server_and_the_setting_comes_back():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    from qlora.cli import _without_heartbeats

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        with _without_heartbeats():
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency == 30


def test_the_collector_waits_for_the_imports_then_resumes():
    import gc

    from qlora.runtime.startup import collector_paused, thaw

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        built = [[i] for i in range(1000)]  # what imports build
    assert gc.isenabled() and gc.get_freeze_count() >= len(built)
    thaw()
    assert gc.get_freeze_count() == 0
