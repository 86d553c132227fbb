"""``--task dpo``: preference tuning (DPO, IPO, hinge, SimPO, ORPO) of a causal LM, in the one loop.

    summary = train.main(TrainConfig(task="dpo", peft="lora", dpo=DpoConfig(loss="sigmoid", beta=0.1)))
    summary["eval_rewards/accuracies_end"]          # held-out pairs whose chosen reward is the larger

- Data: preference pairs (``preference_data``); chosen and rejected of a batch run as one forward,
  concatenated along the batch dimension (2B, T); a sequence's log-prob is the sum of its completion
  tokens' log-probs, taken through the output projection in chunks (``losses.token_logprobs``).
- The reference: with LoRA / QLoRA / DoRA the same params with the adapters removed
  (``lora.base_only``, no copy of the weights), run without gradients through the same forward (and
  the same FSDP gather); with full fine-tuning (or ``--dpo.precompute-ref``) the starting model's
  log-probs of every pair, computed in one pass before training and kept with the data, so full DPO
  never holds two models. SimPO and ORPO need no reference.
- The loss per pair is ``preference.preference_loss`` (TRL's formulas); the step divides the summed
  loss and metrics by the number of pairs, so the logged ``rewards/chosen``, ``rewards/rejected``,
  ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` are TRL's batch
  means (``eval_*`` on the held-out pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from purefine import data, lora, losses, models, ops, preference, train
from purefine.errors import ConfigError
from purefine.recipes import setup
from purefine.recipes.tasks import preference_data
from purefine.recipes.tasks.base import Task

Gather = Callable[[Any], Any] | None


def sequence_logps(model_cfg: Any, params: Any, batch: dict, gather: Gather = None,
                   remat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (2B,) float32, completion token counts (2B,)) of a pair batch's chosen rows then its
    rejected rows, in one forward over the concatenated (2B, T) tokens: each the sum over the
    sequence's labelled positions of log p(label)."""
    chosen, rejected = batch["chosen"], batch["rejected"]
    tokens = torch.cat([chosen["tokens"], rejected["tokens"]])
    labels = torch.cat([chosen["labels"], rejected["labels"]])
    positions = torch.cat([chosen["positions"], rejected["positions"]])
    h, _ = models.hidden_states(model_cfg, params, tokens, positions=positions, remat=remat, gather=gather)
    flat = labels.reshape(-1)
    picked = flat != ops.IGNORE_INDEX
    rows = torch.div(picked.nonzero()[:, 0], labels.shape[1], rounding_mode="floor")
    w = (gather or _same)(models.output_weight(model_cfg, params))
    per_token = losses.token_logprobs(h.reshape(-1, h.shape[-1])[picked], w, flat[picked],
                                      softcap=model_cfg.logit_softcap)
    logps = torch.zeros(tokens.shape[0], dtype=torch.float32, device=h.device).index_add(0, rows, per_token)
    return logps, picked.view(labels.shape).sum(-1)


def _reference(model_cfg: Any, params: Any, batch: dict, gather: Gather, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) reference log-probs (B,): the batch's precomputed ones, else the policy's
    params with the adapters removed, without gradients."""
    if "ref_chosen" in batch:
        return batch["ref_chosen"].float(), batch["ref_rejected"].float()
    with torch.no_grad():
        logps, _ = sequence_logps(model_cfg, lora.base_only(params), batch, gather)
    return logps[:pairs], logps[pairs:]


def loss(model_cfg: Any, opts: Any, gather: Gather, remat: bool) -> Callable[[Any, dict], tuple]:
    """(params, pair batch) -> (summed loss over the pairs, pairs, {metric: sum over the pairs})."""
    referenced = opts.loss not in preference.REFERENCE_FREE

    def fn(params: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        logps, counts = sequence_logps(model_cfg, params, batch, gather, remat)
        real = (batch["index"] >= 0).to(logps.device)
        b = real.shape[0]

        def fill(x: torch.Tensor, value: float) -> torch.Tensor:  # empty rows get harmless values (no NaN)
            return torch.where(real, x.to(logps.device), value)

        ref = _reference(model_cfg, params, batch, gather, b) if referenced else (None, None)
        pairs = preference.Pairs(fill(logps[:b], -1.0), fill(logps[b:], -1.0), fill(counts[:b], 1), fill(counts[b:], 1),
                                 *(None if r is None else fill(r, -1.0) for r in ref))
        per_pair, metrics = preference.preference_loss(opts.loss, pairs, beta=opts.beta,
                                                       label_smoothing=opts.label_smoothing, gamma=opts.gamma)
        sums = {k: torch.where(real, v, 0.0).sum() for k, v in metrics.items()}
        return torch.where(real, per_pair, 0.0).sum(), real.sum(), sums

    return fn


def reference_kind(cfg: Any) -> str:
    """How the run gets its reference: ``none`` (simpo, orpo), ``precomputed`` or ``adapters off``."""
    if cfg.dpo.loss in preference.REFERENCE_FREE:
        return "none"
    precompute = cfg.dpo.precompute_ref if cfg.dpo.precompute_ref is not None else cfg.peft == "none"
    return "precomputed" if precompute or cfg.peft == "none" else "adapters off"


def precompute(cfg: Any, model_cfg: Any, params: Any, layout: Any, sets: list[Any]) -> list[Any]:
    """The pair sets with their reference log-probs from ``params`` (the starting model) in the compute dtype."""
    dtype = setup.compute_dtype(cfg)
    compute = train.cast_params(params, dtype if dtype != torch.float32 else None)

    def logps(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = sequence_logps(model_cfg, compute, batch, layout.gather)
        return out[: out.shape[0] // 2], out[out.shape[0] // 2:]

    return [None if s is None else preference_data.with_reference(
        s, logps, batch_size=cfg.batch_size, seq_len=cfg.max_seq_len, layout=layout,
        to_device=lambda b: setup.to_device(b, layout.device)) for s in sets]


def check(cfg: Any, model_cfg: Any) -> None:
    """The rules --task dpo adds to the config's: a causal model, label smoothing only where TRL
    defines it, and no live reference for full fine-tuning (it would be a second model)."""
    if not models.family(model_cfg).causal:
        raise ConfigError(f"--task dpo: needs a causal language model; {model_cfg.model_type} is an encoder")
    if cfg.dpo.label_smoothing and cfg.dpo.loss not in preference.LABEL_SMOOTHED:
        raise ConfigError(f"--dpo.label-smoothing: applies to --dpo.loss {' and '.join(preference.LABEL_SMOOTHED)}, "
                          f"not {cfg.dpo.loss}")
    if cfg.peft == "none" and cfg.dpo.precompute_ref is False and cfg.dpo.loss not in preference.REFERENCE_FREE:
        raise ConfigError("--dpo.no-precompute-ref: full fine-tuning (--peft none) keeps no second model; its "
                          "reference log-probs are precomputed before training (drop the flag)")


def build(cfg: Any, model_cfg: Any, params: Any, layout: Any) -> Task:
    """The DPO task over --data.source's preference pairs (and its held-out pairs) with the run's tokenizer."""
    check(cfg, model_cfg)
    tok_path = setup.tokenizer_path(cfg)
    tokenizer = data.load_tokenizer(tok_path, model_vocab_size=model_cfg.vocab_size)
    with layout.main_first():  # rank 0 fills the tokenization cache, the others read it
        train_set, eval_set = preference_data.load(cfg, tokenizer)
    reference = reference_kind(cfg)
    if reference == "precomputed":
        train_set, eval_set = precompute(cfg, model_cfg, params, layout, [train_set, eval_set])

    def stream(dataset: Any, state: data.SamplerState, *, shuffle: bool, loop: bool, rank: int = 0,
               world_size: int = 1) -> Any:
        return preference_data.batches(dataset, batch_size=cfg.batch_size, seq_len=cfg.max_seq_len, state=state,
                                       shuffle=shuffle, loop=loop, rank=rank, world_size=world_size)

    facts = {"dpo_loss": cfg.dpo.loss, "beta": cfg.dpo.beta, "reference": reference}
    return Task("dpo", model_cfg, params, tok_path, train_set, eval_set, stream,
                loss=lambda gather, remat: loss(model_cfg, cfg.dpo, gather, remat), count=preference_data.real_pairs,
                header=f"dpo {cfg.dpo.loss}, beta {cfg.dpo.beta:g}, reference: {reference}", facts=facts)


def _same(subtree: Any) -> Any:
    return subtree
