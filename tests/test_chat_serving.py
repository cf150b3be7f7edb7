"""The packaged chat model as MLflow's clients see it: pyfunc answers one OpenAI `chat.completion`
object per request (MLflow's llm/v1/chat response), named as the registry names it, its text the
same token ids plain transformers generates; the transformers flavor still loads without our
serving module. `mlflow models serve` on the real merged model: tests/test_causal.py."""
from __future__ import annotations

import pytest
from conftest import save_llama_with_minilm_tokenizer

from qlora.tasks.training.loading import CAUSAL

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
INFO = {"task": CAUSAL, "recipe": "tiny-chat", "base": "b", "labels": [], "reference": "r", "method": "qlora",
        "data": "d", "data_hash": "h", "steps": 1, "metrics": {"loss": 1.0}, "merged_metrics": None,
        "registered_name": "tiny-chat-merged", "model_kind": "merged model"}


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    from transformers import AutoTokenizer

    from qlora.tasks.package import mlflow_model

    root = tmp_path_factory.mktemp("chat")
    save_llama_with_minilm_tokenizer(root / "merged", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    tok = AutoTokenizer.from_pretrained(root / "merged")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "merged")
    mlflow_model(root / "mlflow_model", root / "merged", INFO)
    return root


def _greedy_ids(folder, messages, max_new_tokens):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok, ids["input_ids"].shape[1], out[0, ids["input_ids"].shape[1]:].tolist()


def test_one_request_answers_one_chat_completion_named_as_registered(packaged):
    import mlflow.pyfunc
    from mlflow.types.llm import ChatCompletionResponse

    messages = [{"role": "user", "content": "What is your name?"}]
    answer = mlflow.pyfunc.load_model(str(packaged / "mlflow_model")).predict({"messages": messages, "max_tokens": 7})
    assert isinstance(answer, dict) and answer["object"] == "chat.completion"
    assert answer["model"] == "tiny-chat-merged" and answer["id"].startswith("chatcmpl-")
    ChatCompletionResponse.from_dict(answer)  # MLflow's own llm/v1/chat response type parses it
    (choice,) = answer["choices"]
    tok, prompt_tokens, ids = _greedy_ids(packaged / "merged", messages, 7)
    # The served text is plain transformers' greedy continuation of the same prompt ids.
    assert choice["message"]["content"] == tok.decode(ids, skip_special_tokens=True)
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 7,
                               "total_tokens": prompt_tokens + 7}


def test_stop_strings_cut_the_answer_and_several_rows_answer_a_list(packaged):
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(str(packaged / "mlflow_model"))
    messages = [{"role": "user", "content": "Tell me a joke."}]
    whole = model.predict({"messages": messages, "max_tokens": 12})["choices"][0]["message"]["content"]
    stop = whole.split()[2]
    cut = model.predict({"messages": messages, "max_tokens": 12, "stop": [stop]})["choices"][0]
    assert cut["message"]["content"] == whole[:whole.index(stop)] and cut["finish_reason"] == "stop"
    rows = model.predict(pd.DataFrame({"messages": [messages, [{"role": "user", "content": "Hi"}]],
                                       "max_tokens": [3, 5]}))
    assert isinstance(rows, list) and [r["usage"]["completion_tokens"] for r in rows] == [3, 5]


def test_what_cannot_be_served_is_refused_naming_the_field(packaged):
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(packaged / "mlflow_model"))
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="^stream: "):
        model.predict({"messages": messages, "stream": True})
    with pytest.raises(ValueError, match="^n: "):
        model.predict({"messages": messages, "n": 2})


def test_the_transformers_flavor_loads_without_our_serving_module(packaged):
    import mlflow.transformers
    from mlflow.models import Model

    flavors = Model.load(str(packaged / "mlflow_model" / "MLmodel")).flavors
    assert flavors["python_function"]["loader_module"] == "qlora.tasks.chat_serving"
    assert flavors["transformers"]["inference_task"] == "llm/v1/chat"
    pipe = mlflow.transformers.load_model(str(packaged / "mlflow_model"))
    assert type(pipe).__name__ == "TextGenerationPipeline"
