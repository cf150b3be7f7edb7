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


def shard_model(model, world: World, dev, cpu_offload: bool = False) -> int:
    """Shard the model in place over the processes: each decoder layer, then the rest (embeddings,
    head, norms) as the root. Weights keep their own dtypes (4-bit bytes, 16-bit norms, float32
    adapter): nothing is cast. A model in CPU memory moves to dev one layer at a time, each GPU
    keeping its shards. Returns the number of layers sharded."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(dev.type, (world.size,))
    offload = CPUOffloadPolicy() if cpu_offload and dev.type == "cuda" else OffloadPolicy()
    _prepare_4bit_layers(model, torch.bfloat16, dev)
    layers = decoder_layers(model)
    for layer in reversed(layers):  # inner units before the ones holding them
        fully_shard(layer, mesh=mesh, offload_policy=offload)
    fully_shard(model, mesh=mesh, offload_policy=offload)
    return len(layers)


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
    """Whole weights and optimizer state (as saved from any number of processes) sharded into this
    process's parts. Every rank passes the same whole state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
