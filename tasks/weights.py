"""The weight files of a model or adapter directory, checked before anything loads them: only
safetensors (a pickle-based file can run code when read, so it is refused, never opened), and each
safetensors file whole (its header parses and the file holds every byte the header's offsets name,
so a truncated download fails here in one line, not deep inside a load)."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from qlora.tasks.recipe import RecipeError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 2**20  # what the safetensors library itself accepts


def safetensors_files(directory: Path, field: str, stem: str = "") -> list[Path]:
    """The directory's safetensors files (those whose names start with `stem`), each checked whole; a
    directory with pickle-based weights only is refused, naming the file."""
    files = sorted(p for p in directory.iterdir() if p.name.startswith(stem) and p.name.endswith(".safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.iterdir() if p.name.startswith(stem) and p.name.endswith(PICKLE_SUFFIXES))
        if pickled:
            raise RecipeError(f"refusing to load a pickle-based weight file ({pickled[0]} in {directory}): convert it "
                              f"to safetensors", field,
                              hint="e.g. load it once where you trust it and save_pretrained(..., safe_serialization=True)")
        raise RecipeError(f"no weights (*.safetensors) in {directory}", field)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        _check_index(index, field)
    _check_shard_numbers(files, directory, field)
    for path in files:
        check_safetensors(path, field)
    return files


def check_safetensors(path: Path, field: str) -> None:
    """The file's 8-byte header length, its JSON header, and a size that covers every tensor's bytes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RecipeError(f"{path} is not a safetensors file ({size} bytes)", field)
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise RecipeError(f"{path} is truncated or not a safetensors file (its header says {length} bytes of "
                              f"metadata; the file has {size} bytes)", field, hint="download or copy it again")
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise RecipeError(f"{path} is not a safetensors file (its header is not valid)", field) from None
    if 8 + length + end > size:
        raise RecipeError(f"{path} is truncated: its tensors need {8 + length + end} bytes, the file has {size}",
                          field, hint="download or copy it again")


SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<number>\d+)-of-(?P<count>\d+)\.safetensors$")


def _check_shard_numbers(files: list[Path], directory: Path, field: str) -> None:
    """Shards named NAME-0000k-of-0000n (as save_pretrained and the Hub name them) are all there,
    with or without an index: a missing one would otherwise load as a model with weights left at
    their random start."""
    groups: dict[tuple[str, str, int], set[int]] = {}
    for path in files:
        m = SHARD_NAME.match(path.name)
        if m:
            groups.setdefault((m["stem"], m["count"], len(m["number"])), set()).add(int(m["number"]))
    for (stem, count, width), numbers in groups.items():
        missing = sorted(set(range(1, int(count) + 1)) - numbers)
        if missing:
            name = f"{stem}-{missing[0]:0{width}d}-of-{count}.safetensors"
            raise RecipeError(f"shard {name} is missing from {directory} ({len(missing)} of {int(count)} missing)", field)


def _check_index(index: Path, field: str) -> None:
    """A sharded checkpoint's index names shards that are all there."""
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise RecipeError(f"{index} is not a valid safetensors index", field) from None
    missing = sorted(s for s in shards if not (index.parent / s).is_file())
    if missing:
        raise RecipeError(f"shard {missing[0]} named in {index.name} is missing from {index.parent}", field)


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file that holds it (one file, or a sharded checkpoint's index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {name: model_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    names = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update({name: file for name in f.keys()})
    return names
