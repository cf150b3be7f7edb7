"""Training on several processes, on the CPU with gloo (CI has no GPU): torchrun workers launched by
the train stage train what one process trains for the same global batch; a run stopped on two
processes resumes on one; two torchrun agents joined through a c10d rendezvous on 127.0.0.1 (two
"nodes" on one host) train as one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import minilm_dir, save_llama_with_minilm_tokenizer, small_recipe, stages_before_training
from safetensors.torch import load_file

from qlora.tasks.recipe import DistributedSection, RecipeError, recipe_from_dict
from qlora.tasks.results import LoraPlan
from qlora.tasks.train import train
from qlora.tasks.training.kernels import can_compile

STEPS = 6


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """MiniLM without dropout (its own and the adapters'): one process and two then draw no random
    masks, so their losses and adapters compare exactly."""
    import shutil

    base = tmp_path_factory.mktemp("minilm") / "model"
    shutil.copytree(minilm_dir(), base)
    config = json.loads((base / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (base / "config.json").write_text(json.dumps(config))
    r = recipe_from_dict(small_recipe(
        model={"name_or_path": str(base)}, lora={"lora_dropout": 0.0},
        train={"max_steps": STEPS, "save_steps": 2, "eval_steps": 3, "logging_steps": 1,
               "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}))
    return stages_before_training(r, str(tmp_path_factory.mktemp("work")))


def _train(p, work_dir, launch=None, **overrides):
    r = p["recipe"]
    return train.fn(p["tokenized"], p["quantized"], p["lora"], r.lora, r.quantization,
                    r.train.model_copy(update=overrides), launch=launch, work_dir=str(work_dir),
                    preference=r.preference if r.preference.enabled else None, reference=p.get("reference"))


def _losses(result) -> list[float]:
    lines = (Path(result.dir) / result.history).read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines if "train_loss" in json.loads(line)]


def _adapter(result) -> dict:
    return load_file(Path(result.dir) / result.adapter / "adapter_model.safetensors")


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-3, atol=2e-5, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_what_one_trains(prepared, tmp_path, strategy):
    """DDP, or FSDP (weights, adapter and optimizer state sharded), over two gloo processes, each on
    half of every step's 16 examples: the same losses per step and the same adapter as one process
    (float reductions in another order aside)."""
    one = _train(prepared, tmp_path / "one")
    two = _train(prepared, tmp_path / "two", DistributedSection(strategy=strategy, nproc_per_node=2))
    assert one.processes == 1 and two.processes == 2 and two.distributed == strategy
    assert ("ddp:2" in two.fast_paths) == (strategy == "ddp")
    assert any(f.startswith("fsdp:2x") for f in two.fast_paths) == (strategy == "fsdp")
    assert two.steps == STEPS and two.train_samples == one.train_samples == STEPS * 16
    assert two.train_tokens == one.train_tokens
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    _close(_adapter(two), _adapter(one))
    assert not list((tmp_path / "two" / "train").glob("*.partial")), "scratch cleared after success"


@pytest.fixture(scope="module")
def prepared_llama(tmp_path_factory):
    """A 2-layer Llama made here (MiniLM's tokenizer) on 96 generated question/answer pairs, loss on
    the answers: the causal path (decoder layers, embeddings and output layer sharded as the root)."""
    import pandas as pd

    root = tmp_path_factory.mktemp("llama")
    save_llama_with_minilm_tokenizer(root / "model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    pd.DataFrame({"question": [f"what is {a} plus {b}?" for a in range(12) for b in range(8)],
                  "answer": [f"{a + b}, since {a} and {b} make {a + b}." for a in range(12) for b in range(8)]}
                 ).to_csv(root / "qa.csv", index=False)
    r = recipe_from_dict({
        "name": "llama-test", "model": {"name_or_path": str(root / "model"), "task": "causal-lm"},
        "data": {"path": str(root / "qa.csv")}, "split": {"validation_size": 0.1, "test_size": 0.1},
        "prompt": {"template": "Q: {question}\nA: ", "response_column": "answer"}, "tokenize": {"max_length": 48},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": 4, "learning_rate": 1e-3, "per_device_train_batch_size": 4,
                  "gradient_accumulation_steps": 2, "logging_steps": 1, "save_steps": 2, "eval_steps": 4},
        "merge": {"enabled": False}})
    return stages_before_training(r, str(root / "work"))


@pytest.fixture(scope="module")
def prepared_pairs(tmp_path_factory, prepared_llama):
    """The same Llama on preference pairs (DPO, its reference scored by the reference stage)."""
    import pandas as pd

    root = tmp_path_factory.mktemp("pairs")
    pd.DataFrame({"prompt": [f"what is {a} plus {b}?" for a in range(12) for b in range(8)],
                  "chosen": [f"{a + b}." for a in range(12) for b in range(8)],
                  "rejected": [f"{a + b + 1}." for a in range(12) for b in range(8)]}).to_json(
        root / "pairs.jsonl", orient="records", lines=True)
    raw = prepared_llama["recipe"].with_secrets()
    raw.update(name="pairs-test", data={"path": str(root / "pairs.jsonl")}, prompt={},
               preference={"loss": "dpo", "beta": 0.5})
    return stages_before_training(recipe_from_dict(raw), str(root / "work"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("data", ["prepared_llama", "prepared_pairs"])
def test_a_causal_lm_trains_alike_on_two_processes(request, tmp_path, strategy, data):
    """Supervised, and DPO (per-pair shares of each step summed over the ranks)."""
    prepared = request.getfixturevalue(data)
    one = _train(prepared, tmp_path / "one")
    two = _train(prepared, tmp_path / "two", DistributedSection(strategy=strategy, nproc_per_node=2))
    assert two.distributed == strategy and two.train_tokens == one.train_tokens
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    _close(_adapter(two), _adapter(one))


@pytest.mark.slow
@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="torch.compile needs a C++ compiler")
def test_compiled_layers_train_sharded_as_eager_layers_train(prepared_llama, tmp_path):
    """Under FSDP each layer's weights are gathered by hooks around the layer: its forward is compiled
    inside them. Two sharded processes with compiled layers train what one eager process trains."""
    one = _train(prepared_llama, tmp_path / "one")
    two = _train(prepared_llama, tmp_path / "two", DistributedSection(strategy="fsdp", nproc_per_node=2),
                 compile=True, require_fast_paths=True)
    assert "compiled_layers:2" in two.fast_paths and "fsdp:2x2" in two.fast_paths
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    _close(_adapter(two), _adapter(one))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_stopped_on_two_processes_resumes_on_one(prepared, tmp_path, strategy):
    """SIGTERM to the stage while two workers train: they checkpoint at a step boundary and exit;
    the same stage on one process resumes there and ends with the adapter of an uninterrupted run
    (sharded: the checkpoint holds the whole weights and optimizer state, gathered from both). Twice
    the usual steps: SIGTERM must reach the workers before they finish on their own (on a busy
    machine the six steps after the first checkpoint outran it once)."""
    steps = 2 * STEPS
    straight = _train(prepared, tmp_path / "straight", max_steps=steps)
    work = tmp_path / "stopped"
    script = (
        "import json, sys\n"
        "from qlora.runtime import signals\n"
        "from qlora.tasks.recipe import DistributedSection, LoraSection, QuantizationSection, TrainSection\n"
        "from qlora.tasks.results import LoraPlan, Quantized, Tokenized\n"
        "from qlora.tasks.train import train\n"
        "signals.install()\n"
        "a = json.loads(open(sys.argv[1]).read())\n"
        "try:\n"
        "    train.fn(Tokenized(**a['tokenized']), Quantized(**a['quantized']), LoraPlan(**a['lora']),\n"
        "             LoraSection(**a['lora_cfg']),\n"
        "             QuantizationSection(**a['q']), TrainSection(**a['cfg']),\n"
        "             launch=DistributedSection(strategy=sys.argv[3], nproc_per_node=2), work_dir=sys.argv[2])\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(143)\n")
    r = prepared["recipe"]
    args = tmp_path / "args.json"
    args.write_text(json.dumps({**{k: prepared[k].model_dump(mode="json") for k in ("tokenized", "quantized", "lora")},
                                "lora_cfg": r.lora.model_dump(mode="json"),
                                "q": r.quantization.model_dump(mode="json"),
                                "cfg": r.train.model_copy(update={"max_steps": steps}).model_dump(mode="json")}))
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", script, str(args), str(work), strategy], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(work.glob("train/*.partial/checkpoint-0000002")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output[-3000:]
    partial = next(work.glob("train/*.partial"))
    saved = sorted(p.name for p in partial.glob("checkpoint-*"))
    assert saved and saved[-1] < f"checkpoint-{steps:07d}", saved
    resumed = _train(prepared, work, DistributedSection(strategy="none"), max_steps=steps)
    assert resumed.resumed_from_step == int(saved[-1].split("-")[1]) and resumed.steps == steps
    _close(_adapter(resumed), _adapter(straight))


@pytest.mark.slow
def test_stopped_in_one_process_resumes_sharded_on_two(prepared, tmp_path):
    """The reverse: a one-process run stopped after its step-2 checkpoint resumes under FSDP on two
    processes (each loads the whole checkpoint and keeps its shards) and ends where an uninterrupted
    run ends."""
    straight = _train(prepared, tmp_path / "straight")
    r = prepared["recipe"]

    def crash(step):
        if step == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train.fn(prepared["tokenized"], prepared["quantized"], prepared["lora"], r.lora, r.quantization, r.train,
                 on_checkpoint=crash, work_dir=str(tmp_path / "stopped"))
    resumed = _train(prepared, tmp_path / "stopped", DistributedSection(strategy="fsdp", nproc_per_node=2))
    assert resumed.resumed_from_step == 2 and resumed.steps == STEPS and resumed.distributed == "fsdp"
    assert _losses(resumed)[2:] == pytest.approx(_losses(straight)[2:], rel=1e-4)
    _close(_adapter(resumed), _adapter(straight))


@pytest.mark.slow
def test_two_agents_join_through_a_c10d_rendezvous(prepared, tmp_path):
    """Multi-node as a cluster runs it, on one host: the stage starts one torchrun agent (node A), a
    second agent joins through `qlora join` (node B) at the same rendezvous on 127.0.0.1; the two
    processes train what one does."""
    from qlora.servers import free_port

    one = _train(prepared, tmp_path / "one")
    endpoint = f"127.0.0.1:{free_port()}"
    work = tmp_path / "nodes"
    env = dict(os.environ)
    joiner = subprocess.Popen([sys.executable, "-m", "qlora.cli", "join", "--work-dir", str(work),
                               "--rdzv-endpoint", endpoint, "--nproc-per-node", "1", "--timeout", "600"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        two = _train(prepared, work, DistributedSection(strategy="ddp", nproc_per_node=1, nnodes=2,
                                                        rdzv_endpoint=endpoint))
        assert joiner.wait(timeout=120) == 0, joiner.stdout.read()[-3000:]
    finally:
        joiner.kill()
    assert two.processes == 2
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    _close(_adapter(two), _adapter(one))


@pytest.mark.slow
def test_a_crashing_worker_is_reported_with_its_traceback(prepared, tmp_path):
    """A defect in a worker (here: its tokenized data gone) fails the stage with that rank's
    traceback, not a bare exit code."""
    broken = {**prepared, "tokenized": prepared["tokenized"].model_copy(update={"dir": str(tmp_path / "gone")})}
    with pytest.raises(RuntimeError, match=r"(?s)training rank \d failed:.*Traceback.*(FileNotFound|gone)"):
        _train(broken, tmp_path / "work", DistributedSection(strategy="ddp", nproc_per_node=2))


@pytest.mark.parametrize("section, message", [
    ({"nnodes": 2}, "distributed: nnodes above 1 needs rdzv_endpoint"),
    ({"nnodes": 2, "rdzv_endpoint": "head-node"}, "distributed: rdzv_endpoint must be HOST:PORT"),
    ({"nproc_per_node": 0}, "distributed.nproc_per_node: .*must be auto or at least 1"),
    ({"strategy": "none", "nproc_per_node": 2}, "distributed: strategy none trains in one process"),
    ({"strategy": "zero3"}, "distributed.strategy"),
    ({"strategy": "ddp", "cpu_offload": True}, "cpu_offload applies to strategy fsdp"),
])
def test_bad_distributed_sections_are_refused(section, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(small_recipe(distributed=section))


@pytest.mark.parametrize("train, message", [
    ({"optim": "paged_adamw_8bit"}, "distributed.strategy fsdp cannot step train.optim paged_adamw_8bit"),
])
def test_what_fsdp_cannot_combine_with_is_refused(train, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(small_recipe(distributed={"strategy": "fsdp"}, train=train))
    recipe_from_dict(small_recipe(distributed={"strategy": "ddp"}, train=train))  # fine without sharding


def test_validate_prints_the_distributed_plan(project, capsys):
    """`qlora validate` says how training would spread: strategy, processes, nodes, and the memory
    plan with its per-GPU estimate; a bad section is one line and exit 2."""
    from conftest import write_recipe

    from qlora.cli import main

    recipe = write_recipe(project / "r.yaml", small_recipe())
    assert main(["validate", str(recipe), "--set", "distributed.strategy=ddp",
                 "--set", "distributed.nproc_per_node=2"]) == 0
    out = capsys.readouterr().out
    assert "distributed: {'strategy': 'ddp', 'processes': 2, 'nodes': 1, 'host_memory_per_node_gib': " in out
    assert "'estimated_peak_gib':" in out
    assert main(["validate", str(recipe), "--set", "distributed.strategy=fsdp", "--set", "distributed.nproc_per_node=2",
                 "--set", "distributed.cpu_offload=true"]) == 0
    out = capsys.readouterr().out
    assert "distributed: {'strategy': 'fsdp', 'processes': 2, 'nodes': 1, 'host_memory_per_node_gib': " in out
    assert "'estimated_peak_gib':" in out  # per GPU; what sharding saves is tested on the 70B shape
    assert main(["validate", str(recipe), "--set", "distributed.nnodes=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distributed: nnodes above 1 needs rdzv_endpoint" in err[0]


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(prepared, tmp_path):
    """kill -9 of one of two workers mid-run, with distributed.max_restarts: torchrun restarts both,
    they resume from the last checkpoint, and the stage ends with the adapter of an uninterrupted run."""
    import threading

    straight = _train(prepared, tmp_path / "straight")
    work = tmp_path / "killed"
    killed = []

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(work.glob("train/*.partial/checkpoint-0000002")):
            time.sleep(0.1)
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"qlora.tasks.training.trainer" in command and b"torch.distributed.run" not in command and str(work).encode() in b" ".join(command):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    resumed = _train(prepared, work, DistributedSection(strategy="ddp", nproc_per_node=2, max_restarts=1))
    killer.join(timeout=5)
    assert killed, "no worker was found to kill"
    assert resumed.steps == STEPS and resumed.resumed_from_step >= 2
    _close(_adapter(resumed), _adapter(straight))


@pytest.mark.slow
def test_a_rendezvous_no_other_node_reaches_fails_in_bounded_time(prepared, tmp_path):
    """Two nodes asked for, none joins: the run fails after distributed.rdzv_timeout_s with one line
    naming the endpoint, and leaves no join pointer behind."""
    from qlora.servers import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(RecipeError, match=r"distributed.rdzv_endpoint: the 2 nodes did not all meet at the rendezvous"):
        _train(prepared, tmp_path, DistributedSection(strategy="ddp", nproc_per_node=1, nnodes=2,
                                                      rdzv_endpoint=endpoint, rdzv_timeout_s=5))
    assert time.monotonic() - started < 90
    assert not list((tmp_path / "train" / "rendezvous").glob("*.json"))


def test_more_processes_than_gpus_is_refused(monkeypatch):
    from qlora.tasks.training.plan import training_processes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    assert training_processes(DistributedSection()) == 2
    with pytest.raises(RecipeError, match="distributed.nproc_per_node: 4 processes per node, but 2 GPU"):
        training_processes(DistributedSection(nproc_per_node=4))
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)  # a torch build without NCCL
    with pytest.raises(RecipeError, match="distributed.strategy: 2 processes need NCCL, which this torch build lacks"):
        training_processes(DistributedSection())
    assert training_processes(DistributedSection(nproc_per_node=1)) == 1


def test_a_worker_computes_on_its_own_gpu(monkeypatch):
    """A torchrun worker's model and batches go to the GPU of its LOCAL_RANK (made current when it
    joins the group): on a bare "cuda" the model of every rank but the first landed on GPU 0, and the
    first step failed on GPU 1 with tensors on two devices."""
    from qlora.tasks.training.loading import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert device() == torch.device("cuda", 1)


def test_a_failed_rank_aborts_the_group_instead_of_waiting_for_it(monkeypatch):
    """Destroying an NCCL group waits for the other ranks, which wait for this one in their next
    all-reduce: a rank that failed aborts the group, exits, and torchrun stops the rest."""
    import torch.distributed as dist

    from qlora.tasks.training.distributed import shutdown

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda: calls.append("abort"))
    shutdown(failed=True)
    shutdown()
    assert calls == ["abort", "destroy"]


def test_the_memory_check_without_a_budget_counts_no_gpus():
    """Counting GPUs imports torch (over a second): the flow's memory check runs on every re-run, and
    without a budget it must not pay that (an unchanged re-run never imports torch otherwise)."""
    code = ("import sys; from qlora.tasks.recipe import *; from qlora.tasks.training.plan import check_memory_budget; "
            "assert check_memory_budget('unread', TrainSection(), QuantizationSection(), {}, None, False, "
            "launch=DistributedSection()) is None; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "False"


def test_auto_shards_what_one_gpu_cannot_hold(monkeypatch):
    """strategy auto on several GPUs: DDP while the DDP plan's estimate fits a GPU (or the budget),
    FSDP once it does not; one process is never sharded; ddp and fsdp are taken as asked."""
    from types import SimpleNamespace

    from test_fast_paths import _llama

    from qlora.tasks.recipe import QuantizationSection, TrainSection
    from qlora.tasks.training.distributed import World
    from qlora.tasks.training.plan import training_strategy

    config, gpu = _llama("70b"), SimpleNamespace(type="cuda")
    lora = LoraPlan.uncounted("causal-lm", []).model_copy(update={"trainable_params": 207_093_760})
    q, train_cfg = QuantizationSection(), TrainSection(per_device_train_batch_size=1, gradient_checkpointing=True)

    def strategy(requested, gib, world=World(0, 2), cfg=train_cfg):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(total_memory=gib * 2**30))
        return training_strategy(requested, world, config, cfg, q, lora, 2048, True, True, gpu)

    assert strategy("auto", 141) == "ddp"  # an H200 holds the 4-bit 70B and its training state
    assert strategy("auto", 24) == "fsdp"  # a 24 GB card does not
    assert strategy("auto", 141, cfg=train_cfg.model_copy(update={"max_memory_gib": 24})) == "fsdp"
    assert strategy("auto", 24, world=World()) == "none"
    assert strategy("ddp", 24) == "ddp" and strategy("fsdp", 141) == "fsdp"


@pytest.mark.slow
def test_a_rank_left_without_rows_trains_at_zero_weight(prepared, tmp_path):
    """One example per optimizer step on two processes: rank 1 has no row in any step, runs one at
    zero weight (DDP needs every rank's backward), and the result is one process's."""
    one = _train(prepared, tmp_path / "one", max_steps=3, per_device_train_batch_size=1,
                 gradient_accumulation_steps=1, save_steps=100)
    two = _train(prepared, tmp_path / "two", DistributedSection(strategy="ddp", nproc_per_node=2), max_steps=3,
                 per_device_train_batch_size=1, gradient_accumulation_steps=1, save_steps=100)
    assert two.steps == 3 and two.train_samples == one.train_samples == 3
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    _close(_adapter(two), _adapter(one))


@pytest.mark.parametrize("args, message", [
    (["--rdzv-endpoint", "head-node"], "--rdzv-endpoint: rdzv_endpoint must be HOST:PORT, got 'head-node'"),
    (["--rdzv-endpoint", "h:1", "--nproc-per-node", "two"], "--nproc-per-node: must be auto or a number"),
    (["--rdzv-endpoint", "h:1", "--nproc-per-node", "0"], "--nproc-per-node: must be auto or at least 1"),
    (["--rdzv-endpoint", "127.0.0.1:29999", "--timeout", "1"], "--rdzv-endpoint: no training to join at"),
])
def test_join_refuses_bad_input_in_one_line(project, capsys, args, message):
    from qlora.cli import main

    assert main(["join", "--work-dir", str(project / "w"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
