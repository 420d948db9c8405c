"""Plain PyTorch attention with log-sum-exp, the numerical reference for the kernels.

Slow on purpose: it loops over the sequences of a packed batch and materialises every
score matrix, so it is only meant for tests and debugging. Its backward
(:func:`reference_attention_backward`, the same math by hand) is attention_with_lse's
backward on every backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from einops import repeat


def reference_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    seqused_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention forward with the flash-attn conventions, returning ``(out, lse)``.

    Args:
        q: ``[total_q, heads_q, head_dim]``, sequences packed along the token axis.
        k, v: ``[total_k, heads_kv, head_dim]``; ``heads_q % heads_kv == 0`` and query
            head ``h`` reads kv head ``h // (heads_q // heads_kv)`` (GQA / MQA).
        cu_seqlens_q, cu_seqlens_k: int32 ``[batch + 1]`` cumulative sequence lengths.
        max_seqlen_q, max_seqlen_k: accepted for signature parity with the kernels; the
            lengths are read from the cu_seqlens tensors.
        causal: bottom-right aligned mask: in a sequence of ``Lq`` queries and ``Lk``
            keys, query ``i`` attends key ``j`` iff ``j <= i + Lk - Lq``.
        softmax_scale: multiplier of ``q @ k^T`` before the softmax.
        seqused_k: optional int32 ``[batch]``: sequence ``i`` uses only its first
            ``seqused_k[i]`` keys from ``cu_seqlens_k[i]`` on.

    Returns:
        ``out`` ``[total_q, heads_q, head_dim]`` in ``q.dtype`` and ``lse``
        ``[heads_q, total_q]``, the natural-log log-sum-exp of the scaled scores, in
        float32 (float64 when the inputs are float64). The math runs in
        ``promote_types(q.dtype, float32)``.

    A query row that sees no key (``Lk == 0``, or every key masked by ``causal`` when
    ``Lq > Lk``) gets an output of exactly 0 and an LSE of ``-inf``, never NaN.
    """
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    total_q, heads_q, head_dim = q.shape
    group = heads_q // k.shape[1]

    out = torch.zeros((total_q, heads_q, head_dim), dtype=compute_dtype, device=q.device)
    lse = torch.full((heads_q, total_q), float("-inf"), dtype=compute_dtype, device=q.device)

    for q_start, q_end, k_start, k_end in _sequence_bounds(cu_seqlens_q, cu_seqlens_k, seqused_k):
        qs = q[q_start:q_end].to(compute_dtype)
        ks = repeat(k[k_start:k_end].to(compute_dtype), "k h d -> k (h g) d", g=group)
        vs = repeat(v[k_start:k_end].to(compute_dtype), "k h d -> k (h g) d", g=group)
        probs, seq_lse = _probabilities(qs, ks, causal, softmax_scale)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, vs)
        lse[:, q_start:q_end] = seq_lse

    return out.to(q.dtype), lse


def _sequence_bounds(cu_seqlens_q, cu_seqlens_k, seqused_k) -> Iterator[tuple[int, int, int, int]]:
    """``(q_start, q_end, k_start, k_end)`` of every sequence holding queries and keys."""
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    used_k = seqused_k.tolist() if seqused_k is not None else [b - a for a, b in itertools.pairwise(bounds_k)]
    for q_start, q_end, k_start, len_k in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], used_k):
        if q_end > q_start and len_k > 0:
            yield q_start, q_end, k_start, k_start + len_k


def _probabilities(qs: torch.Tensor, ks: torch.Tensor, causal: bool, softmax_scale: float):
    """``(probs [heads, Lq, Lk], lse [heads, Lq])`` of one sequence's queries ``qs [Lq, heads, d]``
    over its keys ``ks [Lk, heads, d]`` (heads already repeated to the query heads)."""
    len_q, len_k = qs.shape[0], ks.shape[0]
    scores = torch.einsum("qhd,khd->hqk", qs, ks) * softmax_scale
    if causal:
        query_pos = torch.arange(len_q, device=qs.device)[:, None]
        key_pos = torch.arange(len_k, device=qs.device)[None, :]
        scores = scores.masked_fill(key_pos > query_pos + len_k - len_q, float("-inf"))
    # Rows with no visible key (every score -inf) get lse -inf and probabilities 0; their
    # scores are zeroed before the logsumexp, which keeps exp(-inf - -inf) = NaN out.
    empty_row = (scores == float("-inf")).all(dim=-1, keepdim=True)  # [heads, tokens, 1]
    safe_scores = scores.masked_fill(empty_row, 0.0)
    seq_lse = torch.logsumexp(safe_scores, dim=-1, keepdim=True)
    probs = torch.exp(safe_scores - seq_lse).masked_fill(empty_row, 0.0)
    return probs, seq_lse.masked_fill(empty_row, float("-inf")).squeeze(-1)


def reference_attention_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    seqused_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of attention for the gradients ``grad_out [total_q, heads_q,
    head_dim]`` of its output and ``grad_lse [heads_q, total_q]`` of its LSE, in the
    dtypes of q, k, v (math in float32, one sequence at a time, scores recomputed).

    With ``P = softmax(S)``, ``S = scale * q k^T``, ``out = P v``, ``lse = logsumexp(S)``:
    ``dv = P^T d_out``, ``dS = P * (d_out v^T - rowsum(d_out * out) + d_lse)``,
    ``dq = scale * dS k``, ``dk = scale * dS^T q``. Rows that see no key get 0.
    """
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    heads_q, heads_kv = q.shape[1], k.shape[1]
    group = heads_q // heads_kv
    dq = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute_dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=compute_dtype, device=q.device)
    for q_start, q_end, k_start, k_end in _sequence_bounds(cu_seqlens_q, cu_seqlens_k, seqused_k):
        qs = q[q_start:q_end].to(compute_dtype)
        ks = repeat(k[k_start:k_end].to(compute_dtype), "k h d -> k (h g) d", g=group)
        vs = repeat(v[k_start:k_end].to(compute_dtype), "k h d -> k (h g) d", g=group)
        d_out = grad_out[q_start:q_end].to(compute_dtype)
        d_lse = grad_lse[:, q_start:q_end].to(compute_dtype)
        probs, _ = _probabilities(qs, ks, causal, softmax_scale)
        out = torch.einsum("hqk,khd->qhd", probs, vs)
        row_dot = (d_out * out).sum(-1).t()  # [heads, Lq]
        d_probs = torch.einsum("qhd,khd->hqk", d_out, vs)
        d_scores = probs * (d_probs - row_dot[..., None] + d_lse[..., None])
        dq[q_start:q_end] = softmax_scale * torch.einsum("hqk,khd->qhd", d_scores, ks)
        # Query heads of a group read the same KV head: their gradients add up.
        dk_heads = softmax_scale * torch.einsum("hqk,qhd->khd", d_scores, qs)
        dv_heads = torch.einsum("hqk,qhd->khd", probs, d_out)
        dk[k_start:k_end] = dk_heads.unflatten(1, (heads_kv, group)).sum(2)
        dv[k_start:k_end] = dv_heads.unflatten(1, (heads_kv, group)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
