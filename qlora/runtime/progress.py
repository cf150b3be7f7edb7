"""Progress bars with ETA for the long loops (training, evaluation, generation), on stderr when it
is a terminal: in a log file (a scheduler, a pipe) each redraw would be one more line, and the
stage's own log lines say the same. QLORA_PROGRESS=0 turns them off, QLORA_PROGRESS=1 on."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def wanted() -> bool:
    setting = os.environ.get("QLORA_PROGRESS")
    return setting != "0" if setting is not None else sys.stderr.isatty()


def bar(total: int, desc: str, unit: str, initial: int = 0, leave: bool = True, disable: bool = False) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                disable=disable or not wanted())
