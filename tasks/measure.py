"""What a stage measures about memory: its own peak (CPU resident set or CUDA allocator) and the bytes
of a model's weights, gradients and optimizer state.
"""
from __future__ import annotations

import os
import threading


def _release_free_memory() -> None:
    """Hand memory freed by earlier work back to the OS (glibc malloc_trim), so that resident memory
    measures what is live: two trainings in one process then measure alike."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measure is then an upper bound of reuse
        pass


class PeakMemory:
    """Peak resident memory above the starting level while the block runs (CPU: /proc sampled
    every 5 ms; CUDA: the allocator's peak)."""

    def __init__(self, dev):
        self.dev, self.peak = dev, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import torch
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.start = torch.cuda.memory_allocated(self.dev)
            return self
        _release_free_memory()  # else freed blocks kept by the allocator hide this block's own peak
        self.start, self._stop = self._rss(), threading.Event()
        self._high = self.start

        def sample():
            while not self._stop.wait(0.005):
                self._high = max(self._high, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch
        if self.dev.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.dev) - self.start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._high, self._rss()) - self.start


class NodeMemory:
    """What several processes of this machine take together while the block runs, sampled every 5 ms:
    `own`, the peak of their summed anonymous memory (what they hold themselves) above its start, and
    `mapped`, the peak growth of file-backed pages any one of them maps (a checkpoint read through
    mmap: the kernel's page cache, one copy however many processes map it, dropped under pressure)."""

    def __init__(self, pids: list[int]):
        self.pids, self.own, self.mapped = pids, 0, 0

    def _levels(self) -> tuple[int, list[int]]:
        own, mapped = 0, []
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    resident, shared = (int(v) for v in f.read().split()[1:3])
            except (OSError, ValueError):  # gone, or no /proc: counted as nothing
                resident, shared = 0, 0
            own, mapped = own + resident - shared, [*mapped, shared]
        page = os.sysconf("SC_PAGE_SIZE")
        return own * page, [m * page for m in mapped]

    def _sample(self) -> None:
        own, mapped = self._levels()
        self.own = max(self.own, own - self._start[0])
        self.mapped = max([self.mapped, *(m - m0 for m, m0 in zip(mapped, self._start[1]))])

    def __enter__(self):
        self._start, self._stop = self._levels(), threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self._sample()

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def _bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def weights_bytes(model) -> int:
    """A model's weights and buffers in memory (4-bit weights at their packed size)."""
    return sum(_bytes(t) for t in list(model.parameters()) + list(model.buffers()))


def training_state_bytes(model, optimizer) -> dict[str, int]:
    """What a method must hold besides activations, counted exactly: the model's weights, the
    gradients of the trainable ones, the optimizer's state."""
    import torch

    trainable = sum(_bytes(p) for p in model.parameters() if p.requires_grad)  # one gradient each
    state = sum(_bytes(v) for per_param in optimizer.state.values() for v in per_param.values()
                if isinstance(v, torch.Tensor))
    return {"weights_bytes": weights_bytes(model), "gradient_bytes": trainable, "optimizer_state_bytes": state}
