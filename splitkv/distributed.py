"""Split-KV attention across processes (context parallelism) with ``torch.distributed``.

A sequence's KV cache too long for one GPU is cut into contiguous shards, one per
rank. Attention over the whole sequence is then the exact merge of the ranks'
partial states (see :mod:`splitkv.merge`): each rank runs
:func:`splitkv.attention_with_lse` over its shard, and the states are combined
across the process group so that every rank returns the full result.

* :func:`context_parallel_attention`: every rank holds the same queries (decode,
  or the last chunk of a prefill) and one KV shard per sequence.
* :func:`context_parallel_prefill`: every rank holds a shard of the query tokens
  *and* the matching KV of one or more sequences (causal self-attention), in the
  contiguous or the zig-zag (load-balanced) layout; :func:`shard_sequences`,
  :func:`unshard_sequences` and :func:`shard_indices` move tensors into and out
  of those layouts.

Conventions are those of :func:`splitkv.attention_with_lse`: varlen packed
tensors ``[tokens, heads, head_dim]`` delimited by int32 ``cu_seqlens``, GQA,
bottom-right aligned causal mask, and LSE ``[heads, tokens]`` float32 natural
log; a query row that sees no key gets output 0 and LSE ``-inf`` (never NaN).

The same code runs on NCCL (CUDA tensors) and gloo (CPU tensors): only
``all_gather`` (single-tensor form where the backend has it) and ``all_reduce``
are used, all-gathers move raw bytes (so no backend has to support the dtype)
and reductions run in float32 (gloo lacks bfloat16 sums in some versions, and a
float32 sum is what the merge needs anyway). Every rank of the group must call
these functions with the same arguments except the shards themselves; shapes
that differ across ranks make the collectives fail or hang, as with any
collective. Forward only: there is no autograd through the collectives.
docs/distributed.md counts the bytes each call moves.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ._checks import expect_bool, expect_count, expect_rank, expect_scale, expect_tensor
from .attention import attention_with_lse, check_attention_inputs, needs_grad
from .merge import merge_states
from .split_kv import split_kv_attention, splits_pay_off

__all__ = [
    "COMBINES",
    "LAYOUTS",
    "choose_combine",
    "combine_bytes",
    "context_parallel_attention",
    "context_parallel_prefill",
    "shard_indices",
    "shard_sequences",
    "unshard_sequences",
]

#: Values of ``combine`` in :func:`context_parallel_attention`.
COMBINES = ("auto", "all_gather", "all_reduce")
#: Values of ``layout`` in :func:`context_parallel_prefill` and the shard helpers.
LAYOUTS = ("zigzag", "contiguous")

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- checks


def _renamed_check(names: dict, *args) -> float:
    """``check_attention_inputs`` with its messages naming *our* arguments.

    The shared checker speaks of ``q``, ``k``, ``cu_seqlens_k``...; the functions
    here take ``k_shard``, ``cu_seqlens_k_shard``..., and an error must name the
    argument the caller actually passed.
    """
    try:
        return check_attention_inputs(*args)
    except (TypeError, ValueError) as error:
        pattern = r"\b(" + "|".join(re.escape(n) for n in names) + r")\b"
        message = re.sub(pattern, lambda m: names[m.group(1)], str(error))
        raise type(error)(message) from None


def _expect_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def _expect_rank_of(rank, world_size) -> tuple[int, int]:
    """``(rank, world_size)`` as ints, ``0 <= rank < world_size``."""
    world_size = expect_count("world_size", world_size, 1)
    rank = expect_count("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank}")
    return rank, world_size


def _expect_forward_only(name: str, **tensors) -> None:
    """The collectives move raw bytes, so no gradient could flow back through them: a
    tensor that requires one is refused instead of being silently detached."""
    if torch.is_grad_enabled():
        wants = [arg for arg, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
        if wants:
            raise ValueError(f"{name} is not differentiable, but {', '.join(wants)} requires grad: call it under "
                             "torch.no_grad() or pass detached tensors")  # fmt: skip


def _resolve_group(group) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group`` (the default group for None), rank within the group."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group() first")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return dist.get_world_size(group), rank


def _lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)


# --------------------------------------------------------------------------- collectives

# Backends on which the single-tensor all-gather raised "unsupported" once; they
# take the list form from then on. (gloo only gained the single-tensor form in
# recent PyTorch releases; NCCL always had it.)
_NO_SINGLE_TENSOR_GATHER: set = set()


def _all_gather_bytes(flat: torch.Tensor, group, world: int) -> torch.Tensor:
    """All-gathers a 1-D uint8 tensor of the same length on every rank into ``[world, n]``.

    Moving bytes rather than typed elements means no backend has to support the
    dtype (gloo's bfloat16 support varies by version) and several tensors of
    different dtypes can travel in one collective.
    """
    out = flat.new_empty(world * flat.numel())
    # all_gather_single is the newer name of all_gather_into_tensor (which warns on torch >= 2.13).
    gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
    backend = str(dist.get_backend(group))
    if gather_single is not None and backend not in _NO_SINGLE_TENSOR_GATHER:
        try:
            gather_single(out, flat, group=group)
            return out.view(world, -1)
        except (RuntimeError, NotImplementedError):
            # An unsupported op is refused locally, before anything is sent, on
            # every rank alike, so falling back to the list form is safe.
            if backend == "nccl":
                raise
            _NO_SINGLE_TENSOR_GATHER.add(backend)
    rows = out.view(world, -1)
    dist.all_gather(list(rows.unbind(0)), flat, group=group)
    return rows


def _all_gather_tensor(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """``[world, *t.shape]`` in ``t``'s dtype, rank order (the same shape on every rank)."""
    got = _all_gather_bytes(t.contiguous().view(-1).view(torch.uint8), group, world)
    return got.view(t.dtype).view((world,) + tuple(t.shape))


def _gather_lengths(cu_seqlens: torch.Tensor, group, world: int) -> list[list[int]]:
    """Every rank's per-sequence token counts, ``[world][batch]`` on the host (one device sync)."""
    lengths = _lengths(cu_seqlens)
    if world == 1:
        return [lengths.tolist()]
    if lengths.numel() == 0:  # an empty batch (the same on every rank): nothing to exchange
        return [[] for _ in range(world)]
    return _all_gather_tensor(lengths, group, world).tolist()


# --------------------------------------------------------------------------- combine


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


# --------------------------------------------------------------------------- decode / queries at the end


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


# --------------------------------------------------------------------------- layouts


def _expect_cu_seqlens(name: str, cu_seqlens) -> list[int]:
    expect_rank(name, cu_seqlens, 1, "[batch + 1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must be an int32 or int64 [batch + 1] tensor, got {cu_seqlens.dtype} "
                         f"of shape {tuple(cu_seqlens.shape)}")  # fmt: skip
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"{name} must rise from 0, got {bounds}")
    return bounds


def _chunks(length: int, parts: int) -> list[int]:
    """Boundaries of ``parts`` near-equal chunks of ``length`` tokens (sizes differ by at most 1)."""
    return [(c * length) // parts for c in range(parts + 1)]


def _pieces(length: int, rank: int, world: int, layout: str) -> list[tuple[int, int]]:
    """``(start, size)`` of the pieces of a ``length``-token sequence that ``rank`` holds, in shard order."""
    if layout == "contiguous":
        bounds = _chunks(length, world)
        return [(bounds[rank], bounds[rank + 1] - bounds[rank])]
    bounds = _chunks(length, 2 * world)
    late = 2 * world - 1 - rank
    return [(bounds[rank], bounds[rank + 1] - bounds[rank]), (bounds[late], bounds[late + 1] - bounds[late])]


def shard_indices(cu_seqlens: torch.Tensor, rank: int, world_size: int, *, layout: str = "zigzag"):
    """Which tokens of a packed batch ``rank`` holds: ``(index, cu_seqlens_shard)``.

    Every sequence (``L`` tokens) is cut into near-equal chunks, chunk ``c`` being
    tokens ``[c*L // n, (c+1)*L // n)``:

    * ``"zigzag"``: ``n = 2R`` chunks; rank ``r`` holds chunks ``r`` and
      ``2R-1-r``, in that order. Under a causal mask early chunks are cheap and late
      ones dear, so pairing them gives every rank the same work (ring attention's
      load-balanced layout);
    * ``"contiguous"``: ``n = R`` chunks; rank ``r`` holds chunk ``r``.

    Args:
        cu_seqlens: int32 or int64 ``[batch + 1]`` cumulative lengths of the whole
            batch (rising from 0), on any device.
        rank: which shard, ``0 <= rank < world_size``.
        world_size: how many shards (``R >= 1``).
        layout: ``"zigzag"`` or ``"contiguous"``.

    Returns:
        ``index``: int64 ``[total_shard]`` positions in the packed batch of the
        tokens of this rank's shard, sequence by sequence (on ``cu_seqlens``'s
        device); ``cu_seqlens_shard``: int32 ``[batch + 1]`` of the shard.
        Reads ``cu_seqlens`` on the host (a device sync for a CUDA tensor).

    Not differentiable: it returns integer indices. Needs no process group.

    Example:
        >>> import torch, splitkv
        >>> cu = torch.tensor([0, 8, 12], dtype=torch.int32)  # sequences of 8 and 4 tokens
        >>> index, cu_shard = splitkv.distributed.shard_indices(cu, 0, 2)
        >>> index, cu_shard
        (tensor([ 0,  1,  6,  7,  8, 11]), tensor([0, 4, 6], dtype=torch.int32))
        >>> splitkv.distributed.shard_indices(cu, 0, 2, layout="contiguous")[0]
        tensor([0, 1, 2, 3, 8, 9])
    """
    bounds = _expect_cu_seqlens("cu_seqlens", cu_seqlens)
    rank, world_size = _expect_rank_of(rank, world_size)
    _expect_choice("layout", layout, LAYOUTS)
    parts, lengths = [], [0]
    for start, end in itertools.pairwise(bounds):
        pieces = _pieces(end - start, rank, world_size, layout)
        parts.extend(torch.arange(start + a, start + a + n) for a, n in pieces)
        lengths.append(sum(n for _, n in pieces))
    index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    cu_shard = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return index.to(cu_seqlens.device), cu_shard.to(cu_seqlens.device)


def _expect_tokens(name: str, x, dim: int, total: int) -> int:
    expect_tensor(name, x)
    dim = expect_count("dim", dim, -x.dim())
    if dim >= x.dim():
        raise ValueError(f"dim = {dim} is out of range for {name} of {x.dim()} dims")
    dim %= x.dim()
    if x.shape[dim] != total:
        raise ValueError(f"{name} must have {total} tokens (cu_seqlens[-1]) along dim {dim}, got shape "
                         f"{tuple(x.shape)}")  # fmt: skip
    return dim


def shard_sequences(x: torch.Tensor, cu_seqlens: torch.Tensor, rank: int, world_size: int, *,
                    layout: str = "zigzag", dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """This rank's shard of a packed batch: ``(x_shard, cu_seqlens_shard)``.

    Args:
        x: any tensor with the packed tokens along ``dim`` (``[tokens, heads,
            head_dim]`` q/k/v with ``dim=0``; an LSE ``[heads, tokens]`` with ``dim=1``).
        cu_seqlens: ``[batch + 1]`` int32/int64 cumulative lengths of the whole batch.
        rank, world_size: which of how many shards (``0 <= rank < world_size``).
        layout: ``"zigzag"`` or ``"contiguous"``, see :func:`shard_indices`.
        dim: the dimension of ``x`` that holds the tokens (negative counts from the end).

    Returns:
        ``(x_shard, cu_seqlens_shard)``: ``x``'s tokens of this rank along ``dim``
        (a copy, in :func:`shard_indices` order), and int32 ``[batch + 1]`` lengths
        of the shard, the ``cu_seqlens_shard`` of :func:`context_parallel_prefill`.

    Differentiable with respect to ``x`` (an ``index_select``). Needs no process
    group: every rank can cut its own shard from the whole batch.

    Example:
        >>> import torch, splitkv
        >>> cu = torch.tensor([0, 8, 12], dtype=torch.int32)
        >>> x = torch.arange(12).view(12, 1)                  # [tokens, 1]
        >>> x_shard, cu_shard = splitkv.shard_sequences(x, cu, 1, 2)
        >>> x_shard.flatten(), cu_shard
        (tensor([ 2,  3,  4,  5,  9, 10]), tensor([0, 4, 6], dtype=torch.int32))
    """
    bounds = _expect_cu_seqlens("cu_seqlens", cu_seqlens)
    dim = _expect_tokens("x", x, dim, bounds[-1])
    index, cu_shard = shard_indices(cu_seqlens, rank, world_size, layout=layout)
    return x.index_select(dim, index.to(x.device)), cu_shard


def unshard_sequences(shards: Sequence[torch.Tensor], cu_seqlens: torch.Tensor, *, layout: str = "zigzag",
                      dim: int = 0) -> torch.Tensor:  # fmt: skip
    """Reassembles the packed batch from every rank's shard (the inverse of :func:`shard_sequences`).

    Args:
        shards: the ``world_size`` shards in rank order (e.g. gathered with
            ``torch.distributed.all_gather_object`` or from each process's output).
        cu_seqlens: ``[batch + 1]`` cumulative lengths of the whole batch.
        layout, dim: as in :func:`shard_sequences`.

    Returns:
        The whole packed batch, ``cu_seqlens[-1]`` tokens along ``dim``, other
        dimensions, dtype and device those of ``shards[0]``.

    Differentiable with respect to the shards (an ``index_copy_`` of their
    concatenation). Needs no process group.

    Example:
        >>> import torch, splitkv
        >>> cu = torch.tensor([0, 8, 12], dtype=torch.int32)
        >>> x = torch.randn(12, 2, 4)                         # [tokens, heads, head_dim]
        >>> shards = [splitkv.shard_sequences(x, cu, rank, 2)[0] for rank in range(2)]
        >>> torch.equal(splitkv.unshard_sequences(shards, cu), x)
        True
        >>> lse = torch.randn(2, 12)                          # [heads, tokens]: tokens on dim 1
        >>> parts = [splitkv.shard_sequences(lse, cu, rank, 2, dim=1)[0] for rank in range(2)]
        >>> torch.equal(splitkv.unshard_sequences(parts, cu, dim=1), lse)
        True
    """
    if isinstance(shards, torch.Tensor) or not isinstance(shards, (list, tuple)) or not shards:
        raise TypeError("shards must be a non-empty list or tuple of tensors, one per rank")
    bounds = _expect_cu_seqlens("cu_seqlens", cu_seqlens)
    world = len(shards)
    indices = []
    for r, shard in enumerate(shards):
        index, _ = shard_indices(cu_seqlens, r, world, layout=layout)
        d = _expect_tokens(f"shards[{r}]", shard, dim, index.numel())
        indices.append(index)
    first = shards[0]
    shape = list(first.shape)
    shape[d] = bounds[-1]
    full = first.new_empty(shape)
    index = torch.cat(indices).to(first.device)
    return full.index_copy_(d, index, torch.cat(list(shards), dim=d))


# --------------------------------------------------------------------------- prefill


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
