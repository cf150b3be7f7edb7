"""reference stage: the starting model's log-probabilities of every preference row's completions, for the
train, validation and test splits, computed once and kept (safetensors). Training reads them, so each
step runs the tuned model alone and no second copy of the model is ever loaded; a re-run, a sweep over
`preference.beta` or a resumed run reuses them (the key is the model and the tokenized rows, not the
loss's settings)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from qlora.tasks.batches import pad_token_id
from qlora.tasks.inference import completion_scores
from qlora.tasks.recipe import SPLITS, QuantizationSection
from qlora.tasks.results import Quantized, ReferenceScores, StartingAdapter, Tokenized
from qlora.tasks.stage import stage
from qlora.tasks.training import loading


@stage("reference")
def score_reference(out: Path, tokenized: Tokenized, quantized: Quantized, q: QuantizationSection,
                    batch_size: int, start: Optional[StartingAdapter] = None) -> ReferenceScores:
    """The model training starts from scores every row, in evaluation mode: the quantized base, with
    the adapter the run continues (`start`) where it continues one."""
    from datasets import load_from_disk
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    data = load_from_disk(str(tokenized.dataset_dir))
    pad_id = pad_token_id(AutoTokenizer.from_pretrained(quantized.original_path))
    dev = loading.device()
    model = loading.load_base(quantized, [], q)
    if start is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, start.path)
    arrays = {}
    for split in SPLITS:
        for name, values in completion_scores(model, data[split], batch_size, pad_id, dev,
                                              desc=f"reference {split}").items():
            arrays[f"{split}.{name}"] = values
    save_file(arrays, str(out / ReferenceScores.model_fields["file_name"].default))
    return ReferenceScores(rows={split: len(data[split]) for split in SPLITS})
