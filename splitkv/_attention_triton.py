"""Launching splitkv's Triton attention forward (the kernel is in
:mod:`splitkv._attention_kernels`) for packed varlen batches, returning the LSE.

``triton_attention_with_lse`` computes softmax attention over sequences packed along
the token axis (flash-attn varlen layout, bottom-right aligned causal mask, GQA/MQA)
and returns the output together with the natural-log log-sum-exp of every query row.

With ``num_splits > 1`` it is the first half of split-KV ("flash-decoding"): the keys
of each sequence are cut into ``num_splits`` contiguous chunks that run as separate
programs, and the kernel writes one partial ``(out, lse)`` state per chunk for a later
merge. That spreads a long KV cache over the GPU when there are too few query rows to
fill it, which is the usual situation when decoding.

``launch_attention`` is the launch itself, for callers that validated their inputs
(cascade attention): it also takes the cascade's shared prefix (:class:`Prefix`) and
the fused merge of one sequence's states.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ._attention_kernels import PrefixMode, attention_fwd_kernel
from ._planning import ROWS_PER_PROGRAM
from ._triton_launch import CompiledLauncher
from ._triton_support import TRITON_MAX_HEAD_DIM, interpreter_enabled

_INTERPRET = interpreter_enabled()
_LOG2E = math.log2(math.e)
_MIN_BLOCK_M = 16
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SPLITS = 65535


class Prefix(NamedTuple):
    """The cascade's shared prefix for one launch: ``k, v [prefix_len, heads_kv,
    head_dim]`` (strided like the launch's k, v), seen whole and non-causally by every
    query of the batch. Either a pass of its own in ``splits >= 1`` key chunks, writing
    states ``0 .. splits - 1`` before the sequences' states, or ``inline`` (``splits ==
    0``): each sequence's first key chunk walks the whole prefix before its own keys."""

    k: torch.Tensor
    v: torch.Tensor
    splits: int
    inline: bool

    @property
    def mode(self) -> PrefixMode:
        if self.inline and self.splits == 0:
            return PrefixMode.INLINE
        if not self.inline and self.splits >= 1:
            return PrefixMode.PASS
        raise ValueError(f"prefix: no kernel mode for splits={self.splits} with inline={self.inline} (an inline "
                         "prefix has no chunks of its own, a prefix pass at least one)")  # fmt: skip


_launch_attention_kernel = CompiledLauncher(attention_fwd_kernel)


@functools.cache
def _launch_config(head_dim_pad: int, dtype: torch.dtype, rows_pow2: int, keys_pow2: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), from a sweep of bf16 prefill on an H100
    (triton 3.6, 4 x 4096 tokens, 32 heads). ``rows_pow2`` / ``keys_pow2``: query rows
    per sequence and keys per split, rounded up to powers of two, so that the cache
    holds a few dozen entries however the sequence lengths vary from call to call."""
    if _INTERPRET:
        # Every program is simulated with numpy; small tiles keep CPU tests quick
        # while still running several key blocks per program.
        block_m, block_n, num_stages = 16, 16, 1
    elif head_dim_pad <= 64:
        block_m, block_n, num_stages = 64, 64, 3
    elif head_dim_pad <= 128:
        block_m, block_n, num_stages = 128, 64, 3
    else:
        block_m, block_n, num_stages = 128, 64, 2
    if dtype == torch.float32 and not _INTERPRET:
        # fp32 tiles take twice the shared memory of 16-bit ones.
        block_n, num_stages = 32, 2
        if head_dim_pad > 128:
            block_m, num_stages = 64, 1
    # tl.dot needs every dimension >= 16; beyond that, shrink tiles that would mostly
    # be padding (decode has group rows per sequence, short sequences few keys).
    block_m = min(block_m, max(_MIN_BLOCK_M, rows_pow2))
    block_n = min(block_n, max(16, keys_pow2))
    # Keeps the fp32 accumulator around 64 registers per thread; 4 warps on a
    # 128 x 256 tile ran several times slower in the sweep.
    num_warps = 8 if block_m * head_dim_pad >= 128 * 128 else 4
    return block_m, block_n, num_warps, num_stages


def _narrow_prefix_tile(dtype: torch.dtype, prefix_rows: int, prefix_len: int, suffix_keys: int) -> bool:
    """Whether a cascade launch gives its prefix pass the 64-row tile of the suffix
    programs' warp count instead of its own 128-row, 8-warp tile. One launch has one
    warp count: with the prefix's 8 warps (244 registers, 128 KB of shared memory) one
    block fits an SM, and the short suffix programs run one per SM at a time; at 4
    warps two fit. On the H200 (bf16, 32 / 8 heads x 128, eager and graph, at
    be83365) the narrow tile took 64 x 8192 x 512 from 81 to 67 us, 256 x 4096 x 256
    from 158 to 119, 256 x 4096 x 4096 from 1107 to 1012, 128 x 16384 x 64 from 122 to
    110; it lost only where the prefix's math is the launch (256 x 32768 x 1: 1024 rows
    per KV head, 357 against 367 us), which keeps the wide tile: at least 1024 rows
    and more prefix keys than all suffixes hold (``suffix_keys``, an upper bound).
    fp32 was not measured and keeps the wide tile."""
    if dtype == torch.float32:
        return False
    return not (prefix_rows >= 1024 and prefix_len > suffix_keys)


def triton_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    num_splits: int = 1,
    prefix: Prefix | None = None,
    seqused_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention forward returning ``(out, lse)``; see ``reference_attention_with_lse``.

    Args:
        q: ``[total_q, heads_q, head_dim]``; k, v: ``[total_k, heads_kv, head_dim]``,
            fp16, bf16 or fp32, any token/head strides but a contiguous last dim,
            ``head_dim <= 256`` and ``heads_q % heads_kv == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[batch + 1]`` on q's device.
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths, used only to
            size the grid and the tiles, so the launch never syncs with the device.
        causal: bottom-right aligned causal mask.
        softmax_scale: multiplier of ``q @ k^T``.
        num_splits: number of contiguous key chunks of ``ceil(Lk / num_splits)`` keys
            each sequence is cut into.
        prefix: the cascade's shared prefix (:class:`Prefix`). As a pass of its own,
            the same launch also runs every query of the batch against the whole
            prefix (non-causal, in ``prefix.splits`` key chunks) into states ``0 ..
            prefix.splits - 1``; the per-sequence states follow them. Inline, the
            programs of each sequence's first key chunk walk the whole prefix before
            their keys instead (one state fewer per chunk: with ``num_splits == 1``
            the final output, and no merge).
        seqused_k: optional int32 ``[batch]``: sequence ``i`` uses only its first
            ``seqused_k[i]`` keys from ``cu_seqlens_k[i]`` on (a cache with room to grow).

    Returns:
        With one state (``num_splits == 1`` and no prefix, or an inline prefix): ``out
        [total_q, heads_q, head_dim]`` in q.dtype and ``lse [heads_q, total_q]`` float32
        (natural log). Otherwise all partial states: ``out [states, total_q, heads_q,
        head_dim]`` float32 and ``lse [states, heads_q, total_q]`` float32, ``states =
        prefix.splits + num_splits``.
        Rows that see no key (in the whole sequence, or in that chunk) get out 0 and
        lse ``-inf``.
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"expected q [tokens, heads, head_dim] and k, v alike, got {q.shape}, {k.shape}, {v.shape}")
    total_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    if k.shape[2] != head_dim or head_dim > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"head_dim must match across q, k, v and be <= {TRITON_MAX_HEAD_DIM}")
    if heads_q % heads_kv != 0:
        raise ValueError(f"heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one of {_SUPPORTED_DTYPES}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v need a contiguous last dimension")
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_k.dtype != torch.int32:
        raise TypeError("cu_seqlens_q and cu_seqlens_k must be int32")
    batch = cu_seqlens_q.shape[0] - 1
    if seqused_k is not None and (seqused_k.dtype != torch.int32 or tuple(seqused_k.shape) != (batch,)):
        raise TypeError("seqused_k must be int32 [batch]")
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
    prefix_splits = 0
    if prefix is not None:
        # prefix.mode refuses a prefix that names no kernel mode, before any state is sized from it.
        prefix_k, prefix_v = prefix.k, prefix.v
        prefix_splits = prefix.splits if prefix.mode is PrefixMode.PASS else 0
        if prefix_k.shape[1:] != k.shape[1:] or prefix_v.shape != prefix_k.shape or prefix_k.dtype != q.dtype:
            raise ValueError(f"prefix k, v must be [prefix_len, {heads_kv}, {head_dim}] {q.dtype}")
        if prefix_k.stride(-1) != 1 or prefix_v.stride(-1) != 1 or prefix_v.dtype != q.dtype:
            raise ValueError("prefix k, v need q's dtype and a contiguous last dimension")
        if prefix_splits > _MAX_SPLITS:
            raise ValueError(f"prefix splits must be at most {_MAX_SPLITS}, got {prefix_splits}")

    num_states = prefix_splits + num_splits
    states_mode = num_states > 1
    # Partial states stay fp32: they are rescaled and summed by the merge, and rounding
    # each one to 16 bits first would add error the unsplit kernel does not have.
    out = torch.empty((num_states, total_q, heads_q, head_dim), dtype=torch.float32 if states_mode else q.dtype,
                      device=q.device)  # fmt: skip
    lse = torch.empty((num_states, heads_q, total_q), dtype=torch.float32, device=q.device)

    launch_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                     num_splits, out, lse, prefix, seqused_k)  # fmt: skip
    if states_mode:
        return out, lse
    return out[0], lse[0]


def fused_merge_counters(heads_q: int, heads_kv: int, max_seqlen_q: int) -> int:
    """Counters enough for a fused-merge launch (``launch_attention(..., merge_into=...)``):
    one per KV head and row block of the smallest tile."""
    return heads_kv * _cdiv(max_seqlen_q * (heads_q // heads_kv), _MIN_BLOCK_M)


# Not triton.cdiv / triton.next_power_of_2: in triton 3.6 those are constexpr functions
# whose call wrapper showed up in cProfile as a visible share of the launch's host time.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def launch_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                     num_splits, out, lse, prefix, seqused_k, merge_into=None):  # fmt: skip
    """The launch of :func:`triton_attention_with_lse` for arguments it (or a caller that
    checked a superset of them, as cascade attention does) has validated, with ``out``
    and ``lse`` given and ``prefix`` a :class:`Prefix` or None. Decode steps are
    host-bound on small shapes, so this does no more Python than the launch needs.

    ``merge_into = (final, final_lse, counters)`` fuses the merge of the states into the
    launch, for one sequence (``batch == 1``) with more than one state:
    ``final [total_q, heads_q, head_dim]`` in q's dtype and,
    unless None, ``final_lse [heads_q, total_q]`` float32 with contiguous tokens get the
    merged result; ``counters`` is int32, zero, of at least :func:`fused_merge_counters`
    entries, and zero again when the launch ends. Two launches may share ``counters``
    only if they run one after the other (one CUDA stream)."""
    total_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    group = heads_q // heads_kv
    if prefix is None:
        # The prefix pointers are placeholders the kernel never reads.
        prefix_mode, prefix_k, prefix_v, prefix_splits, prefix_len = PrefixMode.NONE, k, v, 0, 0
    else:
        # Refuses, before any launch, a prefix that names no kernel mode.
        prefix_mode, prefix_k, prefix_v, prefix_splits = prefix.mode, prefix.k, prefix.v, prefix.splits
        prefix_len = prefix_k.shape[0]
    inline_prefix = prefix_mode == PrefixMode.INLINE
    head_dim_pad = max(16, _next_power_of_2(head_dim))
    rows_per_seq = max_seqlen_q * group
    keys_per_program = _cdiv(max_seqlen_k, num_splits) + (prefix_len if inline_prefix else 0)
    block_m, block_n, num_warps, num_stages = _launch_config(
        head_dim_pad, q.dtype, _next_power_of_2(rows_per_seq), _next_power_of_2(keys_per_program)
    )
    num_row_blocks = _cdiv(rows_per_seq, block_m)
    prefix_block_m, prefix_block_n, prefix_row_blocks = block_m, block_n, 0
    if prefix_splits:
        prefix_rows, prefix_keys = _next_power_of_2(total_q * group), _next_power_of_2(_cdiv(prefix_len, prefix_splits))
        prefix_block_m, prefix_block_n, prefix_warps, prefix_stages = _launch_config(
            head_dim_pad, q.dtype, prefix_rows, prefix_keys
        )
        if prefix_warps > num_warps and _narrow_prefix_tile(q.dtype, prefix_rows, prefix_len, batch * max_seqlen_k):
            narrow = _launch_config(head_dim_pad, q.dtype, ROWS_PER_PROGRAM, prefix_keys)
            if narrow[2] == num_warps:
                prefix_block_m, prefix_block_n, prefix_warps, prefix_stages = narrow
        # One launch has one warp count and pipeline depth: enough warps for the larger
        # tile, and the shallower pipeline so both tiles fit in shared memory.
        num_warps, num_stages = max(num_warps, prefix_warps), min(num_stages, prefix_stages)
        prefix_row_blocks = _cdiv(total_q * group, prefix_block_m)
        if merge_into is not None:
            # The fused merge needs the prefix pass tiled as the suffix pass: the same
            # rows per program and row blocks (those past the queries have no rows).
            prefix_block_m, prefix_row_blocks = block_m, num_row_blocks
    programs = prefix_row_blocks * heads_kv * prefix_splits + num_row_blocks * batch * heads_kv * num_splits
    if programs == 0 or total_q == 0:
        return
    q_stride, k_stride, v_stride = q.stride(), k.stride(), v.stride()
    pk_stride, pv_stride, out_stride, lse_stride = prefix_k.stride(), prefix_v.stride(), out.stride(), lse.stride()
    # Without a fused merge its pointers are placeholders the kernel never reads.
    final, final_lse, counters = merge_into if merge_into is not None else (out, None, cu_seqlens_q)
    final_stride = final.stride()
    args = (
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k if seqused_k is None else seqused_k,
        prefix_k, prefix_v, final, lse if final_lse is None else final_lse, counters,
        q_stride[0], q_stride[1], k_stride[0], k_stride[1], v_stride[0], v_stride[1],
        pk_stride[0], pk_stride[1], pv_stride[0], pv_stride[1],
        out_stride[0], out_stride[1], out_stride[2], lse_stride[0], lse_stride[1],
        final_stride[-3], final_stride[-2], 0 if final_lse is None else final_lse.stride(0),
        batch, heads_kv, group, num_row_blocks, num_splits, total_q, prefix_len, prefix_row_blocks,
        prefix_splits, softmax_scale * _LOG2E,
    )  # fmt: skip
    constexprs = (
        causal, seqused_k is not None, int(prefix_mode), merge_into is not None,
        final_lse is not None, head_dim, head_dim_pad,
        block_m, block_n, prefix_block_m, prefix_block_n,
        # fp32 callers want fp32 accuracy, which TF32 tensor cores (10-bit
        # mantissa) do not give; the setting is ignored for 16-bit inputs.
        "ieee" if q.dtype == torch.float32 else "tf32",
        _INTERPRET and q.dtype == torch.bfloat16,
    )  # fmt: skip
    _launch_attention_kernel((programs,), args, constexprs, num_warps, num_stages, q.device.index)
