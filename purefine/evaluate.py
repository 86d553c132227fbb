"""Evaluation with EleutherAI's lm-eval harness over purefine's pure forward.

- ``continuation_logprobs(cfg, params, requests, ...)``: for (context ids, continuation ids) pairs,
  the summed log-probability of each continuation and whether greedy decoding would produce it.
  Batched: sorted by length (longest first), right-padded (causal attention never looks right, so
  padding needs no mask), and only the continuation positions go through the output projection.
- ``rolling_windows(tokens, prefix_id, max_length)``: lm-eval's disjoint rolling windows that
  score every token of a long text once.
- ``PurefineLM``: an ``lm_eval`` model (``TemplateLM``): ``loglikelihood``,
  ``loglikelihood_rolling`` and ``generate_until`` over any params tree (LoRA, DoRA and NF4 leaves
  included) and any ``purefine.data.Tokenizer``. Tokenization follows lm-eval's Hugging Face
  backend (``HFLM``): the context's trailing spaces move to the continuation, the continuation's
  ids are those of ``encode(context + continuation)`` after the context's, and the BOS id is added
  as the tokenizer's own ``add_special_tokens`` would (SentencePiece: yes; a ``tokenizer.json``:
  when its post-processor adds it), so scores equal ``HFLM``'s on the same checkpoint.
- ``local_tasks_dir()``: the bundled offline task ``purefine_mc`` (purefine/assets/eval/).

lm-eval is the optional ``eval`` extra (``pip install 'purefine[eval]'``); the scoring functions
work without it. Shapes: B batch, T padded length, D hidden size, V vocabulary, N scored tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from purefine import generate, models, ops
from purefine.errors import ConfigError

try:
    from lm_eval.api.model import TemplateLM
    HAVE_LM_EVAL = True
except ModuleNotFoundError:  # the optional extra; PurefineLM explains what to install
    TemplateLM = object  # type: ignore[assignment,misc]
    HAVE_LM_EVAL = False

ASSETS_EVAL = Path(__file__).resolve().parent / "assets" / "eval"
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256
GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens", "do_sample",
              "temperature", "top_k", "top_p", "seed")
ERR_NO_LM_EVAL = "lm-eval is not installed: pip install 'purefine[eval]' (or pip install lm-eval)"


def require_lm_eval() -> None:
    """Raise ConfigError with the install command when lm-eval is missing."""
    if not HAVE_LM_EVAL:
        raise ConfigError(ERR_NO_LM_EVAL)


def local_tasks_dir() -> Path:
    """The directory of purefine's bundled lm-eval tasks (an lm-eval ``include_path``)."""
    return ASSETS_EVAL


def model_max_length(cfg: Any) -> int:
    """The longest sequence the model takes: ``max_position_embeddings`` (``n_positions``), else 2048."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


def _device(params: dict) -> torch.device:
    return generate._first_tensor(params).device


def _window(context: Sequence[int], continuation: Sequence[int], max_length: int) -> list[int]:
    """The model input of one request: (context + continuation) without its last token, left-cut to max_length."""
    if not continuation:
        raise ConfigError("loglikelihood: a request has an empty continuation (nothing to score)")
    if not context:
        raise ConfigError("loglikelihood: a request has an empty context; start it with the BOS id")
    if len(continuation) > max_length:
        raise ConfigError(f"loglikelihood: a continuation of {len(continuation)} tokens exceeds the model's "
                          f"max length {max_length}")
    return (list(context) + list(continuation))[-(max_length + 1):][:-1]


@torch.no_grad()
def _score_batch(cfg: Any, params: dict, inputs: list[list[int]], continuations: list[list[int]],
                 device: torch.device) -> list[tuple[float, bool]]:
    """One right-padded batch: inputs (B lists, T max) -> [(sum log p(continuation), all greedy)] (B)."""
    length = max(len(x) for x in inputs)
    tokens = torch.zeros((len(inputs), length), dtype=torch.long)
    for row, ids in enumerate(inputs):
        tokens[row, : len(ids)] = torch.as_tensor(ids)
    h, _ = models.hidden_states(cfg, params, tokens.to(device))  # (B, T, D), causal
    picked = torch.cat([h[row, len(ids) - len(cont): len(ids)] for row, (ids, cont) in
                        enumerate(zip(inputs, continuations))])  # (N, D)
    logprobs = ops.linear(picked, models.output_weight(cfg, params)).float().log_softmax(-1)  # (N, V)
    targets = torch.as_tensor([t for cont in continuations for t in cont], device=device)  # (N,)
    token_logprobs = logprobs.gather(-1, targets[:, None])[:, 0]
    greedy = logprobs.argmax(-1) == targets
    out, start = [], 0
    for cont in continuations:
        stop = start + len(cont)
        out.append((float(token_logprobs[start:stop].sum()), bool(greedy[start:stop].all())))
        start = stop
    return out


def continuation_logprobs(cfg: Any, params: dict, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                          batch_size: int = 16, max_length: int | None = None) -> list[tuple[float, bool]]:
    """[(context ids, continuation ids)] -> [(log p(continuation | context), greedy)], in request order.

    The context is cut on the left so context + continuation fits ``max_length + 1`` tokens (the
    last token is only a target). Requests run longest first, ``batch_size`` at a time.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, found {batch_size}")
    max_length = max_length or model_max_length(cfg)
    inputs = [_window(ctx, cont, max_length) for ctx, cont in requests]
    order = sorted(range(len(requests)), key=lambda i: -(len(inputs[i]) + 1))
    device = _device(params)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        scored = _score_batch(cfg, params, [inputs[i] for i in rows], [list(requests[i][1]) for i in rows], device)
        for i, result in zip(rows, scored):
            results[i] = result
    return results  # type: ignore[return-value]


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows [(context ids, continuation ids)] that score each token once.

    The first window is conditioned on ``prefix_id``; later ones on as much preceding text as fits.
    """
    from lm_eval import utils as lm_utils

    windows = lm_utils.get_rolling_token_windows(token_list=list(tokens), prefix_token=prefix_id,
                                                 max_seq_len=max_length, context_len=1)
    return [lm_utils.make_disjoint_window(w) for w in windows]


def default_add_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own encoding adds BOS: SentencePiece (Llama-2) does; a ``tokenizer.json``
    does when its post-processor does (Llama-3) and not otherwise (GPT-2)."""
    if tokenizer.bos_id is None:
        return False
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "encode"):
        return True
    ids = backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == tokenizer.bos_id


class PurefineLM(TemplateLM):
    """An lm-eval model over ``purefine.models`` and a ``purefine.data.Tokenizer``.

    ``PurefineLM(cfg, params, tokenizer, batch_size=16)`` then
    ``lm_eval.simple_evaluate(model=lm, tasks=[...])``. ``dtype`` casts the params (LoRA and NF4
    leaves through their ``astype``); ``add_bos`` overrides whether inputs start with BOS.
    """

    def __init__(self, cfg: Any, params: dict, tokenizer: Any, *, batch_size: int = 16, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos: bool | None = None,
                 dtype: torch.dtype | None = None, name: str | None = None):
        require_lm_eval()
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"--batch-size: expected a positive integer, found {batch_size}")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.params = generate.cast_params(params, dtype) if dtype is not None else params
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self._max_length = max_length or model_max_length(cfg)
        self.add_bos = default_add_bos(tokenizer) if add_bos is None else add_bos
        self._name = name or repr(tokenizer)
        self._device = _device(self.params)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self._name

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        return eos if eos is not None else self.tokenizer.pad_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on (and rolling windows start with): BOS, else EOS."""
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    def _bos_text(self) -> str | None:
        bos = self.tokenizer.bos_id
        if bos is None:
            return None
        return next((t for t, i in self.tokenizer.special_tokens.items() if i == bos), None)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Text -> ids; BOS first when ``add_special_tokens`` (default: the tokenizer's own behavior).
        A text that already starts with the BOS string gets the BOS id once, as transformers does."""
        add = self.add_bos if add_special_tokens is None else add_special_tokens
        bos_text = self._bos_text()
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            string, add = string[len(bos_text):], True
        return self.tokenizer.encode(string, bos=add)

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """[(cache key, context ids, continuation ids)] -> [(log-probability, greedy)]."""
        results = continuation_logprobs(self.cfg, self.params, [(ctx, cont) for _, ctx, cont in requests],
                                        batch_size=self.batch_size, max_length=self.max_length)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-probability, over disjoint windows of at most ``max_length`` tokens."""
        windows, owners = [], []
        for i, request in enumerate(requests):
            for context, continuation in rolling_windows(self.tok_encode(request.args[0]), self.prefix_token_id,
                                                         self.max_length):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, EOS or ``max_gen_toks``; requests sharing
        generation options run together in left-padded batches, longest first."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str] = [""] * len(requests)
        for indices in groups.values():
            options = generation_options(requests[indices[0]].args[1], self.max_gen_toks)
            contexts = {i: self._context_ids(requests[i].args[0], options["max_new_tokens"]) for i in indices}
            ordered = sorted(indices, key=lambda i: -len(contexts[i]))
            for start in range(0, len(ordered), self.batch_size):
                rows = ordered[start: start + self.batch_size]
                outputs = generate.generate(self.cfg, self.params, [contexts[i] for i in rows],
                                            decode=self.tokenizer.decode, eos_ids=(self.eot_token_id,), **options)
                for i, new in zip(rows, outputs):
                    results[i] = generate.trim_stop(self.tokenizer.decode(new), options["stop"])
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results

    def _context_ids(self, context: str, max_new_tokens: int) -> list[int]:
        room = self.max_length - max_new_tokens
        if room < 1:
            raise ConfigError(f"generate_until: max_gen_toks {max_new_tokens} leaves no room for a prompt in the "
                              f"model's max length {self.max_length}")
        return self.tok_encode(context)[-room:]



def generation_options(gen_kwargs: dict, default_max_new_tokens: int = DEFAULT_MAX_GEN_TOKS) -> dict:
    """lm-eval's generation kwargs -> ``generate.generate`` keywords, as lm-eval's HF backend reads them:
    ``until`` (a string or list), ``max_gen_toks`` (or an alias), greedy unless ``do_sample`` (default:
    temperature > 0) with a positive ``temperature``, then ``top_k`` / ``top_p``. Unknown kwargs are an
    error naming them."""
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise ConfigError(f"generate_until: unsupported generation kwargs {unknown} "
                          f"(supported: {', '.join(GEN_KWARGS)})")
    until = gen_kwargs.get("until") or []
    limits = [gen_kwargs.get(k) for k in GEN_KWARGS[1:5] if gen_kwargs.get(k) is not None]
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    do_sample = gen_kwargs.get("do_sample")
    sampling = (temperature > 0 if do_sample is None else bool(do_sample)) and temperature > 0
    return {"max_new_tokens": int(limits[0]) if limits else default_max_new_tokens,
            "stop": [until] if isinstance(until, str) else list(until),
            "temperature": temperature if sampling else 0.0,
            "top_k": gen_kwargs.get("top_k") if sampling else None,
            "top_p": gen_kwargs.get("top_p") if sampling else None,
            "seed": int(gen_kwargs.get("seed") or 0)}
