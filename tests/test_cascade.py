"""cascade_attention and split_kv_attention end to end: both must equal full attention."""

import itertools
import random
import zlib

import pytest
import torch
from attention_reference import assert_attention_close, cu_seqlens, random_tokens, reference64
from grids import grid, rotate

import splitkv
from splitkv import cascade as cascade_module
from splitkv.attention import ATTENTION_BACKENDS
from splitkv.bench.common import capture_graph
from splitkv.cascade import estimate_cascade

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def rng(request):
    seed = zlib.crc32(request.node.name.encode())
    return random.Random(seed), torch.Generator().manual_seed(seed)


def _shared_prefix_batch(rng, num_sequences, prefix_len, max_suffix, decode, heads_q, heads_kv, head_dim, dtype):
    """Random lengths: suffixes from 0 keys up; queries are each sequence's last tokens
    (1 when decoding, else a prefill chunk of up to the whole suffix)."""
    py, gen = rng
    lens_k = [py.randint(0, max_suffix) for _ in range(num_sequences)]
    lens_q = [min(1, lk + 1) if decode else py.randint(0 if lk == 0 else 1, max(lk, 1)) for lk in lens_k]
    q = random_tokens(sum(lens_q), heads_q, head_dim, dtype, DEVICE, gen)
    prefix_k = random_tokens(prefix_len, heads_kv, head_dim, dtype, DEVICE, gen)
    prefix_v = random_tokens(prefix_len, heads_kv, head_dim, dtype, DEVICE, gen)
    suffix_k = random_tokens(sum(lens_k), heads_kv, head_dim, dtype, DEVICE, gen)
    suffix_v = random_tokens(sum(lens_k), heads_kv, head_dim, dtype, DEVICE, gen)
    return q, lens_q, prefix_k, prefix_v, suffix_k, suffix_v, lens_k


def _full_attention_reference(q, lens_q, prefix_k, prefix_v, suffix_k, suffix_v, lens_k, scale):
    """Float64 causal attention over each sequence's materialised [prefix ; suffix_i]."""
    starts = [0] + list(torch.tensor(lens_k).cumsum(0).tolist())
    full_k = torch.cat([torch.cat([prefix_k, suffix_k[a:b]]) for a, b in itertools.pairwise(starts)])
    full_v = torch.cat([torch.cat([prefix_v, suffix_v[a:b]]) for a, b in itertools.pairwise(starts)])
    lens_full = [prefix_k.shape[0] + lk for lk in lens_k]
    return reference64(q, full_k, full_v, cu_seqlens(lens_q, q.device), cu_seqlens(lens_full, q.device),
                       max(lens_q), max(lens_full), True, scale)  # fmt: skip


CASES = [  # (sequences, prefix_len, max suffix, decode, heads_q, heads_kv, head_dim)
    (5, 70, 40, True, 8, 2, 64),
    (3, 33, 30, False, 4, 4, 64),
    (4, 0, 25, True, 8, 1, 128),
    (1, 50, 0, True, 8, 8, 64),
    (6, 40, 20, False, 8, 1, 64),
]
GPU_CASES = [
    (1, 5000, 300, True, 32, 8, 128),
    (1, 3000, 500, False, 16, 2, 128),
    (64, 2048, 300, True, 32, 8, 128),
    (16, 4096, 1024, True, 32, 4, 128),
    (8, 1000, 700, False, 16, 2, 256),
    (256, 512, 64, True, 32, 8, 64),
]


_ALL_CASES = CASES + (GPU_CASES if HAS_CUDA else [])
CASCADE_CHOICES = ["auto", True, False]


def _every_dtype_once(index_of) -> callable:
    """A ``grid`` default: each combination of the other axes at one dtype (rotating)."""
    return lambda *values: values[-1] is rotate(index_of(*values[:-1]), DTYPES)


@pytest.mark.parametrize(
    "cascade,case,dtype",
    grid(CASCADE_CHOICES, [pytest.param(c, id=str(c)) for c in _ALL_CASES], DTYPES,
         default=_every_dtype_once(lambda cascade, case: CASCADE_CHOICES.index(cascade) + _ALL_CASES.index(case))),
)  # fmt: skip
def test_cascade_equals_full_attention(dtype, case, cascade, rng):
    batch = _shared_prefix_batch(rng, *case, dtype)
    q, lens_q, prefix_k, prefix_v, suffix_k, suffix_v, lens_k = batch
    out, lse = splitkv.cascade_attention(
        q, cu_seqlens(lens_q, DEVICE), prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens(lens_k, DEVICE),
        return_lse=True, cascade=cascade,
    )  # fmt: skip
    ref_out, ref_lse = _full_attention_reference(*batch, q.shape[-1] ** -0.5)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("why", ["head_dim above the Triton limit", "CPU tensors without TRITON_INTERPRET"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cascade_without_triton_uses_two_passes(dtype, why, rng, monkeypatch):
    """Where the Triton kernel cannot run, cascade goes through attention_with_lse and the two-state merge.
    Both ways a user gets there, through public means: a head_dim above the kernel's
    declared limit (on any device), and CPU tensors without the interpreter."""
    if why.startswith("head_dim"):
        head_dim = ATTENTION_BACKENDS["triton"].max_head_dim + 8
        batch = _shared_prefix_batch(rng, 4, 37, 20, False, 8, 2, head_dim, dtype)
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        batch = [t.cpu() if torch.is_tensor(t) else t for t in _shared_prefix_batch(rng, 4, 37, 20, False, 8, 2, 64,
                                                                                      dtype)]  # fmt: skip
    q, lens_q, prefix_k, prefix_v, suffix_k, suffix_v, lens_k = batch
    cu_q, cu_k = cu_seqlens(lens_q, q.device), cu_seqlens(lens_k, q.device)
    report = splitkv.explain_attention(q, suffix_k, suffix_v, cu_q, cu_k, max(lens_q), max(lens_k), backend="triton")
    assert report.splitlines()[0].endswith("-> no backend"), report  # the premise: Triton cannot run q
    out = splitkv.cascade_attention(q, cu_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_k, cascade=True)
    ref_out, _ = _full_attention_reference(*batch, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=1.6e-2, rtol=1.6e-2)


PREFIX_SPLIT_CASES = [(70, 0), (5, 0), (70, 1), (70, 3), (70, 8), (5, 7)]


@pytest.mark.skipif(not cascade_module.triton_can_run(torch.empty(1, 1, 64, device=DEVICE)),
                    reason="the one-launch cascade needs the Triton kernel (CUDA, or TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize(
    "prefix_len,prefix_splits,dtype",
    grid(PREFIX_SPLIT_CASES, DTYPES, default=_every_dtype_once(lambda *case: PREFIX_SPLIT_CASES.index(case))),
)
def test_one_launch_cascade_with_prefix_splits(dtype, prefix_len, prefix_splits, rng):
    """Both passes in one launch, the prefix cut into chunks (some empty when there are
    more chunks than keys), merged N-way; or, with 0 prefix chunks, each sequence's
    programs walking the prefix themselves, with no merge: still full attention over
    [prefix ; suffix_i]."""
    batch = _shared_prefix_batch(rng, 5, prefix_len, 30, False, 8, 2, 64, dtype)
    q, lens_q, prefix_k, prefix_v, suffix_k, suffix_v, lens_k = batch
    stages = cascade_module.cascade_stages(
        q, cu_seqlens(lens_q, DEVICE), prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens(lens_k, DEVICE),
        max(lens_q), max(lens_k), q.shape[-1] ** -0.5, True, prefix_splits=prefix_splits,
    )  # fmt: skip
    assert [name for name, _ in stages] == ["passes", "merge"][: 1 if prefix_splits == 0 else 2]
    for _, stage in stages:
        result = stage()
    out, lse = result
    ref_out, ref_lse = _full_attention_reference(*batch, q.shape[-1] ** -0.5)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


ONE_SEQUENCE_CASES = [(True, 1), (True, 3), (False, 2), (False, 8)]


@pytest.mark.skipif(not cascade_module.triton_can_run(torch.empty(1, 1, 64, device=DEVICE)),
                    reason="the one-launch cascade needs the Triton kernel (CUDA, or TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize(
    "decode,prefix_splits,dtype",
    grid(ONE_SEQUENCE_CASES, DTYPES, default=_every_dtype_once(lambda *case: ONE_SEQUENCE_CASES.index(case))),
)
def test_one_sequence_cascade_merges_in_its_launch(dtype, decode, prefix_splits, rng):
    """One sequence: the launch of the two passes also merges the states (one stage),
    twice in a row on the same counters, and equals full attention over [prefix ; suffix]."""
    batch = _shared_prefix_batch(rng, 1, 70, 30, decode, 8, 2, 64, dtype)
    q, lens_q, prefix_k, prefix_v, suffix_k, suffix_v, lens_k = batch
    ref_out, ref_lse = _full_attention_reference(*batch, q.shape[-1] ** -0.5)
    for _ in range(2):
        stages = cascade_module.cascade_stages(
            q, cu_seqlens(lens_q, DEVICE), prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens(lens_k, DEVICE),
            max(lens_q), max(lens_k), q.shape[-1] ** -0.5, True, prefix_splits=prefix_splits,
        )  # fmt: skip
        assert [name for name, _ in stages] == ["passes"]
        out, lse = stages[0][1]()
        assert_attention_close(out, lse, ref_out, ref_lse, dtype)
    # Internal on purpose: the test is about the fused merge's counters resetting themselves.
    assert all((counters == 0).all() for counters in cascade_module._MERGE_COUNTERS.values())


def test_cascade_split_counts(monkeypatch):
    """On a 132-multiprocessor GPU: decode batches get prefix chunks that fill the GPU
    alongside the suffix programs, and otherwise never more partial-state bytes than
    half the prefix KV unless the prefix's own programs would fall short of one wave;
    the headline cases get the counts measured fastest (on the H100; the third's 2
    suffix chunks on the H200, 71.3 against 73.5 us for 3 under graph replay); short
    prefixes run as the single-launch cascade, except under graph capture."""
    # Internal on purpose: the test is about the planner on a given GPU, faked through its multiprocessor count.
    from splitkv import _planning

    monkeypatch.setattr(_planning, "multiprocessors", lambda index: 132)
    capturing = False
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    gpu = torch.device("cuda", 0)
    heads_q, heads_kv, head_dim = 32, 8, 128
    for batch, prefix_len, suffix_len in [(64, 8192, 512), (256, 4096, 256), (16, 32768, 1024), (1, 32768, 1),
                                          (256, 4096, 1), (4, 600, 10)]:  # fmt: skip
        prefix_splits, suffix_splits = cascade_module.cascade_splits(
            batch, heads_q, heads_kv, head_dim, batch, 1, suffix_len, prefix_len, gpu
        )
        assert 0 <= prefix_splits <= min(128, max(1, prefix_len // 256)) and suffix_splits >= 1
        assert prefix_splits > 0 or suffix_splits == 1
        state_bytes = prefix_splits * batch * heads_q * (head_dim + 1) * 4 * 2
        one_wave = 132 // (heads_kv * -(-batch * heads_q // heads_kv // 64))
        assert (prefix_splits <= max(1, one_wave) or state_bytes <= 2 * prefix_len * heads_kv * head_dim * 2 // 2
                or batch * 8 < 264)  # fmt: skip
    assert cascade_module.cascade_splits(64, heads_q, heads_kv, head_dim, 64, 1, 512, 8192, gpu) == (4, 1)
    assert cascade_module.cascade_splits(256, heads_q, heads_kv, head_dim, 256, 1, 256, 4096, gpu) == (1, 1)
    assert cascade_module.cascade_splits(16, heads_q, heads_kv, head_dim, 16, 1, 1024, 32768, gpu) == (16, 2)
    # Long suffixes: a prefix chunk holds at most 2048 keys per wave of suffix programs, else
    # the prefix programs are the launch's long pole (H200: 16 x 32768 x 4096 in 8 chunks
    # 22% faster than in 4).
    assert cascade_module.cascade_splits(16, heads_q, heads_kv, head_dim, 16, 1, 4096, 16384, gpu) == (4, 2)
    assert cascade_module.cascade_splits(16, heads_q, heads_kv, head_dim, 16, 1, 4096, 32768, gpu) == (8, 2)
    # One sequence: the prefix chunks fill two waves of the GPU (8 KV heads x 32 chunks + 8 suffix programs).
    assert cascade_module.cascade_splits(1, heads_q, heads_kv, head_dim, 1, 1, 1, 32768, gpu) == (32, 1)
    assert cascade_module.cascade_splits(3, heads_q, heads_kv, head_dim, 3, 1, 100, 8192, torch.device("cpu")) == (1, 1)
    # Host-bound shapes: one launch, no merge; 64 x (2048 + 1) keys are too many for it.
    assert cascade_module.cascade_splits(64, heads_q, heads_kv, head_dim, 64, 1, 256, 512, gpu) == (0, 1)
    # Short suffixes: the prefix's 32 or 64 tiles get chunks up to one wave of them past the
    # state cap (H200 graph replay, 64 x 2048 x 1: 25.1 against 38.6 us in 1 chunk; 64 x 4096 x 1:
    # 31.5 against 37.7 in 3; 128 x 4096 x 1: 49.0 against 67.6 in 1).
    assert cascade_module.cascade_splits(64, heads_q, heads_kv, head_dim, 64, 1, 1, 2048, gpu) == (2, 1)
    assert cascade_module.cascade_splits(64, heads_q, heads_kv, head_dim, 64, 1, 1, 4096, gpu) == (4, 1)
    assert cascade_module.cascade_splits(128, heads_q, heads_kv, head_dim, 128, 1, 1, 4096, gpu) == (2, 1)
    # One sequence merges inside its split launch anyway: its prefix is split.
    assert cascade_module.cascade_splits(1, heads_q, heads_kv, head_dim, 1, 1, 1, 512, gpu) == (2, 1)
    # float32 KV has twice the bytes to walk: the same 64 x (512 + 256) keys stay split.
    assert cascade_module.cascade_splits(64, heads_q, heads_kv, head_dim, 64, 1, 256, 512, gpu, 4) == (1, 1)
    capturing = True
    assert cascade_module.cascade_splits(64, heads_q, heads_kv, head_dim, 64, 1, 256, 512, gpu) == (1, 1)
    # No query at all: one chunk, not a division by the query count.
    assert cascade_module.cascade_splits(4, heads_q, heads_kv, head_dim, 0, 0, 16, 4096, gpu) == (1, 1)


def test_split_kv_counts_follow_the_h200_sweep(monkeypatch):
    """On a 132-multiprocessor GPU, split-KV decode (32 / 8 heads, one query) takes the
    chunk counts the H200 sweep measured fastest or within 3% of it
    (benchmarks/results/split_counts_h200.log): a batch of at most one program per
    multiprocessor is split to about two per multiprocessor, a larger one toward eight
    in chunks of at least 2048 keys; never more than 128 chunks or one under 256 keys."""
    # Internal on purpose: the test is about the planner on a given GPU, faked through its multiprocessor count.
    from splitkv import _planning

    monkeypatch.setattr(_planning, "multiprocessors", lambda index: 132)
    gpu = torch.device("cuda", 0)
    measured = {(256, 256): 1, (64, 512): 1, (128, 1024): 1, (32, 2048): 1, (64, 4096): 2, (64, 8704): 3,
                (8, 16384): 4, (256, 4352): 1, (1, 1 << 20): 33}  # fmt: skip
    for (sequences, keys), chunks in measured.items():
        assert splitkv.split_kv.choose_num_splits(sequences, 8, 4, keys, gpu) == chunks, (sequences, keys)
    assert splitkv.split_kv.choose_num_splits(1, 8, 4, 2000, gpu) == 7  # chunks of at least 256 keys
    assert splitkv.split_kv.choose_num_splits(1, 1, 1, 1 << 30, gpu) == 128
    assert splitkv.split_kv.choose_num_splits(0, 8, 4, 4096, gpu) >= 1
    assert splitkv.split_kv.choose_num_splits(64, 8, 4, 4096, torch.device("cpu")) == 1


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("sequences", [4, 1])
def test_cascade_in_cuda_graph(sequences, rng):
    """A shape that runs eagerly as the single-launch cascade (4 sequences), or as a launch
    that merges its own states (one sequence), is captured as the split cascade with its
    merge (whose kernels are first compiled during the capture) and, replayed on new
    queries, still equals full attention."""
    batch = _shared_prefix_batch(rng, sequences, 300, 20, True, 8, 2, 64, torch.bfloat16)
    q, lens_q, prefix_k, prefix_v, suffix_k, suffix_v, lens_k = batch
    cu_q, cu_k = cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE)
    lengths = {"max_seqlen_q": max(lens_q), "max_seqlen_k": max(lens_k)}
    splits = cascade_module.cascade_splits(sequences, 8, 2, 64, q.shape[0], max(lens_q), max(lens_k), 300, q.device)
    assert splits == ((0, 1) if sequences > 1 else (1, 1))

    def call():
        return splitkv.cascade_attention(q, cu_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_k, return_lse=True,
                                         **lengths)  # fmt: skip

    graph, (captured_out, captured_lse) = capture_graph(call)
    q.copy_(random_tokens(q.shape[0], 8, 64, q.dtype, DEVICE, rng[1]))
    captured_out.fill_(float("nan"))
    graph.replay()
    ref_out, ref_lse = _full_attention_reference(q, *batch[1:], 64**-0.5)
    assert_attention_close(captured_out, captured_lse, ref_out, ref_lse, torch.bfloat16)
    assert_attention_close(*call(), ref_out, ref_lse, torch.bfloat16)


def test_cascade_rejects_queries_before_the_prefix_end():
    q = torch.randn(3, 2, 64)
    kv = torch.randn(1, 2, 64)
    with pytest.raises(ValueError, match="sequence 0 has 3 queries but 1 suffix keys"):
        splitkv.cascade_attention(q, cu_seqlens([3], "cpu"), kv, kv, kv, kv, cu_seqlens([1], "cpu"))
    with pytest.raises(ValueError, match="prefix_k must be \\[prefix_len, heads_kv, head_dim\\]"):
        splitkv.cascade_attention(q[:1], cu_seqlens([1], "cpu"), torch.randn(4, 1, 64), kv, kv, kv,
                                  cu_seqlens([1], "cpu"))  # fmt: skip
    with pytest.raises(TypeError, match="prefix_k must be a torch.Tensor"):  # None is not "no prefix" here
        splitkv.cascade_attention(q[:1], cu_seqlens([1], "cpu"), None, None, kv, kv, cu_seqlens([1], "cpu"))


@pytest.mark.parametrize("cascade", [True, "auto"])
def test_cascade_with_no_query(cascade):
    """A batch with no query token (a step or a rank with none) returns empty results:
    on the GPU the split counts were planned per query row and divided by zero."""
    gen = torch.Generator().manual_seed(5)
    q = random_tokens(0, 4, 64, torch.float16, DEVICE, gen)
    prefix = random_tokens(1024, 2, 64, torch.float16, DEVICE, gen)
    suffix = random_tokens(6, 2, 64, torch.float16, DEVICE, gen)
    out, lse = splitkv.cascade_attention(q, cu_seqlens([0, 0], DEVICE), prefix, prefix, suffix, suffix,
                                         cu_seqlens([2, 4], DEVICE), cascade=cascade, return_lse=True)  # fmt: skip
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0)


def test_cost_model():
    # Many sequences over a long prefix: cascade reads the prefix once instead of 64 times.
    assert splitkv.use_cascade(64, 8192, 64 * 512, 64, heads_q=32, heads_kv=8, head_dim=128)
    big = estimate_cascade(256, 4096, 256 * 256, 256, 32, 8, 128)
    assert big.plain_us > 5 * big.cascade_us
    # One sequence shares nothing; a prefix of two tokens is not worth the partial states.
    assert not splitkv.use_cascade(1, 8192, 512, 1, heads_q=32, heads_kv=8, head_dim=128)
    assert not splitkv.use_cascade(64, 2, 64 * 4096, 64, heads_q=32, heads_kv=8, head_dim=128)
    # A long prefill is bound by the same arithmetic either way.
    assert not splitkv.use_cascade(4, 1024, 4 * 4096, 4 * 4096, heads_q=32, heads_kv=8, head_dim=128)


def test_cost_model_bandwidth_follows_the_device(monkeypatch):
    """The model's bandwidth: the H100 fit scaled by the device's copy bandwidth, from its
    memory clock and bus width, else from a table of measured devices by name, else the
    H100's; the H100 fit itself on a CPU device or for no device."""
    from types import SimpleNamespace

    # Internal on purpose: the test is about the planner's bandwidth model and its cache.
    from splitkv import _planning

    devices = {
        0: SimpleNamespace(name="NVIDIA H100 80GB HBM3", memory_clock_rate=2_619_000, memory_bus_width=5120),
        1: SimpleNamespace(name="NVIDIA H200", memory_clock_rate=3_125_000, memory_bus_width=6144),  # 4.8 TB/s peak
        2: SimpleNamespace(name="NVIDIA H200"),  # a torch that does not report the memory clock
        3: SimpleNamespace(name="Some Future GPU"),
    }
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: devices[index])
    _planning._bytes_per_us_of.cache_clear()
    try:
        rate = {index: _planning.device_bytes_per_us(torch.device("cuda", index)) for index in devices}
    finally:
        _planning._bytes_per_us_of.cache_clear()
    fitted = _planning.FITTED_BYTES_PER_US
    # 2 x 2.619 GHz x 640 bytes = 3.35 TB/s peak, 90% of it copied: the H100's measured 3.0 TB/s.
    assert abs(rate[0] - 2 * 2.619e3 * 640 * 0.9 * fitted / 3.0e6) < 1 and abs(rate[0] / fitted - 1) < 0.01
    assert abs(rate[1] - 2 * 3.125e3 * 768 * 0.9 * fitted / 3.0e6) < 1
    assert abs(rate[2] - 4.3e6 * fitted / 3.0e6) < 1 and rate[3] == fitted
    assert _planning.device_bytes_per_us(torch.device("cpu")) == _planning.device_bytes_per_us(None) == fitted
    # A faster memory makes the memory-bound estimates shorter.
    shape = (64, 8192, 64 * 512, 64, 32, 8, 128)
    monkeypatch.setattr(_planning, "device_bytes_per_us", lambda device: rate[1] if device is not None else fitted)
    on_h200 = _planning.estimate_cascade(*shape, device=torch.device("cuda", 1))
    assert on_h200.plain_us < estimate_cascade(*shape).plain_us


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reads a CUDA device's memory clock and bus width")
def test_cost_model_bandwidth_of_this_gpu():
    """On a device with a measured copy figure (H100, H200), the bandwidth derived from its
    properties is within 10% of the one that figure gives."""
    # Internal on purpose: the test is about the planner's table of measured devices.
    from splitkv import _planning

    name = torch.cuda.get_device_properties(0).name
    measured = [copy for known, copy in _planning._MEASURED_COPY_BYTES_PER_US.items() if known in name]
    if not measured:
        pytest.skip(f"no measured copy bandwidth for {name}")
    want = _planning.FITTED_BYTES_PER_US * measured[0] / _planning._MEASURED_COPY_BYTES_PER_US["H100"]
    assert abs(_planning.device_bytes_per_us(torch.device("cuda", 0)) / want - 1) < 0.1


SPLIT_COUNTS = [None, 1, 3, 8]


@pytest.mark.parametrize(
    "causal,num_splits,dtype",
    grid([False, True], SPLIT_COUNTS, DTYPES,
         default=_every_dtype_once(lambda causal, splits: int(causal) + SPLIT_COUNTS.index(splits))),
)  # fmt: skip
def test_split_kv_equals_full_attention(dtype, num_splits, causal, rng):
    _py, gen = rng
    lengths = [(1, 90), (0, 7), (12, 12), (4, 0), (9, 4), (2, 61)]
    if HAS_CUDA:
        lengths += [(1, 32768), (1, 5000), (128, 3000)]
    lens_q, lens_k = [a for a, _ in lengths], [b for _, b in lengths]
    q = random_tokens(sum(lens_q), 8, 64, dtype, DEVICE, gen)
    k = random_tokens(sum(lens_k), 2, 64, dtype, DEVICE, gen)
    v = random_tokens(sum(lens_k), 2, 64, dtype, DEVICE, gen)
    args = (q, k, v, cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE), max(lens_q), max(lens_k))
    out, lse = splitkv.split_kv_attention(*args, causal=causal, num_splits=num_splits)
    ref_out, ref_lse = reference64(*args, causal, 64**-0.5)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


def test_split_kv_rejects_bad_split_count():
    q = torch.randn(1, 2, 64)
    with pytest.raises(ValueError, match="num_splits must be an int >= 1"):
        splitkv.split_kv_attention(q, q, q, cu_seqlens([1], "cpu"), cu_seqlens([1], "cpu"), 1, 1, num_splits=0)
