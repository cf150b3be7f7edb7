"""Resumable checkpoints: trained weights (safetensors), optimizer and scheduler state (tensors and
plain containers only, read with weights_only=True), RNG states and progress (JSON). Weights and
optimizer state are whole and keyed by weight name, so a run saved on N processes (sharded or not)
resumes on any number. Written to a
temporary directory and renamed, so a checkpoint is whole or absent; a damaged one is skipped.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np

from qlora.tasks.training import fsdp


def training_state(model, optimizer) -> tuple[dict, dict]:
    """The trained weights and the optimizer state, whole, on the CPU, keyed by weight name: the same
    whatever the number of processes, the sharding or the flat optimizer layout, so a checkpoint
    resumes on any of them. Sharded (FSDP), a collective: every rank calls it, rank 0 gets them."""
    if fsdp.is_sharded(model):
        return fsdp.full_trainable_weights(model), fsdp.full_optimizer_state(model, optimizer)
    # Copies: on the CPU .cpu() would hand back views of the one flat buffer (flatten_parameters).
    weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    return weights, optimizer_state_by_name(optimizer, model)


def optimizer_state_by_name(optimizer, model) -> dict:
    """optimizer.state_dict() with each weight's state under the weight's name (torch.distributed.
    checkpoint's layout); a flat tensor's state (flatten_parameters) cut into the weights it holds."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    saved = optimizer.state_dict()
    state, groups = {}, []
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        held = []
        for index, param in zip(saved_group["params"], group["params"]):
            own = saved["state"].get(index, {})
            if id(param) in names:
                state[names[id(param)]] = {k: _cpu(v) for k, v in own.items()}
                held.append(names[id(param)])
                continue
            for name, weight in _flat_members(param, model):
                start = weight.storage_offset()
                state[name] = {k: _cpu(_cut(v, k, param, start, weight)) for k, v in own.items()}
                held.append(name)
        groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": held})
    return {"state": {k: v for k, v in state.items() if v}, "param_groups": groups}


def load_optimizer_state(optimizer, model, saved: dict) -> None:
    """The reverse of optimizer_state_by_name, into this optimizer (flat or not)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    current = optimizer.state_dict()
    state = {}
    for group, current_group, saved_group in zip(optimizer.param_groups, current["param_groups"],
                                                 saved["param_groups"]):
        current_group.update({k: v for k, v in saved_group.items() if k != "params"})
        for index, param in zip(current_group["params"], group["params"]):
            if id(param) in names:
                if names[id(param)] in saved["state"]:
                    state[index] = saved["state"][names[id(param)]]
                continue
            parts = [(saved["state"].get(name), weight) for name, weight in _flat_members(param, model)]
            if parts and all(part is not None for part, _ in parts):
                state[index] = _joined(param, parts)
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _flat_members(flat, model) -> list:
    """The trained weights that are views into the flat tensor, with their names."""
    storage = flat.untyped_storage().data_ptr()
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and p.untyped_storage().data_ptr() == storage]


BLOCK = 256  # elements per block of bitsandbytes' 8-bit optimizer state (its absmax values)


def _spread(key: str, value, numel: int) -> str | None:
    """How a state tensor of a weight with numel elements lies over them: one entry per element, one
    per block (8-bit scales), or shared by all (None: step counts, quantization maps)."""
    import torch

    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    if value.numel() == numel:
        return "element"
    return "block" if key.startswith("absmax") else None


def _cut(value, key: str, flat, start: int, weight):
    """One weight's part of a flat tensor's state."""
    spread = _spread(key, value, flat.numel())
    if spread == "element":
        return value.reshape(-1)[start:start + weight.numel()].view_as(weight)
    if spread == "block":
        return value[start // BLOCK:start // BLOCK + -(-weight.numel() // BLOCK)]
    return value


def _joined(flat, parts: list) -> dict:
    """The flat tensor's state put together from its weights' parts (the reverse of _cut)."""
    import torch

    first, weight = parts[0]
    joined = {}
    for key, value in first.items():
        spread = _spread(key, value, weight.numel())
        if spread is None:
            joined[key] = value
            continue
        per_block = spread == "block"
        out = torch.zeros(flat.numel() // BLOCK if per_block else flat.numel(), dtype=value.dtype)
        for part, member in parts:
            at = member.storage_offset() // BLOCK if per_block else member.storage_offset()
            out[at:at + part[key].numel()] = part[key].reshape(-1).cpu()
        joined[key] = out
    return joined


def _cpu(value):
    import torch

    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


def save_checkpoint(scratch: Path, step: int, weights: dict, optimizer_state: dict, scheduler, state: dict,
                    keep: int) -> None:
    """weights and optimizer_state as training_state returns them (rank 0's)."""
    import torch
    from safetensors.torch import save_file

    final = scratch / f"checkpoint-{step:07d}"
    tmp = scratch / f".tmp-checkpoint-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "weights.safetensors")
    # Only tensors and plain containers in state.pt (loaded with weights_only=True: nothing in a
    # checkpoint is executed); the NumPy and Python RNG states as JSON.
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng_torch": torch.get_rng_state(), "rng_cuda": cuda_rng}, tmp / "state.pt")
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    (tmp / "rng.json").write_text(json.dumps({
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next]}))
    (tmp / "progress.json").write_text(json.dumps(state))
    os.replace(tmp, final)
    for old in sorted(scratch.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(path: Path, whole: bool = True) -> dict:
    """Every file of a checkpoint, read before any is applied: an unreadable one changes nothing.
    whole=False: without the trained weights and optimizer state (a sharded run's other ranks receive
    them from rank 0): the schedule, RNG and progress only."""
    import torch
    from safetensors.torch import load_file

    # Mapped, not read: the optimizer state a rank does not need is never read from disk.
    state = torch.load(path / "state.pt", weights_only=True, mmap=not whole)
    if not whole:
        state["optimizer"] = {}
    return {"weights": load_file(path / "weights.safetensors") if whole else {}, "state": state,
            "rng": json.loads((path / "rng.json").read_text()),
            "progress": json.loads((path / "progress.json").read_text())}


def apply_checkpoint(checkpoint: dict, model, optimizer, scheduler) -> dict:
    """A checkpoint read back restored into this run's model, optimizer (sharded or not, flat or not),
    schedule and RNG; returns its progress. Sharded: rank 0's whole weights and optimizer state are
    sent to every rank (the others read the checkpoint without them), each keeping its shards."""
    import torch

    state = checkpoint["state"]
    if fsdp.is_sharded(model):
        fsdp.load_full_state(model, optimizer, checkpoint["weights"], state["optimizer"])
    else:
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if trained.keys() != checkpoint["weights"].keys():
            raise ValueError("the checkpoint holds other weights than this run trains")
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(checkpoint["weights"][name])
        load_optimizer_state(optimizer, model, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    kind, keys, pos, has_gauss, gauss = checkpoint["rng"]["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = checkpoint["rng"]["python"]
    random.setstate((version, tuple(internal), gauss_next))
    return checkpoint["progress"]


def agreed_checkpoint(scratch: Path, log, rank: int, dev) -> tuple[Path, dict] | None:
    """A sharded run's checkpoint to resume from: the one rank 0 finds readable (it reads it whole);
    the other ranks read the same one without its weights and optimizer state (a collective)."""
    from qlora.tasks.training.distributed import broadcast_int

    found = newest_readable_checkpoint(scratch, log) if rank == 0 else None
    step = broadcast_int(found[1]["progress"]["step"] if found else -1, dev)
    if rank == 0 or step < 0:
        return found
    path = scratch / f"checkpoint-{step:07d}"
    return path, read_checkpoint(path, whole=False)


def newest_readable_checkpoint(scratch: Path, log) -> tuple[Path, dict] | None:
    """The newest checkpoint that reads back; a damaged or planted one (unreadable, or holding
    anything but tensors and plain data) is reported and removed, and the one before it tried."""
    for path in sorted(scratch.glob("checkpoint-*"), reverse=True):
        try:
            return path, read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any failure to read means: do not trust it
            log(f"checkpoint {path} cannot be used ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                f"removed, resuming from an earlier one")
            shutil.rmtree(path, ignore_errors=True)
    return None
