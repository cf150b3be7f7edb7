"""Loading a saved 4-bit base for sharded training, the way the train stage does, in two ways side by
side: every rank loading the whole checkpoint into CPU memory and FSDP cutting its shards from it
(each_rank, the earlier load), and rank 0 alone loading it while the others build the model on the
meta device and receive their shards (rank0, tasks/training/fsdp.py). Prints, per way: the load
time, each process's resident-memory growth, and the node's processes together (their own memory
summed, the checkpoint's mapped pages once: measure.NodeMemory).

The checkpoint is written first (once, into --dir), tensor by tensor: random 16-bit weights of the
shape, quantized to NF4 by bitsandbytes on the device and saved in the layout transformers' 4-bit
save writes (no 16-bit copy of a 70B model ever exists on disk).

    python benchmarks/sharded_load.py --shape llama3-8b --processes 2 --device cpu
    python benchmarks/sharded_load.py --shape llama2-70b --processes 1 --device cuda   # a group of one
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
SHARD_BYTES = 4 * 2**30
QUANTIZATION = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype="bfloat16")


def write_checkpoint(shape: str, directory: Path, device: str, bits: int = 4) -> None:
    """A random NF4 checkpoint of the shape, as transformers saves a 4-bit model (packed weights with
    their quantization state entries, 16-bit norms and embeddings, an index over the shards); bits 16:
    an unquantized base in float32, as many checkpoints ship (a bfloat16 run converts it on load)."""
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from gpu_train import config_of

    if (directory / "model.safetensors.index.json").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    config = config_of(shape, 4096)
    with torch.device("meta"):
        names = [(n, tuple(p.shape)) for n, p in LlamaForCausalLM(config).named_parameters()]
    generator = torch.Generator(device).manual_seed(0)
    shard, size, weight_map, number = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, number
        if shard:
            number += 1
            file = f"model-{number:05d}.safetensors"
            save_file(shard, directory / file, metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
            shard, size = {}, 0

    for name, shape_ in names:
        stored = torch.bfloat16 if bits == 4 else torch.float32
        if name.endswith("norm.weight"):
            tensors = {name: torch.ones(shape_, dtype=stored)}
        else:
            w = (torch.randn(shape_, generator=generator, device=device, dtype=torch.float32) * 0.02).to(stored)
            if ".layers." in name and bits == 4:
                packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                tensors = {name: packed.cpu(), **{f"{name}.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()}}
            else:
                tensors = {name: w.cpu()}
        shard.update(tensors)
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        if size >= SHARD_BYTES:
            flush()
    flush()
    total = {f"model-{i:05d}.safetensors": f"model-{i:05d}-of-{number:05d}.safetensors" for i in range(1, number + 1)}
    for old, new in total.items():
        (directory / old).rename(directory / new)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: total[v] for k, v in weight_map.items()}}))
    saved = config.to_dict() | ({"dtype": "bfloat16", "quantization_config": BitsAndBytesConfig(
        **{**QUANTIZATION, "bnb_4bit_compute_dtype": torch.bfloat16}).to_dict()} if bits == 4 else {"dtype": "float32"})
    (directory / "config.json").write_text(json.dumps(saved, default=str))


def worker(directory: str, way: str, out: str, bits: str) -> None:
    """One rank: load (rank 0, or every rank for each_rank; the meta-device build otherwise) and shard."""
    import torch
    import torch.distributed as dist

    from qlora.tasks.measure import NodeMemory, PeakMemory
    from qlora.tasks.recipe import QuantizationSection
    from qlora.tasks.results import Quantized
    from qlora.tasks.training import distributed, fsdp, loading

    world = distributed.init_from_env()
    cuda = torch.cuda.is_available()
    dev = loading.device()
    if not dist.is_initialized():  # one process: a group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1,
                                **({"device_id": dev} if cuda else {}))
    q = QuantizationSection(**QUANTIZATION) if bits == "4" else \
        QuantizationSection(load_in_4bit=False, bnb_4bit_compute_dtype="bfloat16")
    path = Path(directory)
    quantized = Quantized(path=path.name if bits == "4" else str(path), quantized=bits == "4", original_path=str(path),
                          task="causal-lm", dir=str(path.parent))
    from transformers import AutoConfig
    loading.import_model_code("causal-lm", AutoConfig.from_pretrained(path))
    pids = distributed.per_rank(os.getpid(), world, dev)
    with open("/proc/self/statm") as f:  # what a process holds before loading (libraries, CUDA context)
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    dist.barrier()
    start = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as host, NodeMemory(pids if world.rank == 0 else []) as node:
        if way == "each_rank" or world.main:
            model = loading.load_base(quantized, [], q, "sdpa", on_cpu=True)
        else:
            model = loading.empty_base(quantized, [], q, "sdpa")
        loaded = time.perf_counter() - start
        fsdp.shard_model(model, world, dev, from_rank0=way == "rank0")
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
    seconds = time.perf_counter() - start
    per_rank = distributed.per_rank(host.peak, world, dev)
    if world.main:
        Path(out).write_text(json.dumps({
            "way": way, "processes": world.size, "process_start_gib": round(resident / 2**30, 2), "load_s": round(loaded, 1), "load_and_shard_s": round(seconds, 1),
            "per_process_gib": [round(b / 2**30, 2) for b in per_rank],
            "node_own_gib": round(node.own / 2**30, 2), "node_mapped_gib": round(node.mapped / 2**30, 2),
            "gpu_gib_per_process": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dir", default="/tmp/qlora-sharded-load")
    parser.add_argument("--ways", default="each_rank,rank0")
    parser.add_argument("--out")
    parser.add_argument("--bits", choices=["4", "16"], default="4",
                        help="16: a float32 unquantized base, trained in bfloat16 (converted on load)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    directory = Path(args.dir) / f"{args.shape}-{args.bits}bit"
    started = time.perf_counter()
    import torch

    write_checkpoint(args.shape, directory, "cuda" if torch.cuda.is_available() else "cpu", int(args.bits))
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    print(json.dumps({"shape": args.shape, "checkpoint_gib": round(size / 2**30, 2),
                      "written_s": round(time.perf_counter() - started, 1)}), flush=True)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    results = []
    for way in args.ways.split(","):
        out = Path(args.dir) / f"{way}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(args.processes), __file__, "--worker", str(directory), way, str(out), args.bits]
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        results.append(json.loads(out.read_text()))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"shape": args.shape, "bits": args.bits, "checkpoint_gib": round(size / 2**30, 2),
                                              "device": args.device, "results": results}, indent=1))


if __name__ == "__main__":
    main()
