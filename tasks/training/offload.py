"""Activation offload: the tensors saved for backward kept in pinned CPU memory, copied on a side
stream so neither the GPU nor the CPU waits.
"""
from __future__ import annotations

import threading

from qlora.tasks.batches import round_up


class _Offloaded:
    __slots__ = ("cpu", "buffer", "device", "gpu", "ready", "index", "released")


_OFFLOAD_STATE: dict = {}  # CUDA device -> (copy stream, pinned byte buffers free for reuse)


_OFFLOAD_LOCK = threading.Lock()  # packs run on the training thread, unpacks on autograd's device thread


def _side_stream_and_pool(device):
    """The device's side stream for every offload copy, and its pool of free pinned buffers."""
    import torch

    with _OFFLOAD_LOCK:
        if device not in _OFFLOAD_STATE:
            with torch.cuda.device(device):
                _OFFLOAD_STATE[device] = (torch.cuda.Stream(), [])
        return _OFFLOAD_STATE[device]


def _fetch(item) -> None:
    """An offloaded tensor's copy back to its GPU, queued on the side stream (once)."""
    import torch

    if item.gpu is None:
        stream, _ = _side_stream_and_pool(item.device)
        with torch.cuda.stream(stream):
            item.gpu = torch.empty(item.cpu.shape, dtype=item.cpu.dtype, device=item.device)
            item.gpu.copy_(item.cpu, non_blocking=True)
            item.ready = stream.record_event()


def offload_to_cpu(min_bytes: int = 2**20):
    """Saved-for-backward tensors (with checkpointing: each layer's input) kept in pinned CPU memory,
    without stalling the GPU or the CPU. torch's save_on_cpu copies on the compute stream and waits for
    each copy, so the CPU stops queuing kernels at every layer (a noticeable share of
    the step). Here the copy out runs on a side stream as soon as the tensor exists, and in backward
    each tensor's copy back starts while the layer after it (in backward order, the one before) is
    still being computed. The pinned buffers are reused from step to step: every copy to or from them
    runs on the one side stream, so a buffer handed back after its copy back is queued is safe to
    fill again (rows of varying width take any free buffer large enough; the pool keeps at most twice
    what one forward pass saved). Small tensors (shared rotary tables, masks) stay on the GPU."""
    import torch

    saved: list = []  # in the order saved; backward unpacks them roughly in reverse
    state, fetch = _side_stream_and_pool, _fetch

    def pack(tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type != "cuda" or nbytes < min_bytes or isinstance(tensor, torch.nn.Parameter):
            return tensor
        stream, free = state(tensor.device)
        with _OFFLOAD_LOCK:
            fits = [i for i, b in enumerate(free) if b.numel() >= nbytes]  # (indices: tensors do not compare by ==)
            buffer = free.pop(min(fits, key=lambda i: free[i].numel())) if fits else None
        if buffer is None:
            buffer = torch.empty(round_up(nbytes, 2**21), dtype=torch.uint8, pin_memory=True)
        cpu = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
        stream.wait_stream(torch.cuda.current_stream())  # the tensor is written before it is copied
        with torch.cuda.stream(stream):
            cpu.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy is done
        item = _Offloaded()
        item.cpu, item.buffer, item.device, item.gpu, item.ready, item.index, item.released = \
            cpu, buffer, tensor.device, None, None, len(saved), False
        saved.append(item)
        return item

    def unpack(item):
        if isinstance(item, torch.Tensor):
            return item
        if item.released:
            raise RuntimeError("activations offloaded to CPU are read once: backward twice through the same "
                               "graph (retain_graph) needs train.offload_activations off")
        fetch(item)
        saved[item.index] = None
        earlier = next((s for s in reversed(saved[:item.index]) if s is not None), None)
        if earlier is not None:
            fetch(earlier)  # the next one backward needs, copied while this one is used
        _, free = state(item.device)
        with _OFFLOAD_LOCK:
            free.append(item.buffer)  # its copy back is queued first
            if len(free) > 2 * len(saved):
                free.pop(min(range(len(free)), key=lambda i: free[i].numel()))
        item.released = True
        compute = torch.cuda.current_stream()
        compute.wait_event(item.ready)
        tensor, item.gpu = item.gpu, None
        tensor.record_stream(compute)
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
