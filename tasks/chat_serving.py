"""The packaged chat model as MLflow's pyfunc serves it: one request, one OpenAI chat completion.

MLflow's transformers flavor answers `llm/v1/chat` with a list (one entry per row) naming the folder
the model was saved from. Clients of an OpenAI-style endpoint expect one `chat.completion` object
naming the model, so the package stage points the MLmodel's pyfunc flavor here (MLflow's
loader-module contract: a `_load_pyfunc(path, model_config)` in an installed module). Nothing in the
model folder is executed: the weights and tokenizer load through `mlflow.transformers.load_model`,
and the transformers flavor stays in the MLmodel for loading without this package."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

# The MLmodel metadata key naming the model in each completion (the registered model name).
SERVED_NAME = "served_model_name"


def _load_pyfunc(path: str, model_config: dict | None = None) -> "ChatCompletions":
    """MLflow's loader-module entry point (the name is MLflow's contract, not a private API)."""
    from mlflow.models import Model

    folder = Path(path)
    metadata = Model.load(folder / "MLmodel").metadata or {}
    return ChatCompletions(folder, metadata.get(SERVED_NAME, ""), model_config or {})


class ChatCompletions:
    """Chat completions from a transformers causal LM: the tokenizer's chat template, greedy unless
    the request asks for a temperature above zero, `stop` strings cut the answer."""

    def __init__(self, folder: Path, name: str, defaults: dict):
        import mlflow.transformers

        pipe = mlflow.transformers.load_model(str(folder), return_type="pipeline")
        self.model, self.tokenizer, self.name = pipe.model.eval(), pipe.tokenizer, name
        self.defaults = defaults

    def predict(self, data: pd.DataFrame | dict, params: dict | None = None):
        """One completion object per row; a single row (one request, as served) answers the object
        itself, several answer a list."""
        rows = [data] if isinstance(data, dict) else data.to_dict(orient="records")
        answers = [self.complete(self._request(row, params or {})) for row in rows]
        return answers[0] if len(answers) == 1 else answers

    def _request(self, row: dict, params: dict) -> dict:
        request = {k: v for k, v in {**row, **params}.items() if not _missing(v)}
        if request.get("stream"):
            raise ValueError("stream: streaming responses are not served; send stream: false")
        if int(request.get("n") or 1) != 1:
            raise ValueError("n: one completion per request is served; send n: 1")
        if "messages" not in request:
            raise ValueError("messages: required, a list of {role, content} messages")
        return request

    def complete(self, request: dict) -> dict:
        import torch
        from mlflow.types.llm import ChatChoice, ChatCompletionResponse, ChatMessage, TokenUsageStats

        messages = [{"role": m["role"], "content": m.get("content") or ""} for m in _as_list(request["messages"])]
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        prompt = {k: prompt[k].to(self.model.device) for k in ("input_ids", "attention_mask")}  # no token_type_ids
        generate = self._generation(request)
        with torch.no_grad():
            out = self.model.generate(**prompt, **generate)
        new = out[0, prompt["input_ids"].shape[1]:].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        finish = "length" if len(new) >= generate["max_new_tokens"] and new[-1] not in self._eos() else "stop"
        for stop in _as_list(request.get("stop") or []):
            if stop and stop in text:
                text, finish = text[:text.index(stop)], "stop"
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}", model=self.name,
            choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=text), finish_reason=finish)],
            usage=TokenUsageStats(prompt_tokens=int(prompt["input_ids"].shape[1]), completion_tokens=len(new),
                                  total_tokens=int(prompt["input_ids"].shape[1]) + len(new)),
        ).to_dict()

    def _generation(self, request: dict) -> dict:
        """generate()'s arguments: the saved model config (greedy), then what the request asks."""
        args = {"do_sample": bool(self.defaults.get("do_sample", False)),
                "max_new_tokens": int(request.get("max_tokens") or self.defaults.get("max_new_tokens", 256)),
                "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        temperature = request.get("temperature")
        if temperature is not None:
            args["do_sample"] = float(temperature) > 0
            if args["do_sample"]:
                args["temperature"] = float(temperature)
        for key in ("top_p", "top_k"):
            if request.get(key) is not None and args["do_sample"]:
                args[key] = request[key]
        return args

    def _eos(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()


def _missing(value) -> bool:
    """A DataFrame cell the request left out (None or NaN), not a list or a string."""
    return value is None or (isinstance(value, float) and value != value)


def _as_list(value) -> list:
    """A request's list field as pandas hands it over (a list, a numpy array or one string)."""
    if isinstance(value, str):
        return [value]
    return list(value)
