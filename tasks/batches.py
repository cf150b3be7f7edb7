"""How tokenized rows become batches, for training and inference alike: the order of a run's batches
(a pure function of seed and epoch), packing of causal-LM examples into rows, and collation of
encoder and causal-LM batches.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

MEGABATCH = 50  # batches per length-sorted block: rows of similar length, order still random


def pad_token_id(tok) -> int:
    """Causal LMs often have no pad token: pad with end-of-sequence (padded positions are masked)."""
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return candidate


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def width_multiple(compiled: bool) -> int:
    """What row widths are rounded up to: compiled layers compile once more for a width that is not a
    multiple of 8 (an alignment guard); eager layers take the rows as they are."""
    return 8 if compiled else 1


def lengths_of(dataset) -> np.ndarray:
    """A tokenized dataset's row lengths as one array, fetched once: `dataset["length"]` is a lazy
    column whose every element access is an Arrow lookup (sorting a million rows through it took
    minutes); a full slice of it is one read."""
    return np.asarray(dataset["length"][:], dtype=np.int64)


def pack(lengths, max_length: int, seed: int) -> list[list[int]]:
    """Examples packed into rows of at most max_length tokens, next-fit in a seeded random order.
    Fixed for the whole run: each epoch shuffles the rows, so a step count means the same data."""
    lengths = np.asarray(lengths).tolist()  # Python ints: the loop below indexes them one by one
    rows, current, used = [], [], 0
    for i in np.random.default_rng([seed, 2**31 - 1]).permutation(len(lengths)).tolist():
        if current and used + lengths[i] > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    return rows + ([current] if current else [])


def unit_lengths(lengths: np.ndarray, units: list[list[int]]) -> np.ndarray:
    """Tokens in each packed row (the sum of its examples' lengths), in one pass."""
    sizes = np.fromiter((len(u) for u in units), dtype=np.int64, count=len(units))
    flat = np.fromiter((i for u in units for i in u), dtype=np.int64, count=int(sizes.sum()))
    return np.add.reduceat(lengths[flat], np.concatenate([[0], np.cumsum(sizes)[:-1]])) if len(units) else sizes


def batch_order(lengths, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The row indices of each batch of one epoch: a pure function of (seed, epoch), so a resumed
    run sees exactly the batches the interrupted one would have. O(rows) numpy work."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:  # within each block of MEGABATCH batches, longest first (stable: ties keep their order)
        block = batch_size * MEGABATCH
        order = np.concatenate([part[np.argsort(-lengths[part], kind="stable")]
                                for part in (order[i:i + block] for i in range(0, len(order), block))] or [order])
    starts = np.arange(0, len(order), batch_size)
    batches = [order[i:i + batch_size].tolist() for i in starts.tolist()]
    if group_by_length and batches:  # keep the longest batch first (a memory spike shows at once), shuffle the rest
        longest = int(np.argmax(np.maximum.reduceat(lengths[order], starts)))
        batches.insert(0, batches.pop(longest))
        rest = batches[1:]
        rng.shuffle(rest)
        batches = batches[:1] + rest
    return batches


def collate(rows: list[dict], pad_id: int, dev: torch.device, multiple_of: int = 1) -> dict:
    """Encoder batch, padded to the longest row rounded up to multiple_of (as collate_lm)."""
    import torch
    width = round_up(max(len(r["input_ids"]) for r in rows), multiple_of)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        mask[i, : r.get("length", n)] = 1  # rows padded at tokenization keep their pads masked
    labels = torch.tensor([r["labels"] for r in rows])
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}


def collate_lm(units: list[list[dict]], pad_id: int, dev, width: int | None = None, multiple_of: int = 1) -> dict:
    """Causal-LM batch. Each unit is one example, or several packed into one row: then positions
    restart per example and no attention mask is passed, so transformers keeps attention within
    each example (its packed-sequence detection), and the first token of each example is never a
    target (it would be predicted from the previous example). width: pad every row to it
    (tokenize.padding: max_length, the tutorial way) instead of to the longest row. multiple_of: round
    the width up to it (width_multiple)."""
    import torch

    packed = any(len(u) > 1 for u in units)
    width = max([sum(len(e["input_ids"]) for e in u) for u in units] + [width or 0])
    width = round_up(width, multiple_of)
    ids = torch.full((len(units), width), pad_id, dtype=torch.long)
    labels = torch.full((len(units), width), -100, dtype=torch.long)
    positions = torch.zeros((len(units), width), dtype=torch.long)
    mask = torch.zeros((len(units), width), dtype=torch.long)
    for r, unit in enumerate(units):
        at = 0
        for e in unit:
            n = len(e["input_ids"])
            ids[r, at:at + n] = torch.as_tensor(e["input_ids"])
            labels[r, at:at + n] = torch.as_tensor(e["labels"])
            labels[r, at] = -100
            positions[r, at:at + n] = torch.arange(n)
            at += n
        mask[r, :at] = 1
        positions[r, at:] = torch.arange(width - at)  # padding: a segment of its own
    # No KV cache: with one, transformers skips its packed-sequence detection (and training needs none).
    batch = {"input_ids": ids.to(dev), "labels": labels.to(dev), "use_cache": False}
    if packed:
        batch["position_ids"] = positions.to(dev)
    else:
        batch["attention_mask"] = mask.to(dev)
    batch["real_tokens"] = int(mask.sum())
    batch["targets"] = int((labels[:, 1:] != -100).sum())  # tokens the loss averages over
    return batch


def _completion_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int, multiple_of: int):
    """Prompt + completion rows, right-padded to the longest (rounded up to multiple_of): input ids,
    attention mask, and labels that score the completion only."""
    import torch

    width = round_up(max(len(p) + len(c) for p, c in zip(prompts, completions)), multiple_of)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), -100, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = torch.as_tensor(p + c, dtype=torch.long)
        ids[i, :len(row)] = row
        labels[i, len(p):len(row)] = row[len(p):]
        mask[i, :len(row)] = 1
    return ids, mask, labels


def _with_reference(batch: dict, mask, rows: int, reference: dict | None, dev) -> dict:
    """A preference batch completed: the reference's log-probabilities of its rows (ref_<name>), its
    non-pad tokens, and its targets (the loss is a mean over rows, or pairs)."""
    import torch

    for name, values in (reference or {}).items():
        batch[f"ref_{name}"] = torch.as_tensor(values, dtype=torch.float32).to(dev)
    batch["real_tokens"] = int(mask.sum())
    batch["targets"] = rows
    return batch


def collate_pairs(rows: list[dict], pad_id: int, dev, multiple_of: int = 1, reference: dict | None = None) -> dict:
    """Preference pairs as one batch: the chosen rows, then the rejected rows (one forward for both),
    and, for losses with a reference model, its log-probabilities (reference: name -> one float per row,
    for these rows)."""
    prompts = [r["prompt_ids"] for r in rows]
    ids, mask, labels = _completion_rows(prompts + prompts, [r["chosen_ids"] for r in rows] +
                                         [r["rejected_ids"] for r in rows], pad_id, multiple_of)
    batch = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}
    return _with_reference(batch, mask, len(rows), reference, dev)


def collate_unpaired(rows: list[dict], pad_id: int, dev, multiple_of: int = 1, reference: dict | None = None) -> dict:
    """KTO's rows as one batch: prompt + completion, whether it is desirable, and the same prompts with
    another row's completion (the KL term's rows); the reference's log-probabilities of both."""
    import torch

    prompts = [r["prompt_ids"] for r in rows]
    ids, mask, labels = _completion_rows(prompts, [r["completion_ids"] for r in rows], pad_id, multiple_of)
    kl_ids, kl_mask, kl_labels = _completion_rows(prompts, [r["kl_ids"] for r in rows], pad_id, multiple_of)
    batch = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev),
             "kl_input_ids": kl_ids.to(dev), "kl_attention_mask": kl_mask.to(dev), "kl_labels": kl_labels.to(dev),
             "desirable": torch.as_tensor([bool(r["label"]) for r in rows]).to(dev)}
    return _with_reference(batch, mask, len(rows), reference, dev)
