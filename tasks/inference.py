"""Running a model over a dataset without training it: classifier logits and loss, a causal LM's
mean loss per target token. Shared by validation during training and the evaluate stage.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from qlora.runtime.progress import bar as progress_bar
from qlora.tasks.batches import collate, collate_lm, lengths_of

if TYPE_CHECKING:
    import torch


def predict_logits(model, dataset, batch_size: int, pad_id: int, dev: torch.device, multiple_of: int = 1,
                   desc: str | None = None) -> tuple[np.ndarray, float]:
    """A classifier's logits for every row (in dataset order) and its mean loss; rows sorted by length
    for speed; a progress bar named desc when given."""
    import torch

    model.eval()
    order = np.argsort(lengths_of(dataset), kind="stable").tolist()  # shortest first, ties in row order
    logits = [None] * len(dataset)
    loss_sum = 0.0
    shown = progress_bar(len(order), desc, "row") if desc else None
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if shown is not None:
                shown.update(len(idx))
            out = model(**collate([dataset[i] for i in idx], pad_id, dev, multiple_of))
            loss_sum += out.loss.float().item() * len(idx)
            for i, row in zip(idx, out.logits.float().cpu().numpy()):
                logits[i] = row
    if shown is not None:
        shown.close()
    model.train()
    return np.stack(logits), loss_sum / max(len(dataset), 1)


def lm_loss(model, dataset, batch_size: int, pad_id: int, dev, multiple_of: int = 1, desc: str | None = None) -> float:
    """Mean loss per target token over a dataset (what perplexity is the exponential of); a progress
    bar named desc when given."""
    import torch

    model.eval()
    order = np.argsort(lengths_of(dataset), kind="stable").tolist()  # shortest first, ties in row order
    total, count = 0.0, 0
    shown = progress_bar(len(order), desc, "row") if desc else None
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            if shown is not None:
                shown.update(len(order[start:start + batch_size]))
            batch = collate_lm([[dataset[i]] for i in order[start:start + batch_size]], pad_id, dev,
                               multiple_of=multiple_of)
            batch.pop("real_tokens")
            targets = batch.pop("targets")
            total += model(**batch).loss.float().item() * targets
            count += targets
    if shown is not None:
        shown.close()
    model.train()
    return total / max(count, 1)


def accuracy(logits: np.ndarray, labels) -> float:
    return float((logits.argmax(-1) == np.asarray(labels)).mean())


def completion_scores(model, dataset, batch_size: int, pad_id: int, dev, multiple_of: int = 1,
                      desc: str | None = None, chunked: bool = True) -> dict[str, np.ndarray]:
    """Each preference row's summed completion log-probabilities and token counts, in dataset order:
    chosen and rejected (pairs), or the completion and the KL term's completion (KTO's rows). The
    reference stage, validation and evaluation all score rows this way."""
    import torch

    from qlora.tasks.batches import collate_pairs, collate_unpaired
    from qlora.tasks.training.preference import sequence_logps

    paired = "chosen_ids" in dataset.column_names
    names = ("chosen", "rejected") if paired else ("logps", "kl")
    out = {name: np.zeros(len(dataset), dtype=np.float64) for name in names}
    out |= {f"{name}_tokens": np.zeros(len(dataset), dtype=np.int64) for name in names}
    if not paired:
        out["desirable"] = np.asarray(dataset["label"][:], dtype=bool)
    model.eval()
    order = np.argsort(lengths_of(dataset), kind="stable")
    shown = progress_bar(len(order), desc, "row") if desc else None
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [dataset[int(i)] for i in idx]
            if paired:
                b = collate_pairs(rows, pad_id, dev, multiple_of)
                parts = [(b["input_ids"], b["attention_mask"], b["labels"])]
            else:
                b = collate_unpaired(rows, pad_id, dev, multiple_of)
                parts = [(b["input_ids"], b["attention_mask"], b["labels"]),
                         (b["kl_input_ids"], b["kl_attention_mask"], b["kl_labels"])]
            values, counts = [], []
            for ids, mask, labels in parts:
                logps, tokens = sequence_logps(model, ids, mask, labels, chunked)
                values.append(logps.double().cpu().numpy())
                counts.append(tokens.cpu().numpy())
            values, counts = np.concatenate(values), np.concatenate(counts)
            for k, name in enumerate(names):  # chosen rows, then rejected (or the KL rows)
                out[name][idx] = values[k * len(idx):(k + 1) * len(idx)]
                out[f"{name}_tokens"][idx] = counts[k * len(idx):(k + 1) * len(idx)]
            if shown is not None:
                shown.update(len(idx))
    if shown is not None:
        shown.close()
    model.train()
    return out
