"""Random varlen batches and the float64 attention reference shared by the attention tests.

The reference is written here, not taken from the package, so that every backend
(the package's own reference backend included) is checked against an independent one.
"""

import itertools

import torch

TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}
LSE_TOLERANCE = {"atol": 1e-3, "rtol": 1e-4}


def cu_seqlens(lengths, device):
    return torch.tensor([0] + list(lengths), device=device).cumsum(0).to(torch.int32)


def random_tokens(total, heads, head_dim, dtype, device, generator):
    return torch.randn(total, heads, head_dim, generator=generator).to(device=device, dtype=dtype)


def reference64(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, seqused_k=None):
    """Float64 attention with the flash-attn varlen conventions, written here independently
    of the package (no splitkv import): per sequence, dense scores and an explicit softmax.

    Args:
        q: ``[total_q, heads_q, head_dim]``; k, v: ``[total_k, heads_kv, head_dim]``; query
            head ``h`` reads KV head ``h // (heads_q // heads_kv)``.
        cu_q, cu_k: ``[batch + 1]`` cumulative lengths; max_q, max_k: unused (the lengths
            come from cu_q / cu_k), kept so calls read like the package's.
        causal: bottom-right mask: query ``i`` of ``Lq`` sees key ``j`` of ``Lk`` iff
            ``j <= i + Lk - Lq``.
        scale: multiplier of ``q @ k^T``.
        seqused_k: optional ``[batch]``: sequence ``i`` uses its first ``seqused_k[i]`` keys.

    Returns:
        ``(out [total_q, heads_q, head_dim], lse [heads_q, total_q])`` in float64 on q's
        device; the LSE in natural log. A row that sees no key gets out 0 and lse -inf.
    """
    del max_q, max_k
    q, k, v = q.double(), k.double(), v.double()
    total_q, heads_q, head_dim = q.shape
    group = heads_q // k.shape[1]
    out = torch.zeros(total_q, heads_q, head_dim, dtype=torch.float64, device=q.device)
    lse = torch.full((heads_q, total_q), float("-inf"), dtype=torch.float64, device=q.device)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    used_k = seqused_k.tolist() if seqused_k is not None else [b - a for a, b in itertools.pairwise(bounds_k)]
    for q_lo, q_hi, k_lo, len_k in zip(bounds_q, bounds_q[1:], bounds_k, used_k):
        len_q = q_hi - q_lo
        if len_q == 0 or len_k == 0:
            continue  # rows stay out 0, lse -inf
        keys = k[k_lo : k_lo + len_k].repeat_interleave(group, dim=1)  # [Lk, heads_q, head_dim]
        values = v[k_lo : k_lo + len_k].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q_lo:q_hi], keys) * scale  # [heads_q, Lq, Lk]
        if causal:
            query_pos = torch.arange(len_q, device=q.device)[:, None]
            key_pos = torch.arange(len_k, device=q.device)[None, :]
            scores = scores.masked_fill(key_pos > query_pos + len_k - len_q, float("-inf"))
        row_max = scores.amax(-1, keepdim=True)  # [heads_q, Lq, 1]; -inf where no key is seen
        seen = torch.isfinite(row_max)
        # Shift by 0 where nothing is seen so exp gives 0, never exp(-inf - -inf) = NaN.
        weights = torch.exp(scores - torch.where(seen, row_max, 0.0))
        row_sum = weights.sum(-1, keepdim=True)
        probs = weights / torch.where(seen, row_sum, 1.0)
        out[q_lo:q_hi] = torch.einsum("hqk,khd->qhd", probs, values)
        lse[:, q_lo:q_hi] = torch.where(seen, row_max + torch.log(row_sum), float("-inf")).squeeze(-1)
    return out, lse


def assert_attention_close(out, lse, ref_out, ref_lse, dtype):
    torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[dtype])
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows with no visible key must have lse -inf exactly there"
    assert (lse[empty] == float("-inf")).all()
    torch.testing.assert_close(lse.double()[~empty], ref_lse[~empty], **LSE_TOLERANCE)
