"""Context-parallel attention over replicated queries (decode, or a prefill's last chunk):
each rank's partial state over its KV shard, with the causal offsets of its shard's
place in the sequence, combined across the group by an all-gather or an all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._checks import expect_bool, expect_scale
from ..attention import attention_with_lse, needs_grad
from ..merge import merge_states
from ..split_kv import split_kv_attention, splits_pay_off
from .checks import _expect_choice, _renamed_check, _resolve_group
from .collectives import _all_gather_bytes, _all_gather_tensor, _gather_lengths, _lengths

#: Values of ``combine`` in :func:`context_parallel_attention`.
COMBINES = ("auto", "all_gather", "all_reduce")

_NEG_INF = float("-inf")


def combine_bytes(world_size: int, tokens: int, heads: int, head_dim: int, element_size: int) -> dict:
    """Bytes each rank receives (and, in a ring, sends) to combine the ranks' states.

    ``tokens`` query tokens, ``heads`` query heads, ``element_size`` bytes per
    element of the attention output (2 for bf16/fp16, 4 for fp32). Ring algorithms
    assumed (what NCCL uses for these sizes between GPUs of one node without NVLS):

    * ``"all_gather"``: outputs and LSEs gathered in one collective, then one local
      ``merge_states``: ``(R-1) * T*H*(D*e + 4)`` bytes (each rank's payload padded
      to a multiple of 4 bytes);
    * ``"all_reduce"``: gather the LSEs (``(R-1) * T*H*4``), then a float32 sum
      all-reduce of the rescaled outputs (``2 * (R-1)/R * T*H*D*4``).

    Args:
        world_size: ranks in the group (``R``); 1 or fewer moves nothing.
        tokens: query tokens ``T`` (the rows of ``q``, the same on every rank).
        heads: query heads ``H``.
        head_dim: ``D``.
        element_size: bytes per element of the attention output ``e``.

    Returns:
        ``{"all_gather": bytes, "all_reduce": bytes}``, ints.

    Not differentiable: integer arithmetic on sizes, no tensors. Needs no process group.

    Example:
        >>> import torch, splitkv
        >>> splitkv.distributed.combine_bytes(8, 64, 32, 128, 2)
        {'all_gather': 3727360, 'all_reduce': 1892352}
    """
    r, rows = world_size, tokens * heads
    if r <= 1:
        return {"all_gather": 0, "all_reduce": 0}
    payload = rows * 4 + rows * head_dim * element_size
    payload += -payload % 4
    gather = (r - 1) * payload
    reduce = (r - 1) * rows * 4 + (2 * (r - 1) * rows * head_dim * 4) // r
    return {"all_gather": gather, "all_reduce": reduce}


def choose_combine(world_size: int, element_size: int) -> str:
    """The combine that moves fewer bytes (:func:`combine_bytes`); ``"all_gather"`` on a tie.

    The difference ``all_gather - all_reduce`` is ``(R-1) * T*H*D * (e - 8/R)``
    bytes: the all-reduce wins when ``R * e > 8``, i.e. from 5 ranks on for
    bf16/fp16 outputs and from 3 ranks on for fp32. On a tie (R = 4 for bf16, 2 for
    fp32) and below, the all-gather is one collective instead of two (lower latency)
    and it wins.

    Args:
        world_size: ranks in the group (``R``).
        element_size: bytes per element of the attention output (``q.element_size()``).

    Returns:
        ``"all_gather"`` or ``"all_reduce"``: what ``combine="auto"`` of
        :func:`context_parallel_attention` picks.

    Not differentiable: a choice from two ints. Needs no process group.

    Example:
        >>> import torch, splitkv
        >>> splitkv.distributed.choose_combine(4, 2), splitkv.distributed.choose_combine(8, 2)
        ('all_gather', 'all_reduce')
    """
    return "all_reduce" if world_size * element_size > 8 else "all_gather"


def _with_local(gathered: torch.Tensor, local: torch.Tensor, rank: int) -> torch.Tensor:
    """``gathered [R, ...]`` with row ``rank`` replaced by ``local`` where autograd records
    ``local``: the collective's copy carries no gradient, the rank's own state does."""
    if not needs_grad(local):
        return gathered
    return torch.cat([gathered[:rank], local.to(gathered.dtype)[None], gathered[rank + 1 :]])


class _ReplicatedInput(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group. Every rank holds
    the same ``q`` and computes the same loss from the same merged output, so the true
    gradient of ``q`` is the sum of the parts that flow through each rank's state."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _combine_all_gather(out, lse, group, world, rank, out_dtype):
    tokens, heads, head_dim = out.shape
    lse_bytes = heads * tokens * 4
    row = lse_bytes + out.numel() * out.element_size()
    # One buffer, one collective: the LSEs first (so the float32 view is 4-byte
    # aligned), then the output bytes, padded so every rank's row stays aligned.
    send = torch.empty(row + (-row % 4), dtype=torch.uint8, device=out.device)
    send[:lse_bytes] = lse.detach().contiguous().view(-1).view(torch.uint8)
    send[lse_bytes:row] = out.detach().contiguous().view(-1).view(torch.uint8)
    got = _all_gather_bytes(send, group, world)
    lses = _with_local(got[:, :lse_bytes].view(torch.float32).view(world, heads, tokens), lse, rank)
    outs = _with_local(got[:, lse_bytes:row].view(out.dtype).view(world, tokens, heads, head_dim), out, rank)
    # Every rank merges the same bytes in the same order, so all return the same result.
    merged, merged_lse = merge_states(outs, lses, output_dtype=out_dtype)
    return merged, merged_lse


def _combine_all_reduce(out, lse, group, world, rank, out_dtype):
    lses = _with_local(_all_gather_tensor(lse.detach().to(torch.float32), group, world), lse, rank)  # [R, H, T]
    # The merge of merge.py, written so that the local share can be summed by an
    # all-reduce: out = sum_r exp(lse_r - peak) out_r / sum_r exp(lse_r - peak).
    # Written so that its gradient is right too: the empty states' LSEs are replaced
    # before exp (exp(inf) would turn their zero gradient into NaN), and the all-reduced
    # sum enters as the local share plus a constant.
    empty = torch.isinf(lses)  # +inf or -inf: a state without keys
    finite_lses = lses.masked_fill(empty, 0.0)
    peak = lses.detach().masked_fill(empty, _NEG_INF).amax(0)
    peak = peak.masked_fill(torch.isinf(peak), 0.0)  # all empty: avoid -inf - -inf = NaN
    weights = torch.exp(finite_lses - peak).masked_fill(empty, 0.0)
    total = weights.sum(0)  # [H, T]
    nothing = total == 0
    safe_total = total.masked_fill(nothing, 1.0)
    merged_lse = (peak + torch.log(safe_total)).masked_fill(nothing, _NEG_INF)
    # An empty state's output is ignored, whatever it holds (0 * NaN would be NaN).
    local = out.to(torch.float32).masked_fill(empty[rank].t().unsqueeze(-1), 0.0) * weights[rank].t().unsqueeze(-1)
    summed = local.detach().clone()
    # float32 sum: exact enough for the merge, and supported by gloo and NCCL alike.
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    if needs_grad(local):
        summed = local + (summed - local.detach())
    merged = (summed / safe_total.t().unsqueeze(-1)).masked_fill(nothing.t().unsqueeze(-1), 0.0)
    return merged.to(out_dtype), merged_lse


def _shard_state(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend, group, world, rank):
    """This rank's partial state: its queries against its KV shard, masked as in the whole sequence."""

    def run(q_part, cu_q_part, max_q_part, causal_part):
        # A decode-shaped shard (few query rows, long KV) would leave most of the GPU
        # idle in one unsplit pass: split it over the multiprocessors first.
        if backend == "auto" and splits_pay_off(q_part, k, cu_q_part, max_q_part, max_k):
            return split_kv_attention(q_part, k, v, cu_q_part, cu_k, max_q_part, max_k, causal=causal_part,
                                      softmax_scale=scale)  # fmt: skip
        return attention_with_lse(q_part, k, v, cu_q_part, cu_k, max_q_part, max_k, causal=causal_part,
                                  softmax_scale=scale, backend=backend)  # fmt: skip

    # A single query per sequence sits at the sequence's end and sees every key:
    # causal or not is the same mask, and no shard lengths need to be exchanged.
    if not causal or max_q <= 1:
        return run(q, cu_q, max_q, False)
    if world == 1:
        return run(q, cu_q, max_q, True)

    # Sequence b has Lq queries at the end of L keys; this rank holds keys
    # [off, off + Lk) and ``after`` = L - off - Lk keys lie on later ranks. Query i
    # (global position L - Lq + i) sees local key j iff off + j <= L - Lq + i, i.e.
    # j <= i + (Lk - Lq + after). Hence:
    #   * the last ``after`` queries (i >= Lq - after) see every local key: non-causal;
    #   * the first m = max(0, Lq - after) queries see j <= i + Lk - m: exactly the
    #     bottom-right causal mask of m queries over the Lk local keys.
    # So each sequence's queries split in two runs over the same, unsliced KV.
    # (On the last rank after = 0 and this is plain bottom-right causal attention.)
    shard_lengths = _gather_lengths(cu_k, group, world)  # [R][B]
    lens_q = _lengths(cu_q).tolist()
    after = [sum(shard_lengths[r][b] for r in range(rank + 1, world)) for b in range(len(lens_q))]
    causal_counts = [max(0, lq - a) for lq, a in zip(lens_q, after)]
    # A sequence of 0 or 1 query can go either way (see above); the others decide.
    strict = [b for b, lq in enumerate(lens_q) if lq > 1]
    if all(causal_counts[b] == lens_q[b] for b in strict):
        return run(q, cu_q, max_q, True)
    if all(causal_counts[b] == 0 for b in strict):
        return run(q, cu_q, max_q, False)

    device = q.device
    counts = torch.tensor(causal_counts, dtype=torch.int64)
    lq_t = torch.tensor(lens_q, dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(lens_q)), lq_t)
    starts = torch.cumsum(lq_t, 0) - lq_t
    position = torch.arange(int(lq_t.sum())) - starts[owner]
    is_causal = position < counts[owner]
    rows_c = torch.nonzero(is_causal).flatten().to(device)
    rows_n = torch.nonzero(~is_causal).flatten().to(device)
    zero = torch.zeros(1, dtype=torch.int64)
    cu_c = torch.cat([zero, torch.cumsum(counts, 0)]).to(device=device, dtype=torch.int32)
    cu_n = torch.cat([zero, torch.cumsum(lq_t - counts, 0)]).to(device=device, dtype=torch.int32)
    out_c, lse_c = run(q.index_select(0, rows_c), cu_c, int(counts.max()), True)
    out_n, lse_n = run(q.index_select(0, rows_n), cu_n, int((lq_t - counts).max()), False)
    out = q.new_empty(q.shape).index_copy_(0, rows_c, out_c).index_copy_(0, rows_n, out_n)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=device)
    lse.index_copy_(1, rows_c, lse_c.to(torch.float32)).index_copy_(1, rows_n, lse_n.to(torch.float32))
    return out, lse


def context_parallel_attention(
    q: torch.Tensor,
    k_shard: torch.Tensor,
    v_shard: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k_shard: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k_shard: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    group=None,
    combine: str = "auto",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the same queries on every rank over KV sharded across the ranks.

    Every rank of ``group`` passes the same queries and, for each sequence, a
    contiguous shard of that sequence's KV; shards are in rank order (rank 0 holds
    the earliest keys, and a rank may hold none). Each rank computes its partial
    state with :func:`splitkv.attention_with_lse`, and the states are merged across
    the group exactly, so every rank returns the attention over the whole KV.

    Args:
        q: ``[total_q, heads_q, head_dim]`` float16, bfloat16 or float32, packed by
            ``cu_seqlens_q``; identical on every rank.
        k_shard, v_shard: ``[total_k_shard, heads_kv, head_dim]``, q's dtype and
            device (``heads_q % heads_kv == 0``): this rank's KV of every sequence,
            packed by ``cu_seqlens_k_shard``. ``total_k_shard`` may be 0.
        cu_seqlens_q, cu_seqlens_k_shard: int32 ``[batch + 1]`` on q's device;
            ``cu_seqlens_q`` identical on every rank, the shard lengths this rank's.
        max_seqlen_q, max_seqlen_k_shard: ints, at least the longest query / local
            KV sequence.
        causal: the queries are the *last* tokens of each whole sequence (decode,
            or the last chunk of a prefill), bottom-right aligned against the whole
            KV (all ranks' shards): query ``i`` of ``Lq`` sees global key ``g`` of
            ``L`` iff ``g <= i + L - Lq``. Each rank applies the matching offset to
            its shard (see the notes). With one query per sequence this is the
            same as ``causal=False``.
        softmax_scale: multiplier of ``q @ k^T``; default ``head_dim ** -0.5``.
        group: the ``torch.distributed`` process group; ``None`` for the default one.
            Shard order is rank order within the group.
        combine: how the states are merged across ranks: ``"all_gather"`` (gather
            every rank's output and LSE, merge locally), ``"all_reduce"`` (gather
            only the LSEs, rescale the local output, one float32 sum all-reduce), or
            ``"auto"``: the one moving fewer bytes, ``"all_reduce"`` iff
            ``world_size * q.element_size() > 8`` (see :func:`combine_bytes`,
            :func:`choose_combine` and docs/distributed.md). Both give the same
            result up to rounding.
        backend: passed to :func:`splitkv.attention_with_lse` for the local state.
            With ``"auto"``, a decode-shaped shard (few query rows, long KV, on a
            GPU: :func:`splitkv.split_kv.splits_pay_off`) runs
            :func:`splitkv.split_kv_attention` instead, so one rank's long shard is
            spread over all of its GPU's multiprocessors.

    Returns:
        ``(out [total_q, heads_q, head_dim] in q's dtype, lse [heads_q, total_q]
        float32 natural log)``, the same on every rank: attention over the whole
        KV. A row that sees no key anywhere (an empty sequence, or a causal query
        before the first key) gets output 0 and LSE ``-inf``.

    Notes:
        *Causal offsets.* For sequence ``b`` let ``after`` be the number of its keys
        on later ranks (from the shard lengths, all-gathered once per call; the
        only extra collective, skipped when ``causal=False`` or
        ``max_seqlen_q <= 1``). Query ``i`` sees local key ``j`` iff
        ``j <= i + Lk_local - Lq + after``: the last ``after`` queries see the whole
        shard (non-causal), and the first ``max(0, Lq - after)`` queries see exactly
        the bottom-right causal mask of themselves over the whole shard. So no key
        is sliced: the queries are split into those two groups (at most two
        ``attention_with_lse`` calls, one when every sequence falls on one side, as
        on the last rank or with one query per sequence) and the rows put back in
        order. Reading the lengths costs a device-to-host copy.

        *Combine.* See :func:`choose_combine`: per rank, ``"all_gather"`` receives
        ``(R-1) * T*H*(D*e + 4)`` bytes, ``"all_reduce"`` ``(R-1) * T*H*4 +
        2 (R-1)/R * T*H*D*4`` (float32 sum; ring). For bf16 the all-gather moves
        fewer bytes up to 3 ranks, ties at 4 and loses from 5 on.

    Differentiable with respect to ``q``, ``k_shard`` and ``v_shard`` with either
    combine: every rank's own state stays differentiable inside the gathered (or
    all-reduced) result, and ``q``'s gradient is summed over the ranks in the
    backward, so each rank receives the gradient of its KV shard and the whole
    gradient of the replicated queries. Backend limits are those of :func:`splitkv.attention_with_lse`'s
    backends (the flash backends take fp16/bf16 and head_dim <= 256, the Triton
    kernel head_dim <= 256; ``splitkv.explain_attention`` says which runs). Needs an
    initialized ``torch.distributed`` process group (NCCL for CUDA tensors, gloo
    for CPU tensors) that every rank enters with its own shard.

    Example:
        >>> import tempfile, torch, torch.distributed as dist, splitkv
        >>> # A world of one over gloo; under torchrun each of R ranks passes its own KV shard.
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/rendezvous",
        ...                         rank=0, world_size=1)
        >>> q = torch.randn(2, 4, 16)                   # decode: 2 sequences, 1 query each, 4 heads
        >>> k, v = torch.randn(2, 10, 2, 16).unbind(0)  # this rank's keys: 6 of sequence 0, 4 of sequence 1
        >>> cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
        >>> cu_k = torch.tensor([0, 6, 10], dtype=torch.int32)
        >>> out, lse = splitkv.context_parallel_attention(q, k, v, cu_q, cu_k, 1, 6)
        >>> out.shape, lse.shape                        # identical on every rank
        (torch.Size([2, 4, 16]), torch.Size([4, 2]))
        >>> want, want_lse = splitkv.attention_with_lse(q, k, v, cu_q, cu_k, 1, 6)
        >>> torch.allclose(out, want, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)
        True
        >>> dist.destroy_process_group()
    """
    names = {"k": "k_shard", "v": "v_shard", "cu_seqlens_k": "cu_seqlens_k_shard", "max_seqlen_k": "max_seqlen_k_shard"}
    scale = _renamed_check(names, q, k_shard, v_shard, cu_seqlens_q, cu_seqlens_k_shard, max_seqlen_q,
                           max_seqlen_k_shard, expect_scale("softmax_scale", softmax_scale))  # fmt: skip
    expect_bool("causal", causal)
    _expect_choice("combine", combine, COMBINES)
    world, rank = _resolve_group(group)

    if world > 1 and needs_grad(q):
        q = _ReplicatedInput.apply(q, group)
    out, lse = _shard_state(q, k_shard, v_shard, cu_seqlens_q, cu_seqlens_k_shard, max_seqlen_q, max_seqlen_k_shard,
                            causal, scale, backend, group, world, rank)  # fmt: skip
    if world == 1 or q.shape[0] == 0:  # nothing to combine (q, hence its size, is the same on every rank)
        return out, lse
    if combine == "auto":
        combine = choose_combine(world, q.element_size())
    if combine == "all_gather":
        return _combine_all_gather(out, lse, group, world, rank, q.dtype)
    return _combine_all_reduce(out, lse, group, world, rank, q.dtype)
