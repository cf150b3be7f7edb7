"""Resumable checkpoints: trainable weights (safetensors), optimizer and scheduler state (tensors and
plain containers only, read with weights_only=True), RNG states and progress (JSON). Written to a
temporary directory and renamed, so a checkpoint is whole or absent; a damaged one is skipped.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np


def trainable_state(model) -> dict:
    """What a checkpoint must hold: the adapter (and head) for LoRA, every weight for full fine-tuning."""
    from peft import PeftModel, get_peft_model_state_dict

    return get_peft_model_state_dict(model) if isinstance(model, PeftModel) else model.state_dict()


def save_checkpoint(scratch: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> None:
    import torch
    from safetensors.torch import save_file

    final = scratch / f"checkpoint-{step:07d}"
    tmp = scratch / f".tmp-checkpoint-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Copies: on the CPU .cpu() would hand back views of the one flat buffer (flatten_parameters).
    weights = {k: v.detach().to("cpu", copy=True) for k, v in trainable_state(model).items()}
    save_file(weights, tmp / "adapter.safetensors")
    # Only tensors and plain containers in state.pt (loaded with weights_only=True: nothing in a
    # checkpoint is executed); the NumPy and Python RNG states as JSON.
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
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


def read_checkpoint(path: Path) -> dict:
    """Every file of a checkpoint, read before any is applied: an unreadable one changes nothing."""
    import torch
    from safetensors.torch import load_file

    return {"weights": load_file(path / "adapter.safetensors"),
            "state": torch.load(path / "state.pt", weights_only=True),
            "rng": json.loads((path / "rng.json").read_text()),
            "progress": json.loads((path / "progress.json").read_text())}


def apply_checkpoint(checkpoint: dict, model, optimizer, scheduler) -> dict:
    import torch
    from peft import PeftModel, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, checkpoint["weights"])
    else:
        model.load_state_dict(checkpoint["weights"])
    state = checkpoint["state"]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    kind, keys, pos, has_gauss, gauss = checkpoint["rng"]["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = checkpoint["rng"]["python"]
    random.setstate((version, tuple(internal), gauss_next))
    return checkpoint["progress"]


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
