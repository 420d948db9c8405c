"""Paged attention with LSE and the cascade over pages shared by id (splitkv.paged).

Every result is compared with a float64 attention written here: each sequence's pages
gathered in a Python loop, then softmax. On CPU the Triton kernel runs under the
interpreter (tests/conftest.py), so the shapes are small; the wide grid is slow-marked.
"""

import itertools
import math
import os
import random

import pytest
import torch

import splitkv
from splitkv.bench.common import capture_graph
from splitkv.paged import PAGED_BACKENDS, plan_cascade

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs and the GPU grid need a CUDA device")
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, causal, scale=None):
    """Each sequence's used keys gathered page by page, full softmax in float64."""
    total_q, heads_q, head_dim = q.shape
    page_size, heads_kv = k_cache.shape[1], k_cache.shape[2]
    group = heads_q // heads_kv
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.zeros(total_q, heads_q, head_dim, dtype=torch.float64)
    lse = torch.full((heads_q, total_q), -math.inf, dtype=torch.float64)
    bounds = cu_seqlens_q.tolist()
    for seq, used in enumerate(seqused_k.tolist()):
        q_lo, q_hi = bounds[seq], bounds[seq + 1]
        if used == 0 or q_hi == q_lo:
            continue
        keys = torch.arange(used)
        pages = block_table[seq].cpu().long()[keys // page_size]
        k = k_cache.cpu()[pages, keys % page_size].double().repeat_interleave(group, dim=1)
        v = v_cache.cpu()[pages, keys % page_size].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q_lo:q_hi].double().cpu(), k.cpu()) * scale
        if causal:
            q_len = q_hi - q_lo
            visible = torch.arange(used)[None, :] <= torch.arange(q_len)[:, None] + used - q_len
            scores = scores.masked_fill(~visible, -math.inf)
        row_lse = torch.logsumexp(scores, -1)
        probs = torch.exp(scores - row_lse.nan_to_num(neginf=0.0)[..., None]).nan_to_num()
        out[q_lo:q_hi] = torch.einsum("hqk,khd->qhd", probs, v.cpu())
        lse[:, q_lo:q_hi] = row_lse
    return out, lse


def make_batch(seq_lens, q_lens, page_size, heads_q, heads_kv, head_dim, dtype, shared=(), seed=0, spare_pages=3):
    """A paged batch: shuffled page ids, padding entries holding garbage (out of range,
    negative), K and V as views of one [num_pages, 2, page_size, heads_kv, head_dim]
    buffer. ``shared`` lists ``(members, num_pages)``: those sequences start with the
    same pages (applied in order, so later entries nest in earlier ones)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    pages_per_seq = [-(-n // page_size) for n in seq_lens]
    width = max(pages_per_seq + [1]) + spare_pages
    num_pages = sum(pages_per_seq) + 4
    ids = list(range(num_pages))
    rng.shuffle(ids)
    rows = []
    for count in pages_per_seq:
        rows.append([ids.pop() for _ in range(count)])
    for members, count in shared:
        for m in members[1:]:
            rows[m][:count] = rows[members[0]][:count]
    garbage = [num_pages + 1000, -7, 2**31 - 1]
    table = [row + [garbage[i % 3] for i in range(width - len(row))] for row in rows]
    block_table = torch.tensor(table, dtype=torch.int32, device=DEVICE)
    seqused_k = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    cu_seqlens_q = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=DEVICE)
    kv = torch.randn(num_pages, 2, page_size, heads_kv, head_dim, generator=gen).to(DEVICE, dtype)
    q = torch.randn(sum(q_lens), heads_q, head_dim, generator=gen).to(DEVICE, dtype)
    return q, kv[:, 0], kv[:, 1], block_table, seqused_k, cu_seqlens_q


def assert_close(out, lse, expected_out, expected_lse, dtype):
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), expected_out, atol=tol, rtol=tol)
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu()[~finite] == -math.inf).all()
    torch.testing.assert_close(lse.double().cpu()[finite], expected_lse[finite], atol=tol, rtol=tol)


def run_case(page_size, dtype, causal, group, head_dim, backend, num_splits=None, seed=0):
    # Sequences: empty with a query, one holding no query, ordinary ones, one at its
    # table's full width; decode and prefill-chunk query counts.
    seq_lens = [0, 2 * page_size + 3, 11, 3 * page_size, 1]
    q_lens = [1, 3, 0, 2, 1]
    batch = make_batch(seq_lens, q_lens, page_size, 2 * group, 2, head_dim, dtype, seed=seed, spare_pages=0)
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = batch
    expected = float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, causal)
    out, lse = splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q,
                                                max(q_lens), max(seq_lens), causal=causal, num_splits=num_splits,
                                                backend=backend)  # fmt: skip
    assert_close(out, lse, *expected, dtype)


QUICK_CASES = [
    # (page_size, dtype, causal, group, head_dim, num_splits)
    (1, torch.float32, True, 4, 64, 1),
    (16, torch.float16, False, 1, 64, 3),
    (5, torch.bfloat16, True, 4, 24, 2),
    (16, torch.float32, True, 1, 24, None),
]


@pytest.mark.parametrize(("page_size", "dtype", "causal", "group", "head_dim", "num_splits"), QUICK_CASES)
def test_triton_matches_float64(page_size, dtype, causal, group, head_dim, num_splits):
    run_case(page_size, dtype, causal, group, head_dim, "triton", num_splits)


@pytest.mark.parametrize("int32_offsets", [True, False])
def test_triton_kv_layouts_and_offset_widths(monkeypatch, int32_offsets):
    """K and V at other strides than each other (their row offsets computed apart), and
    both offset widths (64 bits forced by the limit), against float64."""
    from splitkv import _paged_triton

    if not int32_offsets:
        monkeypatch.setattr(_paged_triton, "INT32_OFFSET_LIMIT", 0)
    seq_lens, q_lens, page_size = [0, 2 * 5 + 3, 11, 3 * 5], [1, 3, 2, 1], 5
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch(seq_lens, q_lens, page_size, 4, 2, 24,
                                                                           torch.float32, spare_pages=0)  # fmt: skip
    # V in its own buffer, one spare head per slot: other page and slot strides than K's.
    v_apart = torch.full((v_cache.shape[0], page_size, 3, 24), math.nan, device=DEVICE)[:, :, :2]
    v_apart.copy_(v_cache)
    for v in (v_cache, v_apart):
        expected = float64_paged_attention(q, k_cache, v, block_table, seqused_k, cu_seqlens_q, True)
        out, lse = splitkv.paged_attention_with_lse(q, k_cache, v, block_table, seqused_k, cu_seqlens_q, max(q_lens),
                                                    max(seq_lens), causal=True, backend="triton")  # fmt: skip
        assert_close(out, lse, *expected, torch.float32)


def test_row_offsets_fit_int32_at_the_limit():
    from splitkv._paged_triton import row_offsets_fit_int32

    def cache_fits(cache):
        return row_offsets_fit_int32(*cache.shape[:2], cache.stride())

    # [num_pages, page_size, heads_kv, head_dim] on the meta device: shapes and strides only.
    per_page = 16 * 8 * 128
    # The most pages for which the last page's last slot lies below 2**31 elements.
    largest = (2**31 - 1 - 15 * 8 * 128) // per_page + 1
    assert cache_fits(torch.empty(largest, 16, 8, 128, device="meta"))
    assert not cache_fits(torch.empty(largest + 1, 16, 8, 128, device="meta"))
    # Two views of one [num_pages, 2, ...] buffer: a page's stride is twice its size (V's
    # first page's offset is in its data pointer, not in the row offsets).
    assert cache_fits(torch.empty(largest // 2, 2, 16, 8, 128, device="meta")[:, 1])
    assert not cache_fits(torch.empty(largest // 2 + 1, 2, 16, 8, 128, device="meta")[:, 1])


@pytest.mark.parametrize(("page_size", "causal"), [(1, True), (5, False)])
def test_reference_matches_float64(page_size, causal):
    run_case(page_size, torch.float32, causal, 4, 24, "reference")


@pytest.mark.slow
@pytest.mark.parametrize("page_size", [1, 16, 5, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("head_dim", [64, 24])
def test_triton_grid(page_size, dtype, causal, group, head_dim):
    run_case(page_size, dtype, causal, group, head_dim, "triton", num_splits=2)


def test_no_query_and_no_key():
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch([0, 0], [1, 2], 4, 4, 2, 64, torch.float32)
    out, lse = splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 2, 0,
                                                backend="triton")  # fmt: skip
    assert (out == 0).all() and (lse == -math.inf).all()
    empty_q = q[:0]
    cu_empty = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out, lse = splitkv.paged_attention_with_lse(empty_q, k_cache, v_cache, block_table, seqused_k, cu_empty, 0, 0)
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0)


def test_reference_is_differentiable():
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch([9, 4], [2, 1], 4, 4, 2, 16, torch.float32)
    q.requires_grad_(True)
    out, _ = splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 2, 9,
                                              causal=True)  # fmt: skip
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gradient"):
        splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 2, 9,
                                         backend="triton")  # fmt: skip


def test_bad_inputs_name_the_argument():
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch([9, 4], [1, 1], 4, 4, 2, 16, torch.float32)
    args = (q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 1, 9)
    bad_table = block_table.clone()
    bad_table[0, 1] = k_cache.shape[0]
    # Values are checked on the CPU always, on a GPU with check_values=True (a sync).
    with pytest.raises(ValueError, match="block_table"):
        splitkv.paged_attention_with_lse(q, k_cache, v_cache, bad_table, seqused_k, cu_seqlens_q, 1, 9,
                                         check_values=True)  # fmt: skip
    too_long = torch.tensor([9, block_table.shape[1] * 4 + 1], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="seqused_k"):
        splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, too_long, cu_seqlens_q, 1, 99,
                                         check_values=True)  # fmt: skip
    with pytest.raises(ValueError, match="max_seqlen_k"):
        splitkv.paged_attention_with_lse(*args[:7], 5, check_values=True)
    with pytest.raises(ValueError, match="seqused_k must have a contiguous"):  # the right values at stride 2
        splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k.repeat_interleave(2)[::2],
                                         *args[5:])  # fmt: skip
    with pytest.raises(ValueError, match="v_cache"):
        splitkv.paged_attention_with_lse(q, k_cache, v_cache[:, :2], *args[3:])
    with pytest.raises(TypeError, match="block_table"):
        splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table.long(), *args[4:])
    with pytest.raises(ValueError, match="k_cache"):
        splitkv.paged_attention_with_lse(q, k_cache[..., :8], v_cache[..., :8], *args[3:])
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=4, heads_q=4, heads_kv=2, head_dim=16,
                        dtype=torch.float32)  # fmt: skip
    other = torch.zeros(k_cache.shape[0], 2, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="page_size"):
        splitkv.paged_cascade_attention(q, other, other, plan)
    with pytest.raises(ValueError, match="page_size"):
        plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=0, heads_q=4, heads_kv=2, head_dim=16,
                     dtype=torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="block_table"):
        plan_cascade(bad_table, seqused_k, cu_seqlens_q, page_size=4, heads_q=4, heads_kv=2, head_dim=16,
                     dtype=torch.float32, num_pages=k_cache.shape[0])  # fmt: skip


def test_plan_arguments_are_checked():
    """plan_cascade refuses what it would otherwise truncate or carry to the call."""
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch([9, 4], [1, 1], 4, 4, 2, 16, torch.float32)
    kw = {"page_size": 4, "heads_q": 4, "heads_kv": 2, "head_dim": 16, "dtype": torch.float32}
    for name, value, message in (("dtype", torch.int32, "dtype must be q's"), ("dtype", "float16", "dtype must be q's"),
                                 ("max_seqlen_k", 16.5, "max_seqlen_k must be an int"),
                                 ("num_pages", 5.5, "num_pages must be an int")):  # fmt: skip
        with pytest.raises(TypeError, match=message):
            plan_cascade(block_table, seqused_k, cu_seqlens_q, **{**kw, name: value})
    with pytest.raises(ValueError, match="levels\\[0\\] must be"):  # 0.9 would have become sequence 0
        plan_cascade(block_table, seqused_k, cu_seqlens_q, **kw, levels=[((0.9, 1), 0, 1)])
    shared = make_batch([9, 4], [1, 1], 4, 4, 2, 16, torch.float32, shared=[((0, 1), 1)])
    members = (m for m in (0, 1))  # an iterator of members is read once
    plan = plan_cascade(shared[3], shared[4], shared[5], **kw, levels=[(members, 0, 1)])
    assert [(run.members, run.first_page, run.end_page) for run in plan.runs] == [((0, 1), 0, 1)]
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        splitkv.paged_cascade_attention(q, k_cache, v_cache, plan, return_lse="no")


@pytest.mark.parametrize("compiled", [False, True])
def test_a_plan_whose_tree_changed_is_refused(compiled):
    """Where the tables are on the CPU, a call checks that the plan's shared runs still
    hold: seqused_k may grow, but a sequence shrinking into its shared pages or a shared
    page rewritten in one sharer needs a new plan (the Triton launch read the old tree:
    0.45 and 0.33 off). Compiled too: the trace cannot read the values, an op checks
    them when the call runs (the compiled call had been 1.06 off)."""
    block_table = torch.tensor([[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 6, 7]], dtype=torch.int32)
    seqused_k, cu_seqlens_q = torch.tensor([9, 10, 9], dtype=torch.int32), torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    kv = torch.randn(8, 2, 4, 1, 16)
    q = torch.randn(3, 2, 16)
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=4, heads_q=2, heads_kv=1, head_dim=16,
                        dtype=torch.float32, share="always", max_seqlen_k=16)  # fmt: skip
    assert plan.shared
    call = splitkv.paged_cascade_attention
    if compiled:
        torch._dynamo.reset()
        call = torch.compile(call, backend="aot_eager", fullgraph=True)
    seqused_k.copy_(torch.tensor([14, 13, 16], dtype=torch.int32))  # grown: allowed
    out, lse = call(q, kv[:, 0], kv[:, 1], plan)
    expected = float64_paged_attention(q, kv[:, 0], kv[:, 1], block_table, seqused_k, cu_seqlens_q, True)
    assert_close(out, lse, *expected, torch.float32)
    seqused_k[0] = 5  # into its shared pages [0, 2)
    with pytest.raises(ValueError, match="needs a new plan"):
        call(q, kv[:, 0], kv[:, 1], plan)
    seqused_k[0] = 14
    block_table[2, 1] = 7
    with pytest.raises(ValueError, match="needs a new plan"):
        call(q, kv[:, 0], kv[:, 1], plan)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("capacity", [{}, {"max_programs": 8, "max_states": 2}])
def test_a_plan_whose_query_counts_changed_is_refused(compiled, capacity):
    """The launch tables place tokens by the planned cu_seqlens_q: new query counts of the
    same total and longest (1, 1, 2 -> 1, 2, 1) need a new plan; the Triton launch had
    read them as the old ones (1.5 off), also for a capacity plan that keeps no run."""
    block_table = torch.tensor([[0, 1, 2, 3], [0, 1, 4, 5], [6, 7, 8, 9]], dtype=torch.int32)
    seqused_k = torch.tensor([14, 13, 10], dtype=torch.int32)
    cu_seqlens_q = torch.tensor([0, 1, 2, 4], dtype=torch.int32)
    kv, q = torch.randn(10, 2, 4, 1, 16), torch.randn(4, 2, 16)
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=4, heads_q=2, heads_kv=1, head_dim=16,
                        dtype=torch.float32, share="always", **capacity)  # fmt: skip
    call = splitkv.paged_cascade_attention
    if compiled:
        torch._dynamo.reset()
        call = torch.compile(call, backend="aot_eager", fullgraph=True)
    out, lse = call(q, kv[:, 0], kv[:, 1], plan)
    assert_close(out, lse, *float64_paged_attention(q, kv[:, 0], kv[:, 1], block_table, seqused_k, cu_seqlens_q,
                                                    True), torch.float32)  # fmt: skip
    cu_seqlens_q.copy_(torch.tensor([0, 1, 3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="other query counts need a new plan"):
        call(q, kv[:, 0], kv[:, 1], plan)


def test_plan_host_time_is_its_own():
    """host_us is the plan's own host time, also when it finds a shared run (a run's
    offset once overwrote the timer's start)."""
    import time

    block_table = torch.tensor([[0, 1, 2], [0, 1, 3]], dtype=torch.int32)
    seqused_k, cu_seqlens_q = torch.tensor([40, 44], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32)
    start = time.perf_counter()
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=16, heads_q=4, heads_kv=1, head_dim=64,
                        dtype=torch.float32, share="always")  # fmt: skip
    wall_us = (time.perf_counter() - start) * 1e6
    assert plan.runs and 0 < plan.host_us <= wall_us


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_cache_without_pages(backend):
    """A cache of no pages, every seqused_k 0 (the table holds padding only): no key
    anywhere, out 0 and lse -inf (the reference gathered page 0 of an empty cache)."""
    k_cache = v_cache = torch.zeros(0, 4, 1, 16)
    block_table = torch.tensor([[7], [9]], dtype=torch.int32)
    q = torch.randn(2, 2, 16)
    cu_seqlens_q, seqused_k = torch.tensor([0, 1, 2], dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    out, lse = splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 1, 5,
                                                causal=True, backend=backend)  # fmt: skip
    assert (out == 0).all() and (lse == float("-inf")).all()


def test_torch_flash_backend_contract():
    """torch's flash attention takes block_table only in a torch whose varlen_attn has
    it (2.13 here, not 2.11 on the device); on CPU flash cannot run at all, so this
    backend is tested only through its refusal and auto's choice."""
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch([9], [1], 4, 4, 2, 16, torch.float32)
    reason = PAGED_BACKENDS.backends[0].why_not(q, k_cache, v_cache, True, 1, 1)
    assert reason is not None and ("block_table" in reason or "CUDA" in reason or "page_size" in reason)
    report = splitkv.explain_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 1, 9)
    assert report.splitlines()[0].endswith("-> triton" if CUDA else "-> reference")
    assert "torch: " in report and reason in report
    # A page size flash attention takes (a multiple of 256) goes through the flash checks
    # themselves in a torch whose varlen_attn has block_table: explained and run by name.
    batch = make_batch([300, 40], [1, 1], 256, 4, 2, 16, torch.bfloat16)
    report = splitkv.explain_paged_attention(*batch, 1, 300, causal=True)
    assert "torch: " in report, report
    out, lse = splitkv.paged_attention_with_lse(*batch, 1, 300, causal=True)
    assert_close(out, lse, *float64_paged_attention(*batch, True), torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="auto takes the reference on CPU tensors either way")
def test_auto_keeps_away_from_triton_when_only_v_cache_needs_grad():
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch([9, 4], [2, 1], 4, 4, 2, 16, torch.float32)
    v_cache = v_cache.clone().requires_grad_(True)
    out, _ = splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 2, 9)
    out.sum().backward()
    assert v_cache.grad is not None and v_cache.grad.abs().sum() > 0


def test_custom_op_compiles_fullgraph():
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch([13, 6], [2, 1], 4, 8, 2, 16, torch.float32)

    def step(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q):
        out, lse = splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 2, 13,
                                                    causal=True, num_splits=2, backend="triton")  # fmt: skip
        return out * 2, lse

    args = (q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q)
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    out, lse = compiled(*args)
    expected_out, expected_lse = step(*args)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, expected_lse)


@pytest.mark.parametrize("backend", [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                    reason="Triton on CPU tensors runs in the interpreter only")),
])  # fmt: skip
def test_compiled_calls_check_values_on_the_cpu(backend):
    """A compiled call on CPU tensors refuses what eager refuses (a page id past
    k_cache, a seqused_k past a row's pages, a max_seqlen_k below it): the trace cannot
    read values, an op checks them when the call runs. Before, the compiled call read
    past k_cache (garbage, NaN; an illegal access on a GPU)."""
    k_cache, v_cache = torch.randn(2, 6, 4, 2, 16).unbind(0)
    q, cu_seqlens_q = torch.randn(3, 4, 16), torch.tensor([0, 1, 3], dtype=torch.int32)
    good_table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    good_used = torch.tensor([7, 9], dtype=torch.int32)

    def step(q, block_table, seqused_k, max_seqlen_k):
        return splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 2,
                                                max_seqlen_k, causal=True, backend=backend)  # fmt: skip

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out, lse = compiled(q, good_table, good_used, 9)
    expected = float64_paged_attention(q, k_cache, v_cache, good_table, good_used, cu_seqlens_q, True)
    assert_close(out, lse, *expected, torch.float32)
    bad_table = good_table.clone()
    bad_table[1, 2] = 99
    for args, match in [((bad_table, good_used, 9), r"block_table\[1, 2\] = 99 is not a page"),
                        ((good_table, torch.tensor([7, 20], dtype=torch.int32), 20), "seqused_k must lie in"),
                        ((good_table, good_used, 5), "max_seqlen_k = 5 is below")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            step(q, *args)
        with pytest.raises(ValueError, match=match):
            compiled(q, *args)


def test_reference_backend_compiles_fullgraph_with_gradients():
    """The reference backend (auto's choice on CPU and under a gradient) traces under
    fullgraph, with eager's values and gradients (it read sequence bounds on the host,
    which broke the graph); split_kv_attention's paged form too."""
    k_cache, v_cache = torch.randn(2, 6, 4, 2, 16).unbind(0)
    k_cache.requires_grad_(True)
    q = torch.randn(3, 4, 16, requires_grad=True)
    block_table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    seqused_k, cu_seqlens_q = torch.tensor([7, 9], dtype=torch.int32), torch.tensor([0, 1, 3], dtype=torch.int32)
    weights = torch.randn(3, 4, 16)

    def loss(q, k_cache):
        out, lse = splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 2, 9,
                                                    causal=True)  # fmt: skip
        return (out * weights).sum() + lse.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    expected, got = loss(q, k_cache), compiled(q, k_cache)
    torch.testing.assert_close(got, expected)
    for g, e in zip(torch.autograd.grad(got, (q, k_cache)), torch.autograd.grad(expected, (q, k_cache))):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)

    def split(q):
        return splitkv.split_kv_attention(q, k_cache.detach(), v_cache, cu_seqlens_q, None, 2, 9, causal=True,
                                          block_table=block_table, seqused_k=seqused_k)[0]  # fmt: skip

    torch.testing.assert_close(torch.compile(split, backend="aot_eager", fullgraph=True)(q.detach()), split(q.detach()))


def test_opcheck():
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch([7, 3], [1, 1], 4, 4, 2, 16, torch.float32)
    op = torch.ops.splitkv_paged.paged_attention_with_lse.default
    args = (q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 1, 7, True, 0.25, 1)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_split_kv_attention_paged_form():
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch([37, 20], [1, 2], 8, 8, 2, 32,
                                                                           torch.float32)  # fmt: skip
    expected = float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, True)
    out, lse = splitkv.split_kv_attention(q, k_cache, v_cache, cu_seqlens_q, None, 2, 37, causal=True, num_splits=3,
                                          block_table=block_table, seqused_k=seqused_k)  # fmt: skip
    assert_close(out, lse, *expected, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        splitkv.split_kv_attention(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_q, 2, 37, block_table=block_table,
                                   seqused_k=seqused_k)  # fmt: skip
    # Differentiable, as split_kv_attention is documented: under grad the paged form takes
    # a backend with a backward instead of refusing in the Triton kernel's name.
    q.requires_grad_(True)
    out, _ = splitkv.split_kv_attention(q, k_cache, v_cache, cu_seqlens_q, None, 2, 37, causal=True, num_splits=3,
                                        block_table=block_table, seqused_k=seqused_k)  # fmt: skip
    (grad,) = torch.autograd.grad(out.sum(), q)
    q64 = q.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(float64_paged_attention(q64, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q,
                                                          True)[0].sum(), q64)  # fmt: skip
    torch.testing.assert_close(grad.double().cpu(), want.cpu(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------
# The cascade over shared pages
# ---------------------------------------------------------------------------------

PS = 4  # page size of the cascade cases: runs of a few pages stay cheap in the interpreter

TREES = {
    # name: (seq_lens, q_lens, shared (members, pages), expected runs (members, first, end))
    "one prefix for all": ([17, 21, 14, 18], [1, 1, 1, 1], [((0, 1, 2, 3), 3)], [((0, 1, 2, 3), 0, 3)]),
    "two groups": (
        [17, 21, 14, 18, 13, 22], [1, 1, 1, 1, 1, 1], [((0, 2, 4), 3), ((1, 3, 5), 2)],
        [((0, 2, 4), 0, 3), ((1, 3, 5), 0, 2)],
    ),
    "three levels": (
        [26, 30, 25, 29, 33], [1, 1, 1, 1, 1], [((0, 1, 2, 3), 2), ((0, 1), 5), ((2, 3), 4)],
        [((0, 1, 2, 3), 0, 2), ((0, 1), 2, 5), ((2, 3), 2, 4)],
    ),
    # Sequence 1 shares nothing; sequence 3's last shared page is not full (10 keys:
    # pages 0-1 full, page 2 holds 2 of 4): the run must stop at page 2.
    "mid-page and a loner": ([17, 15, 20, 10], [1, 1, 1, 1], [((0, 2, 3), 3)], [((0, 2, 3), 0, 2), ((0, 2), 2, 3)]),
    # 6 x 4 query rows share the run: more than one narrow row tile, so the run takes
    # the wide tile (32 rows under the interpreter) while the own pages take the narrow.
    "a run of wide tiles": ([17, 21, 14, 18, 13, 22], [1] * 6, [((0, 1, 2, 3, 4, 5), 3)],
                            [((0, 1, 2, 3, 4, 5), 0, 3)]),
    # A prefill chunk of 6 queries inside the shared pages: query 0 of sequence 1 sees
    # keys < 20 - 6 + 1 = 15, so only pages 0-2 are shared with it.
    "queries overlap the run": ([22, 20, 21], [1, 6, 2], [((0, 1, 2), 5)], [((0, 1, 2), 0, 3), ((0, 2), 3, 5)]),
}


@pytest.mark.parametrize("name", list(TREES))
def test_plan_finds_the_tree_and_matches_float64(name):
    seq_lens, q_lens, shared, expected_runs = TREES[name]
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch(seq_lens, q_lens, PS, 8, 2, 32,
                                                                           torch.float32, shared)  # fmt: skip
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=PS, heads_q=8, heads_kv=2, head_dim=32,
                        dtype=torch.float32, share="always", num_splits=2)  # fmt: skip
    assert sorted((r.members, r.first_page, r.end_page) for r in plan.runs) == sorted(expected_runs)
    assert plan.shared and plan.kv_bytes_plan < plan.kv_bytes_plain
    wide = plan.launch_tables[0].reshape(-1, 9)[:, 8].tolist()
    if CUDA:
        # The GPU's row tiles come from launch_config's device sizes (a narrow tile of
        # 16 rows), so other trees may take wide tiles too (on the H200 the 24-row item
        # of "queries overlap the run" did); the interpreter's fixed tiles pin the rest.
        assert any(wide) or name != "a run of wide tiles"
    else:
        assert any(wide) == (name == "a run of wide tiles")
    expected = float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, True)
    out = torch.full_like(q, math.nan)
    out, lse = splitkv.paged_cascade_attention(q, k_cache, v_cache, plan, backend="triton")
    assert_close(out, lse, *expected, torch.float32)


def test_plan_ignores_batch_order():
    seq_lens, q_lens, shared, expected_runs = TREES["three levels"]
    batch = make_batch(seq_lens, q_lens, PS, 8, 2, 32, torch.float32, shared)
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = batch
    order = [3, 0, 4, 2, 1]
    permuted = plan_cascade(block_table[order], seqused_k[order], cu_seqlens_q[:len(order) + 1], page_size=PS,
                            heads_q=8, heads_kv=2, head_dim=32, dtype=torch.float32, share="always")  # fmt: skip
    renamed = sorted((tuple(sorted(order[m] for m in r.members)), r.first_page, r.end_page) for r in permuted.runs)
    assert renamed == sorted(expected_runs)
    q_perm = torch.cat([q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]] for i in order])
    out, lse = splitkv.paged_cascade_attention(q_perm, k_cache, v_cache, permuted, backend="triton")
    expected = float64_paged_attention(q_perm, k_cache, v_cache, block_table[order], seqused_k[order],
                                       cu_seqlens_q[:len(order) + 1], True)  # fmt: skip
    assert_close(out, lse, *expected, torch.float32)


def test_split_counts_and_negative_page_ids_are_checked():
    """num_splits is checked by name and capped at the keys (no state per missing key);
    a negative page id among a sequence's pages is refused when planning, on any device."""
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch([9, 4], [1, 1], 4, 4, 2, 16, torch.float32)
    kwargs = dict(page_size=4, heads_q=4, heads_kv=2, head_dim=16, dtype=torch.float32)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_splits must be an int >= 1"):
            plan_cascade(block_table, seqused_k, cu_seqlens_q, num_splits=bad, **kwargs)
        with pytest.raises(ValueError, match="num_splits must be an int >= 1"):
            splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 1, 9,
                                             num_splits=bad)  # fmt: skip
    out, lse = splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 1, 9,
                                                num_splits=10**6, backend="triton")  # fmt: skip
    assert_close(out, lse, *float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, False),
                 torch.float32)  # fmt: skip
    assert plan_cascade(block_table, seqused_k, cu_seqlens_q, num_splits=10**6, **kwargs).last_splits == 9
    negative = block_table.clone()
    negative[1, 0] = -1  # sequence 1's first page, holding its keys
    with pytest.raises(ValueError, match="block_table holds page id -1"):
        plan_cascade(negative, seqused_k, cu_seqlens_q, **kwargs)


def test_explicit_levels_and_their_checks():
    seq_lens, q_lens, shared, _ = TREES["three levels"]
    batch = make_batch(seq_lens, q_lens, PS, 8, 2, 32, torch.bfloat16, shared)
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = batch
    kwargs = dict(page_size=PS, heads_q=8, heads_kv=2, head_dim=32, dtype=torch.bfloat16)
    # A coarser tree than the one found: the whole batch's 2 pages, then (0, 1)'s next 3.
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, levels=[((0, 1, 2, 3), 0, 2), ((1, 0), 2, 5)], **kwargs)
    assert plan.own_start_page == [5, 5, 2, 2, 0]
    out, lse = splitkv.paged_cascade_attention(q, k_cache, v_cache, plan, backend="triton")
    assert_close(out, lse, *float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, True),
                 torch.bfloat16)  # fmt: skip
    for levels, message in [
        ([((0, 1, 2, 3, 4), 0, 2)], "share page ids"),
        ([((0, 1), 2, 5)], "follow one another"),
        ([((0, 1), 0, 9)], "not all full"),
        ([((0, 9), 0, 1)], "members"),
    ]:
        with pytest.raises(ValueError, match=message):
            plan_cascade(block_table, seqused_k, cu_seqlens_q, levels=levels, **kwargs)


def test_explicit_triton_refuses_a_gradient_it_cannot_give():
    """The Triton cascade is a custom op without a backward: asked for by name under
    grad it must refuse, not return a silently detached result; auto takes the
    differentiable reference."""
    seq_lens, q_lens, shared, _ = TREES["one prefix for all"]
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch(seq_lens, q_lens, PS, 8, 2, 32,
                                                                           torch.float32, shared)  # fmt: skip
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=PS, heads_q=8, heads_kv=2, head_dim=32,
                        dtype=torch.float32, share="always")  # fmt: skip
    assert plan.shared
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="paged_cascade_attention: backend='triton' has no backward"):
        splitkv.paged_cascade_attention(q, k_cache, v_cache, plan, backend="triton")
    out, _ = splitkv.paged_cascade_attention(q, k_cache, v_cache, plan)
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_cost_model_keeps_long_prefixes_and_falls_back_on_short_ones():
    page_size, prompt_pages, samples = 16, 512, 64
    prompt = torch.arange(prompt_pages, dtype=torch.int32)
    own = torch.arange(samples * 32, dtype=torch.int32).reshape(samples, 32) + prompt_pages
    block_table = torch.cat([prompt.expand(samples, -1), own], dim=1)
    seqused_k = torch.full((samples,), prompt_pages * page_size + 300, dtype=torch.int32)
    cu_seqlens_q = torch.arange(samples + 1, dtype=torch.int32)
    kwargs = dict(page_size=page_size, heads_q=32, heads_kv=8, head_dim=128, dtype=torch.bfloat16)
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, **kwargs)
    assert [r.kept for r in plan.runs] == [True] and plan.shared
    # 64 x (8192 + 300) keys against 8192 + 64 x 300: 19.8x fewer bytes.
    assert 19 < plan.kv_bytes_plain / plan.kv_bytes_plan < 20
    # Two sequences sharing one page: not worth a level; the plan is plain paged attention.
    short = plan_cascade(block_table[:2, prompt_pages - 1:], torch.tensor([20, 20], dtype=torch.int32),
                         cu_seqlens_q[:3], **kwargs)  # fmt: skip
    assert not short.shared and short.num_states == short.last_splits
    assert "not shared" in short.describe()


def test_fallback_plan_equals_plain():
    seq_lens, q_lens, shared, _ = TREES["one prefix for all"]
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch(seq_lens, q_lens, PS, 8, 2, 32,
                                                                           torch.float16, shared)  # fmt: skip
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=PS, heads_q=8, heads_kv=2, head_dim=32,
                        dtype=torch.float16)  # fmt: skip
    assert not plan.shared
    out, lse = splitkv.paged_cascade_attention(q, k_cache, v_cache, plan, backend="triton")
    plain = splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 1, 21,
                                             causal=True, backend="triton")  # fmt: skip
    assert torch.equal(out, plain[0]) and torch.equal(lse, plain[1])


def test_bench_plan_stages_compose_the_cascade():
    """The paged benchmark times a plan's launches and merge one by one: in order they
    give paged_cascade_attention's result."""
    from splitkv.bench.paged import plan_stages

    seq_lens, q_lens, shared, _ = TREES["three levels"]
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch(seq_lens, q_lens, PS, 8, 2, 32,
                                                                           torch.float32, shared)  # fmt: skip
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=PS, heads_q=8, heads_kv=2, head_dim=32,
                        dtype=torch.float32, share="always")  # fmt: skip
    stages = plan_stages(q, k_cache, v_cache, plan)
    assert stages[-1][0] == f"merge of {plan.num_states} states"
    for _name, fn in stages[:-1]:
        fn()
    out, lse = stages[-1][1]()
    expected = splitkv.paged_cascade_attention(q, k_cache, v_cache, plan, backend="triton")
    torch.testing.assert_close(out, expected[0])
    torch.testing.assert_close(lse, expected[1])


def test_bench_plan_host_times_run_without_a_gpu():
    """``python -m splitkv.bench paged --plan-host`` plans every benchmark case on CPU tables."""
    from splitkv.bench.paged import plan_host_times

    rows = plan_host_times(calls=1)
    assert [(r["page_size"], r["runs"], r["kept_runs"]) for r in rows] == [
        (page_size, runs, runs) for page_size in (16, 128) for runs in (1, 8, 9, 0)]
    assert all(r["plan_host_us"] > 0 for r in rows)


def test_plan_with_capacity_takes_another_tree_in_place():
    """A plan built with spare capacity runs one fixed-size launch; a different tree of
    the same batch written into it (into=) reuses its tensors and gives that tree's result."""
    seq_lens, q_lens, shared, _ = TREES["three levels"]
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch(seq_lens, q_lens, PS, 8, 2, 32,
                                                                           torch.float32, shared)  # fmt: skip
    kwargs = dict(page_size=PS, heads_q=8, heads_kv=2, head_dim=32, dtype=torch.float32)
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, share="always", max_programs=40, max_states=6, **kwargs)
    assert plan.num_states == 6 and plan.launch_configs[-1] == 40 * 2
    tensors = [t.data_ptr() for t in plan.launch_tables]
    expected = float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, True)
    assert_close(*splitkv.paged_cascade_attention(q, k_cache, v_cache, plan, backend="triton"), *expected,
                 torch.float32)  # fmt: skip
    # Another tree: sequence 1 gets pages of its own where it shared pages 2-4 with sequence 0.
    in_use = {int(p) for row, used in zip(block_table, seqused_k.tolist()) for p in row[: -(-used // PS)]}
    block_table[1, 2:5] = torch.tensor([p for p in range(k_cache.shape[0]) if p not in in_use][:3])
    again = plan_cascade(block_table, seqused_k, cu_seqlens_q, share="always", into=plan, **kwargs)
    assert again is plan and [t.data_ptr() for t in plan.launch_tables] == tensors
    runs = [(r.members, r.first_page, r.end_page) for r in plan.runs]
    assert ((0, 1, 2, 3), 0, 2) in runs and ((0, 1), 2, 5) not in runs
    expected = float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, True)
    assert_close(*splitkv.paged_cascade_attention(q, k_cache, v_cache, plan, backend="triton"), *expected,
                 torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="max_programs"):
        plan_cascade(block_table, seqused_k, cu_seqlens_q, share="always", max_programs=2, max_states=6, **kwargs)
    with pytest.raises(ValueError, match="into"):
        plan_cascade(block_table.clone(), seqused_k, cu_seqlens_q, into=plan, **kwargs)


def random_tree_batch(seed: int, page_size: int):
    """A random tree of shared page runs: up to 3 levels, 1-24 sequences in shuffled
    order, used lengths ending mid-page, queries 0..many (prefill chunks that overlap
    runs), padding holding garbage. Returns block_table, seqused_k, cu_seqlens_q and
    the page count."""
    rng = random.Random(seed)
    next_page, nodes = 0, {}
    rows, used, q_lens = [], [], []
    for _ in range(rng.randint(1, 24)):
        row, path = [], ()
        for _level in range(rng.randint(0, 3)):
            path += (rng.randint(0, 2),)
            if path not in nodes:
                count = rng.randint(1, 6)
                nodes[path] = list(range(next_page, next_page + count))
                next_page += count
            row += nodes[path]
        row += list(range(next_page, next_page + rng.randint(1, 6)))
        next_page = max(row) + 1
        keys = min(len(row) * page_size, max(0, (len(row) - 1) * page_size + rng.randint(-page_size, page_size)))
        rows.append(row)
        used.append(keys)
        q_lens.append(min(keys, rng.choice([0, 1, 1, 1, 2, 3, 7, keys // 2 + 1])) if keys else rng.choice([0, 1]))
    order = list(range(len(rows)))
    rng.shuffle(order)
    rename = list(range(next_page))
    rng.shuffle(rename)
    width = max(len(row) for row in rows) + rng.randint(0, 2)
    table = [[rename[p] for p in rows[i]] + [rng.choice([-7, 0, 10**6]) for _ in range(width - len(rows[i]))]
             for i in order]  # fmt: skip
    cu = [0]
    for i in order:
        cu.append(cu[-1] + q_lens[i])
    return (torch.tensor(table, dtype=torch.int32), torch.tensor([used[i] for i in order], dtype=torch.int32),
            torch.tensor(cu, dtype=torch.int32), next_page)  # fmt: skip


def python_tree(rows: list, limits: list, candidates: list) -> list:
    """The shared runs by a plain recursive search over Python lists: members holding
    the same page at a depth share it, up to the first page they differ or one's limit."""
    runs = []

    def visit(members, depth):
        groups = {}
        for i in members:
            if limits[i] > depth:
                groups.setdefault(rows[i][depth], []).append(i)
        for group in groups.values():
            if len(group) < 2:
                continue
            end, limit = depth, min(limits[i] for i in group)
            while end < limit and all(rows[i][end] == rows[group[0]][end] for i in group):
                end += 1
            runs.append((tuple(sorted(group)), depth, end))
            visit(group, end)

    visit(candidates, 0)
    return runs


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_plan_tables_on_random_trees(page_size):
    """On many random trees the plan's runs are the tree a plain search finds (parents
    first), and its launch tables say exactly what the tree needs: each item's tokens,
    key range and state slots; every (item, row block, split) program once, row blocks
    innermost; every token's states written once each, 0 .. num_states - 1."""
    for seed in range(40):
        block_table, seqused_k, cu_seqlens_q, num_pages = random_tree_batch(seed, page_size)
        heads_q, heads_kv = [(4, 1), (8, 2), (2, 2)][seed % 3]
        group = heads_q // heads_kv
        kwargs = dict(page_size=page_size, heads_q=heads_q, heads_kv=heads_kv, head_dim=32, dtype=torch.float16)
        rows, used, bounds = block_table.tolist(), seqused_k.tolist(), cu_seqlens_q.tolist()
        q_lens = [b - a for a, b in zip(bounds, bounds[1:])]
        limits = [max(0, (u - q + 1) // page_size) if q else 0 for u, q in zip(used, q_lens)]
        with_queries = [i for i, q in enumerate(q_lens) if q]
        for share, num_splits in (("always", 1 + seed % 3), ("auto", None)):
            plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, share=share, num_splits=num_splits,
                                num_pages=num_pages, **kwargs)  # fmt: skip
            runs = [(r.members, r.first_page, r.end_page) for r in plan.runs]
            if share == "always":
                assert sorted(runs) == sorted(python_tree(rows, limits, with_queries)), seed
            for k, (members, first, _end) in enumerate(runs):
                parents = [r for r in runs if set(members) < set(r[0]) and r[2] <= first]
                assert all(runs.index(r) < k for r in parents), seed
            live = [p for row, u in zip(rows, used) for p in row[: -(-u // page_size)]]
            assert plan.max_page_id == max(live, default=-1)
            kv_token = 2 * heads_kv * 32 * 2
            assert plan.kv_bytes_plain == sum(used[i] for i in with_queries) * kv_token
            saved = sum((len(r.members) - 1) * (r.end_page - r.first_page) * page_size * kv_token
                        for r in plan.runs if r.kept)  # fmt: skip
            assert plan.kv_bytes_plan == plan.kv_bytes_plain - saved
            if not plan.shared:
                assert plan.launch_tables == [] and plan.num_states == plan.last_splits
                continue
            items = plan.launch_tables[0].reshape(-1, 9).tolist()
            tokens = plan.launch_tables[1].tolist()
            programs = [tuple(p) for p in plan.launch_tables[2].reshape(-1, 3).tolist()]
            narrow_m, wide_m, grid = plan.launch_configs[1], plan.launch_configs[5], plan.launch_configs[6]
            kept = [r for r in plan.runs if r.kept and r.end_page > r.first_page]
            assert len(items) == len(kept) + len(with_queries)
            slots = {t: [] for t in range(bounds[-1])}
            expected_programs = []
            for k, (row, tok0, count, key_lo, key_hi, base, splits, pad, wide) in enumerate(items):
                if k < len(kept):  # a kept run, in tree order
                    run = kept[k]
                    members = run.members
                    assert (row, key_lo, key_hi, pad) == (members[0], run.first_page * page_size,
                                                          run.end_page * page_size, 1 << 30)  # fmt: skip
                else:  # the sequences' own levels, in batch order
                    members = (with_queries[k - len(kept)],)
                    assert (row, key_lo, key_hi) == (members[0], plan.own_start_page[row] * page_size, -1)
                    assert pad == base + splits and splits == plan.last_splits
                assert splits == (num_splits or 1)
                item_tokens = [t for m in members for t in range(bounds[m], bounds[m + 1])]
                assert tokens[tok0: tok0 + count] == item_tokens
                block_m = wide_m if wide else narrow_m
                assert wide == (block_m != narrow_m)
                for t in item_tokens:
                    slots[t] += range(base, base + splits)
                expected_programs += [(k, rb, split) for split in range(splits)
                                      for rb in range(-(-count * group // block_m))]  # fmt: skip
            assert programs == expected_programs and grid == len(programs) * heads_kv
            # Each token's items write slots 0, 1, ... once each; its own level marks
            # the rest (from pad on) empty.
            assert all(sorted(written) == list(range(len(written))) for written in slots.values()), seed
            assert plan.num_states == max(map(len, slots.values()), default=0)


@pytest.mark.parametrize("seed, page_size", [(3, 5), (7, 1), (11, 16), (19, 5)])
def test_plan_of_a_random_tree_matches_float64(seed, page_size):
    # On DEVICE: a GPU machine runs Triton on CUDA tensors only (the interpreter is for CPU machines).
    block_table, seqused_k, cu_seqlens_q, num_pages = random_tree_batch(seed, page_size)
    block_table, seqused_k, cu_seqlens_q = (t.to(DEVICE) for t in (block_table, seqused_k, cu_seqlens_q))
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(num_pages, 2, page_size, 1, 16, generator=gen).to(DEVICE)
    q = torch.randn(int(cu_seqlens_q[-1]), 2, 16, generator=gen).to(DEVICE)
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=page_size, heads_q=2, heads_kv=1,
                        head_dim=16, dtype=torch.float32, share="always")  # fmt: skip
    assert plan.shared
    out, lse = splitkv.paged_cascade_attention(q, kv[:, 0], kv[:, 1], plan, backend="triton")
    expected = float64_paged_attention(q, kv[:, 0], kv[:, 1], block_table, seqused_k, cu_seqlens_q, True)
    assert_close(out, lse, *expected, torch.float32)


def test_cascade_compiles_fullgraph():
    seq_lens, q_lens, shared, _ = TREES["two groups"]
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = make_batch(seq_lens, q_lens, PS, 8, 2, 32,
                                                                           torch.float32, shared)  # fmt: skip
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=PS, heads_q=8, heads_kv=2, head_dim=32,
                        dtype=torch.float32, share="always")  # fmt: skip

    def step(q, k_cache, v_cache):
        return splitkv.paged_cascade_attention(q, k_cache, v_cache, plan, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    out, lse = compiled(q, k_cache, v_cache)
    torch.testing.assert_close(out, step(q, k_cache, v_cache)[0])


# ---------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("page_size", [1, 16, 128, 256, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_grid(page_size, dtype, head_dim):
    seq_lens, q_lens = [0, 700, 1500, 3, 1024], [1, 1, 4, 1, 9]
    batch = make_batch(seq_lens, q_lens, page_size, 32, 8, head_dim, dtype, seed=page_size)
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = batch
    for causal, splits in ((True, None), (False, 4)):
        expected = float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, causal)
        out, lse = splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 9,
                                                    1500, causal=causal, num_splits=splits)  # fmt: skip
        assert_close(out, lse, *expected, dtype)


def capture_cascade(q, k_cache, v_cache, plan):
    """A CUDA graph of one paged_cascade_attention call (warmed up on a side stream) and its captured output."""
    return capture_graph(lambda: splitkv.paged_cascade_attention(q, k_cache, v_cache, plan)[0])


@needs_cuda
@pytest.mark.parametrize("page_size", [16, 128])
def test_gpu_cascade_tree_and_graph_replay(page_size):
    # 3 levels: 2 system pages for all, 4 more per group of 4, then own pages.
    samples = 16
    prompt = 2 * page_size
    groups = [tuple(range(g, samples, 4)) for g in range(4)]
    seq_lens = [prompt + 4 * page_size + 37 + 5 * i for i in range(samples)]
    shared = [(tuple(range(samples)), 2)] + [(g, 6) for g in groups]
    batch = make_batch(seq_lens, [1] * samples, page_size, 32, 8, 128, torch.bfloat16, shared, spare_pages=4)
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = batch
    # Room to grow: the padding entries become real (spare) pages, written in place.
    spare = (block_table < 0) | (block_table >= k_cache.shape[0])
    block_table[spare] = k_cache.shape[0] - 1
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=page_size, heads_q=32, heads_kv=8,
                        head_dim=128, dtype=torch.bfloat16, share="always",
                        max_seqlen_k=max(seq_lens) + 3 * page_size)  # fmt: skip
    assert len([r for r in plan.runs if r.kept]) == 5
    out, lse = splitkv.paged_cascade_attention(q, k_cache, v_cache, plan)
    assert_close(out, lse, *float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, True),
                 torch.bfloat16)  # fmt: skip

    graph, static_out = capture_cascade(q, k_cache, v_cache, plan)
    for grow in (1, page_size + 1, 2 * page_size):
        seqused_k.copy_(torch.tensor(seq_lens, dtype=torch.int32) + grow)
        graph.replay()
        eager = splitkv.paged_cascade_attention(q, k_cache, v_cache, plan)[0]
        torch.testing.assert_close(static_out, eager, atol=0, rtol=0)
        expected = float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, True)
        torch.testing.assert_close(static_out.double().cpu(), expected[0], atol=2e-2, rtol=2e-2)


@needs_cuda
def test_gpu_graph_replays_a_tree_written_into_the_plan():
    samples, page_size = 16, 16
    seq_lens = [6 * page_size + 20 + i for i in range(samples)]
    shared = [(tuple(range(samples)), 4), (tuple(range(0, samples, 2)), 6)]
    batch = make_batch(seq_lens, [1] * samples, page_size, 32, 8, 128, torch.bfloat16, shared)
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = batch
    kwargs = dict(page_size=page_size, heads_q=32, heads_kv=8, head_dim=128, dtype=torch.bfloat16, share="always")
    plan = plan_cascade(block_table, seqused_k, cu_seqlens_q, max_programs=4096, max_states=64, **kwargs)
    graph, static_out = capture_cascade(q, k_cache, v_cache, plan)
    graph.replay()
    expected = float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, True)
    torch.testing.assert_close(static_out.double().cpu(), expected[0], atol=2e-2, rtol=2e-2)
    # The odd sequences take pages of their own for positions 2-3: a new tree, same graph.
    in_use = {int(p) for row, used in zip(block_table.cpu(), seqused_k.tolist()) for p in row[: -(-used // page_size)]}
    free = [p for p in range(k_cache.shape[0]) if p not in in_use]
    assert len(free) >= 2
    for i in range(1, samples, 2):
        block_table[i, 2:4] = torch.tensor(free[:2], device=DEVICE)
    plan_cascade(block_table, seqused_k, cu_seqlens_q, into=plan, **kwargs)
    graph.replay()
    expected = float64_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, True)
    torch.testing.assert_close(static_out.double().cpu(), expected[0], atol=2e-2, rtol=2e-2)
