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
