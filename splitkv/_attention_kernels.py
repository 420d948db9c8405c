"""The ``@triton.jit`` code of splitkv's attention forward (launched by
:mod:`splitkv._attention_triton`), and the helpers the paged kernel
(:mod:`splitkv._paged_triton`) shares with it.

``attention_fwd_kernel`` runs softmax attention over sequences packed along the token
axis (flash-attn varlen layout, bottom-right aligned causal mask, GQA/MQA) and writes
the output with its natural-log LSE, or one float32 partial state per key chunk
(split-KV), optionally with the cascade's shared prefix in one of the
:class:`PrefixMode` modes and the merge of one sequence's states fused in.

Each program owns one KV head and ``BLOCK_M`` rows, where a row is a (query token,
query head of that KV head's group) pair, so every K/V tile is loaded once for all the
query heads that share it. Scores stay in the log2 domain (``qk_scale`` is
``softmax_scale * log2(e)``) so the online softmax uses exp2.
"""

import enum
import math

import triton
import triton.language as tl

_LN2 = tl.constexpr(math.log(2.0))


class PrefixMode(enum.IntEnum):
    """How a launch of :func:`attention_fwd_kernel` treats the cascade's shared prefix
    (its ``PREFIX_MODE`` constexpr)."""

    #: No prefix: plain or split-KV attention.
    NONE = 0
    #: Each sequence's first key chunk walks the whole prefix before its own keys (the
    #: single-launch cascade: one state fewer per chunk, no prefix programs).
    INLINE = 1
    #: The prefix is a pass of its own: programs of every query of the batch against
    #: the prefix, non-causal, in ``prefix_splits`` key chunks, writing the first states.
    PASS = 2


# The kernel compares its constexpr with these (a jit function reads only constexpr globals).
_PREFIX_INLINE = tl.constexpr(int(PrefixMode.INLINE))
_PREFIX_PASS = tl.constexpr(int(PrefixMode.PASS))


@triton.jit
def load_kv_tile(ptrs, keys, key_hi, MASK_KEYS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
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
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    if UPCAST_OPERANDS:
        # The Triton 3.9 interpreter multiplies the raw uint16 storage of bf16 blocks;
        # bf16 -> fp32 is exact, so upcasting first gives the same product.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=INPUT_PRECISION)


@triton.jit
def online_softmax(s, m_i, l_i):
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
def finish_state(acc, l_i, m_i):
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
        k = load_kv_tile(k_ptrs, keys, key_hi, MASK_KEYS, HEAD_DIM, HEAD_DIM_PAD)
        s = dot(q, tl.trans(k), None, INPUT_PRECISION, UPCAST_DOT) * qk_scale
        if MASK_KEYS:
            s = tl.where(keys[None, :] < row_key_end[:, None], s, float("-inf"))

        p, alpha, l_i, m_new = online_softmax(s, m_i, l_i)

        v = load_kv_tile(v_ptrs, keys, key_hi, MASK_KEYS, HEAD_DIM, HEAD_DIM_PAD)
        acc = acc * alpha[:, None]
        acc = dot(p.to(v.dtype), v, acc, INPUT_PRECISION, UPCAST_DOT)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit
def block_rows(row_block, kv_head, num_rows, group, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
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
        row_valid, token, head, offs_d, row_d_mask = block_rows(row_block, kv_head, num_rows, group, HEAD_DIM,
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

        out, lse = finish_state(acc, l_i, m_i)

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
        row_valid, token, head, offs_d, row_d_mask = block_rows(row_block, kv_head, total_q * group, group,
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
def attention_fwd_kernel(
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
    PREFIX_MODE: tl.constexpr,
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
    # prefills and large decode batches exceed). With PREFIX_MODE PASS its first
    # programs are the cascade's prefix pass: every query of the batch, as one sequence,
    # against the shared PrefixK/PrefixV, non-causal, writing states [0, prefix_splits);
    # the rest are the per-sequence pass writing the states after them. One launch serves
    # both passes. With PREFIX_MODE INLINE there are no prefix programs (prefix_splits is
    # 0): each sequence's first-chunk programs walk the prefix before their own keys.
    # Row blocks that read the same keys are adjacent so they reuse K/V in L2, and run
    # last-to-first so the longest causal blocks start first.
    pid = tl.program_id(0)
    prefix_programs = prefix_row_blocks * heads_kv * prefix_splits
    if pid < prefix_programs:
        row_block = prefix_row_blocks - 1 - pid % prefix_row_blocks
        kv_head = pid // (prefix_row_blocks * prefix_splits)
        if PREFIX_MODE == _PREFIX_PASS:
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
            CAUSAL, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, INPUT_PRECISION, UPCAST_DOT,
            PREFIX_MODE == _PREFIX_INLINE,
        )  # fmt: skip
    if FUSED_MERGE:
        # One sequence, and the prefix pass tiled as the suffix pass (launch_attention
        # makes it so): a (KV head, row block) tile names the same rows in both.
        _merge_tile_when_last(
            Out, Lse, Final, FinalLse, Counters, kv_head * num_row_blocks + row_block, prefix_splits + num_splits,
            row_block, kv_head, total_q, group, stride_os, stride_ot, stride_oh, stride_ls, stride_lh,
            stride_ft, stride_fh, stride_flh, WRITE_FINAL_LSE, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M,
        )  # fmt: skip
