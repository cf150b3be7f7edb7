"""Secrets are a type, masked wherever they are printed or logged: the shapes users' credentials
take, the recipe fields that carry them, the CLI's error lines, the tracking preflight, and a mask
that costs linear time on hostile text."""
from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from pathlib import Path

import pytest

from qlora.cli import EXIT_USER_ERROR, main
from qlora.runtime.secrets import REVEALING, SecretText, mask, reveal

# (text holding a secret, the secret): each shape a user's credentials come in.
SHAPES = [
    ("http://alice:PWuri1234@127.0.0.1:9", "PWuri1234"),
    ("postgresql://bob:s3cretDB77@db.internal:5432/mlflow", "s3cretDB77"),
    ("https://ghtokenONLY5678@example.com/data.csv", "ghtokenONLY5678"),
    ("https://x/y?token=querytok42&page=2", "querytok42"),
    ("s3://bucket/data.csv?access_token=accTOK9876", "accTOK9876"),
    ("client_secret=clientSEC4321", "clientSEC4321"),
    ("Authorization: Bearer eyJbearer.tokenVALUE123", "eyJbearer.tokenVALUE123"),
    ("api_key: apikeyVALUE555", "apikeyVALUE555"),
    ('"password": "jsonPW2468"', "jsonPW2468"),
    ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("the key wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzAMPLEKEY is AWS-shaped", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzAMPLEKEY"),
    ("hf_" + "Q" * 30, "hf_" + "Q" * 30),
    ("sk-" + "a1" * 12, "sk-" + "a1" * 12),
    ("AKIAABCDEFGHIJKLMNOP", "AKIAABCDEFGHIJKLMNOP"),
    ("ghp_" + "B" * 36, "ghp_" + "B" * 36),
]
SECRETS = [secret for _, secret in SHAPES]
SECRET_TEXT = "made with: " + "; ".join(text for text, _ in SHAPES)


@pytest.mark.parametrize("text,secret", SHAPES)
def test_every_shape_is_masked(text, secret):
    shown = mask(text)
    assert secret not in shown and "***" in shown


@pytest.mark.parametrize("text", [
    "tokenize:\n  max_length: 128", "max_new_tokens: 64", "revision: 3f786850e387550fdab836ed7e6dc881de23001b",
    "sqlite:///mlflow/mlflow.db", "http://127.0.0.1:5000", "package:qlora_agnews/data", "a basic sentiment model",
    "each token counts", "author: Ada",
])
def test_what_is_not_a_secret_is_left_alone(text):
    assert mask(text) == text


def test_the_mask_takes_linear_time_on_hostile_text():
    """Texts that made the old patterns backtrack: 200 KB each, well under a second together (the
    old patterns took 82 s on one 200 KB description)."""
    texts = ["a-" * 100_000, "a" * 200_000, "://" * 66_000, "http://" + "a:" * 100_000, "token=" * 33_000,
             "x_" * 100_000 + "=", "A1b/" * 50_000]
    start = time.perf_counter()
    for text in texts:
        mask(text)
    assert time.perf_counter() - start < 5


def test_secret_text_is_itself_for_code_and_masked_for_people():
    value = SecretText("http://alice:PW123456@host:5000/path")
    assert value.startswith("http://alice:PW123456@") and Path(value).name == "path"
    assert reveal(value) == "http://alice:PW123456@host:5000/path" and type(reveal(value)) is str
    for shown in (str(value), repr(value), f"{value}", "%s" % value):
        assert "PW123456" not in shown and "alice:***@host" in shown


def test_recipe_fields_that_carry_credentials_are_secret_by_schema():
    from qlora.tasks.recipe import recipe_from_dict

    r = recipe_from_dict({"name": "x", "model": {"name_or_path": "https://t0kenMODEL1@hub.example/m"},
                          "data": {"path": "d.csv?token=DATATOK77"},
                          "tracking": {"tracking_uri": "http://alice:PWtrack99@127.0.0.1:9"}})
    shown = json.dumps(r.model_dump(mode="json"))
    for secret in ("t0kenMODEL1", "DATATOK77", "PWtrack99"):
        assert secret not in shown
    kept = r.model_dump(mode="json", context=REVEALING)  # a copy this process keeps (sweep trials)
    assert kept["tracking"]["tracking_uri"] == "http://alice:PWtrack99@127.0.0.1:9"
    from qlora.tasks.tracking import tracking_uri_of

    assert tracking_uri_of(r) == "http://alice:PWtrack99@127.0.0.1:9"  # what MLflow connects with


def test_a_long_description_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"name_or_path": "m"}, "data": {"path": "d.csv"}, "description": "x" * 20_001}))
    assert main(["validate", str(recipe)]) == EXIT_USER_ERROR
    assert "description" in capsys.readouterr().err


@pytest.mark.parametrize("override", [
    "tracking.tracking_uri=http://alice:PWcli1234@127.0.0.1:9",
    "data.path=/nowhere/data.csv?token=TOKcli5678",
    "model.name_or_path=/nowhere/model?token=TOKcli9012",
])
def test_cli_errors_never_print_a_credential(override, project, capsys):
    from conftest import small_recipe, write_recipe

    path = write_recipe(project / "r.yaml", small_recipe())
    assert main(["validate", str(path), "--set", override]) == EXIT_USER_ERROR
    out = capsys.readouterr()
    secret = override.split(":", 2)[-1].split("@")[0] if "@" in override else override.split("token=")[1]
    assert secret not in out.err + out.out and "***" in out.err


def test_predict_with_a_credential_in_its_tracking_uri_never_prints_it(project, capsys):
    assert main(["predict", "--run", "x", "--tracking-uri", "http://alice:PWpred4321@127.0.0.1:9", "hello"]) == EXIT_USER_ERROR
    out = capsys.readouterr()
    assert "PWpred4321" not in out.err + out.out and "alice:***@127.0.0.1" in out.err


def test_the_preflight_sends_uri_credentials_as_mlflow_does_never_as_a_host():
    """An MLflow server behind basic auth answers the preflight: the credentials go in the
    Authorization header (as MLflow's client sends them), the host resolved is the host."""
    seen = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200 if self.headers.get("Authorization") else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        from qlora.tasks.tracking import check_tracking

        check_tracking(f"http://alice:PW%40x@127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert seen == [("/health", "Basic " + base64.b64encode(b"alice:PW@x").decode())]
