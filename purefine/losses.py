"""Losses over the layers of ``ops``: cross-entropy, chunked through the output projection.

- ``cross_entropy(logits, labels)``: summed token loss in float32 and the number of labels.
- ``chunked_cross_entropy(h, w, labels)``: the next-token loss over the output projection in
  chunks of tokens, so a (tokens x vocab) logits tensor never exists whole; for a plain output
  weight the gradients are formed chunk by chunk in forward (nothing is recomputed). An optional
  final-logit soft-cap (Gemma-2's ``final_logit_softcapping``) is applied inside each chunk.
- ``softcap(logits, cap)``: ``cap * tanh(logits / cap)``.
- ``token_logprobs(h, w, targets)``: log p(target) per token through the output projection, in
  chunks (checkpointed under grad: one (chunk x V) logits block alive at a time), for sequence
  log-probabilities (preference losses).
- ``chunked_distillation(h, w, h_teacher, w_teacher, labels, alpha=, temperature=)``: the
  knowledge-distillation loss ``alpha * T² * KL(teacher_T || student_T) + (1 - alpha) * CE`` per
  token, in chunks, so neither model's (tokens x vocab) logits exist whole.

Every loss returns ``(summed loss (float32), count)``: the training step divides by the count over
all accumulated micro-batches, so k micro-batches equal one large batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from purefine.ops import IGNORE_INDEX, linear, mm_w, mm_wt

# The most logits one cross-entropy chunk holds (elements): 32 MiB in float32, whatever the vocabulary.
LOGITS_BUDGET = 1 << 23


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """logits (..., V) -> cap * tanh(logits / cap) (..., V); unchanged when ``cap`` is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V), labels (N,) -> (summed loss in float32, number of labels != -100)."""
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def _chunk_loss(h: torch.Tensor, w: Any, labels: torch.Tensor, cap: float | None) -> torch.Tensor:
    return cross_entropy(softcap(linear(h, w).float(), cap), labels)[0]


def _linear_cross_entropy(h: torch.Tensor, w: Any, labels: torch.Tensor, chunk_size: int, need_h: bool,
                          need_w: bool, cap: float | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(summed loss, dL/dh or None, dL/dw (float32) or None), one (chunk x V) logits block at a time.

    The blocks live in buffers allocated once per call and reused by every chunk (a block of a large
    vocabulary is tens of MiB: allocated per chunk, each one would be fresh pages from the OS); the
    gradient matmuls write straight into ``grad_h`` and a reused (V, D) buffer. A frozen ``w`` stored in
    a lower precision than ``h`` (bf16 under fp32 compute) is upcast a block of rows at a time
    (``ops.mm_wt``), never whole.
    """
    n, v = h.shape[0], w.shape[0]
    rows = min(chunk_size, n)
    low = h.dtype != torch.float32
    grad_h = torch.zeros_like(h) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
    logits_buf = torch.empty(rows, v, dtype=h.dtype, device=h.device)                  # matmul out; d in h's dtype
    logp_buf = torch.empty(rows, v, dtype=torch.float32, device=h.device) if low else logits_buf
    gw_buf = torch.empty(w.shape, dtype=h.dtype, device=w.device) if need_w and low else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, n, chunk_size):
        hc, lc = h[start : start + chunk_size], labels[start : start + chunk_size]
        valid = lc != IGNORE_INDEX
        if not bool(valid.any()):
            continue
        logits = mm_wt(hc, w, out=logits_buf[: hc.shape[0]])
        tanh = None
        if cap is not None:
            tanh = logits.float().div_(cap).tanh_()
            logits = tanh * cap
        # one fused pass, float32 from any dtype (in place when the logits are float32 already)
        if tanh is None:
            logp = logp_buf[: hc.shape[0]]
            if low:
                logp.copy_(logits)
            logp = torch.log_softmax(logp, dim=-1, out=logp)  # row by row, safe in place
        else:  # the buffer holds tanh, which the gradient needs
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        target = lc.clamp(min=0)
        total = total - (logp.gather(1, target[:, None])[:, 0] * valid).sum()
        if need_h or need_w:
            d = logp.exp_()  # softmax, in place of the log-probabilities
            d[torch.arange(d.shape[0], device=d.device), target] -= 1.0
            if tanh is not None:  # d/dz of cap * tanh(z / cap)
                d.mul_(tanh.square_().neg_().add_(1.0))
            d = d.mul_(valid[:, None])
            if low:
                d = logits_buf[: hc.shape[0]].copy_(d)
            if need_h:
                mm_w(d, w, out=grad_h[start : start + chunk_size])
            if need_w:
                if low:
                    _add_in_slices(grad_w, torch.mm(d.t(), hc, out=gw_buf))
                else:
                    grad_w.addmm_(d.t(), hc)
    return total, grad_h, grad_w


def _add_in_slices(acc: torch.Tensor, x: torch.Tensor, rows: int = 2048) -> None:
    """acc += x for a float32 acc and a lower-precision x, a few rows at a time: a mixed-dtype add_ casts
    x whole first, and a temporary that large (> 32 MiB) is fresh pages from the OS on every call."""
    for i in range(0, acc.shape[0], rows):
        acc[i : i + rows].add_(x[i : i + rows])


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ wᵀ`` whose gradients are formed chunk by chunk in forward.

    The loss is a scalar, so dL/dh and dL/dw are known as soon as each chunk's softmax is: they are
    accumulated there and only they are saved (N x D, and V x D when w trains), never the logits,
    and nothing is recomputed in backward (a checkpointed chunk would run the projection twice).
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                cap: float | None) -> torch.Tensor:
        total, grad_h, grad_w = _linear_cross_entropy(h, w, labels, chunk_size, *ctx.needs_input_grad[:2], cap)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        if getattr(ctx, "done", False):
            raise RuntimeError("chunked_cross_entropy: backward ran twice over one forward (retain_graph is not supported)")
        ctx.done = True
        grad_h, grad_w = ctx.saved_tensors
        # The saved gradients are this Function's own buffers, used once: scaled in place.
        gh = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def chunked_cross_entropy(
    h: torch.Tensor, w: Any, labels: torch.Tensor, *, chunk_size: int = 1024, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h (N, D) hidden states, w (V, D) output weight, labels (N,) -> (loss sum, label count).

    The 2-D hidden states are chunked *before* the output projection (slicing a 3-D activation
    per chunk would copy a frozen bf16 weight each time on CPU). For a plain weight the gradients
    are formed chunk by chunk in forward (``_LinearCrossEntropy``); for a leaf kind (a LoRA'd
    lm_head) each chunk is checkpointed and recomputed in backward. Either way at most one
    (chunk x V) logits block is alive; ``chunk_size`` rows at most, fewer when the vocabulary is
    large (``LOGITS_BUDGET`` elements per chunk). ``softcap`` caps the logits first (Gemma-2).
    """
    if torch.compiler.is_compiling():  # already fused by hand: run eagerly (its chunk loop would unroll)
        return _eager(_chunked_cross_entropy)(h, w, labels, chunk_size, softcap)
    return _chunked_cross_entropy(h, w, labels, chunk_size, softcap)


def _eager(fn: Any) -> Any:
    """``fn`` excluded from torch.compile (imported only when compiling: torch._dynamo is heavy)."""
    return torch.compiler.disable(fn)


def _chunked_cross_entropy(h: torch.Tensor, w: Any, labels: torch.Tensor, chunk_size: int,
                           softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    if h.dim() != 2:
        raise ValueError(f"chunked_cross_entropy: expected 2-D hidden states (N, D), got {tuple(h.shape)}")
    count = (labels != IGNORE_INDEX).sum()
    chunk_size = min(chunk_size, max(64, LOGITS_BUDGET // max(1, w.shape[0])))
    if type(w) is torch.Tensor or _frozen_blocks(w, h):
        if torch.is_grad_enabled() and (h.requires_grad or getattr(w, "requires_grad", False)):
            return _LinearCrossEntropy.apply(h, w, labels, chunk_size, softcap), count
        return _linear_cross_entropy(h, w, labels, chunk_size, False, False, softcap)[0], count
    n = h.shape[0]
    if n <= chunk_size:
        return _chunk_loss(h, w, labels, softcap), count
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        if not (labels[sl] != IGNORE_INDEX).any():
            continue
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h[sl], w, labels[sl], softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(h[sl], w, labels[sl], softcap)
    return total, count


def _frozen_blocks(w: Any, h: torch.Tensor) -> bool:
    """Whether ``w`` is a frozen leaf kind (NF4) that decodes into blocks for a matmul with ``h``: then
    it goes through ``_LinearCrossEntropy`` like a plain weight (each block decoded once per chunk,
    no logits kept for backward) instead of a checkpointed chunk (decoded again in backward)."""
    row_blocks = getattr(w, "row_blocks", None)
    return row_blocks is not None and row_blocks(h) is not None


def _chunk_rows(chunk_size: int, vocab: int) -> int:
    """Rows per chunk: ``chunk_size`` at most, fewer for a large vocabulary (``LOGITS_BUDGET``)."""
    return min(chunk_size, max(64, LOGITS_BUDGET // max(1, vocab)))


def _token_logprobs(h: torch.Tensor, w: Any, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = softcap(linear(h, w).float(), cap)
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def token_logprobs(h: torch.Tensor, w: Any, targets: torch.Tensor, *, chunk_size: int = 1024,
                   softcap: float | None = None) -> torch.Tensor:
    """h (N, D) hidden states, w (V, D) output weight (any leaf kind), targets (N,) token ids (no -100)
    -> log p(target) (N,) float32 under ``softcap``-capped logits. Chunked over the 2-D hidden states;
    under grad each chunk is checkpointed (its logits recomputed in backward), so at most one
    (chunk x V) logits block is alive."""
    if h.dim() != 2:
        raise ValueError(f"token_logprobs: expected 2-D hidden states (N, D), got {tuple(h.shape)}")
    rows = _chunk_rows(chunk_size, w.shape[0])
    parts = []
    for start in range(0, h.shape[0], rows):
        sl = slice(start, start + rows)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_token_logprobs, h[sl], w, targets[sl], softcap, use_reentrant=False))
        else:
            parts.append(_token_logprobs(h[sl], w, targets[sl], softcap))
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


def _distill_chunk(h: torch.Tensor, w: Any, h_teacher: torch.Tensor, w_teacher: Any, labels: torch.Tensor,
                   alpha: float, temperature: float, caps: tuple[float | None, float | None]) -> tuple[torch.Tensor, ...]:
    """(loss, KL, CE) sums (float32) of one chunk; the teacher's logits without gradient."""
    with torch.no_grad():
        teacher = F.log_softmax(softcap(linear(h_teacher, w_teacher).float(), caps[1]) / temperature, dim=-1)
    logits = softcap(linear(h, w).float(), caps[0])
    student = F.log_softmax(logits / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum")  # sum of p_t (log p_t - log p_s)
    ce = F.cross_entropy(logits, labels, reduction="sum")
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl.detach(), ce.detach()


def chunked_distillation(h: torch.Tensor, w: Any, h_teacher: torch.Tensor, w_teacher: Any, labels: torch.Tensor, *,
                         alpha: float, temperature: float = 1.0, chunk_size: int = 1024, softcap: float | None = None,
                         teacher_softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knowledge distillation over N labelled tokens: h (N, D) and w (V, D) the student's hidden
    states and output weight, h_teacher (N, D') and w_teacher (V, D') the teacher's (no gradient),
    labels (N,) the next-token ids (no -100) -> (loss sum, KL sum, CE sum), each () float32.

    Per token: ``alpha * T² * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, label)`` with s,
    t the student's and teacher's logits (Hinton et al.'s soft targets, the T² keeping the soft
    gradients' scale; alpha = 1 is pure distillation, 0 plain fine-tuning). The KL is the full
    divergence (teacher entropy included) at temperature T. Chunked over tokens and checkpointed
    under grad, so at most one (chunk x V) block of each model's logits is alive.
    """
    if h.dim() != 2 or h_teacher.dim() != 2 or h.shape[0] != h_teacher.shape[0]:
        raise ValueError(f"chunked_distillation: expected 2-D hidden states with the same N, got "
                         f"{tuple(h.shape)} and {tuple(h_teacher.shape)}")
    rows = _chunk_rows(chunk_size, w.shape[0])
    sums = [h.new_zeros((), dtype=torch.float32) for _ in range(3)]
    for start in range(0, h.shape[0], rows):
        sl = slice(start, start + rows)
        args = (h[sl], w, h_teacher[sl], w_teacher, labels[sl], alpha, temperature, (softcap, teacher_softcap))
        out = checkpoint(_distill_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _distill_chunk(*args)
        sums = [a + b for a, b in zip(sums, out)]
    return sums[0], sums[1], sums[2]
