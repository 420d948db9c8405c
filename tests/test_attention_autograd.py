"""Autograd of attention (issue 22): attention_with_lse and split_kv_attention are
differentiable w.r.t. q, k and v through the output and the LSE on every backend
that runs here, against float64 autograd of a dense attention written here;
cascade_attention refuses a gradient with a clear error; context-parallel attention
over 2 gloo ranks gives the single-process gradients with either combine."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import splitkv
from splitkv._triton_support import interpreter_enabled


def dense_attention64(q, k, v, cu_q, cu_k, causal, scale, seqused_k=None):
    """Float64 attention, differentiable by torch autograd: per sequence, dense scores and
    ``torch.softmax``; a row that sees no key has output 0 and LSE -inf (its gradient 0)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else [b - a for a, b in zip(bounds_k, bounds_k[1:])]
    for i in range(len(bounds_q) - 1):
        qs = q[bounds_q[i] : bounds_q[i + 1]]
        ks = k[bounds_k[i] : bounds_k[i] + used[i]].repeat_interleave(group, dim=1)
        vs = v[bounds_k[i] : bounds_k[i] + used[i]].repeat_interleave(group, dim=1)
        lq, lk = qs.shape[0], ks.shape[0]
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        visible = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq
        seen = visible.any(-1)  # [lq]
        # Rows that see nothing: any finite scores (masked out of the result below).
        scores = torch.where(visible | ~seen[:, None], scores, float("-inf"))
        probs = torch.softmax(scores, -1) * seen[None, :, None]
        outs.append(torch.einsum("hqk,khd->qhd", probs, vs))
        lse = torch.logsumexp(scores, -1)
        lses.append(torch.where(seen[None, :], lse, float("-inf")))
    return torch.cat(outs), torch.cat(lses, dim=1)


def _inputs(lens_q, lens_k, heads_q=4, heads_kv=2, head_dim=8, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), heads_q, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(sum(lens_k), heads_kv, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(sum(lens_k), heads_kv, head_dim, generator=generator, dtype=dtype)
    cu = [torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32) for lens in (lens_q, lens_k)]
    return q, k, v, cu[0], cu[1]


def _loss_weights(total_q, heads_q, head_dim, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(total_q, heads_q, head_dim, generator=generator), torch.randn(heads_q, total_q,
                                                                                      generator=generator)


def _loss(out, lse, w_out, w_lse):
    # The LSE of rows that see no key is -inf: weigh only the finite ones.
    finite = torch.isfinite(lse)
    return (out.double() * w_out).sum() + (torch.where(finite, lse.double(), 0.0) * w_lse).sum()


# Batches mixing empty and full sequences, more queries than keys (rows that see nothing), GQA.
CASES = [
    ([2, 0, 3, 1], [4, 3, 0, 5], True),
    ([3, 1], [2, 6], True),
    ([2, 2], [3, 4], False),
]


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
@pytest.mark.parametrize("lens_q, lens_k, causal", CASES)
def test_attention_with_lse_gradients(backend, lens_q, lens_k, causal):
    if backend == "triton" and not interpreter_enabled():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (tests/conftest.py sets it where no GPU is)")
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k)
    w_out, w_lse = _loss_weights(q.shape[0], q.shape[1], q.shape[2])
    scale = 0.4
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = splitkv.attention_with_lse(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                          softmax_scale=scale, backend=backend)  # fmt: skip
    assert out.requires_grad and lse.requires_grad
    _loss(out, lse, w_out, w_lse).backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = dense_attention64(*ref_leaves, cu_q, cu_k, causal, scale)
    _loss(ref_out, ref_lse, w_out, w_lse).backward()
    for name, got, ref in zip("qkv", leaves, ref_leaves):
        assert torch.isfinite(got.grad).all(), name
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-4, rtol=1e-4, msg=f"d{name}")


def test_lse_gradient_flows_alone_and_with_seqused_k():
    q, k, v, cu_q, cu_k = _inputs([2, 3], [5, 6], seed=2)
    used = torch.tensor([3, 6], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _, lse = splitkv.attention_with_lse(*leaves, cu_q, cu_k, 3, 6, causal=True, seqused_k=used,
                                        lse_base="2", lse_layout="th")  # fmt: skip
    assert lse.shape == (5, 4)
    lse.sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    _, ref_lse = dense_attention64(*ref_leaves, cu_q, cu_k, True, 8**-0.5, used)
    (ref_lse / torch.log(torch.tensor(2.0, dtype=torch.float64))).sum().backward()
    for name, got, ref in zip("qk", leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-4, rtol=1e-4, msg=f"d{name}")
    assert (leaves[2].grad == 0).all()  # the LSE does not depend on v
    # Keys past seqused_k get no gradient.
    assert (leaves[1].grad[3:5] == 0).all() and (leaves[2].grad[3:5] == 0).all()


def test_split_kv_attention_gradients():
    q, k, v, cu_q, cu_k = _inputs([1, 1], [40, 70], seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = splitkv.split_kv_attention(*leaves, cu_q, cu_k, 1, 70, num_splits=3)
    w_out, w_lse = _loss_weights(2, 4, 8)
    _loss(out, lse, w_out, w_lse).backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    _loss(*dense_attention64(*ref_leaves, cu_q, cu_k, False, 8**-0.5), w_out, w_lse).backward()
    for name, got, ref in zip("qkv", leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-4, rtol=1e-4, msg=f"d{name}")


def test_cascade_attention_refuses_a_gradient():
    q, k, v, cu_q, cu_k = _inputs([1, 2], [2, 3])
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="cascade_attention is not differentiable"):
        splitkv.cascade_attention(q, cu_q, k[:1], v[:1], k, v, cu_k)
    with torch.no_grad():
        assert not splitkv.cascade_attention(q, cu_q, k[:1], v[:1], k, v, cu_k).requires_grad


def test_no_grad_result_is_not_tracked():
    q, k, v, cu_q, cu_k = _inputs([2], [3])
    q.requires_grad_()
    with torch.no_grad():
        out, lse = splitkv.attention_with_lse(q, k, v, cu_q, cu_k, 2, 3)
    assert not out.requires_grad and not lse.requires_grad


# --------------------------------------------------------------------------- context parallel, 2 gloo ranks


def _cp_rank(rank, world, port, combine, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        lens_k = [6, 9, 4]
        q, k, v, cu_q, cu_k = _inputs([1, 2, 1], lens_k, seed=5)
        w_out, w_lse = _loss_weights(q.shape[0], q.shape[1], q.shape[2])
        # This rank's shard: the first or second half of every sequence's keys.
        shard_rows, shard_lens = [], []
        for b, n in enumerate(lens_k):
            start = int(cu_k[b]) + (0 if rank == 0 else n // 2)
            count = n // 2 if rank == 0 else n - n // 2
            shard_rows += list(range(start, start + count))
            shard_lens.append(count)
        rows = torch.tensor(shard_rows)
        q_leaf = q.clone().requires_grad_()
        k_shard = k[rows].clone().requires_grad_()
        v_shard = v[rows].clone().requires_grad_()
        cu_shard = torch.tensor([0] + shard_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out, lse = splitkv.context_parallel_attention(q_leaf, k_shard, v_shard, cu_q, cu_shard, 2, max(shard_lens),
                                                      combine=combine)  # fmt: skip
        _loss(out, lse, w_out, w_lse).backward()
        results[rank] = (q_leaf.grad.clone(), k_shard.grad.clone(), v_shard.grad.clone(), rows)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("combine", ["all_gather", "all_reduce"])
def test_context_parallel_gradients_equal_single_process(combine):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_cp_rank, args=(2, port, combine, results), nprocs=2, start_method="spawn")
    q, k, v, cu_q, cu_k = _inputs([1, 2, 1], [6, 9, 4], seed=5)
    w_out, w_lse = _loss_weights(q.shape[0], q.shape[1], q.shape[2])
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    # Every rank holds the same queries, whose last token sees all keys: non-causal.
    _loss(*dense_attention64(*ref_leaves, cu_q, cu_k, False, 8**-0.5), w_out, w_lse).backward()
    for rank in range(2):
        dq, dk, dv, rows = results[rank]
        torch.testing.assert_close(dq.double(), ref_leaves[0].grad, atol=1e-4, rtol=1e-4, msg=f"dq rank {rank}")
        torch.testing.assert_close(dk.double(), ref_leaves[1].grad[rows], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dv.double(), ref_leaves[2].grad[rows], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- issue 16's GQA decode bug (GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention runs on a CUDA GPU")
def test_gqa_decode_batch_with_queryless_sequences_runs_on_auto():
    # 8 sequences, 6 queries (two sequences hold none), max_seqlen_q == 1, GQA 8:2, head_dim 256:
    # torch's flash attention fails on this shape ("shape '[8, 2, 8, 256]' is invalid ...").
    lens_q, lens_k = [1, 1, 0, 1, 1, 0, 1, 1], [37, 5, 12, 64, 1, 9, 200, 3]
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, heads_q=8, heads_kv=2, head_dim=256, seed=7)
    q, k, v = (t.to("cuda", torch.bfloat16) for t in (q, k, v))
    cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
    report = splitkv.explain_attention(q, k, v, cu_q, cu_k, 1, 200, causal=True)
    assert "one query per sequence" in report
    out, lse = splitkv.attention_with_lse(q, k, v, cu_q, cu_k, 1, 200, causal=True)
    ref_out, ref_lse = dense_attention64(q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), True, 256**-0.5)
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=1e-3, rtol=1e-3)
    # One query per sequence (4 rows per KV head) is a decode shape: auto takes splitkv's Triton kernel.
    full_q = q.new_ones((8, 8, 256))
    one_each = torch.arange(9, dtype=torch.int32, device="cuda")
    assert "-> triton" in splitkv.explain_attention(full_q, k, v, one_each, cu_k, 1, 200)
