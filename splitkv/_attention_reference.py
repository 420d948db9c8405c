"""Plain PyTorch attention with log-sum-exp, the numerical reference for the kernels.

Slow on purpose: it loops over the sequences of a packed batch and materialises every
score matrix, so it is only meant for tests and debugging.
"""

from __future__ import annotations

import itertools

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

    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    used_k = seqused_k.tolist() if seqused_k is not None else [b - a for a, b in itertools.pairwise(bounds_k)]
    for q_start, q_end, k_start, len_k in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], used_k):
        len_q, k_end = q_end - q_start, k_start + len_k
        if len_q == 0 or len_k == 0:
            continue
        qs = q[q_start:q_end].to(compute_dtype)
        ks = repeat(k[k_start:k_end].to(compute_dtype), "k h d -> k (h g) d", g=group)
        vs = repeat(v[k_start:k_end].to(compute_dtype), "k h d -> k (h g) d", g=group)

        scores = torch.einsum("qhd,khd->hqk", qs, ks) * softmax_scale
        if causal:
            query_pos = torch.arange(len_q, device=q.device)[:, None]
            key_pos = torch.arange(len_k, device=q.device)[None, :]
            scores = scores.masked_fill(key_pos > query_pos + len_k - len_q, float("-inf"))

        seq_lse = torch.logsumexp(scores, dim=-1)  # [heads, tokens]
        # Rows with no visible key have lse -inf; subtracting 0 there keeps exp() at 0
        # instead of exp(-inf - -inf) = NaN.
        probs = torch.exp(scores - seq_lse.masked_fill(seq_lse == float("-inf"), 0.0)[..., None])
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, vs)
        lse[:, q_start:q_end] = seq_lse

    return out.to(q.dtype), lse
