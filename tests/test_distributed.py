"""Context-parallel attention across processes: gloo on CPU (2 and 4 ranks), NCCL when GPUs exist.

Spawning costs several seconds per process (``import torch``), so each world size
is spawned once and runs every scenario inside: decode, causal queries at the end
of the sequence, prefill in the zig-zag and contiguous layouts, uneven and empty
shards, both combine strategies, float32 and bfloat16. Every rank compares its own
result with single-process attention over the whole KV in float64.
"""

import datetime
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from attention_reference import assert_attention_close, cu_seqlens, random_tokens, reference64

from splitkv import distributed as cp

DTYPES = (torch.float32, torch.bfloat16)
HEADS_Q, HEADS_KV, HEAD_DIM = 8, 2, 16  # GQA 8:2


# --------------------------------------------------------------------------- helpers


def _shard_lengths(lengths, world, gen, empty_rank=None):
    """``[world][batch]``: random contiguous cuts of every sequence; ``empty_rank`` holds nothing."""
    holders = [r for r in range(world) if r != empty_rank]
    shards = [[0] * len(lengths) for _ in range(world)]
    for b, length in enumerate(lengths):
        cuts = sorted(torch.randint(0, length + 1, (len(holders) - 1,), generator=gen).tolist())
        edges = [0] + cuts + [length]
        for i, r in enumerate(holders):
            shards[r][b] = edges[i + 1] - edges[i]
    return shards


def _take(x, lengths, shard_lengths, rank):
    """Rank ``rank``'s contiguous shard of every sequence of the packed ``x`` (tokens on dim 0)."""
    pieces, start = [], 0
    for b, length in enumerate(lengths):
        offset = start + sum(shard_lengths[r][b] for r in range(rank))
        pieces.append(x[offset : offset + shard_lengths[rank][b]])
        start += length
    return torch.cat(pieces)


def _batch(lengths_q, lengths_k, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)  # the same data on every rank
    q = random_tokens(sum(lengths_q), HEADS_Q, HEAD_DIM, dtype, device, gen)
    k = random_tokens(sum(lengths_k), HEADS_KV, HEAD_DIM, dtype, device, gen)
    v = random_tokens(sum(lengths_k), HEADS_KV, HEAD_DIM, dtype, device, gen)
    return q, k, v, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)


def _cpu(*tensors):
    return [t.cpu() for t in tensors]


def _same_on_every_rank(out, lse, world):
    """Every rank must return bit-identical results (they merge the same data the same way)."""
    if world == 1:
        return
    for t in (out.float(), lse):
        gathered = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(gathered, t.contiguous())
        for other in gathered[1:]:
            assert torch.equal(torch.nan_to_num(other), torch.nan_to_num(gathered[0])), "ranks disagree"


def _check_queries(rank, world, device, lengths_q, lengths_k, *, causal, combines, seed, empty_rank=None,
                   scale=None, even=False):  # fmt: skip
    """context_parallel_attention over random uneven (or even) shards against full float64 attention."""
    if even:
        shards = [[(r + 1) * n // world - r * n // world for n in lengths_k] for r in range(world)]
    else:
        shards = _shard_lengths(lengths_k, world, torch.Generator().manual_seed(seed + 1000), empty_rank)
    for dtype in DTYPES:
        q, k, v, cu_q, cu_k = _batch(lengths_q, lengths_k, dtype, device, seed)
        ref_out, ref_lse = reference64(*_cpu(q, k, v, cu_q, cu_k), max(lengths_q), max(lengths_k), causal,
                                       scale if scale is not None else HEAD_DIM**-0.5)  # fmt: skip
        k_shard, v_shard = _take(k, lengths_k, shards, rank), _take(v, lengths_k, shards, rank)
        cu_k_shard = cu_seqlens(shards[rank], device)
        max_k_shard = max(shards[rank])
        for combine in combines:
            out, lse = cp.context_parallel_attention(q, k_shard, v_shard, cu_q, cu_k_shard, max(lengths_q),
                                                     max_k_shard, causal=causal, softmax_scale=scale,
                                                     combine=combine)  # fmt: skip
            assert out.dtype == dtype and out.shape == q.shape
            assert lse.dtype == torch.float32 and lse.shape == (HEADS_Q, q.shape[0])
            assert not torch.isnan(out).any() and not torch.isnan(lse).any()
            assert_attention_close(out.cpu(), lse.cpu(), ref_out, ref_lse, dtype)
            _same_on_every_rank(out, lse, world)


def _check_prefill(rank, world, device, lengths, *, layout, causal, seed, uneven=False):
    """context_parallel_prefill on shards of every sequence against full float64 self-attention."""
    for dtype in DTYPES:
        q, k, v, cu, _ = _batch(lengths, lengths, dtype, device, seed)
        ref_out, ref_lse = reference64(*_cpu(q, k, v, cu, cu), max(lengths), max(lengths), causal, HEAD_DIM**-0.5)
        if uneven:  # contiguous pieces of random lengths, one rank empty
            empty_rank = world - 1 if world > 1 else None
            shards = _shard_lengths(lengths, world, torch.Generator().manual_seed(seed), empty_rank)
            q_s, k_s, v_s = (_take(t, lengths, shards, rank) for t in (q, k, v))
            cu_s = cu_seqlens(shards[rank], device)
            ref_out_s = _take(ref_out, lengths, shards, rank)
            ref_lse_s = _take(ref_lse.t(), lengths, shards, rank).t()
        else:
            q_s, cu_s = cp.shard_sequences(q, cu, rank, world, layout=layout)
            k_s, _ = cp.shard_sequences(k, cu, rank, world, layout=layout)
            v_s, _ = cp.shard_sequences(v, cu, rank, world, layout=layout)
            ref_out_s, _ = cp.shard_sequences(ref_out, cu.cpu(), rank, world, layout=layout)
            ref_lse_s, _ = cp.shard_sequences(ref_lse, cu.cpu(), rank, world, layout=layout, dim=1)
        max_s = int((cu_s[1:] - cu_s[:-1]).max())
        out, lse = cp.context_parallel_prefill(q_s, k_s, v_s, cu_s, max_s, layout=layout, causal=causal)
        assert out.dtype == dtype and out.shape == q_s.shape and lse.shape == (HEADS_Q, q_s.shape[0])
        assert_attention_close(out.cpu(), lse.cpu(), ref_out_s, ref_lse_s, dtype)


def _run_checks(rank, world, device):
    both = ("all_gather", "all_reduce")
    # Decode: one query per sequence, an empty KV sequence (output 0, LSE -inf).
    decode_q, decode_k = [1] * 6, [37, 1, 20, 0, 64, 9]
    _check_queries(rank, world, device, decode_q, decode_k, causal=True, combines=both + ("auto",), seed=1)
    # Causal queries at the end of the sequence: Lq > 1, Lq > Lk (leading rows see
    # nothing), a sequence without keys, one with a single query.
    end_q, end_k = [4, 7, 1, 3, 5], [30, 5, 12, 2, 0]
    _check_queries(rank, world, device, end_q, end_k, causal=True, combines=both, seed=2)
    # Zig-zag causal prefill (3 tokens over 2R chunks: some chunks empty; an empty sequence).
    _check_prefill(rank, world, device, [16, 11, 3, 0], layout="zigzag", causal=True, seed=5)
    _check_queries(rank, world, device, decode_q, decode_k, causal=False, combines=both, seed=3, scale=0.3)
    if world > 1:
        # A rank without a single key (the last one, then a middle one).
        _check_queries(rank, world, device, end_q, end_k, causal=True, combines=both, seed=4, empty_rank=world - 1)
        _check_queries(rank, world, device, end_q, end_k, causal=True, combines=both, seed=4, empty_rank=world // 2)
        # The list all_gather, as on a gloo without the single-tensor form.
        cp._NO_SINGLE_TENSOR_GATHER.add(dist.get_backend())
        try:
            _check_queries(rank, world, device, end_q, end_k, causal=True, combines=both, seed=6)
        finally:
            cp._NO_SINGLE_TENSOR_GATHER.discard(dist.get_backend())
        # Shards that are not the zig-zag layout: every rank sees it and raises (none hangs).
        q, k, *_ = _batch([8], [8], torch.float32, device, 11)
        shards = [[0]] * (world - 1) + [[8]]  # the last rank holds the whole sequence
        q_s, k_s = _take(q, [8], shards, rank), _take(k, [8], shards, rank)
        with pytest.raises(ValueError, match="zigzag layout"):
            cp.context_parallel_prefill(q_s, k_s, k_s, cu_seqlens(shards[rank], device), 8, layout="zigzag")
        # A subgroup without this rank: new_group returns a marker here, not a group.
        first_only = dist.new_group([0])
        if rank > 0:
            with pytest.raises(ValueError, match="not a member of the given process group"):
                cp.context_parallel_prefill(q_s, k_s, k_s, cu_seqlens(shards[rank], device), 8, group=first_only)
    _check_queries(rank, world, device, end_q, end_k, causal=False, combines=("auto",), seed=7)
    # Even shards of long sequences: on all but the last rank every query sees the
    # whole shard (one non-causal call), on the last one the mask is plain causal.
    _check_queries(rank, world, device, [2, 3, 1], [40, 50, 7], causal=True, combines=("auto",), seed=12, even=True)
    # Shards long enough that, on a GPU, each rank splits its KV over the multiprocessors.
    _check_queries(rank, world, device, [1, 3], [3000, 700], causal=True, combines=("auto",), seed=13, even=True)
    _check_prefill(rank, world, device, [13, 1, 8], layout="zigzag", causal=False, seed=8)
    _check_prefill(rank, world, device, [17, 9, 4], layout="contiguous", causal=True, seed=9, uneven=True)
    _check_prefill(rank, world, device, [10, 7], layout="contiguous", causal=True, seed=10)


def _worker(rank, world, init_method, backend):
    torch.set_num_threads(1)  # the ranks share a couple of cores
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        _run_checks(rank, world, device)
        dist.barrier()
    except BaseException:  # noqa: BLE001 (any failure, exits included, must end the rank)
        # A rank that fails alone would leave the others waiting in their next
        # collective until NCCL's timeout; report it and end this process now
        # (mp.spawn then stops the others and fails the test).
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


def _spawn(world, tmp_path, backend="gloo"):
    init_method = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world, init_method, backend), nprocs=world, join=True)


# --------------------------------------------------------------------------- multi-process


@pytest.mark.parametrize("world", [2, 4])
def test_gloo(world, tmp_path):
    _spawn(world, tmp_path)


def test_gloo_world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        _run_checks(0, 1, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.skipif(sys.platform != "linux", reason="NCCL runs on Linux")
def test_nccl(world, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"NCCL over {world} processes needs {world} CUDA devices, {torch.cuda.device_count()} visible")
    _spawn(world, tmp_path, backend="nccl")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA device")
def test_nccl_world_of_one(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        _run_checks(0, 1, torch.device("cuda"))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- single process


def test_combine_bytes_and_choice():
    # The docs' example: 8 ranks, 64 tokens, 32 heads, head_dim 128, bf16.
    assert cp.combine_bytes(8, 64, 32, 128, 2) == {"all_gather": 3727360, "all_reduce": 1892352}
    assert cp.combine_bytes(1, 64, 32, 128, 2) == {"all_gather": 0, "all_reduce": 0}
    tie = cp.combine_bytes(4, 64, 32, 128, 2)
    assert tie["all_gather"] == tie["all_reduce"]
    for world in range(1, 17):
        for element_size in (2, 4):
            counted = cp.combine_bytes(world, 64, 32, 128, element_size)
            fewer = "all_reduce" if counted["all_reduce"] < counted["all_gather"] else "all_gather"
            assert cp.choose_combine(world, element_size) == fewer, (world, element_size)
    assert cp.choose_combine(4, 2) == "all_gather" and cp.choose_combine(5, 2) == "all_reduce"
    assert cp.choose_combine(2, 4) == "all_gather" and cp.choose_combine(3, 4) == "all_reduce"


@pytest.mark.parametrize("layout", cp.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout, world):
    lengths = [16, 11, 3, 0, 1, 9]
    cu = cu_seqlens(lengths, "cpu")
    x = torch.arange(sum(lengths) * 2).view(-1, 2)
    shards = [cp.shard_sequences(x, cu, r, world, layout=layout) for r in range(world)]
    assert sum(s.shape[0] for s, _ in shards) == x.shape[0]
    for shard, cu_shard in shards:
        assert cu_shard.dtype == torch.int32 and int(cu_shard[-1]) == shard.shape[0]
    assert torch.equal(cp.unshard_sequences([s for s, _ in shards], cu, layout=layout), x)
    lse_like = x.t().contiguous()  # tokens on dim 1
    parts = [cp.shard_sequences(lse_like, cu, r, world, layout=layout, dim=1)[0] for r in range(world)]
    assert torch.equal(cp.unshard_sequences(parts, cu, layout=layout, dim=-1), lse_like)


def test_zigzag_layout():
    cu = cu_seqlens([8], "cpu")
    assert cp.shard_indices(cu, 0, 2)[0].tolist() == [0, 1, 6, 7]
    assert cp.shard_indices(cu, 1, 2)[0].tolist() == [2, 3, 4, 5]
    index, cu_shard = cp.shard_indices(cu_seqlens([8, 4], "cpu"), 1, 2)
    assert index.tolist() == [2, 3, 4, 5, 9, 10] and cu_shard.tolist() == [0, 4, 6]
    assert cp.shard_indices(cu, 1, 2, layout="contiguous")[0].tolist() == [4, 5, 6, 7]


def _args(dtype=torch.float32):
    q, k, v, cu_q, cu_k = _batch([1, 1], [5, 3], dtype, "cpu", 0)
    return [q, k, v, cu_q, cu_k, 1, 5]


@pytest.mark.parametrize(
    "position,value,error,match",
    [
        (1, torch.zeros(8, 2, 16, dtype=torch.float16), TypeError, "k_shard must have dtype"),
        (2, torch.zeros(8, 3, 16), ValueError, "v_shard must be"),
        (4, torch.tensor([0, 5, 8]), TypeError, "cu_seqlens_k_shard must have dtype torch.int32"),
        (6, 2, ValueError, "max_seqlen_k_shard = 2"),
        (0, torch.zeros(2, 8, 16, dtype=torch.int32), TypeError, "q must be float32"),
    ],
)
def test_context_parallel_attention_checks(position, value, error, match):
    args = _args()
    args[position] = value
    with pytest.raises(error, match=match):
        cp.context_parallel_attention(*args)


def test_context_parallel_argument_checks():
    with pytest.raises(ValueError, match="combine must be one of"):
        cp.context_parallel_attention(*_args(), combine="ring")
    with pytest.raises(TypeError, match="causal must be a bool"):
        cp.context_parallel_attention(*_args(), causal=1)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialized"):
            cp.context_parallel_attention(*_args())
    q, k, v, cu, _ = _batch([4], [4], torch.float32, "cpu", 0)
    with pytest.raises(ValueError, match="layout must be one of"):
        cp.context_parallel_prefill(q, k, v, cu, 4, layout="ring")
    with pytest.raises(ValueError, match="k_shard must hold the same tokens as q_shard"):
        cp.context_parallel_prefill(q, k[:3], v[:3], cu, 4)
    with pytest.raises(ValueError, match="max_seqlen_shard = 3"):
        cp.context_parallel_prefill(q, k, v, cu, 3)
    with pytest.raises(ValueError, match="rank must be an int in"):
        cp.shard_indices(cu, 2, 2)
    with pytest.raises(ValueError, match="world_size must be an int"):
        cp.shard_sequences(q, cu, 0, 0)
    with pytest.raises(ValueError, match="x must have 4 tokens"):
        cp.shard_sequences(q[:3], cu, 0, 2)
    with pytest.raises(TypeError, match="shards must be"):
        cp.unshard_sequences(q, cu)


def test_group_argument(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        q, k, v, cu, _ = _batch([4], [4], torch.float32, "cpu", 0)
        # One rank holds everything: fine for any layout.
        cp.context_parallel_prefill(q, k, v, cu, 4)
        with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup"):
            cp.context_parallel_prefill(q, k, v, cu, 4, group="world")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -0.1])
def test_bad_softmax_scale_is_refused(scale):
    with pytest.raises(ValueError, match="softmax_scale must be a finite positive float"):
        cp.context_parallel_attention(*_args(), softmax_scale=scale)
    q, k, v, cu, _ = _batch([4], [4], torch.float32, "cpu", 0)
    with pytest.raises(ValueError, match="softmax_scale must be a finite positive float"):
        cp.context_parallel_prefill(q, k, v, cu, 4, softmax_scale=scale)


def test_flags_counts_and_gradients_are_checked():
    q, k, v, cu, _ = _batch([4], [4], torch.float32, "cpu", 0)
    # A flag given as a string is not taken as truthy.
    with pytest.raises(TypeError, match="causal must be a bool"):
        cp.context_parallel_attention(*_args(), causal="False")
    with pytest.raises(TypeError, match="causal must be a bool"):
        cp.context_parallel_prefill(q, k, v, cu, 4, causal="False")
    with pytest.raises(TypeError, match="softmax_scale must be a positive float or None"):
        cp.context_parallel_attention(*_args(), softmax_scale="0.3")
    # Counts are ints: a float or a string is a TypeError naming the argument.
    with pytest.raises(TypeError, match="rank must be an int"):
        cp.shard_indices(cu, 1.0, 2)
    with pytest.raises(TypeError, match="world_size must be an int"):
        cp.shard_sequences(q, cu, 0, "2")
    with pytest.raises(TypeError, match="dim must be an int"):
        cp.shard_sequences(q, cu, 0, 2, dim="0")
    with pytest.raises(ValueError, match="dim = 3 is out of range for x of 3 dims"):
        cp.shard_sequences(q, cu, 0, 2, dim=3)
    with pytest.raises(ValueError, match="dim must be an int >= -3"):
        cp.shard_sequences(q, cu, 0, 2, dim=-4)
    # No gradient flows through the prefill's KV collectives: refused, not silently detached
    # (context_parallel_attention is differentiable: tests/test_attention_autograd.py).
    with pytest.raises(ValueError, match="context_parallel_prefill is not differentiable, but v_shard requires grad"):
        cp.context_parallel_prefill(q, k, v.requires_grad_(), cu, 4)


def test_numpy_scale_and_no_grad_are_accepted(tmp_path):
    import numpy as np

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        args = _args()
        args[0].requires_grad_()
        with torch.no_grad():
            out, lse = cp.context_parallel_attention(*args, softmax_scale=np.float32(0.3))
        ref_out, ref_lse = reference64(*_cpu(*args[:5]), args[5], args[6], False, 0.3)
        assert_attention_close(out, lse, ref_out, ref_lse, torch.float32)
    finally:
        dist.destroy_process_group()
