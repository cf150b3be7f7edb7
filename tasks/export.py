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

# llama.cpp splits text before BPE by the rules its file names (`tokenizer.ggml.pre`); a wrong name
# tokenizes some text differently from transformers (" +" in two, for SmolLM2 under "default"). Its
# converter names the rules by hashing the tokenizer's ids on a fixed text that exercises them
# (whitespace runs, digits, emoji, scripts, apostrophes); the same text and hashes here, for the
# byte-level BPE tokenizers of the Llama family (smollm checked against SmolLM2's own GGUF).
PRE_TOKENIZER_CHECK_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````\"\"\"\"......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
}


def pre_tokenizer_name(tokenizer_dir: Path) -> str:
    """The name llama.cpp knows this tokenizer's pre-tokenizer by; a tokenizer it cannot name is
    refused (its GGUF would tokenize text otherwise than the model was trained on)."""
    import hashlib

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tokenizer_dir)).encode(PRE_TOKENIZER_CHECK_TEXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise RecipeError(f"llama.cpp knows no pre-tokenizer for this tokenizer (check hash {digest[:12]}): its GGUF "
                          "would split text differently from transformers", "--format", hint="export it with --format hf")
    return PRE_TOKENIZERS[digest]


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
    pre = pre_tokenizer_name(tokenizer_dir)  # before anything is written
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
    _add_tokenizer(writer, tokenizer_dir, config["vocab_size"], pre)

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


def _add_tokenizer(writer, tokenizer_dir: Path, vocab_size: int, pre: str) -> None:
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
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
