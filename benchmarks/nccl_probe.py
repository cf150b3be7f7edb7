"""All-reduce time and bus bandwidth between the GPUs of this host, for tensors the size of an
adapter's gradients: whether the link or something else limits data-parallel scaling.

    torchrun --standalone --nproc-per-node 2 benchmarks/nccl_probe.py
"""
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    world = dist.get_world_size()
    for mib in (4, 160, 640):
        x = torch.ones(mib * 2**20 // 4, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(20):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / 20
        if rank == 0:  # a ring all-reduce moves 2 (N-1)/N of the tensor over each link
            print(f"all_reduce {mib} MiB: {seconds * 1e3:.2f} ms, bus {2 * (world - 1) / world * mib / 1024 / seconds:.1f} GiB/s",
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
