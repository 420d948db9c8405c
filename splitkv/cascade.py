"""Cascade attention: sequences that share a prefix read the prefix KV once.

Each sequence ``i`` of a batch has the same prefix KV (a system prompt, few-shot
examples, a document) followed by its own suffix KV. Its queries are its last
tokens, so they see the whole prefix and, causally, their suffix. Cascade
attention computes:

1. the prefix pass: all queries of all sequences against the one prefix KV,
   non-causal, with the query heads of each KV-head group packed into one tile
   and the prefix split over the multiprocessors (float32 partial states);
2. the suffix pass: each sequence's queries against its own suffix KV, causal
   (bottom-right), also split when the suffixes are long;
3. one N-way merge of all those partial states into the output (for one
   sequence, done inside the launch of the two passes by the last program of each
   tile to finish).

The result equals full causal attention over ``[prefix ; suffix_i]``, while the
prefix KV is read once instead of once per sequence, and stored once.
:func:`use_cascade` is the cost model that says when this beats plain attention
over per-sequence ``[prefix ; suffix_i]`` KV; ``cascade_attention`` takes the
plain path itself when the model predicts it faster.
"""

from __future__ import annotations

import functools

import torch

from ._checks import expect_bool, expect_count, expect_tensor
from ._planning import CascadeEstimate, cascade_splits, estimate_cascade
from .attention import (
    check_attention_inputs,
    check_sequence_values,
    empty_attention_results,
    fake_attention_results,
    needs_grad,
    run_checked_attention,
)
from .merge import merge_attn_states, merge_states
from .split_kv import triton_can_run

__all__ = ["CascadeEstimate", "cascade_attention", "cascade_splits", "estimate_cascade", "use_cascade"]


def use_cascade(
    num_sequences: int,
    prefix_len: int,
    total_suffix_len: int,
    total_query_len: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    element_size: int = 2,
) -> bool:
    """Whether to keep a shared-prefix batch as one prefix plus suffixes and run cascade
    attention, rather than per-sequence ``[prefix ; suffix_i]`` KV and plain attention.

    Cascade reads the prefix KV once instead of ``num_sequences`` times (and stores it
    once), and pays for float32 partial states, a merge and two more launches. It
    wins when several sequences share a prefix that is long next to those partial
    states, as in decoding; it does not with one sequence, with a prefix of a few
    tokens, or in a long prefill, where the attention arithmetic (the same either
    way) dominates. The cost model (:func:`estimate_cascade`) is a roofline
    calibrated on an H100: on a CPU, or where host time dominates, its answer is
    only indicative. It takes no device, so it answers with the H100's bandwidth;
    :func:`cascade_attention` scales it to the device it runs on. Not differentiable (it returns a bool).

    What the answer means depends on the caller: :func:`cascade_attention` with
    ``cascade="auto"`` makes its own choice (counting the copy the plain path needs
    first); :class:`splitkv.nn.SharedPrefixKVCache` with ``mode="auto"`` follows this
    function once, for its decode shape; with ``mode="cascade"`` it cascades regardless.

    Args:
        num_sequences: sequences sharing the prefix (an int >= 0).
        prefix_len: tokens of the shared prefix.
        total_suffix_len: suffix tokens of all sequences together.
        total_query_len: query tokens of all sequences together (``num_sequences``
            for one decode step).
        heads_q: query heads (>= 1).
        heads_kv: KV heads (>= 1; GQA when fewer than ``heads_q``).
        head_dim: dimension of a head (>= 1).
        element_size: bytes per K/V element (2 for float16/bfloat16, 4 for float32).

    Returns:
        ``True`` if cascade attention is predicted at least as fast as plain
        attention over per-sequence KV that already exists.

    Example:
        >>> import torch, splitkv
        >>> splitkv.use_cascade(64, 8192, 64 * 512, 64, heads_q=32, heads_kv=8, head_dim=128)
        True
        >>> splitkv.use_cascade(1, 8192, 512, 1, heads_q=32, heads_kv=8, head_dim=128)
        False
    """
    num_sequences, prefix_len, total_suffix_len, total_query_len = (
        expect_count(name, value) for name, value in (("num_sequences", num_sequences), ("prefix_len", prefix_len),
                                                      ("total_suffix_len", total_suffix_len),
                                                      ("total_query_len", total_query_len)))  # fmt: skip
    heads_q, heads_kv, head_dim, element_size = (
        expect_count(name, value, minimum=1) for name, value in (("heads_q", heads_q), ("heads_kv", heads_kv),
                                                                 ("head_dim", head_dim),
                                                                 ("element_size", element_size)))  # fmt: skip
    estimate = estimate_cascade(num_sequences, prefix_len, total_suffix_len, total_query_len, heads_q, heads_kv,
                                head_dim, element_size)  # fmt: skip
    return estimate.cascade_us <= estimate.plain_us


def _check_cascade_values(q, suffix_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k) -> None:
    """That each sequence's queries come after the prefix, where the CPU ``cu_seqlens_*``
    (and ``seqused_k``) passed :func:`~splitkv.attention.check_sequence_values`."""
    if not cu_seqlens_q.is_cpu or torch.compiler.is_compiling():
        return
    # A query before the last prefix token would see only part of the prefix.
    lens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist() if seqused_k is None else seqused_k.tolist()
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if lq > lk + 1:
            raise ValueError(
                f"sequence {i} has {lq} queries but {lk} suffix keys: its queries must be its last tokens "
                "and come after the prefix (queries <= suffix keys + 1)"
            )


def _max_len(cu_seqlens: torch.Tensor) -> int:
    # One device sync on a GPU; 0 for a batch of none (or, for a falling cu_seqlens, which
    # the checks then report against cu_seqlens itself).
    return max(0, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())) if cu_seqlens.shape[0] > 1 else 0


def _materialise(prefix: torch.Tensor, suffix: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """Packed ``[prefix ; suffix_i]`` for every sequence and its cu_seqlens, without a host sync."""
    num_sequences = cu_seqlens_k.shape[0] - 1
    prefix_len = prefix.shape[0]
    sequence = torch.arange(num_sequences + 1, device=cu_seqlens_k.device, dtype=torch.int32)
    cu_full = cu_seqlens_k + sequence * prefix_len
    full = prefix.new_empty((suffix.shape[0] + num_sequences * prefix_len,) + tuple(prefix.shape[1:]))
    prefix_rows = (cu_full[:-1, None] + torch.arange(prefix_len, device=full.device, dtype=torch.int32)).flatten()
    full[prefix_rows.long()] = prefix.repeat(num_sequences, 1, 1)
    tokens = torch.arange(suffix.shape[0], device=full.device, dtype=torch.int32)
    owner = torch.searchsorted(cu_seqlens_k[1:], tokens, right=True)
    full[(tokens + (owner + 1) * prefix_len).long()] = suffix
    return full, cu_full


def cascade_attention(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    cascade: bool | str = "auto",
    seqused_k: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of many sequences over one shared prefix KV plus their own suffix KV.

    Not differentiable: a call whose inputs require grad (with grad mode on) raises
    a RuntimeError rather than return a result without a gradient (for training,
    use :func:`splitkv.attention_with_lse` over per-sequence ``[prefix ; suffix_i]``).
    A torch custom op (``torch.ops.splitkv.cascade_attention``): traceable by
    ``torch.compile(fullgraph=True)``, and CUDA-graph capturable on the GPU when
    ``max_seqlen_q`` / ``max_seqlen_k`` are given (capacities are fine) and the
    lengths live in tensors (``seqused_k``). Its host choices (cascade or plain,
    split counts) are made when it runs, from Python ints and shapes.

    Backends: on CUDA (and CPU under ``TRITON_INTERPRET=1``) the Triton kernel runs
    both passes in one launch (``head_dim <= 256``); elsewhere two
    :func:`splitkv.attention_with_lse` calls and a merge (on a CPU the slow
    ``reference`` backend).

    Args:
        q: ``[total_q, heads_q, head_dim]`` queries of all sequences, packed by
            ``cu_seqlens_q``; float16, bfloat16 or float32.
        cu_seqlens_q: int32 ``[batch + 1]`` tensor of cumulative query counts.
        prefix_k: ``[prefix_len, heads_kv, head_dim]``, the shared prefix keys
            (``prefix_len`` may be 0).
        prefix_v: like ``prefix_k``, the shared prefix values.
        suffix_k: ``[total_k, heads_kv, head_dim]``, each sequence's own keys,
            packed by ``cu_seqlens_k`` (a suffix may be empty).
        suffix_v: like ``suffix_k``.
        cu_seqlens_k: int32 ``[batch + 1]`` tensor of cumulative suffix key counts
            (with ``seqused_k``: of each sequence's suffix capacity).
        softmax_scale: finite positive multiplier of ``q @ k^T``; default ``head_dim ** -0.5``.
        return_lse: also return the LSE ``[heads_q, total_q]`` (float32, natural log).
        max_seqlen_q: longest query count (an int); computed from ``cu_seqlens_q``
            (one device sync) when None. Give it for CUDA graphs.
        max_seqlen_k: longest (used) suffix key count, or a capacity; computed
            from ``cu_seqlens_k`` when None.
        cascade: ``"auto"`` takes the path the cost model (:func:`estimate_cascade`)
            predicts faster, counting that the plain path must first materialise
            ``[prefix ; suffix_i]``; ``True`` / ``False`` forces the cascade / the plain path.
        seqused_k: optional int32 ``[batch]``: sequence ``i`` uses only the first
            ``seqused_k[i]`` keys of its ``cu_seqlens_k`` segment (flash-attn's
            meaning), so a suffix cache with room to grow (``cu_seqlens_k =
            arange(batch + 1) * capacity``) is read in place.

    Each sequence's queries are its last tokens and come after the prefix
    (queries <= suffix keys + 1; checked when the cu_seqlens are on the CPU), so
    they see the whole prefix and their suffix causally (bottom-right aligned).

    Returns:
        ``out [total_q, heads_q, head_dim]`` in q's dtype (and ``lse`` with
        ``return_lse``), equal to full causal attention over ``[prefix ; suffix_i]``.

    Example:
        >>> import torch, splitkv
        >>> q = torch.randn(3, 4, 16)  # sequence 0: 1 query, sequence 1: 2 queries
        >>> prefix_k, prefix_v = torch.randn(8, 2, 16), torch.randn(8, 2, 16)
        >>> suffix_k, suffix_v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)  # 2 and 3 suffix keys
        >>> cu_q = torch.tensor([0, 1, 3], dtype=torch.int32)
        >>> cu_k = torch.tensor([0, 2, 5], dtype=torch.int32)
        >>> out = splitkv.cascade_attention(q, cu_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_k)
        >>> out.shape
        torch.Size([3, 4, 16])
    """
    # The prefix is required here (check_attention_inputs takes None for "no prefix").
    for name, tensor in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("prefix_k", prefix_k),
                         ("prefix_v", prefix_v)):  # fmt: skip
        expect_tensor(name, tensor)
    return_lse = expect_bool("return_lse", return_lse)
    if not (isinstance(cascade, str) and cascade == "auto"):
        if isinstance(cascade, str):
            raise ValueError(f"cascade must be True, False or 'auto', got {cascade!r}")
        cascade = expect_bool("cascade", cascade)
    compiling = torch.compiler.is_compiling()
    # Under torch.compile a length read from a tensor would be data-dependent: the op reads it when it runs.
    if max_seqlen_q is None and not compiling:
        max_seqlen_q = _max_len(cu_seqlens_q)
    if max_seqlen_k is None and not compiling:
        max_seqlen_k = _max_len(cu_seqlens_k)
    scale = check_attention_inputs(q, suffix_k, suffix_v, cu_seqlens_q, cu_seqlens_k,
                                   0 if max_seqlen_q is None else max_seqlen_q,
                                   0 if max_seqlen_k is None else max_seqlen_k, softmax_scale,
                                   seqused_k, prefix_k, prefix_v)  # fmt: skip
    _check_cascade_values(q, suffix_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k)
    if needs_grad(q, prefix_k, prefix_v, suffix_k, suffix_v):
        raise RuntimeError(
            "cascade_attention is not differentiable and its inputs require grad; run it under torch.no_grad() "
            "(inference), or use splitkv.attention_with_lse over per-sequence [prefix ; suffix_i] KV for training"
        )
    if compiling:
        code = {"auto": -1, False: 0, True: 1}[cascade]
        out, lse = torch.ops.splitkv.cascade_attention(
            q, cu_seqlens_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens_k, scale, return_lse,
            -1 if max_seqlen_q is None else max_seqlen_q, -1 if max_seqlen_k is None else max_seqlen_k, code,
            seqused_k,
        )  # fmt: skip
    else:
        out, lse = _cascade_impl(q, cu_seqlens_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens_k, scale,
                                 return_lse, max_seqlen_q, max_seqlen_k, cascade, seqused_k)  # fmt: skip
    return (out, lse) if return_lse else out


def _cascade_impl(q, cu_seqlens_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens_k, scale, return_lse,
                  max_seqlen_q, max_seqlen_k, cascade, seqused_k):  # fmt: skip
    """The eager body of :func:`cascade_attention`, for checked arguments and int maxima."""
    if q.shape[0] == 0:
        # No query (a rank or a step with none): nothing to plan; split counts divide by the rows.
        return empty_attention_results(q)
    prefix_len = prefix_k.shape[0]
    if prefix_len == 0 and cascade is not True:
        # Nothing is shared: plain attention over the suffixes is the whole answer.
        return run_checked_attention(q, suffix_k, suffix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     True, scale, seqused_k, normalise_lse=return_lse)  # fmt: skip
    num_sequences = cu_seqlens_q.shape[0] - 1
    total_q, heads_q, head_dim = q.shape
    heads_kv = suffix_k.shape[1]
    if cascade == "auto":
        # The inputs come as prefix + suffixes, so the plain way must build [prefix ; suffix_i] first.
        estimate = estimate_cascade(num_sequences, prefix_len, suffix_k.shape[0], total_q, heads_q, heads_kv,
                                    head_dim, q.element_size(), q.device)  # fmt: skip
        cascade = estimate.cascade_us <= estimate.plain_us + estimate.materialise_us

    if not cascade:
        full_k, cu_full = _materialise(prefix_k, suffix_k, cu_seqlens_k)
        full_v, _ = _materialise(prefix_v, suffix_v, cu_seqlens_k)
        used_full = None if seqused_k is None else seqused_k + prefix_len
        return run_checked_attention(q, full_k, full_v, cu_seqlens_q, cu_full, max_seqlen_q, max_seqlen_k + prefix_len,
                                     True, scale, used_full, normalise_lse=return_lse)  # fmt: skip
    if triton_can_run(q):
        return _cascade_split(q, cu_seqlens_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens_k,
                              max_seqlen_q, max_seqlen_k, scale, return_lse, seqused_k=seqused_k)  # fmt: skip
    return _cascade_two_passes(q, cu_seqlens_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, scale, return_lse, seqused_k)  # fmt: skip


def _cascade_op_impl(q, cu_seqlens_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens_k, softmax_scale,
                     return_lse, max_seqlen_q, max_seqlen_k, cascade, seqused_k):  # fmt: skip
    max_seqlen_q = _max_len(cu_seqlens_q) if max_seqlen_q < 0 else max_seqlen_q
    max_seqlen_k = _max_len(cu_seqlens_k) if max_seqlen_k < 0 else max_seqlen_k
    check_sequence_values(q, suffix_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k)
    _check_cascade_values(q, suffix_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k)
    out, lse = _cascade_impl(q, cu_seqlens_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens_k, softmax_scale,
                             return_lse, max_seqlen_q, max_seqlen_k, {-1: "auto", 0: False, 1: True}[cascade],
                             seqused_k)  # fmt: skip
    # Fresh contiguous results, as the fake implementation promises (lse: empty without return_lse).
    return out.contiguous(), (lse.contiguous() if return_lse else q.new_empty((0,), dtype=torch.float32))


def _cascade_fake(q, cu_seqlens_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens_k, softmax_scale, return_lse,
                  *args):  # fmt: skip
    out, lse = fake_attention_results(q)
    return out, (lse if return_lse else q.new_empty((0,), dtype=torch.float32))


_cascade_op = torch.library.custom_op(
    "splitkv::cascade_attention", _cascade_op_impl, mutates_args=(),
    schema="(Tensor q, Tensor cu_seqlens_q, Tensor prefix_k, Tensor prefix_v, Tensor suffix_k, Tensor suffix_v, "
           "Tensor cu_seqlens_k, float softmax_scale, bool return_lse, SymInt max_seqlen_q, SymInt max_seqlen_k, "
           "int cascade, Tensor? seqused_k) -> (Tensor, Tensor)",
)  # fmt: skip
_cascade_op.register_fake(_cascade_fake)


def _single_sequence_bounds(total: int, like: torch.Tensor) -> torch.Tensor:
    # [0, total] built on the device by a kernel (no host-to-device copy: graph-capturable).
    return torch.arange(2, device=like.device, dtype=torch.int32) * total


@functools.cache
def _triton_attention():
    # Imported on first use: triton is optional for the rest of splitkv.
    from . import _attention_triton

    return _attention_triton


# Zeroed int32 arrival counters of the fused merge, one buffer per (device, CUDA
# stream): a fused launch leaves them zero, and launches on one stream run one
# after another, while launches on two streams could overlap.
_MERGE_COUNTERS: dict[tuple, torch.Tensor] = {}


def _merge_counters(device: torch.device, needed: int) -> torch.Tensor:
    if device.type == "cuda":
        key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    else:
        key = (device.type, 0)
    counters = _MERGE_COUNTERS.get(key)
    if counters is None or counters.shape[0] < needed:
        counters = torch.zeros(max(needed, 1024), dtype=torch.int32, device=device)
        _MERGE_COUNTERS[key] = counters
    return counters


def cascade_stages(q, cu_seqlens_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens_k,
                   max_seqlen_q, max_seqlen_k, scale, return_lse, prefix_splits=None, seqused_k=None):  # fmt: skip
    """The split cascade as named stages, run in order by ``cascade_attention`` (and timed
    one by one by the benchmark): ``"passes"``, one Triton launch that runs the prefix
    pass and the suffix pass together, writing float32 partial states side by side into
    one buffer, then ``"merge"``, a single N-way merge into q's dtype; the last stage
    returns ``(out, lse or None)``. Two cases have the one stage ``"passes"``: the
    single-launch cascade (``prefix_splits == 0`` and one suffix chunk), which writes
    the output itself, and one sequence outside CUDA graph capture, whose launch also
    merges (the last program of each tile to finish merges its states, see
    ``launch_attention``), saving the merge's launch. ``prefix_splits`` overrides
    :func:`cascade_splits`' count (the benchmark's sweep and the tests); ``seqused_k``
    as in :func:`cascade_attention`."""
    kernels = _triton_attention()
    total_q, heads_q, head_dim = q.shape
    heads_kv = suffix_k.shape[1]
    num_sequences = cu_seqlens_q.shape[0] - 1
    chosen, suffix_splits = cascade_splits(num_sequences, heads_q, heads_kv, head_dim, total_q, max_seqlen_q,
                                           max_seqlen_k, prefix_k.shape[0], q.device, q.element_size())  # fmt: skip
    prefix_splits = chosen if prefix_splits is None else prefix_splits
    # cascade_splits' 0 prefix chunks: the suffix programs walk the prefix inline.
    prefix = kernels.Prefix(prefix_k, prefix_v, prefix_splits, inline=prefix_splits == 0)
    num_states = prefix_splits + suffix_splits
    # A single state (the single-launch cascade) is the output itself, in q's dtype.
    states_dtype = torch.float32 if num_states > 1 else q.dtype
    states = q.new_empty((num_states, total_q, heads_q, head_dim), dtype=states_dtype)
    lses = q.new_empty((num_states, heads_q, total_q), dtype=torch.float32)
    # A graph would keep this stream's counters for its replays, which may overlap other launches.
    fused = (num_states > 1 and num_sequences == 1
             and not (q.is_cuda and torch.cuda.is_current_stream_capturing()))  # fmt: skip
    merge_into = None
    if fused:
        counters = _merge_counters(q.device, kernels.fused_merge_counters(heads_q, heads_kv, max_seqlen_q))
        final_lse = q.new_empty((heads_q, total_q), dtype=torch.float32) if return_lse else None
        merge_into = (q.new_empty((total_q, heads_q, head_dim)), final_lse, counters)

    def passes():
        # cascade_attention checked every input, and states / lses are made to measure above.
        kernels.launch_attention(q, suffix_k, suffix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, True,
                                 scale, suffix_splits, states, lses, prefix, seqused_k, merge_into)  # fmt: skip
        if fused:
            return merge_into[0], merge_into[1]
        return (states[0], lses[0] if return_lse else None) if num_states == 1 else None

    def merge():
        return merge_states(states, lses, output_dtype=q.dtype, return_lse=return_lse)

    return [("passes", passes)] if num_states == 1 or fused else [("passes", passes), ("merge", merge)]


def _cascade_split(*args, seqused_k=None):
    result = None
    for _, stage in cascade_stages(*args, seqused_k=seqused_k):
        result = stage()
    return result


def _cascade_two_passes(q, cu_seqlens_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, scale, return_lse, seqused_k=None):  # fmt: skip
    """Cascade through attention_with_lse (any backend, no splits) and the two-state merge."""
    total_q = q.shape[0]
    prefix_len = prefix_k.shape[0]
    suffix_out, suffix_lse = run_checked_attention(q, suffix_k, suffix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                   max_seqlen_k, True, scale, seqused_k)  # fmt: skip
    if prefix_len == 0:
        return suffix_out, suffix_lse
    bounds_q, bounds_k = _single_sequence_bounds(total_q, q), _single_sequence_bounds(prefix_len, q)
    prefix_out, prefix_lse = run_checked_attention(q, prefix_k, prefix_v, bounds_q, bounds_k, total_q, prefix_len,
                                                   False, scale)  # fmt: skip
    return merge_attn_states(prefix_out, prefix_lse, suffix_out, suffix_lse, return_lse=return_lse,
                             output=prefix_out, output_lse=prefix_lse if return_lse else None)  # fmt: skip
