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


CHUNK = 1024  # target positions per output-layer chunk: its float32 logits are the largest tensor here


def _chunk_logps(head, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _plain_head(model):
    """(decoder, output layer) where the model's logits are the output layer over the decoder's last
    hidden states and nothing more (no logit soft-capping or scaling); else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or any(getattr(config, k, None) is not None for k in ("final_logit_softcapping", "logit_scale")):
        return None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    return (decoder, head) if decoder is not None and head is not None and decoder is not base else None


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its target tokens and their count. chunked: the output layer
    runs on the target positions alone (a pair's prompts get no logits), CHUNK positions at a time, each
    chunk recomputed in backward instead of kept, so the batch's logits never exist whole (the
    decoder's own forward is called: not for sharded models, whose root owns the output layer)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    parts = _plain_head(model) if chunked else None
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return completion_logps(logits, labels)
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    rows = mask.nonzero()[:, 0]
    picked, ids = hidden[mask], targets[mask]
    logps = [checkpoint(_chunk_logps, head, picked[i:i + CHUNK], ids[i:i + CHUNK], use_reentrant=False)
             if torch.is_grad_enabled() else _chunk_logps(head, picked[i:i + CHUNK], ids[i:i + CHUNK])
             for i in range(0, len(ids), CHUNK)]
    flat = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(labels.shape[0], dtype=flat.dtype, device=flat.device).index_add(0, rows, flat)
    return sums, mask.sum(-1)


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


def batch_loss(model, batch: dict, cfg: PreferenceSection, chunked: bool = True) -> tuple[torch.Tensor, dict]:
    """The mean loss of one micro-batch (what backward runs on) and its per-example figures (detached:
    rewards, log-probabilities, token counts) for metrics. chunked: see sequence_logps."""
    import torch

    logps, tokens = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunked)
    if cfg.loss == "kto":
        with torch.no_grad():
            kl_logps, _ = sequence_logps(model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"],
                                         chunked)
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
