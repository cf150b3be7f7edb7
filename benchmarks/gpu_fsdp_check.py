"""FSDP2 on a model loaded the way the train stage loads it: a small Llama saved in 16-bit, quantized
to NF4 by transformers + bitsandbytes and saved (the quantize stage), then loaded back twice: onto the
GPU (the unsharded path) and into CPU memory, then sharded onto the GPU (tasks/training/fsdp.py).
Both get LoRA on every linear layer (tasks/training/lora.py), the fused LoRA layers, one forward and
backward of the same batch. Prints whether the 4-bit layers carry their quantization state on the
module, the loss and LoRA gradients sharded against unsharded, the GPU memory the sharded model
holds against the unsharded one, and whether the adapter saved from the gathered weights loads in
peft. Runs under torchrun on any number of GPUs (one: the sharding code without communication).

    torchrun --standalone --nproc-per-node 1 benchmarks/gpu_fsdp_check.py
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    import bitsandbytes as bnb
    import torch
    import torch.distributed as dist
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from qlora.tasks.batches import collate_lm
    from qlora.tasks.training import distributed, fsdp
    from qlora.tasks.training.checkpoint import training_state
    from qlora.tasks.training.fused_lora import fuse_lora_layers
    from qlora.tasks.training.lora import draw_adapter_weights, model_for_training
    from qlora.tasks.training.step import forward_backward

    world = distributed.init_from_env()
    if not dist.is_initialized():  # one GPU: a group of one
        dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    dev = torch.device("cuda", torch.cuda.current_device())
    work = Path(os.environ.get("OUT", "/tmp")) / "fsdp-check"
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    if world.main:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(work / "bf16")
        AutoModelForCausalLM.from_pretrained(work / "bf16", quantization_config=q, device_map={"": 0}).save_pretrained(
            work / "nf4")
    dist.barrier()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora_cfg = SimpleNamespace(enabled=True, bias="none", use_dora=False, use_rslora=False, init="default", r=8, lora_alpha=16,
                               lora_dropout=0.0)
    rows = [[{"input_ids": list(range(i, i + 128)), "labels": list(range(i, i + 128))}] for i in range(4)]
    out, reference = {"world_size": world.size}, None
    for sharded in (False, True):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(dev)
        base = AutoModelForCausalLM.from_pretrained(work / "nf4", device_map={"": "cpu" if sharded else dev.index},
                                                    dtype=torch.bfloat16)
        quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
        out[f"{'sharded' if sharded else 'plain'}_module_quant_state"] = all(
            getattr(m, "quant_state", None) is not None for m in quantized)
        torch.manual_seed(1)
        model = model_for_training(base, {"task": "causal-lm", "modules_to_save": [], "target_modules": targets},
                                   lora_cfg, True, gradient_checkpointing=True)
        draw_adapter_weights(model, 1)  # as the trainer does: the same start wherever the model is
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():  # B away from zero, so the gradients reach A too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 1e-2)
        fuse_lora_layers(model, unnest=not sharded)
        if sharded:
            out["layers_sharded"] = fsdp.shard_model(model, world, dev)
        held = (torch.cuda.memory_allocated(dev) - before) / 2**20
        out[f"{'sharded' if sharded else 'plain'}_gpu_mib"] = round(held, 2)
        model.train()
        batch = collate_lm(rows, 0, dev)
        batch.pop("targets"), batch.pop("real_tokens")
        loss = forward_backward(model, batch, dev, "bfloat16", False, 1.0)
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().cpu()
                 for n, p in model.named_parameters() if p.requires_grad}
        out[f"{'sharded' if sharded else 'plain'}_loss"] = float(loss)
        if reference is None:
            reference = grads
            del model, base
            continue
        diff = sum(float((grads[n] - reference[n]).norm()) ** 2 for n in reference) ** 0.5
        out["lora_grad_relative_error"] = diff / sum(float(g.norm()) ** 2 for g in reference.values()) ** 0.5
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        weights, state = training_state(model, optimizer)  # every rank: a collective
        if world.main:
            out["checkpoint_weights"], out["checkpoint_optimizer_states"] = len(weights), len(state["state"])
            model.save_pretrained(work / "adapter", state_dict=weights)
            reloaded = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(work / "nf4", device_map={"": dev.index}), work / "adapter")
            saved = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
            out["adapter_reloads_equal"] = len(saved) == len(weights) and all(
                torch.equal(saved[n].detach().cpu().to(weights[n].dtype), weights[n]) for n in weights)
    if world.main:
        out["passed"] = (out["plain_module_quant_state"] and out["sharded_module_quant_state"]
                         and out["lora_grad_relative_error"] < 1e-2 and out["adapter_reloads_equal"]
                         and abs(out["plain_loss"] - out["sharded_loss"]) < 1e-3 * abs(out["plain_loss"]))
        print("FSDP_CHECK " + json.dumps(out), flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "gpu_fsdp_check.json").write_text(json.dumps(out, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    main()
