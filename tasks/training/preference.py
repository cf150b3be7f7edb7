"""Preference losses: DPO, IPO, ORPO, SimPO and KTO on the log-probabilities of completions, as TRL
computes them (tests hold each to TRL's own loss functions), and the log-probabilities themselves.

A batch of pairs holds the chosen rows, then the rejected rows (one forward for both); KTO's holds
one row per example and, beside it, the same prompts with another row's completion (its KL term).
The reference model's log-probabilities come in the batch, computed once by the reference stage.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from qlora.tasks.recipe import PreferenceSection

if TYPE_CHECKING:
    import torch

# What preference_metrics reports (MLflow's test_ and eval_ figures).
PAIR_METRICS = ("preference_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps",
                "rejected_logps", "logp_accuracy")
UNPAIRED_METRICS = ("kl", "logps", "desirable_reward", "undesirable_reward", "reward_margin")


def rows_per_example(cfg: PreferenceSection | None) -> int:
    """Sequences a training example puts through the model with gradients: a pair's two, else one (KTO's
    KL rows run without gradients)."""
    return 2 if cfg is not None and cfg.paired else 1


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its target tokens (labels not -100, shifted by one) and
    their count. The log-softmax is taken in float32 one row at a time: never a second float32 copy of
    the whole batch's logits."""
    import torch

    targets = labels[:, 1:]
    mask = targets != -100
    ids = targets.masked_fill(~mask, 0)
    sums = []
    for row_logits, row_ids, row_mask in zip(logits[:, :-1], ids, mask):
        logp = torch.log_softmax(row_logits.float(), dim=-1).gather(-1, row_ids.unsqueeze(-1)).squeeze(-1)
        sums.append((logp * row_mask).sum())
    return torch.stack(sums), mask.sum(-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (as TRL's ORPO)."""
    import torch

    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(cfg: PreferenceSection, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                rejected_tokens: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                ref_rejected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected rewards (detached) of a paired loss, from summed
    completion log-probabilities. ORPO's NLL term is added by batch_loss (it needs the token count of
    the whole micro-batch)."""
    import torch.nn.functional as F

    beta, smoothing = cfg.beta, cfg.label_smoothing
    if cfg.loss in ("dpo", "ipo"):
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if cfg.loss == "dpo":
            margin = chosen_ratio - rejected_ratio
            losses = -F.logsigmoid(beta * margin) * (1 - smoothing) - F.logsigmoid(-beta * margin) * smoothing
        else:  # IPO on per-token averaged log-ratios (as TRL, agreed with IPO's authors)
            margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
            losses = (margin - 1 / (2 * beta)) ** 2
        return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    chosen_avg, rejected_avg = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
    if cfg.loss == "orpo":
        chosen_avg, rejected_avg = chosen_avg.float(), rejected_avg.float()
        log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
        losses = -beta * F.logsigmoid(log_odds)
    elif cfg.loss == "simpo":
        margin = (chosen_avg - rejected_avg) - cfg.gamma / beta
        losses = -F.logsigmoid(beta * margin) * (1 - smoothing) - F.logsigmoid(-beta * margin) * smoothing
    else:
        raise ValueError(f"not a paired loss: {cfg.loss}")
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def kto_losses(cfg: PreferenceSection, logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
               kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's per-row losses (desirable and undesirable rows weighted) and rewards (detached); kl is the
    batch's estimate of the policy's divergence from the reference (detached, at least 0)."""
    import torch

    ratio = logps - ref_logps
    losses = torch.where(desirable, cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (ratio - kl))),
                         cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (kl - ratio))))
    return losses, cfg.beta * ratio.detach()


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the mean log-ratio of prompts paired with other rows' completions,
    detached and clamped at 0 (as TRL)."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def batch_loss(model, batch: dict, cfg: PreferenceSection) -> tuple[torch.Tensor, dict]:
    """The mean loss of one micro-batch (what backward runs on) and its per-example figures (detached:
    rewards, log-probabilities, token counts) for metrics."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps, tokens = completion_logps(logits, batch["labels"])
    if cfg.loss == "kto":
        with torch.no_grad():
            kl_logits = model(input_ids=batch["kl_input_ids"], attention_mask=batch["kl_attention_mask"],
                              use_cache=False).logits
            kl_logps, _ = completion_logps(kl_logits, batch["kl_labels"])
        kl = kto_kl(kl_logps, batch["ref_kl"])
        losses, rewards = kto_losses(cfg, logps, batch["ref_logps"], batch["desirable"], kl)
        return losses.mean(), {"rewards": rewards, "logps": logps.detach(), "desirable": batch["desirable"], "kl": kl}
    n = logps.shape[0] // 2
    chosen, rejected = logps[:n], logps[n:]
    losses, chosen_rewards, rejected_rewards = pair_losses(
        cfg, chosen, rejected, tokens[:n], tokens[n:], batch.get("ref_chosen"), batch.get("ref_rejected"))
    loss = losses.mean()
    if cfg.loss == "orpo":  # plus the chosen answers' NLL, averaged over the micro-batch's chosen tokens
        loss = loss - chosen.sum() / tokens[:n].sum().clamp(min=1)
    return loss, {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
                  "chosen_logps": chosen.detach(), "rejected_logps": rejected.detach(),
                  "chosen_tokens": tokens[:n], "rejected_tokens": tokens[n:]}


def preference_metrics(cfg: PreferenceSection, scores: dict, reference: dict | None) -> dict[str, float]:
    """A model's loss and preference figures over scored rows (tasks.inference.completion_scores), against
    the reference's scores of the same rows for losses that have one. preference_accuracy: the chosen
    reward above the rejected (as TRL's rewards/accuracies); logp_accuracy: the chosen completion more
    likely per token than the rejected, the model's own preference, reference or not."""
    import torch

    t = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in scores.items()}
    ref = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in (reference or {}).items()}
    if cfg.loss == "kto":
        kl = kto_kl(t["kl"], ref["kl"])
        desirable = t["desirable"].bool()
        losses, rewards = kto_losses(cfg, t["logps"], ref["logps"], desirable, kl)
        good, bad = rewards[desirable], rewards[~desirable]
        out = {"loss": losses.mean(), "kl": kl, "logps": t["logps"].mean()}
        if len(good):
            out["desirable_reward"] = good.mean()
        if len(bad):
            out["undesirable_reward"] = bad.mean()
        if len(good) and len(bad):
            out["reward_margin"] = good.mean() - bad.mean()
        return {k: float(v) for k, v in out.items()}
    losses, chosen_rewards, rejected_rewards = pair_losses(
        cfg, t["chosen"], t["rejected"], t["chosen_tokens"], t["rejected_tokens"], ref.get("chosen"), ref.get("rejected"))
    loss = losses.mean()
    if cfg.loss == "orpo":
        loss = loss - t["chosen"].sum() / t["chosen_tokens"].sum().clamp(min=1)
    per_token = (t["chosen"] / t["chosen_tokens"].clamp(min=1), t["rejected"] / t["rejected_tokens"].clamp(min=1))
    out = {"loss": loss, "preference_accuracy": (chosen_rewards > rejected_rewards).double().mean(),
           "reward_margin": (chosen_rewards - rejected_rewards).mean(), "chosen_reward": chosen_rewards.mean(),
           "rejected_reward": rejected_rewards.mean(), "chosen_logps": t["chosen"].mean(),
           "rejected_logps": t["rejected"].mean(), "logp_accuracy": (per_token[0] > per_token[1]).double().mean()}
    return {k: float(v) for k, v in out.items()}
