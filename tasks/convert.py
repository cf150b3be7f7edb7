"""convert: a GGUF checkpoint dequantized once into a cached 16-bit model directory, which is then
quantized to NF4 like any other base."""
from __future__ import annotations

from pathlib import Path

from qlora.tasks.model import resolve_model
from qlora.tasks.recipe import ModelSection, RecipeError
from qlora.tasks.results import BaseModelFiles, Converted
from qlora.tasks.stage import stage


@stage("convert")
def convert_gguf(out: Path, model: BaseModelFiles) -> Converted:
    """A GGUF checkpoint dequantized once into a 16-bit model directory (transformers reads GGUF
    through the gguf package), which is then quantized to NF4 like any other base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model.gguf)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        net = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
    except ImportError as e:
        raise RecipeError(f"reading GGUF needs the gguf package: {e}", "model.name_or_path",
                          hint="pip install gguf") from None
    # transformers will not save a model loaded from GGUF: move its (dequantized) weights into a
    # fresh model of the same architecture and save that.
    config = net.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(net.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    plain.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return Converted(model="model", tokenizer_hash=resolve_model(ModelSection(name_or_path=str(out / "model"))).tokenizer.hash,
                     source=str(path))
