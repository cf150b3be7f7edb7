"""The documentation: `mkdocs build --strict` (no broken link or anchor); every `qlora` command the
README and docs/ show in a code block names a real command with real options (parsed by the CLI's
own parser, placeholders filled in); and every concrete one is run, here or by a named test, or is
marked as needing a GPU or a cluster."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NEEDS = re.compile(r"#\s*needs (a GPU|GPUs|a cluster|several machines)\b")
MAIN_COMMAND = "qlora run recipes/quickstart.yaml"
# Concrete commands the docs show, and the test that runs them (checked to exist).
RUN_BY = {
    MAIN_COMMAND: "tests/test_docs.py::test_the_main_command_runs_as_written",
    "qlora run recipe.yaml": "tests/test_pipeline.py::test_run_rerun_and_edit",
    'qlora deploy recipes/agnews-minilm.yaml --set data.path=/data/ag_news --cron "0 3 * * 1"':
        "tests/test_deploy.py::test_served_deployment_retrains_only_on_new_data",
}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(=[A-Z_]+)?(\.json)?$")


def _code_lines(text: str) -> list[str]:
    """Lines of code blocks: fenced, or indented four spaces after a blank line."""
    lines, fenced, indented, previous = [], False, False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        elif fenced or (line.startswith("    ") and (indented or not previous.strip())):
            indented = not fenced
            lines.append(line.strip())
        else:
            indented = False
        previous = line
    return lines


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for line in _code_lines(page.read_text(encoding="utf-8")):
            found += [(page.name, part.strip()) for part in line.split(" && ") if part.strip().startswith("qlora ")]
    return found


def _without_comment(command: str) -> str:
    return re.split(r"\s+#\s", command, maxsplit=1)[0].strip()


def _is_synopsis(command: str) -> bool:
    words = shlex.split(_without_comment(command))
    return any(c in command for c in "[]") or any(PLACEHOLDER.match(w) for w in words[1:])


def _filled_in(command: str) -> list[str]:
    """A synopsis as arguments the parser takes: brackets dropped, the first of each alternative,
    placeholders filled in."""
    words = shlex.split(_without_comment(command))[1:]
    out, skipping = [], False
    for word in words:
        if word == "|":  # `--cron X | --interval SECONDS`: the first alternative
            skipping = True
            continue
        if skipping and not word.startswith("["):
            continue
        skipping = False
        if not re.match(r"^[\w.]+=\[.*\]$", word):  # a grid's list of values keeps its brackets
            word = word.replace("[", "").replace("]", "")
        if not word or word == "...":
            continue
        if "|" in word:
            word = word.split("|")[0]
        if word == "RECIPE":
            word = "recipes/quickstart.yaml"
        elif word.startswith("KEY="):
            word = "train.seed=1"
        elif word in ("N", "SECONDS"):
            word = "1"
        elif PLACEHOLDER.match(word):
            word = "x"
        out.append(word)
    return out


def test_the_docs_show_commands_at_all():
    assert len(documented_commands()) >= 15 and any(c == MAIN_COMMAND for _, c in documented_commands())


@pytest.mark.parametrize("page,command", documented_commands())
def test_each_documented_command_parses_and_is_run_or_marked(page, command):
    from qlora.cli import command_parser

    arguments = _filled_in(command) if _is_synopsis(command) else shlex.split(_without_comment(command))[1:]
    try:
        command_parser().parse_args(arguments)
    except SystemExit:
        pytest.fail(f"{page}: the CLI refuses `{command}` (as {arguments})")
    if _is_synopsis(command) or NEEDS.search(command):
        return
    test = RUN_BY.get(_without_comment(command))
    assert test, f"{page}: `{command}` is run by no test: add it to RUN_BY, or mark it `# needs a GPU`/`# needs a cluster`"
    path, name = test.split("::")
    assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{test} does not exist"


def test_mkdocs_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is a dev dependency: pip install -e '.[dev]'"
    done = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "site")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "recipe-reference" / "index.html").is_file()


@pytest.mark.slow
def test_the_main_command_runs_as_written(tmp_path):
    """The README's main job, typed as the README shows it, from a directory holding recipes/: the
    quickstart trains, evaluates and merges, offline; the same command again is a cache hit."""
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect"), "QLORA_PROGRESS": "0"}
    env.pop("PREFECT_API_URL", None)
    qlora = str(Path(sys.executable).parent / "qlora")
    for attempt in ("first", "again"):
        done = subprocess.run([qlora, *shlex.split(MAIN_COMMAND)[1:]], cwd=tmp_path, capture_output=True, text=True,
                              timeout=1200, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "== qlora run complete ==" in done.stdout
    assert "every stage was a cache hit" in done.stdout
    accuracy = float(re.search(r"^test: accuracy=([0-9.]+)", done.stdout, re.M).group(1))
    assert accuracy > 0.7, done.stdout
