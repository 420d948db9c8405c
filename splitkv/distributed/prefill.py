"""Context-parallel causal prefill: every rank holds a shard of the query tokens and the
matching KV, in one of the layouts of :mod:`splitkv.distributed.layouts`.
"""

from __future__ import annotations

import torch

from .._checks import expect_bool, expect_scale
from ..attention import attention_with_lse
from .checks import _expect_choice, _expect_forward_only, _renamed_check, _resolve_group
from .collectives import _all_gather_tensor, _gather_lengths
from .layouts import LAYOUTS, _pieces


def context_parallel_prefill(
    q_shard: torch.Tensor,
    k_shard: torch.Tensor,
    v_shard: torch.Tensor,
    cu_seqlens_shard: torch.Tensor,
    max_seqlen_shard: int,
    *,
    layout: str = "zigzag",
    causal: bool = True,
    softmax_scale: float | None = None,
    group=None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention prefill of sequences whose tokens (queries and KV) are sharded across ranks.

    Each rank holds, for every sequence, some of its tokens: their queries and
    their keys/values (the same positions), laid out as :func:`shard_sequences`
    produces them. Each query attends (causally) to every key of its sequence up
    to its own position, wherever that key lives.

    Args:
        q_shard: ``[total_shard, heads_q, head_dim]`` float16, bfloat16 or float32.
        k_shard, v_shard: ``[total_shard, heads_kv, head_dim]`` (same tokens as q).
        cu_seqlens_shard: int32 ``[batch + 1]``: this rank's tokens of each
            sequence (its pieces, concatenated in :func:`shard_indices` order).
        max_seqlen_shard: int, at least the longest per-sequence count in the shard.
        layout: ``"zigzag"`` (rank ``r`` holds chunks ``r`` and ``2R-1-r`` of ``2R``
            near-equal chunks of each sequence; the chunk sizes are recomputed from
            the gathered lengths and checked) or ``"contiguous"`` (rank ``r`` holds
            the ``r``-th contiguous piece of each sequence; any piece lengths, so
            uneven or empty shards are fine).
        causal: ``False`` lets every query see its whole sequence.
        softmax_scale, group, backend: as in :func:`context_parallel_attention`.

    Returns:
        ``(out [total_shard, heads_q, head_dim] in q's dtype, lse [heads_q,
        total_shard] float32 natural log)`` for this rank's queries, in shard
        order; :func:`unshard_sequences` reassembles the whole batch.

    How (and what it costs): the simple way. The shard lengths are all-gathered
    (``R * batch`` int64), then every rank all-gathers the KV of all ranks in one
    collective: it receives ``(R-1) * max_r(total_shard_r) * 2 * heads_kv *
    head_dim * e`` bytes, ``(R-1)/R`` of the batch's KV when shards are even. Each
    local piece of queries, global positions ``[a, b)``, is then one varlen
    "sequence" of an ``attention_with_lse`` call over keys ``[0, b)``
    (bottom-right causal then gives query ``a + i`` the keys ``<= a + i``), so
    one call covers all pieces and no merge is needed; the keys of overlapping
    prefixes are copied per piece (about one sequence's KV per rank).

    A ring (ring attention) moves the same bytes but overlaps them with compute:
    KV blocks travel rank to rank while the previous block's partial state is
    computed and merged, and no rank holds more than two blocks. Here the
    communication is all done before the compute and each rank holds the whole
    KV for the duration of the call: fine while the KV fits and the all-gather is
    short next to the attention (long prefills are compute-bound: ``O(L^2)``
    flops over ``O(L)`` bytes), wasteful when memory is tight.

    Not differentiable: the KV travels through the collectives as raw bytes; a
    ``q_shard``, ``k_shard`` or ``v_shard`` that requires grad (with grad mode on)
    is refused with a ValueError rather than silently detached. Backend limits are
    those of :func:`splitkv.attention_with_lse` (see :func:`context_parallel_attention`).
    Needs an initialized ``torch.distributed`` process group that every rank enters
    with its own shard.

    Example:
        >>> import tempfile, torch, torch.distributed as dist, splitkv
        >>> # A world of one over gloo; under torchrun rank r of R passes rank=r, world_size=R.
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/rendezvous",
        ...                         rank=0, world_size=1)
        >>> q, k, v = torch.randn(3, 12, 2, 16).unbind(0)  # 2 sequences of 5 and 7 tokens, 2 heads
        >>> cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        >>> q_s, cu_s = splitkv.shard_sequences(q, cu, dist.get_rank(), dist.get_world_size())
        >>> k_s, _ = splitkv.shard_sequences(k, cu, dist.get_rank(), dist.get_world_size())
        >>> v_s, _ = splitkv.shard_sequences(v, cu, dist.get_rank(), dist.get_world_size())
        >>> max_s = int((cu_s[1:] - cu_s[:-1]).max())
        >>> out_s, lse_s = splitkv.context_parallel_prefill(q_s, k_s, v_s, cu_s, max_s)
        >>> out = splitkv.unshard_sequences([out_s], cu)  # gather every rank's out_s first
        >>> want, _ = splitkv.attention_with_lse(q, k, v, cu, cu, 7, 7, causal=True)
        >>> torch.allclose(out, want, atol=1e-5)
        True
        >>> dist.destroy_process_group()
    """
    names = {"q": "q_shard", "k": "k_shard", "v": "v_shard", "cu_seqlens_q": "cu_seqlens_shard",
             "cu_seqlens_k": "cu_seqlens_shard", "max_seqlen_q": "max_seqlen_shard",
             "max_seqlen_k": "max_seqlen_shard"}  # fmt: skip
    tensors = isinstance(q_shard, torch.Tensor) and isinstance(k_shard, torch.Tensor)
    if tensors and q_shard.dim() >= 1 and k_shard.dim() >= 1 and k_shard.shape[0] != q_shard.shape[0]:
        # Checked first: the shared checker would only see cu_seqlens_shard disagree with one of them.
        raise ValueError(f"k_shard must hold the same tokens as q_shard ({q_shard.shape[0]}), got "
                         f"{k_shard.shape[0]}")  # fmt: skip
    scale = _renamed_check(names, q_shard, k_shard, v_shard, cu_seqlens_shard, cu_seqlens_shard, max_seqlen_shard,
                           max_seqlen_shard, expect_scale("softmax_scale", softmax_scale))  # fmt: skip
    _expect_choice("layout", layout, LAYOUTS)
    expect_bool("causal", causal)
    _expect_forward_only("context_parallel_prefill", q_shard=q_shard, k_shard=k_shard, v_shard=v_shard)
    world, rank = _resolve_group(group)

    shard_lengths = _gather_lengths(cu_seqlens_shard, group, world)  # [R][B], the same on every rank
    batch = cu_seqlens_shard.shape[0] - 1
    totals = [sum(lengths) for lengths in shard_lengths]
    width = max(totals) if totals else 0

    # Where each rank's pieces sit in their sequence. Every rank checks the same
    # gathered numbers, so a bad layout raises everywhere instead of hanging a rank.
    pieces = [[None] * batch for _ in range(world)]  # [r][b] -> [(global start, size)]
    for b in range(batch):
        length = sum(shard_lengths[r][b] for r in range(world))
        offset = 0
        for r in range(world):
            if layout == "contiguous":
                pieces[r][b] = [(offset, shard_lengths[r][b])]
                offset += shard_lengths[r][b]
            else:
                pieces[r][b] = _pieces(length, r, world, layout)
                expected = sum(n for _, n in pieces[r][b])
                if shard_lengths[r][b] != expected:
                    raise ValueError(
                        f"cu_seqlens_shard: rank {r} holds {shard_lengths[r][b]} tokens of sequence {b}, but the "
                        f"zigzag layout of its {length} tokens over {world} ranks puts {expected} there (chunks "
                        f"{r} and {2 * world - 1 - r} of {2 * world}); shard with splitkv.distributed.shard_sequences"
                    )

    # One collective for K and V of every rank, padded to the longest shard. The
    # gathered rows are [rank][k|v][token], addressed below as flat row numbers.
    send = k_shard.new_empty((2, width) + tuple(k_shard.shape[1:]))
    send[0, : k_shard.shape[0]] = k_shard
    send[1, : v_shard.shape[0]] = v_shard
    if world > 1 and send.numel() > 0:
        gathered = _all_gather_tensor(send, group, world)
    else:
        gathered = send.unsqueeze(0)
    rows = gathered.view((world * 2 * width,) + tuple(k_shard.shape[1:]))

    # For each sequence, the flat row of its key at every global position, in order.
    key_rows = []
    for b in range(batch):
        spans = []
        for r in range(world):
            local = sum(shard_lengths[r][:b])  # where sequence b starts in rank r's shard
            for start, size in pieces[r][b]:
                spans.append((start, r * 2 * width + local, size))
                local += size
        spans.sort()
        parts = [torch.arange(row, row + size) for _, row, size in spans]
        key_rows.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64))

    # Varlen "sequences" of the call: one per local piece (causal), keys [0, end of
    # the piece); or, non-causal, one per sequence with all of its keys.
    q_counts, k_index = [], []
    for b in range(batch):
        if causal:
            for start, size in pieces[rank][b]:
                q_counts.append(size)
                k_index.append(key_rows[b][: start + size])
        else:
            q_counts.append(shard_lengths[rank][b])
            k_index.append(key_rows[b])
    k_counts = [t.numel() for t in k_index]
    device = q_shard.device
    k_index = (torch.cat(k_index) if k_index else torch.zeros(0, dtype=torch.int64)).to(device)
    keys = rows.index_select(0, k_index)
    values = rows.index_select(0, k_index + width)  # V rows follow K rows of the same rank
    cu_q = torch.tensor([0] + q_counts, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    cu_k = torch.tensor([0] + k_counts, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    return attention_with_lse(q_shard, keys, values, cu_q, cu_k, max(q_counts, default=0), max(k_counts, default=0),
                              causal=causal, softmax_scale=scale, backend=backend)  # fmt: skip
