"""Progress bars with ETA for the long loops (training, evaluation, generation), on stderr.
QLORA_PROGRESS=0 turns them off (tests, logs collected by a scheduler)."""
from __future__ import annotations

import os

from tqdm.auto import tqdm


def bar(total: int, desc: str, unit: str, initial: int = 0, leave: bool = True, disable: bool = False) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                disable=disable or os.environ.get("QLORA_PROGRESS", "1") == "0")
