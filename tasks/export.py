"""Export: a trained model as a self-contained folder (`hf`: weights, config, tokenizer, model
card) or, for a Llama-family causal LM, one GGUF file for llama.cpp and the tools built on it,
written with the `gguf` package the way llama.cpp's own converter lays it out (tensor names,
rotary permutation of the query and key projections, the BPE tokenizer, the chat template).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from qlora.tasks.recipe import RecipeError

GGUF_ARCHITECTURES = {"llama": "llama"}  # transformers model_type -> GGUF architecture
QUANT_TYPES = ("f32", "f16", "bf16", "q8_0")


def export_hf(model_dir: Path, tokenizer_dir: Path, out: Path, card: str | None, causal: bool = False) -> Path:
    """One folder that plain transformers loads: weights, config, tokenizer, and a model card of its own
    (the MLflow model's provenance and metrics; how to load this folder, not the MLflow model)."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in (model_dir, tokenizer_dir):
        for path in folder.iterdir():
            if path.is_file():
                shutil.copy2(path, out / path.name)
    if card:
        (out / "README.md").write_text(folder_card(card, causal))
    return out


def folder_card(card: str, causal: bool) -> str:
    """The model card of an exported folder: what the MLflow model's card says of the model, its
    "Load it" section replaced by plain transformers loading this folder."""
    head = card.split("\n## Load it", 1)[0].rstrip()
    cls = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    return "\n".join([head, "", "## Load it", "",
                      "A plain transformers checkpoint: weights (safetensors), config and tokenizer in this folder.", "",
                      "```python", f"from transformers import {cls}, AutoTokenizer", "",
                      f"model = {cls}.from_pretrained(\".\")  # this folder",
                      "tokenizer = AutoTokenizer.from_pretrained(\".\")", "```", ""])


def _permute(weights, n_head: int):
    """HF stores the rotary halves of each head apart; GGUF (llama.cpp) interleaves them."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def export_gguf(model_dir: Path, tokenizer_dir: Path, out_file: Path, quant: str = "f16", name: str = "model") -> Path:
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    arch = GGUF_ARCHITECTURES.get(config.get("model_type", ""))
    if arch is None:
        raise RecipeError(f"GGUF export supports Llama-family causal LMs; this model is "
                          f"'{config.get('model_type')}' ({', '.join(config.get('architectures') or [])})", "--format",
                          hint="export it with --format hf")
    if quant not in QUANT_TYPES:
        raise RecipeError(f"unknown GGUF type '{quant}'", "--quant", hint=f"one of: {', '.join(QUANT_TYPES)}")
    n_head, n_layers = config["num_attention_heads"], config["num_hidden_layers"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or {}
    writer = gguf.GGUFWriter(str(out_file), arch)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_vocab_size(config["vocab_size"])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tokenizer_dir, config["vocab_size"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    state = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    for hf_name, tensor in state.items():
        data = tensor.to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise RecipeError(f"no GGUF name for tensor {hf_name}", "--format", hint="export it with --format hf")
        if data.ndim == 1 or quant == "f32":  # norms stay float32, as llama.cpp keeps them
            writer.add_tensor(new_name, data.astype(np.float32))
        elif quant == "f16":
            writer.add_tensor(new_name, data.astype(np.float16))
        else:
            kind = gguf.GGMLQuantizationType.BF16 if quant == "bf16" else gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(new_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _add_tokenizer(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (GPT-2 style, as Llama 3 and SmolLM use): tokens, types, merges,
    special token ids and the chat template."""
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(tokenizer_dir)
    except FileNotFoundError:
        raise RecipeError("GGUF export supports byte-level BPE tokenizers (tokenizer.json)", "--format",
                          hint="export it with --format hf") from None
    # Special tokens (<|im_start|>, <|endoftext|>, ...) are control tokens to llama.cpp.
    tokenizer_json = tokenizer_dir / "tokenizer.json"
    special = {t["content"] for t in json.loads(tokenizer_json.read_text()).get("added_tokens", [])
               if t.get("special")} if tokenizer_json.is_file() else set()
    tokens, types = [], []
    for text, _score, kind in vocab.all_tokens():
        tokens.append(text)
        name = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        types.append(gguf.TokenType.CONTROL if name in special else kind)
    for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer's vocabulary
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
