"""Triton flash-attention forward for packed varlen batches that also returns the LSE.

``triton_attention_with_lse`` computes softmax attention over sequences packed along
the token axis (flash-attn varlen layout, bottom-right aligned causal mask, GQA/MQA)
and returns the output together with the natural-log log-sum-exp of every query row.

With ``num_splits > 1`` it is the first half of split-KV ("flash-decoding"): the keys
of each sequence are cut into ``num_splits`` contiguous chunks that run as separate
programs, and the kernel writes one partial ``(out, lse)`` state per chunk for a later
merge. That spreads a long KV cache over the GPU when there are too few query rows to
fill it, which is the usual situation when decoding.

Each program owns one KV head and ``BLOCK_M`` rows, where a row is a (query token,
query head of that KV head's group) pair, so every K/V tile is loaded once for all the
query heads that share it.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from ._triton_launch import CompiledLauncher
from ._triton_support import TRITON_MAX_HEAD_DIM, interpreter_enabled

_INTERPRET = interpreter_enabled()
_LOG2E = math.log2(math.e)
_LN2 = tl.constexpr(math.log(2.0))
_MIN_BLOCK_M = 16
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _load_kv_tile(ptrs, keys, key_hi, MASK_KEYS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    # Masks are only emitted where they can be false: unmasked loads vectorise better.
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    if MASK_KEYS:
        mask = (keys < key_hi)[:, None]
        if HEAD_DIM != HEAD_DIM_PAD:
            mask = mask & (offs_d < HEAD_DIM)[None, :]
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif HEAD_DIM != HEAD_DIM_PAD:
        tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    if UPCAST_OPERANDS:
        # The Triton 3.9 interpreter multiplies the raw uint16 storage of bf16 blocks;
        # bf16 -> fp32 is exact, so upcasting first gives the same product.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=INPUT_PRECISION)


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One key tile's step of the online softmax over scores ``s [rows, keys]`` (log2
    domain, ``-inf`` where masked), running max ``m_i`` and sum ``l_i``: returns the
    tile's weights ``p``, the rescale ``alpha`` of what came before, and the new sum and
    max. The caller rescales its accumulator by ``alpha`` and adds ``p @ v``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; shifting by 0 instead
    # avoids exp2(-inf - -inf) = NaN and leaves p = alpha = 0 for that row.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _finish_state(acc, l_i, m_i):
    """``(out, lse)`` of a finished online softmax, lse in natural log. Rows that saw no
    visible key end with l_i = 0, acc = 0 and m_i = -inf: dividing by 1 instead gives
    them out = 0 and lse = -inf."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None], (m_i + tl.log2(l_safe)) * _LN2


@triton.jit
def _attend_key_range(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    key_lo,
    key_hi,
    row_key_end,
    qk_scale,
    MASK_KEYS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with the keys [key_lo, key_hi).

    Scores are kept in the log2 domain (scaled by softmax_scale * log2(e)) so exp2 can
    be used. With MASK_KEYS, key ``j`` is visible to row ``r`` iff ``j < row_key_end[r]``
    and loads stop at key_hi; without it every key of the range must be visible to
    every row and key_hi - key_lo must be a multiple of BLOCK_N.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    # 64-bit token offset: a long KV cache times its token stride can pass 2**31.
    k_ptrs = k_base + tl.cast(key_lo, tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + tl.cast(key_lo, tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(key_lo, key_hi, BLOCK_N):
        keys = start_n + offs_n
        k = _load_kv_tile(k_ptrs, keys, key_hi, MASK_KEYS, HEAD_DIM, HEAD_DIM_PAD)
        s = _dot(q, tl.trans(k), None, INPUT_PRECISION, UPCAST_DOT) * qk_scale
        if MASK_KEYS:
            s = tl.where(keys[None, :] < row_key_end[:, None], s, float("-inf"))

        p, alpha, l_i, m_new = _online_softmax(s, m_i, l_i)

        v = _load_kv_tile(v_ptrs, keys, key_hi, MASK_KEYS, HEAD_DIM, HEAD_DIM_PAD)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, INPUT_PRECISION, UPCAST_DOT)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit
def _block_rows(row_block, kv_head, num_rows, group, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr):  # fmt: skip
    """Rows ``row_block`` of a sequence's ``num_rows`` for one KV head: row r is query token
    r // group and query head kv_head * group + r % group. Returns (row_valid, token,
    head, offs_d, row_d_mask)."""
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_d_mask = row_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    return row_valid, rows // group, kv_head * group + rows % group, offs_d, row_d_mask


@triton.jit
def _attend_rows(
    Q,
    K,
    V,
    Out,
    Lse,
    q_start,
    q_len,
    k_start,
    k_len,
    kv_head,
    row_block,
    split,
    num_splits,
    state,
    group,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_os,
    stride_ot,
    stride_oh,
    stride_ls,
    stride_lh,
    qk_scale,
    PrefixK,
    PrefixV,
    stride_pkt,
    stride_pkh,
    stride_pvt,
    stride_pvh,
    prefix_len,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INLINE_PREFIX: tl.constexpr,
):
    """One program's work: ``BLOCK_M`` rows of one sequence and KV head against key
    chunk ``split`` of ``num_splits``, written as partial state ``state``. With
    INLINE_PREFIX, the programs of chunk 0 first walk the whole shared prefix
    ``PrefixK/PrefixV [prefix_len]``, which every row sees."""
    num_rows = q_len * group
    if row_block * BLOCK_M < num_rows:
        row_valid, token, head, offs_d, row_d_mask = _block_rows(row_block, kv_head, num_rows, group, HEAD_DIM,
                                                                 HEAD_DIM_PAD, BLOCK_M)  # fmt: skip

        q_rows = (q_start + token).to(tl.int64)
        q = tl.load(Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=row_d_mask,
                    other=0.0)  # fmt: skip

        chunk = (k_len + num_splits - 1) // num_splits
        chunk_lo = tl.minimum(split * chunk, k_len)
        chunk_hi = tl.minimum(chunk_lo + chunk, k_len)
        if CAUSAL:
            # Bottom-right alignment: token i sees key j iff j <= i + k_len - q_len.
            shift = k_len - q_len + 1
            first_token = (row_block * BLOCK_M) // group
            last_token = (tl.minimum((row_block + 1) * BLOCK_M, num_rows) - 1) // group
            common_hi = tl.minimum(chunk_hi, first_token + shift)
            block_hi = tl.minimum(chunk_hi, last_token + shift)
            row_key_end = tl.minimum(chunk_hi, token + shift)
        else:
            common_hi = chunk_hi
            block_hi = chunk_hi
            row_key_end = tl.zeros([BLOCK_M], dtype=tl.int32) + chunk_hi
        # Whole key blocks that every row of the block sees skip the per-element mask.
        unmasked_hi = chunk_lo + tl.maximum(common_hi - chunk_lo, 0) // BLOCK_N * BLOCK_N

        # 64-bit token offsets (a long KV cache times its token stride can pass 2**31);
        # tl.cast also takes the prefix pass's literal 0.
        k_base = K + tl.cast(k_start, tl.int64) * stride_kt + kv_head * stride_kh
        v_base = V + tl.cast(k_start, tl.int64) * stride_vt + kv_head * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        # Two ifs: the constexpr one removes the prefix walk at compile time.
        if INLINE_PREFIX:  # noqa: SIM102
            if split == 0:
                pk_base = PrefixK + kv_head * stride_pkh
                pv_base = PrefixV + kv_head * stride_pvh
                prefix_blocks_end = prefix_len // BLOCK_N * BLOCK_N
                acc, l_i, m_i = _attend_key_range(
                    acc, l_i, m_i, q, pk_base, pv_base, stride_pkt, stride_pvt,
                    0, prefix_blocks_end, row_key_end, qk_scale,
                    False, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, INPUT_PRECISION, UPCAST_DOT,
                )  # fmt: skip
                acc, l_i, m_i = _attend_key_range(
                    acc, l_i, m_i, q, pk_base, pv_base, stride_pkt, stride_pvt,
                    prefix_blocks_end, prefix_len, tl.zeros([BLOCK_M], dtype=tl.int32) + prefix_len, qk_scale,
                    True, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, INPUT_PRECISION, UPCAST_DOT,
                )  # fmt: skip
        acc, l_i, m_i = _attend_key_range(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
            chunk_lo, unmasked_hi, row_key_end, qk_scale,
            False, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, INPUT_PRECISION, UPCAST_DOT,
        )  # fmt: skip
        acc, l_i, m_i = _attend_key_range(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
            unmasked_hi, block_hi, row_key_end, qk_scale,
            True, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, INPUT_PRECISION, UPCAST_DOT,
        )  # fmt: skip

        out, lse = _finish_state(acc, l_i, m_i)

        state_offset = tl.cast(state, tl.int64)
        o_ptrs = Out + state_offset * stride_os + q_rows[:, None] * stride_ot + head[:, None] * stride_oh
        o_ptrs += offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_d_mask)
        lse_ptrs = Lse + state_offset * stride_ls + head.to(tl.int64) * stride_lh + q_start + token
        tl.store(lse_ptrs, lse, mask=row_valid)


@triton.jit
def _load_state(lse_ptrs, o_ptrs, state, num_states, stride_ls, stride_os, row_valid, row_d_mask):
    # A state past the last reads the last one again, as empty (lse -inf): weight 0.
    # (A scalar in the load mask is refused by the triton 3.9 interpreter.) .cg reads
    # from L2, where the other programs' stores are, never from a stale L1 line.
    read = tl.minimum(state, num_states - 1)
    lse = tl.load(lse_ptrs + read * stride_ls, mask=row_valid, other=float("-inf"), cache_modifier=".cg")
    out = tl.load(o_ptrs + read * stride_os, mask=row_d_mask, other=0.0, cache_modifier=".cg")
    return tl.where(state < num_states, lse, float("-inf")), out


@triton.jit
def _merge_tile_when_last(
    Out,
    Lse,
    Final,
    FinalLse,
    Counters,
    tile,
    num_states,
    row_block,
    kv_head,
    total_q,
    group,
    stride_os,
    stride_ot,
    stride_oh,
    stride_ls,
    stride_lh,
    stride_ft,
    stride_fh,
    stride_flh,
    WRITE_FINAL_LSE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The fused merge of a one-sequence cascade. Every program of a (KV head, row
    block) tile, prefix and suffix alike, counts itself on the tile's counter once its
    state is stored; the last to arrive merges the tile's ``num_states`` states into
    ``Final`` (and ``FinalLse``) and sets the counter back to 0 for the next launch."""
    # The barrier puts every thread's state stores before the atomic, whose release
    # (issued by one thread of the program) makes them visible to the program that
    # arrives last; its acquire makes the others' stores visible to it.
    tl.debug_barrier()
    arrived = tl.atomic_add(Counters + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == num_states - 1:
        tl.store(Counters + tile, 0)
        row_valid, token, head, offs_d, row_d_mask = _block_rows(row_block, kv_head, total_q * group, group,
                                                                 HEAD_DIM, HEAD_DIM_PAD, BLOCK_M)  # fmt: skip
        o_ptrs = Out + token.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        lse_ptrs = Lse + head.to(tl.int64) * stride_lh + token
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        # Four states per step, their loads issued together: one program merges the
        # whole tile, and one state after another would wait on L2 once per state.
        for first in range(0, num_states, 4):
            lse_0, out_0 = _load_state(lse_ptrs, o_ptrs, first, num_states, stride_ls, stride_os, row_valid, row_d_mask)
            lse_1, out_1 = _load_state(lse_ptrs, o_ptrs, first + 1, num_states, stride_ls, stride_os, row_valid,
                                       row_d_mask)  # fmt: skip
            lse_2, out_2 = _load_state(lse_ptrs, o_ptrs, first + 2, num_states, stride_ls, stride_os, row_valid,
                                       row_d_mask)  # fmt: skip
            lse_3, out_3 = _load_state(lse_ptrs, o_ptrs, first + 3, num_states, stride_ls, stride_os, row_valid,
                                       row_d_mask)  # fmt: skip
            m_new = tl.maximum(m_i, tl.maximum(tl.maximum(lse_0, lse_1), tl.maximum(lse_2, lse_3)))
            # An empty state (lse -inf) weighs 0; shifting by 0 while every state so far
            # is empty avoids exp(-inf - -inf) = NaN. A NaN lse makes its row NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_shift)
            w_0 = tl.exp(lse_0 - m_shift)
            w_1 = tl.exp(lse_1 - m_shift)
            w_2 = tl.exp(lse_2 - m_shift)
            w_3 = tl.exp(lse_3 - m_shift)
            acc = acc * alpha[:, None] + w_0[:, None] * out_0 + w_1[:, None] * out_1
            acc += w_2[:, None] * out_2 + w_3[:, None] * out_3
            l_i = l_i * alpha + (w_0 + w_1) + (w_2 + w_3)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        f_ptrs = Final + token.to(tl.int64)[:, None] * stride_ft + head[:, None] * stride_fh + offs_d[None, :]
        tl.store(f_ptrs, (acc / l_safe[:, None]).to(Final.dtype.element_ty), mask=row_d_mask)
        if WRITE_FINAL_LSE:
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))
            tl.store(FinalLse + head.to(tl.int64) * stride_flh + token, lse, mask=row_valid)


@triton.jit
def _attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    cu_seqlens_q,
    cu_seqlens_k,
    seqused_k,
    PrefixK,
    PrefixV,
    Final,
    FinalLse,
    Counters,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_pkt,
    stride_pkh,
    stride_pvt,
    stride_pvh,
    stride_os,
    stride_ot,
    stride_oh,
    stride_ls,
    stride_lh,
    stride_ft,
    stride_fh,
    stride_flh,
    batch,
    heads_kv,
    group,
    num_row_blocks,
    num_splits,
    total_q,
    prefix_len,
    prefix_row_blocks,
    prefix_splits,
    qk_scale,
    CAUSAL: tl.constexpr,
    HAS_SEQUSED_K: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    INLINE_PREFIX: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    WRITE_FINAL_LSE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREFIX_BLOCK_M: tl.constexpr,
    PREFIX_BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # One flat grid axis (limit 2**31 - 1; axes 1 and 2 stop at 65535, which long
    # prefills and large decode batches exceed). With HAS_PREFIX its first programs are
    # the cascade's prefix pass: every query of the batch, as one sequence, against the
    # shared PrefixK/PrefixV, non-causal, writing states [0, prefix_splits); the rest are
    # the per-sequence pass writing the states after them. One launch serves both passes.
    # With INLINE_PREFIX (prefix_splits = 0) there are no prefix programs: each
    # sequence's first-chunk programs walk the prefix before their own keys.
    # Row blocks that read the same keys are adjacent so they reuse K/V in L2, and run
    # last-to-first so the longest causal blocks start first.
    pid = tl.program_id(0)
    prefix_programs = prefix_row_blocks * heads_kv * prefix_splits
    if pid < prefix_programs:
        row_block = prefix_row_blocks - 1 - pid % prefix_row_blocks
        kv_head = pid // (prefix_row_blocks * prefix_splits)
        if HAS_PREFIX:
            split = (pid // prefix_row_blocks) % prefix_splits
            _attend_rows(
                Q, PrefixK, PrefixV, Out, Lse, 0, total_q, 0, prefix_len, kv_head, row_block, split, prefix_splits,
                split, group, stride_qt, stride_qh, stride_pkt, stride_pkh, stride_pvt, stride_pvh,
                stride_os, stride_ot, stride_oh, stride_ls, stride_lh, qk_scale,
                PrefixK, PrefixV, stride_pkt, stride_pkh, stride_pvt, stride_pvh, prefix_len,
                False, HEAD_DIM, HEAD_DIM_PAD, PREFIX_BLOCK_M, PREFIX_BLOCK_N, INPUT_PRECISION, UPCAST_DOT, False,
            )  # fmt: skip
    else:
        pid -= prefix_programs
        row_block = num_row_blocks - 1 - pid % num_row_blocks
        seq_head = (pid // num_row_blocks) % (batch * heads_kv)
        split = pid // (num_row_blocks * batch * heads_kv)
        seq = seq_head // heads_kv
        kv_head = seq_head % heads_kv
        q_start = tl.load(cu_seqlens_q + seq)
        k_start = tl.load(cu_seqlens_k + seq)
        if HAS_SEQUSED_K:
            k_len = tl.load(seqused_k + seq)
        else:
            k_len = tl.load(cu_seqlens_k + seq + 1) - k_start
        _attend_rows(
            Q, K, V, Out, Lse, q_start, tl.load(cu_seqlens_q + seq + 1) - q_start,
            k_start, k_len, kv_head, row_block, split, num_splits,
            prefix_splits + split, group, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
            stride_os, stride_ot, stride_oh, stride_ls, stride_lh, qk_scale,
            PrefixK, PrefixV, stride_pkt, stride_pkh, stride_pvt, stride_pvh, prefix_len,
            CAUSAL, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, INPUT_PRECISION, UPCAST_DOT, INLINE_PREFIX,
        )  # fmt: skip
    if FUSED_MERGE:
        # One sequence, and the prefix pass tiled as the suffix pass (launch_attention
        # makes it so): a (KV head, row block) tile names the same rows in both.
        _merge_tile_when_last(
            Out, Lse, Final, FinalLse, Counters, kv_head * num_row_blocks + row_block, prefix_splits + num_splits,
            row_block, kv_head, total_q, group, stride_os, stride_ot, stride_oh, stride_ls, stride_lh,
            stride_ft, stride_fh, stride_flh, WRITE_FINAL_LSE, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M,
        )  # fmt: skip


_launch_attention_kernel = CompiledLauncher(_attention_fwd_kernel)


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
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor, int] | None = None,
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
        out, lse: optional result buffers for the (split) states
            (``[states, total_q, heads_q, head_dim]`` float32 or q's dtype, any leading strides,
            contiguous last dim; ``[states, heads_q, total_q]`` float32 with
            contiguous tokens).
        prefix: ``(prefix_k, prefix_v, prefix_splits)``, the cascade's shared prefix
            KV ``[prefix_len, heads_kv, head_dim]`` (strided like k, v). The same launch
            then also runs every query of the batch against the whole prefix
            (non-causal, in ``prefix_splits`` key chunks) into states
            ``0 .. prefix_splits - 1``; the per-sequence states follow them. With
            ``prefix_splits == 0`` the programs of each sequence's first key chunk
            walk the whole prefix before their keys instead (one state fewer per
            chunk: with ``num_splits == 1`` the final output, and no merge).
        seqused_k: optional int32 ``[batch]``: sequence ``i`` uses only its first
            ``seqused_k[i]`` keys from ``cu_seqlens_k[i]`` on (a cache with room to grow).

    Returns:
        With ``num_splits == 1`` and no prefix: ``out [total_q, heads_q, head_dim]`` in
        q.dtype and ``lse [heads_q, total_q]`` float32 (natural log). Otherwise all
        partial states: ``out [states, total_q, heads_q, head_dim]`` float32 and ``lse
        [states, heads_q, total_q]`` float32, ``states = prefix_splits + num_splits``.
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
    if not 1 <= num_splits <= 65535:
        raise ValueError(f"num_splits must be in [1, 65535], got {num_splits}")
    prefix_k, prefix_v, prefix_splits = prefix if prefix is not None else (k, v, 0)
    if prefix is not None:
        if prefix_k.shape[1:] != k.shape[1:] or prefix_v.shape != prefix_k.shape or prefix_k.dtype != q.dtype:
            raise ValueError(f"prefix k, v must be [prefix_len, {heads_kv}, {head_dim}] {q.dtype}")
        if prefix_k.stride(-1) != 1 or prefix_v.stride(-1) != 1 or prefix_v.dtype != q.dtype:
            raise ValueError("prefix k, v need q's dtype and a contiguous last dimension")
        if not 0 <= prefix_splits <= 65535:
            raise ValueError(f"prefix_splits must be in [0, 65535], got {prefix_splits}")

    num_states = prefix_splits + num_splits
    states_mode = num_states > 1
    # Partial states stay fp32: they are rescaled and summed by the merge, and rounding
    # each one to 16 bits first would add error the unsplit kernel does not have.
    out_dtype = out.dtype if out is not None else (torch.float32 if states_mode else q.dtype)
    if out is None:
        out = torch.empty((num_states, total_q, heads_q, head_dim), dtype=out_dtype, device=q.device)
    if lse is None:
        lse = torch.empty((num_states, heads_q, total_q), dtype=torch.float32, device=q.device)
    if out.shape != (num_states, total_q, heads_q, head_dim) or out_dtype not in (torch.float32, q.dtype):
        raise ValueError(f"out must be [{num_states}, {total_q}, {heads_q}, {head_dim}], float32 or q's dtype")
    if out.stride(-1) != 1:
        raise ValueError("out must have a contiguous last dim")
    if lse.shape != (num_states, heads_q, total_q) or lse.dtype != torch.float32 or lse.stride(-1) != 1:
        raise ValueError(f"lse must be [{num_states}, {heads_q}, {total_q}] float32 with contiguous tokens")

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
    and ``lse`` given. Decode steps are host-bound on small shapes, so this does no
    more Python than the launch needs.

    ``merge_into = (final, final_lse, counters)`` fuses the merge of the states into the
    launch, for one sequence (``batch == 1``) with a prefix in chunks
    (``prefix_splits >= 1``): ``final [total_q, heads_q, head_dim]`` in q's dtype and,
    unless None, ``final_lse [heads_q, total_q]`` float32 with contiguous tokens get the
    merged result; ``counters`` is int32, zero, of at least :func:`fused_merge_counters`
    entries, and zero again when the launch ends. Two launches may share ``counters``
    only if they run one after the other (one CUDA stream)."""
    total_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    group = heads_q // heads_kv
    prefix_k, prefix_v, prefix_splits = prefix if prefix is not None else (k, v, 0)
    prefix_len = prefix_k.shape[0] if prefix is not None else 0
    inline_prefix = prefix is not None and prefix_splits == 0
    head_dim_pad = max(16, _next_power_of_2(head_dim))
    rows_per_seq = max_seqlen_q * group
    keys_per_program = _cdiv(max_seqlen_k, num_splits) + (prefix_len if inline_prefix else 0)
    block_m, block_n, num_warps, num_stages = _launch_config(
        head_dim_pad, q.dtype, _next_power_of_2(rows_per_seq), _next_power_of_2(keys_per_program)
    )
    num_row_blocks = _cdiv(rows_per_seq, block_m)
    prefix_block_m, prefix_block_n, prefix_row_blocks = block_m, block_n, 0
    if prefix_splits:
        prefix_block_m, prefix_block_n, prefix_warps, prefix_stages = _launch_config(
            head_dim_pad, q.dtype, _next_power_of_2(total_q * group), _next_power_of_2(_cdiv(prefix_len, prefix_splits))
        )
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
        causal, seqused_k is not None, prefix_splits > 0, inline_prefix, merge_into is not None,
        final_lse is not None, head_dim, head_dim_pad,
        block_m, block_n, prefix_block_m, prefix_block_n,
        # fp32 callers want fp32 accuracy, which TF32 tensor cores (10-bit
        # mantissa) do not give; the setting is ignored for 16-bit inputs.
        "ieee" if q.dtype == torch.float32 else "tf32",
        _INTERPRET and q.dtype == torch.bfloat16,
    )  # fmt: skip
    _launch_attention_kernel((programs,), args, constexprs, num_warps, num_stages, q.device.index)
