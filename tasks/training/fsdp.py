"""Sharded data parallelism (FSDP2, torch.distributed.fsdp.fully_shard) for models one GPU cannot hold.
Each process keeps 1/N of every weight (the 4-bit base's packed bytes included), of the adapter and
of its optimizer state; a decoder layer's shards are gathered just before it runs and freed after,
so a GPU holds its shards plus a layer or two. FSDP reduces the trained weights' gradients over the
processes itself (each keeps its shard), so the loop is the same.

bitsandbytes' 4-bit layers keep their quantization state (block scales) on the module as well as on
the weight: the gathered weight is a plain tensor, and the layer (and the fused LoRA function) finds
the state there. The block scales themselves are not sharded (about 1/64 byte per weight).
"""
from __future__ import annotations

import math

from qlora.tasks.training.distributed import World


def choose_strategy(requested: str, world: World, fits_one_gpu: bool) -> str:
    """What this run trains with: none in one process; ddp or fsdp as the recipe asks; auto: ddp when
    the model and its training state fit one GPU, else fsdp."""
    if not world.distributed:
        return "none"
    if requested in ("ddp", "fsdp"):
        return requested
    return "ddp" if fits_one_gpu else "fsdp"


def decoder_layers(model) -> list:
    """The repeated blocks each sharded as a unit: the classes transformers never splits across
    devices (the model's _no_split_modules: LlamaDecoderLayer, BertLayer, ...)."""
    names = set()
    for module in model.modules():  # the transformers model, wherever peft put it
        names |= set(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model, world: World, dev, cpu_offload: bool = False, from_rank0: bool = False) -> int:
    """Shard the model in place over the processes: each decoder layer, then the rest (embeddings,
    head, norms) as the root. Weights keep their own dtypes (4-bit bytes, 16-bit norms, float32
    adapter): nothing is cast. A model in CPU memory moves to dev one layer at a time, each GPU
    keeping its shards. from_rank0: only rank 0 holds the weights (the others built the model on the
    meta device, loading.empty_base); each unit's weights are sent from rank 0 as it is sharded, and
    rank 0's whole copy of that unit is freed, so a node holds about one copy of the base whatever
    its number of processes. Returns the number of layers sharded."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(dev.type, (world.size,))
    offload = CPUOffloadPolicy() if cpu_offload and dev.type == "cuda" else OffloadPolicy()
    _prepare_4bit_layers(model, torch.bfloat16, dev)
    layers = decoder_layers(model)
    units = [*reversed(layers), model]  # inner units before the ones holding them
    if from_rank0:
        _check_same_model(model, dev)
        owned = _owned_tensors(model, units)
    for unit in units:
        if not from_rank0:
            fully_shard(unit, mesh=mesh, offload_policy=offload)
            continue
        names = owned[id(unit)]
        # Rank 0's whole tensors of this unit, kept until they are sent (sharding replaces them).
        whole = {n: unit.get_parameter(n) for n in names["parameters"]} if world.main else {}
        fully_shard(unit, mesh=mesh, offload_policy=offload)
        _receive_from_rank0(unit, names, whole, dev)
        del whole
    return len(layers)


def _owned_tensors(model, units: list) -> dict[int, dict]:
    """For each unit (by id), the names (relative to it) of the parameters it shards itself (not those of
    a unit inside it), its buffers, its 4-bit layers, and the other names of a tied weight."""
    prefixes = {id(m): name for name, m in model.named_modules()}
    unit_prefixes = sorted(((prefixes[id(u)], u) for u in units), key=lambda pu: -len(pu[0]))

    def owner(name: str):
        return next(u for prefix, u in unit_prefixes if not prefix or name.startswith(prefix + "."))

    def relative(unit, name: str) -> str:
        prefix = prefixes[id(unit)]
        return name[len(prefix) + 1:] if prefix else name

    owned = {id(u): {"parameters": [], "aliases": {}, "buffers": [], "4bit": []} for u in units}
    first_name: dict[int, tuple] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        unit = owner(name)
        if id(p) in first_name:  # a tied weight: sharded once, under its first name
            owned[id(unit)]["aliases"][relative(unit, name)] = first_name[id(p)]
            continue
        first_name[id(p)] = (unit, relative(unit, name))
        owned[id(unit)]["parameters"].append(relative(unit, name))
    for module_name, module in model.named_modules():
        unit = owner(module_name) if module_name else model
        for buffer_name, buffer in module.named_buffers(recurse=False):  # all: small, and then rank 0's
            if buffer is not None:
                full = f"{module_name}.{buffer_name}" if module_name else buffer_name
                owned[id(unit)]["buffers"].append(relative(unit, full))
        if type(module).__name__ == "Linear4bit" and getattr(module, "quant_state", None) is not None:  # bitsandbytes'
            owned[id(unit)]["4bit"].append(relative(unit, module_name) if module_name else "")
    return owned


# How much of a weight one broadcast sends: what a rank holds besides its shards while receiving (on
# a GPU, pieces this large keep NCCL near its bandwidth; on the CPU, the buffer is host memory).
PIECE_BYTES = {"cuda": 8 * 2**20, "cpu": 2**20}


def _receive_from_rank0(unit, names: dict, whole: dict, dev) -> None:
    """Each of the unit's weights sent from rank 0 in pieces of rows (PIECE_BYTES at a time), each other
    rank keeping the rows of its own shard (FSDP's dim-0 shards, as torch.chunk cuts them; rank 0's
    were cut by FSDP from its whole weights); its buffers and its 4-bit layers' quantization state
    sent whole."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    shards, buffer = {}, None
    for name in names["parameters"]:
        param = unit.get_parameter(name)  # this rank's shard (a DTensor): on the meta device but on rank 0
        mesh = param.device_mesh
        rows, rest = param.shape[0], tuple(param.shape[1:])
        per_rank = -(-rows // mesh.size())
        first = min(mesh.get_local_rank() * per_rank, rows)
        last = min(first + per_rank, rows)
        local = torch.empty((last - first, *rest), dtype=param.dtype, device=dev) if param.is_meta else None
        if local is not None and tuple(local.shape) != tuple(param.to_local().shape):
            raise RuntimeError(f"{name}: FSDP's shard has shape {tuple(param.to_local().shape)}, not the "
                               f"{tuple(local.shape)} of rows {first}..{last}")
        source = whole.pop(name).detach() if name in whole else None
        row_bytes = max(1, math.prod(rest) * param.element_size())
        step = max(1, PIECE_BYTES[dev.type] // row_bytes)
        if buffer is None or buffer.numel() < step * row_bytes:  # one buffer, reused: no allocation per piece
            buffer = torch.empty(max(PIECE_BYTES[dev.type], step * row_bytes), dtype=torch.uint8, device=dev)
        for top in range(0, rows, step):
            bottom = min(rows, top + step)
            piece = buffer[:(bottom - top) * row_bytes].view(param.dtype).view(bottom - top, *rest)
            if source is not None:
                piece.copy_(source[top:bottom])
            dist.broadcast(piece, src=0)
            lo, hi = max(top, first), min(bottom, last)
            if local is not None and lo < hi:
                local[lo - first:hi - first].copy_(piece[lo - top:hi - top])
        del source
        if local is not None:
            shards[name] = DTensor.from_local(local, mesh, param.placements, shape=param.shape, stride=param.stride())
    if shards:
        unit.load_state_dict(shards, strict=False, assign=True)  # FSDP takes the new shards as its own
        for alias, (owner, name) in names["aliases"].items():  # a tied weight: the same shard under each name
            parent, _, leaf = alias.rpartition(".")
            (unit.get_submodule(parent) if parent else unit).register_parameter(leaf, owner.get_parameter(name))
    with torch.no_grad():
        for name in names["buffers"]:
            dist.broadcast(unit.get_buffer(name), src=0)
        for name in names["4bit"]:
            state = (unit.get_submodule(name) if name else unit).quant_state
            while state is not None:
                for t in (state.absmax, state.code, state.offset if state.nested else None):
                    if isinstance(t, torch.Tensor) and t.dim() > 0:
                        dist.broadcast(t, src=0)
                    elif isinstance(t, torch.Tensor):
                        held = t.reshape(1).to(dev)  # a scalar: sent as a one-element tensor
                        dist.broadcast(held, src=0)
                        t.copy_(held[0])
                state = state.state2 if state.nested else None


def _check_same_model(model, dev) -> None:
    """Every rank built the same weights (names, shapes, dtypes, which are tied): otherwise a broadcast
    would mismatch."""
    import hashlib

    import torch
    import torch.distributed as dist

    described = "".join(f"{n}:{tuple(t.shape)}:{t.dtype};" for n, t in model.named_parameters())  # a tied one once
    digest = int(hashlib.sha256(described.encode()).hexdigest()[:15], 16)
    seen = torch.tensor([digest, -digest], dtype=torch.int64, device=dev)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    if seen.tolist() != [digest, -digest]:
        raise RuntimeError("the ranks built different models (names, shapes or dtypes of their weights differ)")


def _prepare_4bit_layers(model, storage, dev) -> None:
    """Each 4-bit layer made shardable: its packed bytes viewed as a floating dtype (FSDP makes every
    shard a parameter, which an integer tensor cannot be; bitsandbytes reads the bytes whatever the
    dtype: its quant_storage), and its quantization state kept on the module too (the gathered
    weight FSDP hands the layer is a plain tensor), on dev (FSDP moves parameters, not this)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = module.weight
        if getattr(module, "quant_state", None) is None:
            module.quant_state = weight.quant_state
        if not weight.dtype.is_floating_point:
            packed = weight.data.reshape(-1).view(storage).reshape(-1, 1)
            module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=module.quant_state,
                                              blocksize=module.quant_state.blocksize, quant_type=module.quant_state.quant_type,
                                              compress_statistics=module.quant_state.nested, quant_storage=storage,
                                              module=module, bnb_quantized=True)
            module.quant_storage = storage
        module.quant_state.to(dev)  # in place: the block scales and, nested, their own


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_trainable_weights(model) -> dict:
    """The trained weights, whole, on the CPU, by name: gathered from every process (a collective:
    every rank calls it; rank 0 gets them, the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    return {k: v for k, v in full.items() if k in names}


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer state, whole, on the CPU, keyed by weight name (a collective, as above)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Whole weights and optimizer state (as saved from any number of processes), given on rank 0 (the
    others pass empty dicts), sent to every process, each keeping its parts (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
