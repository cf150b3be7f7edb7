"""lora: what LoRA will train, decided on the meta device before anything is loaded: the target
modules resolved against the architecture and checked, the heads trained fully, the parameters
counted. The adapters themselves are attached in the train stage (tasks/training/lora.py)."""
from __future__ import annotations

from pathlib import Path

from qlora.tasks.recipe import LoraSection, RecipeError
from qlora.tasks.results import BaseModelFiles, LoraPlan
from qlora.tasks.stage import stage
from qlora.tasks.training.loading import CAUSAL, OUTPUT_HEADS, skeleton
from qlora.tasks.training.lora import lora_config


def _linear_names(model) -> set[str]:
    import torch
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def resolve_lora_targets(model_path: str, cfg: LoraSection, label_names: list[str],
                         task: str = "sequence-classification", trust_remote_code: bool = False) -> LoraPlan:
    """Resolve target modules against the architecture (on the meta device: no weights loaded),
    refuse names that match nothing, and count what LoRA will train."""
    import torch
    from peft import get_peft_model

    base = skeleton(model_path, task, label_names, trust_remote_code)
    config = base.config
    head = [n for n, _ in base.named_children() if n in OUTPUT_HEADS]
    body = sorted(n for n in _linear_names(base) if n.split(".")[0] not in head)
    suffixes = sorted({n.split(".")[-1] for n in body})
    if cfg.target_modules == "all-linear":
        targets = suffixes
    else:
        unmatched = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in body)]
        if unmatched:
            raise RecipeError(f"{unmatched} match no linear layer of {config.model_type}", "lora.target_modules",
                              hint=f"its linear layers: {', '.join(suffixes)} (or use all-linear)")
        targets = list(cfg.target_modules)
    trained_heads = [] if task == CAUSAL else head
    modules_to_save = sorted(set(trained_heads) | set(cfg.modules_to_save or []))
    _check_rank(base, body, targets, cfg.r)
    total = sum(p.numel() for p in base.parameters())
    try:
        with torch.device("meta"):  # peft builds the LoRA weights where the default device says: no memory
            peft_model = get_peft_model(base, lora_config(task, targets, modules_to_save, cfg, initialise=False))
    except ValueError as e:  # a combination peft refuses on this architecture
        field = "lora.use_dora" if cfg.use_dora and "dora" in str(e).lower() else "lora.target_modules"
        raise RecipeError(f"peft refuses this lora section on {config.model_type}: {str(e).splitlines()[0]}",
                          field) from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lora_layers = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    return LoraPlan(enabled=True, task=task, target_modules=targets, modules_to_save=modules_to_save,
                    trainable_params=trainable, base_params=total, trainable_percent=round(100 * trainable / total, 4),
                    lora_layers=lora_layers)


def _check_rank(base, body: list[str], targets: list[str], r: int) -> None:
    """A LoRA rank above a targeted layer's smaller dimension adds weights and no capacity (and an
    absurd rank would allocate gigabytes): refused, naming the layer."""
    modules = dict(base.named_modules())
    targeted = [n for n in body if any(n == t or n.endswith("." + t) for t in targets)]
    smallest = min(targeted, key=lambda n: min(modules[n].in_features, modules[n].out_features), default=None)
    if smallest is not None:
        limit = min(modules[smallest].in_features, modules[smallest].out_features)
        if r > limit:
            raise RecipeError(f"rank {r} exceeds the smaller dimension ({limit}) of targeted layer {smallest}",
                              "lora.r", hint=f"use a rank of at most {limit} (typically 4 to 64)")


def count_full_params(model_path: str, label_names: list[str], task: str, trust_remote_code: bool = False) -> LoraPlan:
    total = sum(p.numel() for p in skeleton(model_path, task, label_names, trust_remote_code).parameters())
    return LoraPlan(enabled=False, task=task, target_modules=[], modules_to_save=[], trainable_params=total,
                    base_params=total, trainable_percent=100.0, lora_layers=0)


@stage("lora")
def plan_lora(out: Path, model: BaseModelFiles, cfg: LoraSection, label_names: list[str],
              task: str = "sequence-classification", trust_remote_code: bool = False) -> LoraPlan:
    if not cfg.enabled:
        return count_full_params(model.path, label_names, task, trust_remote_code)
    return resolve_lora_targets(model.path, cfg, label_names, task, trust_remote_code)

