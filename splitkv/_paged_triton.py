"""Triton attention forward over a paged KV cache, returning the LSE (or split states).

The KV cache is ``k_cache, v_cache [num_pages, page_size, heads_kv, head_dim]`` (any
strides but a contiguous ``head_dim``: K and V may be two views of one ``[num_pages,
2, page_size, heads_kv, head_dim]`` buffer). Every key tile of ``BLOCK_N`` keys looks
its pages up in the block table (``page = block_table[row, key // page_size]``, slot
``key % page_size``), so any ``page_size >= 1`` works, powers of two or not (the
kernel is compiled once per page size, which it takes as a constexpr), and the
same physical page may appear in many rows. Entries past a row's last used key are
never read: the lookup is masked like the keys.

Each program owns one KV head and ``BLOCK_M`` rows, a row being a (query token, query
head of that KV head's group) pair, so every K/V tile is loaded once for all the query
heads that share it (GQA packing); a program walks one key chunk of ``num_splits``,
writing a float32 partial state for :func:`splitkv.merge_states`.

Two ways to name the work:

* plain (``items is None``): one work item per sequence, its tokens
  ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]``, its keys ``[0, seqused_k[i])``;
* a plan (the cascade's, :mod:`splitkv.paged`): a table of items, each a list of query
  tokens (possibly of several sequences), one block-table row and a key range that is
  fixed (a shared run of pages, attended without mask) or ends at ``seqused_k`` of
  the row (a sequence's own pages, causal when asked), and a program table that says
  which (item, row block, key chunk) each program runs. The tables are device tensors
  of fixed size, so a launch is captured in a CUDA graph and replayed with new
  ``seqused_k`` values.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._attention_kernels import block_rows, dot, finish_state, load_kv_tile, online_softmax
from ._triton_launch import CompiledLauncher
from ._triton_support import interpreter_enabled

_INTERPRET = interpreter_enabled()
_LOG2E = math.log2(math.e)


@triton.jit
def _attend_pages(
    acc, l_i, m_i, next_page, q, k_head, v_head, bt_row, key_lo, key_hi, pages_hi, row_key_end, qk_scale,
    stride_kp, stride_ks, stride_vp, stride_vs,
    MASKED: tl.constexpr, PAGE_SIZE: tl.constexpr, SAME_KV_STRIDES: tl.constexpr, INT32_OFFSETS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of (acc, l_i, m_i) with the keys [key_lo, key_hi) of one
    block-table row, ``next_page`` holding the page ids of the tile at key_lo; returns
    them with the page ids of the tile at key_hi (block-table entries from ``pages_hi``
    on are not read). With MASKED, key ``j`` is visible to row ``r`` iff ``j <
    row_key_end[r]`` and loads stop at key_hi; without it every key of the range is
    visible to every row and key_hi - key_lo is a multiple of BLOCK_N. PAGE_SIZE is a
    constexpr: the page and slot of every key of a tile are a shift and a mask for a
    power of two, where a division by a runtime page size took a quarter of the shared
    runs' instructions (benchmarks/NOTES.md). The row offsets of a tile's keys are
    computed once for K and V when their strides are the same (SAME_KV_STRIDES), and in
    32 bits when every page's fit (INT32_OFFSETS): the addressing was about half the
    integer work of a tile, which made the paged launch execute 1.7x the instructions of
    the packed cascade's for the same keys (benchmarks/NOTES.md). Where PAGE_SIZE is a
    multiple of BLOCK_N and key_lo of BLOCK_N, each tile lies in one page: one page id
    per tile, and the rows' offsets a scalar plus loop-invariant slot offsets (5-8% off
    the plain paged kernel at page 128 on the H200, 2-6% off the plan's launch)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        keys = start_n + offs_n
        if PAGE_SIZE % BLOCK_N == 0:
            # The tile lies in one page (it starts at a multiple of BLOCK_N: _attend_item):
            # one page id, and the rows' offsets a scalar plus loop-invariant slot offsets.
            page = next_page if INT32_OFFSETS else next_page.to(tl.int64)
            next_page = tl.load(bt_row + (start_n + BLOCK_N) // PAGE_SIZE, mask=start_n + BLOCK_N < pages_hi,
                                other=0)  # fmt: skip
            k_rows = page * stride_kp + (start_n % PAGE_SIZE) * stride_ks + offs_n * stride_ks
            if SAME_KV_STRIDES:
                v_rows = k_rows
            else:
                v_rows = page * stride_vp + (start_n % PAGE_SIZE + offs_n) * stride_vs
        else:
            if INT32_OFFSETS:
                page = next_page
                slot = keys % PAGE_SIZE
            else:
                page = next_page.to(tl.int64)
                slot = (keys % PAGE_SIZE).to(tl.int64)
            ahead = keys + BLOCK_N
            next_page = tl.load(bt_row + ahead // PAGE_SIZE, mask=ahead < pages_hi, other=0)
            k_rows = page * stride_kp + slot * stride_ks
            if SAME_KV_STRIDES:
                v_rows = k_rows
            else:
                v_rows = page * stride_vp + slot * stride_vs
        k_ptrs = k_head + k_rows[:, None]
        v_ptrs = v_head + v_rows[:, None]
        k = load_kv_tile(k_ptrs, keys, key_hi, MASKED, HEAD_DIM, HEAD_DIM_PAD)
        s = dot(q, tl.trans(k), None, INPUT_PRECISION, UPCAST_DOT) * qk_scale
        if MASKED:
            s = tl.where(keys[None, :] < row_key_end[:, None], s, float("-inf"))
        p, alpha, l_i, m_new = online_softmax(s, m_i, l_i)
        v = load_kv_tile(v_ptrs, keys, key_hi, MASKED, HEAD_DIM, HEAD_DIM_PAD)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], INPUT_PRECISION, UPCAST_DOT)
        m_i = m_new
    return acc, l_i, m_i, next_page


@triton.jit
def _attend_item(
    Q, K, V, Out, Lse, BlockTable, ItemTokens,
    row, tok_off, num_tokens, key_lo, key_hi, k_total, causal, state_base, split, splits, pad_from, row_block,
    kv_head, stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_os, stride_ot, stride_oh, stride_ls, stride_lh, stride_bt, group, num_states, qk_scale,
    PLAN: tl.constexpr, PAGE_SIZE: tl.constexpr, SAME_KV_STRIDES: tl.constexpr, INT32_OFFSETS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """Rows ``row_block`` (of BLOCK_M) of one item and KV head against key chunk
    ``split`` of ``splits`` of the item's keys ``[key_lo, key_hi)``, written as state
    ``state_base + split``; chunk 0 also marks the states from ``pad_from`` on empty."""
    num_rows = num_tokens * group
    if row_block * BLOCK_M < num_rows:
        row_valid, tok_idx, head, offs_d, row_d_mask = block_rows(row_block, kv_head, num_rows, group, HEAD_DIM,
                                                                   HEAD_DIM_PAD, BLOCK_M)  # fmt: skip
        if PLAN:
            token = tl.load(ItemTokens + tok_off + tok_idx, mask=row_valid, other=0)
        else:
            token = tok_off + tok_idx
        token = token.to(tl.int64)
        q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=row_d_mask,
                    other=0.0)  # fmt: skip

        chunk = (key_hi - key_lo + splits - 1) // splits
        if PAGE_SIZE % BLOCK_N == 0:
            # Chunks of whole tiles: every item's key_lo is at a page boundary (0, or a
            # shared run's edge), so every tile starts at a multiple of BLOCK_N and lies in
            # one page, which _attend_pages then looks up once.
            chunk = tl.cdiv(chunk, BLOCK_N) * BLOCK_N
        chunk_lo = tl.minimum(key_lo + split * chunk, key_hi)
        chunk_hi = tl.minimum(chunk_lo + chunk, key_hi)
        if causal:
            # Bottom-right alignment over the sequence's keys: the item's token t (its
            # t-th query) sees key j iff j <= t + k_total - num_tokens.
            shift = k_total - num_tokens + 1
            first_tok = (row_block * BLOCK_M) // group
            last_tok = (tl.minimum((row_block + 1) * BLOCK_M, num_rows) - 1) // group
            common_hi = tl.minimum(chunk_hi, first_tok + shift)
            block_hi = tl.minimum(chunk_hi, last_tok + shift)
            row_key_end = tl.minimum(chunk_hi, tok_idx + shift)
        else:
            common_hi = chunk_hi
            block_hi = chunk_hi
            row_key_end = tl.zeros([BLOCK_M], dtype=tl.int32) + chunk_hi

        bt_row = BlockTable + row.to(tl.int64) * stride_bt
        k_head = K + kv_head * stride_kh + offs_d[None, :]
        v_head = V + kv_head * stride_vh + offs_d[None, :]
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        # Whole key tiles that every row of the block sees skip the key masks.
        unmasked_hi = chunk_lo + tl.maximum(common_hi - chunk_lo, 0) // BLOCK_N * BLOCK_N
        # Only the used keys' block-table entries are read: padding entries may hold
        # anything, an out-of-range page id included. Each tile's page ids are loaded one
        # tile ahead, so the K/V loads do not wait on a dependent block-table load: 10-17%
        # off the plan launch on the H200 (benchmarks/NOTES.md).
        offs_n = tl.arange(0, BLOCK_N)
        if PAGE_SIZE % BLOCK_N == 0:
            # One page id per tile.
            next_page = tl.load(bt_row + chunk_lo // PAGE_SIZE, mask=chunk_lo < block_hi, other=0)
        else:
            next_page = tl.load(bt_row + (chunk_lo + offs_n) // PAGE_SIZE, mask=chunk_lo + offs_n < block_hi,
                                other=0)  # fmt: skip
        acc, l_i, m_i, next_page = _attend_pages(
            acc, l_i, m_i, next_page, q, k_head, v_head, bt_row, chunk_lo, unmasked_hi, block_hi, row_key_end,
            qk_scale, stride_kp, stride_ks, stride_vp, stride_vs,
            False, PAGE_SIZE, SAME_KV_STRIDES, INT32_OFFSETS, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, INPUT_PRECISION,
            UPCAST_DOT,
        )  # fmt: skip
        acc, l_i, m_i, next_page = _attend_pages(
            acc, l_i, m_i, next_page, q, k_head, v_head, bt_row, unmasked_hi, block_hi, block_hi, row_key_end,
            qk_scale, stride_kp, stride_ks, stride_vp, stride_vs,
            True, PAGE_SIZE, SAME_KV_STRIDES, INT32_OFFSETS, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, INPUT_PRECISION,
            UPCAST_DOT,
        )  # fmt: skip

        out, lse = finish_state(acc, l_i, m_i)
        state = tl.cast(state_base + split, tl.int64)
        o_ptrs = Out + state * stride_os + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_d_mask)
        lse_ptrs = Lse + head.to(tl.int64) * stride_lh + token
        tl.store(lse_ptrs + state * stride_ls, lse, mask=row_valid)
        if split == 0:
            # States past this token's levels are empty (the merge ignores their outputs).
            for empty in range(pad_from, num_states):
                tl.store(lse_ptrs + tl.cast(empty, tl.int64) * stride_ls, float("-inf"), mask=row_valid)


@triton.jit
def _paged_fwd_kernel(
    Q, K, V, Out, Lse, BlockTable, SequsedK, CuSeqlensQ, Items, ItemTokens, Programs,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_os, stride_ot, stride_oh, stride_ls, stride_lh, stride_bt,
    heads_kv, group, batch, num_row_blocks, num_splits, num_states, qk_scale,
    CAUSAL: tl.constexpr, PLAN: tl.constexpr, PAGE_SIZE: tl.constexpr, SAME_KV_STRIDES: tl.constexpr,
    INT32_OFFSETS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    WIDE_BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    # KV heads innermost: the programs of one item and chunk start together and
    # share its block-table lines in L1/L2.
    kv_head = pid % heads_kv
    work = pid // heads_kv
    if PLAN:
        item = tl.load(Programs + 3 * work)
        row_block = tl.load(Programs + 3 * work + 1)
        split = tl.load(Programs + 3 * work + 2)
        fields = Items + item * 9  # splitkv/paged.py ITEM_FIELDS: the item table's layout
        row = tl.load(fields + 0)
        key_hi = tl.load(fields + 4)
        k_total = tl.load(SequsedK + row)
        dynamic = key_hi < 0  # DYNAMIC_KEY_HI: the sequence's own keys, up to seqused_k
        key_hi = tl.where(dynamic, k_total, key_hi)
        # Shared runs are seen whole by their queries: only a sequence's own keys are causal.
        if CAUSAL:
            causal = dynamic
        else:
            causal = dynamic & False
        # One launch runs the shared runs' wide row tiles (many queries per KV tile) and
        # the sequences' own narrow ones, so both fill the GPU together. Two calls that
        # differ only in the row tile: BLOCK_M is a constexpr, fixed per call site.
        if tl.load(fields + 8) != 0:
            _attend_item(
                Q, K, V, Out, Lse, BlockTable, ItemTokens, row, tl.load(fields + 1), tl.load(fields + 2),
                tl.load(fields + 3), key_hi, k_total, causal, tl.load(fields + 5), split, tl.load(fields + 6),
                tl.load(fields + 7), row_block, kv_head, stride_qt, stride_qh, stride_kp, stride_ks, stride_kh,
                stride_vp, stride_vs, stride_vh, stride_os, stride_ot, stride_oh, stride_ls, stride_lh, stride_bt,
                group, num_states, qk_scale,
                True, PAGE_SIZE, SAME_KV_STRIDES, INT32_OFFSETS, HEAD_DIM, HEAD_DIM_PAD, WIDE_BLOCK_M, BLOCK_N,
                INPUT_PRECISION, UPCAST_DOT,
            )  # fmt: skip
        else:
            _attend_item(
                Q, K, V, Out, Lse, BlockTable, ItemTokens, row, tl.load(fields + 1), tl.load(fields + 2),
                tl.load(fields + 3), key_hi, k_total, causal, tl.load(fields + 5), split, tl.load(fields + 6),
                tl.load(fields + 7), row_block, kv_head, stride_qt, stride_qh, stride_kp, stride_ks, stride_kh,
                stride_vp, stride_vs, stride_vh, stride_os, stride_ot, stride_oh, stride_ls, stride_lh, stride_bt,
                group, num_states, qk_scale,
                True, PAGE_SIZE, SAME_KV_STRIDES, INT32_OFFSETS, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N,
                INPUT_PRECISION, UPCAST_DOT,
            )  # fmt: skip
    else:
        # One item per sequence: its tokens from cu_seqlens_q, its keys [0, seqused_k).
        row_block = work % num_row_blocks
        row = (work // num_row_blocks) % batch
        split = work // (num_row_blocks * batch)
        tok_off = tl.load(CuSeqlensQ + row)
        k_total = tl.load(SequsedK + row)
        _attend_item(
            Q, K, V, Out, Lse, BlockTable, ItemTokens, row, tok_off, tl.load(CuSeqlensQ + row + 1) - tok_off,
            0, k_total, k_total, CAUSAL, 0, split, num_splits, num_states, row_block, kv_head,
            stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
            stride_os, stride_ot, stride_oh, stride_ls, stride_lh, stride_bt, group, num_states, qk_scale,
            False, PAGE_SIZE, SAME_KV_STRIDES, INT32_OFFSETS, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N,
            INPUT_PRECISION, UPCAST_DOT,
        )  # fmt: skip


_launch_paged_kernel = CompiledLauncher(_paged_fwd_kernel)


# Row offsets (page * stride(0) + slot * stride(1), in elements) at or past this take 64 bits.
INT32_OFFSET_LIMIT = 2**31


def row_offsets_fit_int32(num_pages: int, page_size: int, strides: tuple[int, ...]) -> bool:
    """Whether every page's row offsets in a cache ``[num_pages, page_size, heads_kv,
    head_dim]`` of these ``strides`` fit in int32 (the kernel adds the head and the
    dimension to the pointer apart). Page ids past the cache are not in the bound: the
    opt-in value check of the block table is what keeps them out. Plain ints: it runs on
    every launch, which has read the strides already."""
    return (num_pages - 1) * strides[0] + (page_size - 1) * strides[1] < INT32_OFFSET_LIMIT


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def launch_config(head_dim: int, dtype: torch.dtype, rows_pow2: int) -> tuple[int, int, int, int, int]:
    """(HEAD_DIM_PAD, BLOCK_M, BLOCK_N, num_warps, num_stages) for items of about
    ``rows_pow2`` query rows per KV head. Decode has few rows (the GQA group times the
    queries per sequence): small row tiles and long key tiles keep the loads wide."""
    head_dim_pad = max(16, _next_power_of_2(head_dim))
    if _INTERPRET:
        # numpy simulates every program: small tiles, yet two row tiles so that a
        # plan's wide and narrow paths both run in the CPU tests.
        return head_dim_pad, 16 if rows_pow2 <= 16 else 32, 16, 4, 1
    block_m = min(64 if head_dim_pad > 128 else 128, max(16, rows_pow2))
    block_n = 64 if head_dim_pad <= 128 else 32
    if dtype == torch.float32:
        block_n = min(block_n, 32)
    num_warps = 8 if block_m * head_dim_pad >= 128 * 128 else 4
    num_stages = 3 if head_dim_pad <= 128 and dtype != torch.float32 else 2
    return head_dim_pad, block_m, block_n, num_warps, num_stages


def launch_paged(q, k_cache, v_cache, out, lse, block_table, seqused_k, cu_seqlens_q, causal: bool,
                 softmax_scale: float, config: tuple, grid_programs: int, num_row_blocks: int = 1,
                 num_splits: int = 1, items=None, item_tokens=None, programs=None,
                 wide_block_m: int | None = None) -> None:  # fmt: skip
    """One launch of the paged kernel on validated inputs.

    ``out [states, total_q, heads_q, head_dim]`` and ``lse [states, heads_q, total_q]``
    (float32 for split states, else out in q's dtype; contiguous last dims) receive the
    states. Plain mode (``items is None``) runs ``grid_programs = batch * heads_kv *
    num_row_blocks * num_splits`` programs; plan mode ``len(programs) * heads_kv``.
    ``config`` is :func:`launch_config`'s tuple; a plan's items flagged wide take row
    tiles of ``wide_block_m`` rows (default: the config's).
    """
    if grid_programs == 0 or q.shape[0] == 0:
        return
    head_dim_pad, block_m, block_n, num_warps, num_stages = config
    heads_kv = k_cache.shape[2]
    plan = items is not None
    # Placeholders the kernel never reads in the other mode.
    items = items if plan else block_table
    item_tokens = item_tokens if plan else block_table
    programs = programs if plan else block_table
    qs, ks, vs, os_, ls = q.stride(), k_cache.stride(), v_cache.stride(), out.stride(), lse.stride()
    args = (
        q, k_cache, v_cache, out, lse, block_table, seqused_k, cu_seqlens_q, items, item_tokens, programs,
        qs[0], qs[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], os_[0], os_[1], os_[2], ls[0], ls[1],
        block_table.stride(0), heads_kv, q.shape[1] // heads_kv, block_table.shape[0],
        num_row_blocks, num_splits, out.shape[0], softmax_scale * _LOG2E,
    )  # fmt: skip
    # K and V at the same page and slot strides (two views of one buffer) share each key's row offset.
    same_kv_strides = ks[:2] == vs[:2]
    num_pages, page_size = k_cache.shape[:2]  # v_cache's too (checked)
    int32_offsets = row_offsets_fit_int32(num_pages, page_size, ks) and row_offsets_fit_int32(num_pages, page_size, vs)
    constexprs = (
        causal, plan, page_size, same_kv_strides, int32_offsets, q.shape[2], head_dim_pad, block_m,
        wide_block_m or block_m, block_n,
        # fp32 callers want fp32 accuracy, which TF32 does not give.
        "ieee" if q.dtype == torch.float32 else "tf32",
        _INTERPRET and q.dtype == torch.bfloat16,
    )  # fmt: skip
    _launch_paged_kernel((grid_programs,), args, constexprs, num_warps, num_stages, q.device.index)
