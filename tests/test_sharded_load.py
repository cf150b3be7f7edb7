"""Loading a base for sharded training: a 16-bit checkpoint saved in several safetensors shards (as the
Hub ships one) is quantized layer by layer to the bytes transformers' own 4-bit load makes; under FSDP
rank 0 alone reads it and every rank ends with exactly its shards of those bytes; the processes of a
node hold about one copy of the base together, whatever their number (CPU, gloo)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_llama_with_minilm_tokenizer, stages_before_training
from safetensors import safe_open

from qlora.tasks.recipe import DistributedSection, recipe_from_dict
from qlora.tasks.train import train

QUANTIZATION = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": "bfloat16"}


def _sharded_run(root: Path, max_shard_size: str, **size) -> dict:
    """A Llama saved in 16 bits in shards with their index, question/answer rows for it, and the
    stages before training run on it."""
    import pandas as pd

    save_llama_with_minilm_tokenizer(root / "model", dtype=torch.bfloat16, max_shard_size=max_shard_size,
                                     num_key_value_heads=4, tie_word_embeddings=True, **size)
    pd.DataFrame({"question": [f"what is {a} plus {b}?" for a in range(8) for b in range(8)],
                  "answer": [f"{a + b}." for a in range(8) for b in range(8)]}).to_csv(root / "qa.csv", index=False)
    r = recipe_from_dict({
        "name": "sharded-test", "model": {"name_or_path": str(root / "model"), "task": "causal-lm"},
        "data": {"path": str(root / "qa.csv")}, "split": {"validation_size": 0.1, "test_size": 0.1},
        "prompt": {"template": "Q: {question}\nA: ", "response_column": "answer"}, "tokenize": {"max_length": 24},
        "quantization": QUANTIZATION,
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": 1, "learning_rate": 1e-3, "per_device_train_batch_size": 4, "optim": "adamw_torch",
                  "gradient_accumulation_steps": 1, "logging_steps": 1, "save_steps": 10, "eval_steps": 10},
        "merge": {"enabled": False}})
    return stages_before_training(r, str(root / "work")) | {"root": root}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Large enough that its weights, not the code, dominate a process's memory (16 layers of width
    1024, tied embeddings; about 200 MB in 4 bits)."""
    return _sharded_run(tmp_path_factory.mktemp("sharded"), "100MB", hidden_size=1024, intermediate_size=4096,
                        num_hidden_layers=16, num_attention_heads=16)


@pytest.fixture(scope="module")
def small_sharded(tmp_path_factory):
    """The same shape of checkpoint (several shards and their index), small enough for the fast tests."""
    return _sharded_run(tmp_path_factory.mktemp("small-sharded"), "2MB", hidden_size=256, intermediate_size=1024,
                        num_hidden_layers=4, num_attention_heads=8)


def _tensors(directory: Path, keep=lambda name: True) -> dict:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if keep(k)})
    return out


def test_a_sharded_16bit_checkpoint_quantizes_to_transformers_own_4bit_bytes(small_sharded, tmp_path):
    """The checkpoint is five files and an index; the quantize stage's saved base holds, tensor for
    tensor, the bytes of transformers' own 4-bit load of the same checkpoint (packed weights, block
    scales, code tables)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    sharded = small_sharded
    source = sharded["root"] / "model"
    assert len(list(source.glob("model-*-of-*.safetensors"))) >= 4 and (source / "model.safetensors.index.json").is_file()
    theirs = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.bfloat16, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(**{**QUANTIZATION, "bnb_4bit_compute_dtype": torch.bfloat16}))
    theirs.save_pretrained(tmp_path / "theirs")
    expected = _tensors(tmp_path / "theirs")
    ours = _tensors(Path(sharded["quantized"].model_path))
    assert ours.keys() == expected.keys()
    assert sum(k.endswith(".quant_state.bitsandbytes__nf4") for k in ours) == 4 * 7
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


GATHER = """
import sys
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from qlora.tasks.recipe import LoraSection, QuantizationSection
from qlora.tasks.results import LoraPlan, Quantized
from qlora.tasks.training import distributed, fsdp, loading
from qlora.tasks.training.lora import model_for_training

quantized, plan = Quantized.model_validate_json(sys.argv[1]), LoraPlan.model_validate_json(sys.argv[2])
lora, q, out = LoraSection.model_validate_json(sys.argv[3]), QuantizationSection.model_validate_json(sys.argv[4]), sys.argv[5]
world = distributed.init_from_env()
if world.main:
    base = loading.load_base(quantized, [], q, "sdpa", on_cpu=True)
else:
    base = loading.empty_base(quantized, [], q, "sdpa")
model = model_for_training(base, plan, lora, True, False, initialise=world.main)
fsdp.shard_model(model, world, torch.device("cpu"), from_rank0=True)
import bitsandbytes as bnb
save_file({n: m.quant_state.absmax.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)},
          f"{out}/absmax-{world.rank}.safetensors")
whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if world.main:
    save_file({k.replace("base_model.model.", "").replace(".base_layer", ""): v.contiguous()
               for k, v in whole.items() if "lora_" not in k}, f"{out}/gathered.safetensors")
distributed.shutdown()
"""


@pytest.mark.slow
def test_under_fsdp_every_rank_holds_its_shards_of_the_saved_bytes(sharded, tmp_path):
    """Two gloo processes, rank 1 built on the meta device: gathered back, the sharded base is bitwise
    the saved 4-bit checkpoint (packed weights, 16-bit norms and embeddings), and both ranks hold the
    saved block scales."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER)
    p = sharded
    args = [p["quantized"].model_dump_json(), p["lora"].model_dump_json(), p["recipe"].lora.model_dump_json(),
            p["recipe"].quantization.model_dump_json(), str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    saved = _tensors(Path(p["quantized"].model_path))
    with safe_open(str(tmp_path / "gathered.safetensors"), framework="pt") as f:
        gathered = {k: f.get_tensor(k) for k in f.keys()}
    packed = [k for k in saved if k.endswith("_proj.weight") and saved[k].dtype == torch.uint8]
    assert len(packed) == 16 * 7
    for name in packed + ["model.embed_tokens.weight", "model.norm.weight", "model.layers.3.input_layernorm.weight"]:
        # a packed weight is sharded as 16-bit words of its bytes: compared byte for byte
        assert torch.equal(gathered[name].reshape(-1).view(torch.uint8), saved[name].reshape(-1).view(torch.uint8)), name
    for rank in (0, 1):
        with safe_open(str(tmp_path / f"absmax-{rank}.safetensors"), framework="pt") as f:
            for layer in ("model.layers.5.mlp.down_proj", "model.layers.2.self_attn.q_proj"):  # plain, and under LoRA
                held = f.get_tensor(f"base_model.model.{layer}" + (".base_layer" if "q_proj" in layer else ""))
                assert torch.equal(held, saved[f"{layer}.weight.absmax"]), (rank, layer)


def _train(p, work_dir, processes: int):
    r = p["recipe"]
    launch = DistributedSection(strategy="fsdp", nproc_per_node=processes) if processes > 1 else None
    return train.fn(p["tokenized"], p["quantized"], p["lora"], r.lora, r.quantization, r.train, launch=launch,
                    work_dir=str(work_dir))


@pytest.mark.slow
def test_a_node_holds_one_copy_of_the_base_whatever_its_number_of_processes(sharded, tmp_path):
    """Loading and sharding the base, FSDP on 2 and 4 processes: what the node's processes hold
    themselves is about one copy of the 4-bit base (the shards) whatever their number; rank 0 alone
    maps the checkpoint, and every other rank grows by about its shards only; the first step's loss is
    that of one process."""
    one = _train(sharded, tmp_path / "one", 1)
    copy = sum(f.stat().st_size for f in Path(sharded["quantized"].model_path).glob("*.safetensors"))
    first = _losses(one)
    for processes in (2, 4):
        run = _train(sharded, tmp_path / f"n{processes}", processes)
        assert run.processes == processes and len(run.load_host_bytes) == processes
        print(f"{processes} processes: the node's own memory {run.load_node_bytes / 2**20:.0f} MiB, the checkpoint "
              f"mapped {run.load_mapped_bytes / 2**20:.0f} MiB, per rank {[round(b / 2**20) for b in run.load_host_bytes]}"
              f" MiB; the 4-bit base {copy / 2**20:.0f} MiB")
        # Besides the shards, each process's own: a receive buffer, FSDP's bookkeeping, the allocator's
        # slack, and where a weight's rows do not divide evenly, one shard copied once more (FSDP pads it).
        assert run.load_node_bytes <= 1.3 * copy + processes * 16 * 2**20, (run.load_node_bytes, copy)
        assert run.load_mapped_bytes <= 1.1 * copy
        assert run.load_host_bytes[0] >= 0.8 * copy  # rank 0 did read it
        for other in run.load_host_bytes[1:]:
            assert other <= copy / processes + 0.35 * copy, (other, copy)  # its shards (and the above), never a copy
        assert _losses(run) == pytest.approx(first, rel=1e-4)


def _losses(result) -> list[float]:
    lines = (Path(result.dir) / result.history).read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines if "train_loss" in json.loads(line)]
