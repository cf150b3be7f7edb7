"""Data files named by URL (fsspec), against a real HTTP server on 127.0.0.1 started here: fetched
once into the cache, read like a local file, keyed by content where the server gives no identity,
and every failure one line naming the field, its credentials masked."""
from __future__ import annotations

import functools
import http.server
import importlib.util
import threading

import pytest

from qlora.tasks.recipe import DataSection, RecipeError


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A plain HTTP server (no ETag: files are keyed by their content) over tmp_path/site, and a
    fresh data cache."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setenv("QLORA_DATA_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield site, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _csv(rows: int, flip: bool = False) -> str:
    return "text,label\n" + "".join(f"review number {i},{(i + flip) % 2}\n" for i in range(rows))


def test_a_url_is_read_like_a_local_file_and_fetched_again_only_when_it_changed(server, tmp_path):
    from qlora.tasks.data import describe_source, read_source
    from qlora.tasks.load import clean

    site, base = server
    (site / "reviews.csv").write_text(_csv(40))
    (tmp_path / "local.csv").write_text(_csv(40))
    remote, local = DataSection(path=f"{base}/reviews.csv"), DataSection(path=str(tmp_path / "local.csv"))
    columns = {"data.text_column": "text", "data.label_column": "label"}
    got = clean(read_source(remote, columns), remote, None)[0]["train"]
    want = clean(read_source(local, columns), local, None)[0]["train"]
    assert got.equals(want)
    first = describe_source(remote)
    assert describe_source(remote).hash == first.hash == describe_source(local).hash  # the same content
    assert str(tmp_path / "cache") in first.files["train"][0]
    (site / "reviews.csv").write_text(_csv(40, flip=True))  # same size, other content
    changed = describe_source(remote)
    assert changed.hash != first.hash
    assert clean(read_source(remote, columns), remote, None)[0]["train"]["label"].tolist() != want["label"].tolist()
    assert not list((tmp_path / "cache").glob(".fetching-*"))  # nothing half-fetched left behind


def test_url_mistakes_are_one_line_naming_the_field_without_credentials(server):
    from qlora.tasks.data import check_data

    site, base = server
    (site / "notes.txt").write_text("not a table")
    secret_base = base.replace("http://", "http://reader:hunter2secret@")
    cases = [(DataSection(path=f"{secret_base}/missing.csv"), "data.path", "no such file"),
             (DataSection(path=f"{base}/notes.txt"), "data.path", "unsupported file type"),
             (DataSection(files={"train": f"{base}/missing.csv"}), "data.files.train", "no such file"),
             (DataSection(path="http://127.0.0.1:9/reviews.csv"), "data.path", "cannot reach"),
             (DataSection(path="nosuchscheme://bucket/reviews.csv"), "data.path", "nosuchscheme")]
    for data, field, message in cases:
        with pytest.raises(RecipeError) as e:
            check_data(data)
        text = str(e.value)
        assert e.value.field == field and message in text and "hunter2secret" not in text, text
        assert len(text.splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_a_scheme_whose_package_is_missing_names_it():
    from qlora.tasks.data import check_data

    with pytest.raises(RecipeError, match="s3fs") as e:
        check_data(DataSection(path="s3://bucket/reviews.csv"))
    assert e.value.field == "data.path"
