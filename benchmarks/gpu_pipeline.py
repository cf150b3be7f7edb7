"""The whole pipeline on a GPU: `qlora run` (the Prefect flow, MLflow tracking) on a Llama-shaped
causal LM with random weights, as a user would run it, and what MLflow recorded of it.

No weights or tokenizer can be downloaded on the GPU machine, so both are made here: a byte-level BPE
tokenizer trained on the chatterbot question/answer corpus (the chat-smollm2 recipe's data, a PyPI
package), and a Llama of the chosen shape with random weights, saved as a 16-bit checkpoint. The
recipe is chat-smollm2's with that model, bf16 compute and a memory budget; every stage runs (load,
split, tokenize with packing, quantize, LoRA, train, evaluate with generation, merge).

    python benchmarks/gpu_pipeline.py                      # TinyLlama-1.1B shape, budget 6 GiB
    python benchmarks/gpu_pipeline.py --shape tiny --max-steps 4 --work /tmp/p   # a CPU smoke run
    python benchmarks/gpu_pipeline.py --shape small --gpus 2     # the train stage under torchrun, 2 GPUs
    python benchmarks/gpu_pipeline.py --shape small --nodes 2    # two torchrun agents ("nodes") on one
                                                                 # host, one GPU each, via `qlora join`

--gpus N: the recipe's `distributed` section asks for N processes (DDP); --nodes 2: node A is this
`qlora run` on the first GPU, node B a `qlora join` on the second, meeting at a c10d rendezvous on
127.0.0.1, as two machines of a cluster would (README, "More than one machine").

Prints the train stage's fast paths and memory plan (MLflow tags), its tokens/s, peak memory and
losses, the evaluation and merge metrics; writes gpu_pipeline.json under $OUT when set.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHAPES = {  # hidden, layers, heads, kv heads, intermediate
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632),
    "small": (512, 8, 8, 4, 1408),
    "tiny": (64, 2, 4, 2, 128),
}


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        sys.exit("chatterbot-corpus is not installed (pip install chatterbot-corpus==1.3.3)")
    return Path(spec.submodule_search_locations[0], "data", "english")


def build_tokenizer(path: Path, vocab_size: int = 8192) -> None:
    """Byte-level BPE trained on the corpus itself: every text encodes, none maps to unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [line.strip(" -") for f in sorted(corpus_dir().glob("*.yml")) for line in f.read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(path)


def build_model(path: Path, shape: str) -> int:
    """A Llama of the shape with random weights, saved in bf16; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(path)
    hidden, layers, heads, kv, inter = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def recipe_for(model: Path, work: Path, args) -> dict:
    return {
        "name": f"gpu-pipeline-{args.shape}",
        "description": "chatterbot Q&A pairs on a random-weight Llama: the whole flow on a GPU",
        "model": {"name_or_path": str(model), "task": "causal-lm"},
        "data": {"path": str(corpus_dir()), "drop_duplicates": True, "sample": {"validation": 100, "test": 100}},
        "split": {"validation_size": 0.1, "test_size": 0.1, "seed": 42},
        "prompt": {"template": "Question: {prompt}\nAnswer: ", "response_column": "response"},
        "tokenize": {"max_length": args.max_length, "packing": True},
        "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                         "bnb_4bit_compute_dtype": "bfloat16"},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "train": {"max_steps": args.max_steps, "learning_rate": 5.0e-4, "warmup_ratio": 0.05,
                  "per_device_train_batch_size": args.batch, "per_device_eval_batch_size": 16,
                  "max_memory_gib": args.budget, "optim": "paged_adamw_8bit", "logging_steps": 5,
                  "eval_steps": args.max_steps, "save_steps": args.max_steps},
        "evaluate": {"metrics": ["rouge"], "generation": {"num_examples": args.generate, "max_new_tokens": 32}},
        "merge": {"enabled": True, "base": "dequantized", "dtype": "bfloat16"},
        "tracking": {"experiment_name": "gpu-pipeline", "tracking_uri": f"sqlite:///{work / 'mlflow.db'}"},
        "work_dir": str(work / "qlora"),
        "distributed": distributed_section(args),
    }


def distributed_section(args) -> dict:
    if args.nodes > 1:
        from qlora.servers import free_port

        return {"strategy": "ddp", "nproc_per_node": 1, "nnodes": args.nodes,
                "rdzv_endpoint": f"127.0.0.1:{free_port()}", "rdzv_timeout_s": 300}
    return {"strategy": "ddp" if args.gpus > 1 else "none", "nproc_per_node": args.gpus}


def recorded(uri: str) -> dict:
    """The newest run of the experiment, as MLflow holds it: tags and metrics of it and its children."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("gpu-pipeline")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    family = [parent] + [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    out = {"run_id": parent.info.run_id, "status": parent.info.status, "tags": {}, "metrics": {}}
    for run in family:
        out["tags"].update({k: v for k, v in run.data.tags.items() if k.startswith("train.")})
        out["tags"].update({k: v for k, v in run.data.params.items() if "device" in k})
        out["metrics"].update(run.data.metrics)
        if "train_loss" in run.data.metrics:  # every logging_steps
            out["loss_history"] = [round(m.value, 4) for m in client.get_metric_history(run.info.run_id, "train_loss")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="packed rows per optimizer step")
    parser.add_argument("--budget", type=float, default=6.0, help="train.max_memory_gib")
    parser.add_argument("--work", default="/tmp/gpu-pipeline")
    parser.add_argument("--gpus", type=int, default=1, help="processes on this machine (distributed.nproc_per_node)")
    parser.add_argument("--nodes", type=int, default=1, choices=[1, 2],
                        help="2: two torchrun agents on this host, one GPU each, joined through a rendezvous")
    parser.add_argument("--generate", type=int, default=16, help="answers generated per evaluation")
    args = parser.parse_args()

    work = Path(args.work)
    model = work / f"llama-{args.shape}"
    if not (model / "config.json").exists():
        build_tokenizer(model)
        print(f"built {args.shape} with random weights: {build_model(model, args.shape) / 1e6:.0f}M parameters",
              flush=True)
    recipe = work / "recipe.yaml"
    spec = recipe_for(model, work, args)
    recipe.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    joiner = None
    if args.nodes > 1:  # node B, on the second GPU; node A (the run below) gets the first
        section = spec["distributed"]
        joiner = subprocess.Popen([sys.executable, "-m", "qlora.cli", "join", "--work-dir", spec["work_dir"],
                                   "--rdzv-endpoint", section["rdzv_endpoint"], "--nproc-per-node", "1",
                                   "--timeout", "600"], cwd=REPO, env={**env, "CUDA_VISIBLE_DEVICES": "1"})
        env["CUDA_VISIBLE_DEVICES"] = "0"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qlora.cli", "run", str(recipe)], cwd=REPO, env=env)
    wall = time.perf_counter() - started
    if joiner is not None:
        try:
            joined = joiner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            joiner.kill()
            joined = "still running a minute after the run"
        if joined != 0:
            sys.exit(f"qlora join (node B) ended with {joined}")
    if done.returncode:
        sys.exit(f"qlora run exited {done.returncode}")
    result = {"shape": args.shape, "gpus": args.gpus, "nodes": args.nodes, "wall_s": round(wall, 1), "recipe": spec,
              **recorded(spec["tracking"]["tracking_uri"])}
    print(f"\nqlora run {recipe}: {wall:.0f} s, MLflow run {result['run_id']} {result['status']}")
    for k, v in sorted(result["tags"].items()):
        print(f"  tag {k} = {v}")
    for k, v in sorted(result["metrics"].items()):
        print(f"  metric {k} = {v:.6g}")
    print(f"  training loss every 5 steps: {result.get('loss_history')}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_pipeline.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
