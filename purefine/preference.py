"""Preference losses over per-sequence log-probabilities: DPO, IPO, hinge, SimPO and ORPO, as TRL
defines them, with TRL's reward metrics.

    pairs = Pairs(chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected)   # each (B,)
    losses, metrics = preference_loss("sigmoid", pairs, beta=0.1)   # (B,), {"rewards/chosen": (B,), ...}

``chosen`` / ``rejected`` are the *summed* log-probabilities of each completion's tokens under the
policy, ``*_tokens`` their token counts, ``ref_*`` the same sums under the reference model (None for
the reference-free losses). Everything is per pair, so a caller sums over pairs and divides by the
number of pairs (accumulation- and data-parallel-invariant). With Δ = (c − c_ref) − (r − r_ref):

- ``sigmoid`` (DPO; TRL ``DPOTrainer``): ``−(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)``; ε = label smoothing
  (conservative DPO, as TRL's DPOTrainer defined it up to 0.28 and its CPOTrainer still does; ε = 0
  is TRL 1.x's ``sigmoid``).
- ``ipo`` (TRL ``DPOTrainer``): ``(Δ̄ − 1/(2β))²`` with Δ̄ the difference of the *length-averaged*
  log-ratios (TRL normalizes each log-ratio by its completion's token count).
- ``hinge`` (SLiC; TRL ``DPOTrainer``): ``relu(1 − βΔ)``.
- ``simpo`` (TRL ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``): reference-free,
  length-normalized: with x = c/n_c − r/n_r − γ/β, ``−(1−ε)·logσ(βx) − ε·logσ(−βx)``.
- ``orpo`` (TRL ``ORPOTrainer``): the chosen completion's mean token NLL minus β·logσ(log-odds),
  log-odds = (c̄ − r̄) − (log(1−e^c̄) − log(1−e^r̄)) over the mean log-probs c̄, r̄. TRL takes its NLL
  as the mean over every token of the batch's chosen sequences, prompt included; here it is the
  chosen completion's own mean, so it sums over pairs like every other term (the two agree for
  completions of equal length after a one-token prompt).

Metrics (TRL's names, per pair): ``rewards/chosen`` = β·(c − c_ref) (β·c̄ for simpo / orpo),
``rewards/rejected``, ``rewards/accuracies`` (chosen reward > rejected reward), ``rewards/margins``,
``logps/chosen`` = c (c̄ for simpo / orpo), ``logps/rejected``; orpo adds ``nll_loss``,
``log_odds_ratio`` (logσ(log-odds)) and ``log_odds_chosen`` (the log-odds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")  # no reference model: rewards are β times the mean token log-prob
LABEL_SMOOTHED = ("sigmoid", "simpo")  # the losses that take --dpo.label-smoothing
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")


@dataclass(frozen=True)
class Pairs:
    """Per-pair log-probabilities of B preference pairs, each (B,) float32: ``chosen`` / ``rejected``
    summed over the completion's tokens under the policy, ``chosen_tokens`` / ``rejected_tokens`` the
    completions' token counts, ``ref_chosen`` / ``ref_rejected`` the reference's sums (None when the
    loss is reference-free)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def mean_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) mean token log-probs (B,): the sums over the token counts (at least 1)."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) (B,) for x < 0 (B,) (or any shape), stable on both sides of −log 2 (as TRL's ORPO computes it)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def smoothed_sigmoid(x: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """−(1−ε)·logσ(βx) − ε·logσ(−βx) for margins x (B,): the DPO / CPO loss with label smoothing ε."""
    return -F.logsigmoid(beta * x) * (1 - label_smoothing) - F.logsigmoid(-beta * x) * label_smoothing


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                   rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's per-pair metrics (each (B,), detached) from the rewards and log-probs (B,) it logs."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps.detach(), "logps/rejected": rejected_logps.detach()}


def _referenced(kind: str, pairs: Pairs, beta: float, label_smoothing: float) -> tuple[torch.Tensor, dict]:
    """sigmoid / ipo / hinge: losses (B,) and metrics over the log-ratios to the reference."""
    if pairs.ref_chosen is None or pairs.ref_rejected is None:
        raise ValueError(f"preference loss {kind!r} needs the reference log-probs (ref_chosen, ref_rejected)")
    chosen_ratio, rejected_ratio = pairs.chosen - pairs.ref_chosen, pairs.rejected - pairs.ref_rejected
    if kind == "sigmoid":
        losses = smoothed_sigmoid(chosen_ratio - rejected_ratio, beta, label_smoothing)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    else:  # ipo: the log-ratios averaged over each completion's tokens (TRL's length normalization)
        delta = (chosen_ratio / pairs.chosen_tokens.clamp(min=1) - rejected_ratio / pairs.rejected_tokens.clamp(min=1))
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, reward_metrics(beta * chosen_ratio, beta * rejected_ratio, pairs.chosen, pairs.rejected)


def _reference_free(kind: str, pairs: Pairs, beta: float, label_smoothing: float,
                    gamma: float) -> tuple[torch.Tensor, dict]:
    """simpo / orpo: losses (B,) and metrics over the mean token log-probs."""
    chosen, rejected = pairs.mean_logps()
    metrics = reward_metrics(beta * chosen, beta * rejected, chosen, rejected)
    if kind == "simpo":
        return smoothed_sigmoid(chosen - rejected - gamma / beta, beta, label_smoothing), metrics
    chosen, rejected = chosen.float(), rejected.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    metrics |= {"nll_loss": -chosen.detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return -chosen - beta * ratio, metrics


def preference_loss(kind: str, pairs: Pairs, *, beta: float, label_smoothing: float = 0.0,
                    gamma: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair losses (B,), {metric: per-pair values (B,)}) of ``kind`` (see the module doc).

    ``beta``: the KL / temperature coefficient β; ``label_smoothing``: ε for sigmoid and simpo;
    ``gamma``: SimPO's target reward margin γ (TRL's ``simpo_gamma``; the margin in log-prob units is γ/β).
    """
    if kind not in LOSSES:
        raise ValueError(f"preference loss: expected one of {', '.join(LOSSES)}, found {kind!r}")
    if kind in REFERENCE_FREE:
        return _reference_free(kind, pairs, beta, label_smoothing, gamma)
    return _referenced(kind, pairs, beta, label_smoothing)
