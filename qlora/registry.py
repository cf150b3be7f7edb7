"""Registered models and finished runs, as the CLI uses them: compare runs' variants, download a
run's model or a registry version, predict or chat with it, promote a candidate to champion, export
to another format, merge an exported adapter."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd

from qlora.tasks.promotion import CHAMPION, promote  # noqa: F401 - `qlora promote`
from qlora.tasks.recipe import RecipeError
from qlora.tasks.upstream import checkpoint_dirs
from qlora.tasks.weights import safetensors_files


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def compare_runs(uri: str, run_ids: list[str]) -> pd.DataFrame:
    from qlora.tasks.comparison import check_comparable, load_comparison

    c = client(uri)
    tables = [load_comparison(c, run_id) for run_id in run_ids]
    check_comparable([c.get_run(run_id) for run_id in run_ids])
    return pd.concat(tables, ignore_index=True)


def _download(uri: str, artifact_uri: str, into: str) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=into, tracking_uri=uri))


def download_model(uri: str, into: str, run_id: str | None, variant: str, model: str | None) -> Path:
    """A local directory holding the chosen model: a run's merged model or adapter, or a registry
    version given as NAME/VERSION or NAME@ALIAS."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        if model:
            name, sep, ref = model.partition("@") if "@" in model else model.rpartition("/")
            if not sep or not name or not ref:
                raise RecipeError(f"'{model}' is not NAME/VERSION or NAME@ALIAS", "--model")
            if "@" in model:
                version = _version_by_alias(c, name, ref)
            else:
                version = c.get_model_version(name, ref)
            return _download(uri, version.source, into)
        run = c.get_run(run_id)
    except MlflowException as e:
        raise RecipeError(f"not found in the tracking store {uri}: {str(e).splitlines()[0]}",
                          "--model" if model else "--run") from None
    artifact = "merged_model" if variant == "merged" else "adapter"
    if artifact not in {a.path for a in c.list_artifacts(run_id)}:
        recipe = run.data.params.get("name", "RECIPE")
        raise RecipeError(f"run {run_id} has no {variant} model", "--variant",
                          hint=f"make it with: qlora run recipes/{recipe}.yaml --set merge.enabled=true")
    return _download(uri, f"{run.info.artifact_uri}/{artifact}", into)


def _version_by_alias(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        try:
            aliases = sorted(c.get_registered_model(name).aliases)
        except MlflowException:
            raise RecipeError(f"no registered model '{name}'", "--model") from None
        raise RecipeError(f"registered model '{name}' has no alias '{alias}'", "--model",
                          hint=f"its aliases: {', '.join(aliases) or 'none'}; `qlora promote {name}` makes "
                               f"'{CHAMPION}'") from None


def adapter_config(directory: Path) -> dict:
    """An adapter's adapter_config.json, read as JSON (one line naming the file when it is not)."""
    path = directory / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RecipeError(f"not valid JSON: {str(e).splitlines()[0][:120]}", file=str(path)) from None
    if not isinstance(config, dict):
        raise RecipeError("not an adapter configuration (a JSON object)", file=str(path))
    return config


def _is_causal(directory: Path) -> bool:
    directory, _ = checkpoint_dirs(directory)
    if (directory / "adapter_config.json").is_file():
        return adapter_config(directory).get("task_type") == "CAUSAL_LM"
    architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    return any(a.endswith("ForCausalLM") for a in architectures)


def load_predictor(directory: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    directory, tokenizer = checkpoint_dirs(directory)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        from qlora.tasks.store import PACKAGE_PREFIX, resolve_location
        from qlora.tasks.training.loading import load_model

        config = adapter_config(directory)
        safetensors_files(directory, "ADAPTER", stem="adapter_model")
        base = config.get("base_model_name_or_path")
        if base and base.startswith(PACKAGE_PREFIX):  # a base inside a package: found where it is installed here
            base = str(resolve_location(base, "--variant"))
        local = bool(base) and (base.startswith(("/", ".", "~")) or Path(base).exists())
        if not base or (local and not Path(base).expanduser().exists()):
            raise RecipeError(f"the adapter's base model {base!r} is not on this machine", "--variant",
                              hint="predict with the merged model (--variant merged), which is self-contained")
        if not local:  # a Hub id: from the local cache, or fetched within a bounded wait
            from qlora.tasks.hub import download_model as hub_model

            base = str(hub_model(base, config.get("revision"), "base_model_name_or_path"))
        if not base.endswith(".gguf"):
            safetensors_files(Path(base).expanduser(), "base_model_name_or_path")
        # Label names travel with the adapter (its config.json); older adapters name them in the base's.
        head = directory / "config.json" if (directory / "config.json").is_file() else Path(base) / "config.json"
        labels = json.loads(head.read_text()).get("id2label", {}) if head.is_file() else {}
        names = [labels[k] for k in sorted(labels, key=int)]
        task = "causal-lm" if config.get("task_type") == "CAUSAL_LM" else "sequence-classification"
        if base.endswith(".gguf"):  # a GGUF base (chat-smollm2): transformers dequantizes it as it loads
            base_model = AutoModelForCausalLM.from_pretrained(str(Path(base).parent), gguf_file=Path(base).name)
        else:
            base_model = load_model(base, task, names, _compute_dtype(base))
        model = PeftModel.from_pretrained(base_model, str(directory))
    else:
        safetensors_files(directory, "SOURCE")
        cls = AutoModelForCausalLM if _is_causal(directory) else AutoModelForSequenceClassification
        model = cls.from_pretrained(directory, use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(tokenizer)


def _respond(net, tok, texts: list[str], max_new_tokens: int = 128) -> list[dict]:
    """A causal LM's answers: each text as the user turn of its chat template (or as is)."""
    import torch

    rows = []
    chat = bool(getattr(tok, "chat_template", None))
    with torch.no_grad():
        for text in texts:
            prompt = (tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True) if chat else text)
            ids = tok(prompt, return_tensors="pt", add_special_tokens=not chat).to(net.device)
            out = net.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id or tok.eos_token_id)
            rows.append({"text": text, "response": tok.decode(out[0, ids["input_ids"].shape[1]:],
                                                               skip_special_tokens=True).strip()})
    return rows


def _compute_dtype(base: str):
    import torch

    config = Path(base) / "config.json"
    q = (json.loads(config.read_text()).get("quantization_config") or {}) if config.is_file() else {}
    return getattr(torch, q.get("bnb_4bit_compute_dtype", "float32"))


def predict_texts(uri: str, texts: list[str], run_id: str | None, variant: str, model: str | None,
            batch_size: int = 32) -> pd.DataFrame:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        directory = download_model(uri, tmp, run_id, variant, model)
        net, tok = load_predictor(directory)
        if _is_causal(directory):
            return pd.DataFrame(_respond(net, tok, texts))
        id2label = net.config.id2label
        rows = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                chunk = texts[i:i + batch_size]
                batch = tok(chunk, padding=True, truncation=True, max_length=512, return_tensors="pt")
                batch = {k: v.to(net.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                probs = torch.softmax(net(**batch).logits.float(), -1)
                conf, ids = probs.max(-1)
                rows += [{"label": id2label[int(j)], "confidence": float(p), "text": t}
                         for t, j, p in zip(chunk, ids, conf)]
    return pd.DataFrame(rows)


def _source_args(source: str) -> tuple[str | None, str | None]:
    """RUN_ID, or a registered model as NAME@ALIAS / NAME/VERSION."""
    return (None, source) if ("@" in source or "/" in source) else (source, None)


def _refuse_to_overwrite(out: Path) -> None:
    """--out is new (or an empty directory) and can be written, checked before anything is fetched."""
    from qlora.tasks.store import check_writable

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecipeError("exists and is not empty: not overwritten", file=str(out))
    check_writable(out, "--out", "the output")


def export(uri: str, source: str, fmt: str, out: Path, quant: str = "f16") -> Path:
    """`qlora export`: a run's merged model (or a registered version) as a self-contained folder, or
    as one GGUF file."""
    from qlora.tasks.export import export_gguf, export_hf

    run_id, model = _source_args(source)
    _refuse_to_overwrite(out)
    with tempfile.TemporaryDirectory() as tmp:
        directory = download_model(uri, tmp, run_id, "merged", model)
        weights, tokenizer = checkpoint_dirs(directory)
        if (weights / "adapter_config.json").is_file():
            raise RecipeError(f"{source} is an adapter, not a merged model", "SOURCE",
                              hint="export the merged model (`<recipe>-merged@ALIAS`, or a run made with merge.enabled)")
        if fmt == "gguf" and not _is_causal(directory):
            raise RecipeError("GGUF is for causal language models; this is a classifier", "--format",
                              hint="export it with --format hf")
        card = (directory / "model_card.md").read_text() if (directory / "model_card.md").is_file() else None
        if fmt == "hf":
            return export_hf(weights, tokenizer, out, card, _is_causal(directory))
        out.parent.mkdir(parents=True, exist_ok=True)
        return export_gguf(weights, tokenizer, out, quant, name=source)


def merge_adapter(adapter: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """`qlora merge`: an exported adapter folded into its original base (named in its
    adapter_config.json), saved in 16-bit with its tokenizer: the correct merge, never into 4-bit."""
    import torch

    if not (adapter / "adapter_config.json").is_file():
        raise RecipeError("not an adapter folder (no adapter_config.json)", file=str(adapter))
    _refuse_to_overwrite(out)
    model, tok = load_predictor(adapter)
    merged = model.merge_and_unload().to(getattr(torch, dtype))
    merged.save_pretrained(out)
    tok.save_pretrained(out)
    return out


class TokenStreamer:
    """Each new token's text written as soon as it is whole. transformers' TextStreamer holds text
    back until the next space, so a model repeating a word without spaces looked hung for minutes."""

    def __init__(self, tok, write):
        self.tok, self.write, self.ids, self.shown, self.prompt_seen = tok, write, [], 0, False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() hands the prompt over first
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        # Without clean-up (" ." -> "."), text once written is never changed by the tokens after it.
        text = self.tok.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for its other bytes
            return
        self.write(text[self.shown:], end="", flush=True)
        self.shown = len(text)

    def end(self) -> None:
        self.write("", flush=True)
        self.ids, self.shown, self.prompt_seen = [], 0, False


def chat(uri: str, source: str, max_new_tokens: int = 256, read=input, write=print) -> None:
    """`qlora chat`: talk to a trained causal LM in the terminal: its chat template, tokens streamed
    as they are generated, its own generation config (sampling, repetition penalty) where it has
    one, a note when an answer reaches max_new_tokens; /reset forgets the conversation, /exit (or
    Ctrl-D) leaves."""
    import torch

    run_id, model = _source_args(source)
    with tempfile.TemporaryDirectory() as tmp:
        directory = download_model(uri, tmp, run_id, "merged", model)
        if not _is_causal(directory):
            raise RecipeError("chat needs a causal language model; this is a classifier", "SOURCE",
                              hint="classify texts with: qlora predict --model NAME@ALIAS TEXT ...")
        net, tok = load_predictor(directory)
    if not getattr(tok, "chat_template", None):
        raise RecipeError("the model's tokenizer has no chat template", "SOURCE")
    streamer = TokenStreamer(tok, write)
    history: list[dict] = []
    write(f"chatting with {source}: /reset forgets the conversation, /exit leaves")
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            write("")
            return
        if text == "/exit":
            return
        if text == "/reset":
            history = []
            write("(conversation reset)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():  # the model's generation_config decides greedy or sampled
            out = net.generate(**ids.to(net.device), max_new_tokens=max_new_tokens, streamer=streamer,
                               pad_token_id=tok.pad_token_id or tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        if len(new) >= max_new_tokens and int(new[-1]) != tok.eos_token_id:
            write(f"(stopped at {max_new_tokens} tokens: --max-new-tokens sets the limit)")
        history.append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True).strip()})
