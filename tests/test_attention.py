"""attention_with_lse: every available backend against the float64 reference, and its argument checks."""

import importlib.util
import zlib

import pytest
import torch
from attention_reference import assert_attention_close, cu_seqlens, random_tokens, reference64
from grids import grid, rotate

import splitkv
from splitkv._triton_support import TRITON_IMPORT_ERROR

# Internal on purpose: test_old_flash_attn_padded_lse_layout tests this helper itself.
from splitkv.attention import _unpad_lse

HAS_CUDA = torch.cuda.is_available()
FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None
DEVICE = "cuda" if HAS_CUDA else "cpu"


def backends():
    names = ["reference"]
    if not TRITON_IMPORT_ERROR:
        names.append("triton")
    names.append(pytest.param("torch", marks=pytest.mark.skipif(not HAS_CUDA, reason="torch's flash attention needs CUDA")))
    names.append(pytest.param("flash_attn", marks=pytest.mark.skipif(
        not (HAS_CUDA and FLASH_ATTN_INSTALLED), reason="needs CUDA and the flash-attn package")))  # fmt: skip
    return names


@pytest.fixture
def generator(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


# (Lq, Lk) per sequence: decode, an empty query sequence, a square prefill, an empty
# KV sequence, Lq > Lk (leading causal rows see no key), Lq < Lk.
LENGTHS = [(1, 33), (0, 4), (37, 37), (5, 0), (20, 9), (3, 50)]
GPU_LENGTHS = [(1, 4097), (300, 300), (700, 260), (64, 2000)]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = [(4, 4), (8, 2), (8, 1)]
HEAD_DIMS = [64, 128, 256]


def _matches_reference_default(causal, head_dim, heads_q, heads_kv, dtype, backend) -> bool:
    """The default run: the reference backend on the whole grid (cheap), the kernels on
    every (causal, head_dim, heads) case at one dtype (rotating); the rest under -m slow."""
    index = int(causal) + HEAD_DIMS.index(head_dim) + HEADS.index((heads_q, heads_kv))
    return backend == "reference" or dtype is rotate(index, DTYPES)


@pytest.mark.parametrize("causal,head_dim,heads_q,heads_kv,dtype,backend",
                         grid([False, True], HEAD_DIMS, HEADS, DTYPES, backends(), default=_matches_reference_default))  # fmt: skip
def test_matches_reference(backend, dtype, heads_q, heads_kv, head_dim, causal, generator):
    if backend in ("torch", "flash_attn") and dtype == torch.float32:
        pytest.skip("flash attention takes float16/bfloat16 only")
    if backend == "triton" and not HAS_CUDA and (head_dim == 256 or heads_q == 4):
        pytest.skip("kept small for the Triton interpreter on CPU (runs on GPU)")
    lengths = LENGTHS + (GPU_LENGTHS if HAS_CUDA else [])
    lens_q, lens_k = [lq for lq, _ in lengths], [lk for _, lk in lengths]
    q = random_tokens(sum(lens_q), heads_q, head_dim, dtype, DEVICE, generator)
    k = random_tokens(sum(lens_k), heads_kv, head_dim, dtype, DEVICE, generator)
    v = random_tokens(sum(lens_k), heads_kv, head_dim, dtype, DEVICE, generator)
    cu_q, cu_k = cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE)
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    out, lse = splitkv.attention_with_lse(*args, causal=causal, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (heads_q, q.shape[0]) and lse.dtype == torch.float32
    ref_out, ref_lse = reference64(*args, causal, head_dim**-0.5)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("with_seqused_k", [False, True])
@pytest.mark.parametrize("heads_q,heads_kv", HEADS)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_backend_matches_float64_on_random_batches(causal, heads_q, heads_kv, with_seqused_k, generator):
    """The package's reference backend is a backend like the others: on random batches
    (random lengths, among them an empty query sequence, an empty key sequence with
    queries and Lq > Lk, in random order; GQA / MQA; causal or not; seqused_k or not) it
    matches the float64 softmax of the test helpers at every dtype."""
    # (Lq, Lk) pairs: three edges, then random ones; a random order.
    random_pairs = torch.randint(1, 24, (4, 2), generator=generator).tolist()
    pairs = [(0, 5), (4, 0), (9, 3)] + [tuple(pair) for pair in random_pairs]
    pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=generator).tolist()]
    lens_q, lens_k = [lq for lq, _ in pairs], [lk for _, lk in pairs]
    head_dim = int(torch.randint(8, 40, (), generator=generator))
    scale = float(torch.empty(()).uniform_(0.05, 1.0, generator=generator))
    seqused_k = None
    if with_seqused_k:  # each sequence uses a random prefix (possibly empty, possibly all) of its keys
        used = [int(torch.randint(n + 1, (), generator=generator)) for n in lens_k]
        seqused_k = torch.tensor(used, dtype=torch.int32)
    cu_q, cu_k = cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")
    for dtype in DTYPES:
        q = random_tokens(sum(lens_q), heads_q, head_dim, dtype, "cpu", generator)
        k = random_tokens(sum(lens_k), heads_kv, head_dim, dtype, "cpu", generator)
        v = random_tokens(sum(lens_k), heads_kv, head_dim, dtype, "cpu", generator)
        args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
        out, lse = splitkv.attention_with_lse(*args, causal=causal, softmax_scale=scale, seqused_k=seqused_k,
                                              backend="reference")  # fmt: skip
        ref_out, ref_lse = reference64(*args, causal, scale, seqused_k=seqused_k)
        assert out.dtype == dtype and out.shape == q.shape and lse.shape == (heads_q, q.shape[0])
        assert (out.transpose(0, 1)[torch.isneginf(ref_lse)] == 0).all(), "a row that sees no key has output 0"
        assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("lens_q,lens_k", [([0, 0], [5, 3]), ([2, 1], [0, 0]), ([0], [0])])
def test_no_query_or_no_key_at_all(backend, lens_q, lens_k, generator):
    """A batch without a single query (a context-parallel rank holding none) or without a
    single key: empty / zero outputs and LSE -inf, no kernel launched (flash refuses a
    zero-sized grid)."""
    dtype = torch.bfloat16
    q = random_tokens(sum(lens_q), 8, 64, dtype, DEVICE, generator)
    k = random_tokens(sum(lens_k), 2, 64, dtype, DEVICE, generator)
    args = (q, k, k.clone(), cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE), max(lens_q), max(lens_k))
    out, lse = splitkv.attention_with_lse(*args, causal=True, backend=backend)
    assert out.shape == q.shape and lse.shape == (8, q.shape[0]) and lse.dtype == torch.float32
    assert (out == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("backend", [b for b in backends() if getattr(b, "values", [b])[0] != "flash_attn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_seqused_k_reads_a_cache_in_place(backend, dtype, causal, generator):
    """Each sequence owns ``capacity`` cache slots and uses the first seqused_k[i]; the
    unused slots hold NaN, so reading one would show. Equal to attention over the
    packed used keys."""
    if backend == "torch" and dtype == torch.float32:
        pytest.skip("flash attention takes float16/bfloat16 only")
    capacity, heads_q, heads_kv, head_dim = 40, 8, 2, 64
    lens_q, used = [1, 3, 0, 5, 2], [17, 40, 6, 5, 0]
    cache_k = torch.full((len(used) * capacity, heads_kv, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    cache_v = cache_k.clone()
    packed_k = random_tokens(sum(used), heads_kv, head_dim, dtype, DEVICE, generator)
    packed_v = random_tokens(sum(used), heads_kv, head_dim, dtype, DEVICE, generator)
    rows = torch.cat([torch.arange(i * capacity, i * capacity + n) for i, n in enumerate(used)]).to(DEVICE)
    cache_k[rows], cache_v[rows] = packed_k, packed_v
    q = random_tokens(sum(lens_q), heads_q, head_dim, dtype, DEVICE, generator)
    cu_q = cu_seqlens(lens_q, DEVICE)
    cu_cache = cu_seqlens([capacity] * len(used), DEVICE)
    seqused_k = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    out, lse = splitkv.attention_with_lse(q, cache_k, cache_v, cu_q, cu_cache, max(lens_q), max(used), causal=causal,
                                          seqused_k=seqused_k, backend=backend)  # fmt: skip
    ref_out, ref_lse = reference64(q, packed_k, packed_v, cu_q, cu_seqlens(used, DEVICE), max(lens_q), max(used),
                                   causal, head_dim**-0.5)  # fmt: skip
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


def test_seqused_k_checks():
    q, kv = torch.randn(2, 2, 16), torch.randn(8, 2, 16)
    cu_q, cu_k = cu_seqlens([1, 1], "cpu"), cu_seqlens([4, 4], "cpu")
    with pytest.raises(ValueError, match="seqused_k must lie in"):
        splitkv.attention_with_lse(q, kv, kv, cu_q, cu_k, 1, 5, seqused_k=torch.tensor([5, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen_k = 2 is below the longest used sequence"):
        splitkv.attention_with_lse(q, kv, kv, cu_q, cu_k, 1, 2, seqused_k=torch.tensor([3, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="seqused_k must have dtype torch.int32"):
        splitkv.attention_with_lse(q, kv, kv, cu_q, cu_k, 1, 4, seqused_k=torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="seqused_k must be \\[batch\\] = \\[2\\]"):
        splitkv.attention_with_lse(q, kv, kv, cu_q, cu_k, 1, 4, seqused_k=torch.tensor([3], dtype=torch.int32))
    # A max_seqlen_k below the segment length is fine when seqused_k says fewer keys are used.
    out, _ = splitkv.attention_with_lse(q, kv, kv, cu_q, cu_k, 1, 3, seqused_k=torch.tensor([3, 1], dtype=torch.int32))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", backends())
def test_custom_scale_and_strided_inputs(backend, generator):
    dtype = torch.float16
    lens_q, lens_k = [3, 1], [40, 17]
    wide = random_tokens(sum(lens_q), 12, 72, dtype, DEVICE, generator)
    q = wide[:, 2:10, 8:72]  # head and token strides of a wider buffer, contiguous last dim
    k = random_tokens(sum(lens_k), 6, 64, dtype, DEVICE, generator)[:, ::3]
    v = random_tokens(sum(lens_k), 2, 64, dtype, DEVICE, generator)
    cu_q, cu_k = cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE)
    out, lse = splitkv.attention_with_lse(q, k, v, cu_q, cu_k, 3, 40, causal=True, softmax_scale=0.3,
                                          backend=backend)  # fmt: skip
    ref_out, ref_lse = reference64(q, k, v, cu_q, cu_k, 3, 40, True, 0.3)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.skipif(not HAS_CUDA, reason="checks the flash backends' alignment limit, on CUDA")
def test_misaligned_view_avoids_flash(generator):
    """Flash kernels fault on rows that are not 16-byte aligned: auto takes Triton instead."""
    q = random_tokens(4, 4, 72, torch.float16, DEVICE, generator)[:, :, 4:68]
    k = v = random_tokens(9, 2, 64, torch.float16, DEVICE, generator)
    cu_q, cu_k = cu_seqlens([4], DEVICE), cu_seqlens([9], DEVICE)
    report = splitkv.explain_attention(q, k, v, cu_q, cu_k, 4, 9)
    assert "torch: flash attention needs 16-byte aligned rows; q starts or strides off that" in report
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        splitkv.attention_with_lse(q, k, v, cu_q, cu_k, 4, 9, backend="torch")
    out, lse = splitkv.attention_with_lse(q, k, v, cu_q, cu_k, 4, 9)
    ref_out, ref_lse = reference64(q, k, v, cu_q, cu_k, 4, 9, False, 64**-0.5)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)


def test_auto_choice_and_explain():
    q = torch.randn(3, 4, 64, device=DEVICE, dtype=torch.float16)
    k = v = torch.randn(5, 2, 64, device=DEVICE, dtype=torch.float16)
    cu_q, cu_k = cu_seqlens([3], DEVICE), cu_seqlens([5], DEVICE)
    report = splitkv.explain_attention(q, k, v, cu_q, cu_k, 3, 5)
    first = report.splitlines()[0]
    if not HAS_CUDA:
        assert first == "attention_with_lse(backend='auto') -> reference", report
        assert "flash_attn: " in report and "torch: tensors are on cpu" in report
    else:
        # 3 query rows x GQA 2 = 6 rows per KV head: a decode shape, which auto gives splitkv's Triton kernel.
        assert first.endswith("-> triton"), report
        assert "a decode shape (6 query rows per KV head and sequence" in report, report
        wide = q.new_zeros((24, 4, 64))  # 24 queries x 2 = 48 rows: flash attention's
        wide_report = splitkv.explain_attention(wide, k, v, cu_seqlens([24], DEVICE), cu_k, 24, 5)
        assert wide_report.splitlines()[0].endswith("-> flash_attn" if FLASH_ATTN_INSTALLED else "-> torch"), wide_report


@pytest.mark.parametrize("backend", backends())
def test_backends_declare_what_they_do(backend, generator):
    """A backend's declared facts hold: its run gives a row that saw no key the declared
    LSE, a head_dim above its declared limit is refused, and explain_attention prints them."""
    from splitkv.attention import ATTENTION_BACKENDS

    declared = ATTENTION_BACKENDS[backend]
    dtype = declared.dtypes[-1]
    q = random_tokens(3, 4, 16, dtype, DEVICE, generator)
    k = v = random_tokens(2, 2, 16, dtype, DEVICE, generator)
    cu_q, cu_k = cu_seqlens([1, 2], DEVICE), cu_seqlens([0, 2], DEVICE)  # the first sequence has no key
    _, raw_lse = declared.run(q, k, v, cu_q, cu_k, 2, 2, False, 0.25, None)
    assert (raw_lse[:, 0] == declared.empty_row_lse).all() and raw_lse[:, 1:].isfinite().all()
    _, lse = splitkv.attention_with_lse(q, k, v, cu_q, cu_k, 2, 2, softmax_scale=0.25, backend=backend)
    assert (lse[:, 0] == float("-inf")).all()
    if declared.max_head_dim is not None:
        wide = q.new_zeros((3, 4, declared.max_head_dim + 8))
        reason = declared.why_not(wide, wide, wide, False, None, 2, 2)
        assert reason is not None and "head_dim" in reason
    report = splitkv.explain_attention(q, k, v, cu_q, cu_k, 2, 2)
    assert f"  {backend}: " in report and f"    declares: {declared.declared()}" in report
    assert ("partial states" in declared.declared()) == declared.writes_partial_states


def test_old_flash_attn_padded_lse_layout():
    # Tests the internal _unpad_lse itself: flash-attn >= 2.6 (the only one CI can install) never takes it.
    """flash-attn < 2.6 returned LSE as [batch, heads, max_seqlen_q]; it is unpadded to [heads, total_q]."""
    lens = [2, 0, 3]
    cu_q = cu_seqlens(lens, "cpu")
    padded = torch.randn(3, 4, 3)
    flat = _unpad_lse(padded, cu_q, 5)
    want = torch.cat([padded[0, :, :2], padded[2, :, :3]], dim=1)
    assert torch.equal(flat, want)


def _good(dtype=torch.float16):
    q = torch.randn(4, 4, 64, dtype=dtype)
    k = torch.randn(6, 2, 64, dtype=dtype)
    return {"q": q, "k": k, "v": k.clone(), "cu_seqlens_q": cu_seqlens([1, 3], "cpu"),
            "cu_seqlens_k": cu_seqlens([2, 4], "cpu"), "max_seqlen_q": 3, "max_seqlen_k": 4}  # fmt: skip


BAD = [
    ("q", lambda a: a["q"][0], ValueError, "q must be \\[total_q, heads_q, head_dim\\]"),
    ("q", lambda a: a["q"].to(torch.int8), TypeError, "q must be float32, float16 or bfloat16"),
    ("k", lambda a: a["k"].float(), TypeError, "k must have dtype torch.float16"),
    ("k", lambda a: a["k"][:, :, :32], ValueError, "k must have q's head_dim 64"),
    ("k", lambda a: torch.randn(6, 3, 64, dtype=torch.float16), ValueError, "must be a multiple of k's heads"),
    ("v", lambda a: a["v"][:5], ValueError, "v must be \\[total_k, heads_kv, head_dim\\] like k"),
    ("v", lambda a: a["v"].transpose(1, 2).contiguous().transpose(1, 2), ValueError, "v must have a contiguous last dim"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].long(), TypeError, "cu_seqlens_q must have dtype torch.int32"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"][None], ValueError, "cu_seqlens_q must be \\[batch \\+ 1\\]"),
    ("cu_seqlens_k", lambda a: cu_seqlens([3, 4], "cpu"), ValueError, "cu_seqlens_k must rise from 0 to 6"),
    ("cu_seqlens_k", lambda a: cu_seqlens([2, 2, 2], "cpu"), ValueError, "cu_seqlens_k must have one entry per"),
    ("max_seqlen_q", lambda a: 2, ValueError, "max_seqlen_q = 2 is below the longest sequence \\(3\\)"),
    ("max_seqlen_k", lambda a: 4.0, TypeError, "max_seqlen_k must be a non-negative int"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].to("meta"), ValueError, "cu_seqlens_q must be on cpu like q"),
    # The right values at stride 2: the kernels would read every entry from the wrong place.
    ("cu_seqlens_k", lambda a: a["cu_seqlens_k"].repeat_interleave(2)[::2], ValueError,
     "cu_seqlens_k must have a contiguous last dim"),
    ("seqused_k", lambda a: torch.tensor([2, 0, 4, 0], dtype=torch.int32)[::2], ValueError,
     "seqused_k must have a contiguous last dim"),
]


@pytest.mark.parametrize("name,corrupt,exc,message", BAD)
def test_bad_input_names_the_argument(name, corrupt, exc, message):
    args = _good()
    args[name] = corrupt(args)
    with pytest.raises(exc, match=message):
        splitkv.attention_with_lse(**args)


def _good_cuda():
    return {name: value.cuda() if isinstance(value, torch.Tensor) else value for name, value in _good().items()}


def _cuda_checks():
    from splitkv import _cuda

    if _cuda.load_error():
        pytest.skip(f"the CUDA extension is not loaded: {_cuda.load_error()}")
    return _cuda.eager_ops.attention_inputs_ok


def _fast_check(check, args, softmax_scale=None, prefix_k=None, prefix_v=None):
    return check(args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"], args["max_seqlen_q"],
                 args["max_seqlen_k"], softmax_scale, prefix_k, prefix_v)  # fmt: skip


# CUDA inputs that only the values of CPU cu_seqlens could show wrong are trusted; the rest is checked.
BAD_CUDA = [
    ("q", lambda a: a["q"][0], ValueError, "q must be \\[total_q, heads_q, head_dim\\]"),
    ("q", lambda a: a["q"].to(torch.int8), TypeError, "q must be float32, float16 or bfloat16"),
    ("q", lambda a: a["q"].transpose(1, 2).contiguous().transpose(1, 2), ValueError, "q must have a contiguous last"),
    ("k", lambda a: a["k"].float(), TypeError, "k must have dtype torch.float16"),
    ("k", lambda a: a["k"][:, :, :32], ValueError, "k must have q's head_dim 64"),
    ("k", lambda a: a["k"][:, :0], ValueError, "must be a multiple of k's heads \\(0\\)"),
    ("k", lambda a: torch.randn(6, 3, 64, dtype=torch.float16, device="cuda"), ValueError, "a multiple of k's heads"),
    ("k", lambda a: a["k"].cpu(), ValueError, "k must be on cuda:0 like the other inputs"),
    ("v", lambda a: a["v"][:5], ValueError, "v must be \\[total_k, heads_kv, head_dim\\] like k"),
    ("v", lambda a: a["v"].transpose(1, 2).contiguous().transpose(1, 2), ValueError, "v must have a contiguous last"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].long(), TypeError, "cu_seqlens_q must have dtype torch.int32"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"][None], ValueError, "cu_seqlens_q must be \\[batch \\+ 1\\]"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"][:0], ValueError, "cu_seqlens_q must be \\[batch \\+ 1\\]"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].cpu(), ValueError, "cu_seqlens_q must be on cuda:0 like q"),
    ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].repeat_interleave(2)[::2], ValueError,
     "cu_seqlens_q must have a contiguous last dim"),
    ("cu_seqlens_k", lambda a: cu_seqlens([2, 2, 2], "cuda"), ValueError, "cu_seqlens_k must have one entry per"),
    ("max_seqlen_q", lambda a: -1, TypeError, "max_seqlen_q must be a non-negative int"),
    ("max_seqlen_q", lambda a: True, TypeError, "max_seqlen_q must be a non-negative int"),
    ("max_seqlen_k", lambda a: 4.0, TypeError, "max_seqlen_k must be a non-negative int"),
]


@pytest.mark.skipif(not HAS_CUDA, reason="the C++ argument checks take CUDA inputs")
@pytest.mark.parametrize("name,corrupt,exc,message", BAD_CUDA)
def test_bad_cuda_input_is_refused_by_the_cpp_checks(name, corrupt, exc, message):
    """The one-call C++ checks pass good CUDA inputs and refuse each bad one, which the
    Python checks then name."""
    check = _cuda_checks()
    args = _good_cuda()
    assert _fast_check(check, args) and _fast_check(check, args, softmax_scale=0.1)
    args[name] = corrupt(args)
    assert not _fast_check(check, args)
    with pytest.raises(exc, match=message):
        splitkv.attention_with_lse(**args)


@pytest.mark.skipif(not HAS_CUDA, reason="the C++ argument checks take CUDA inputs")
def test_bad_cuda_scale_and_prefix_are_refused_by_the_cpp_checks():
    check = _cuda_checks()
    args = _good_cuda()
    prefix = torch.randn(5, 2, 64, dtype=torch.float16, device="cuda")
    assert _fast_check(check, args, prefix_k=prefix, prefix_v=prefix.clone())
    for scale in ("0.1", True, float("nan"), float("inf"), -1.0, 0.0, 0):
        assert not _fast_check(check, args, softmax_scale=scale)
        with pytest.raises((TypeError, ValueError), match="softmax_scale must be a"):
            splitkv.attention_with_lse(**args, softmax_scale=scale)
    assert _fast_check(check, args, softmax_scale=2)  # a Python int is a scale
    empty_dim = {**args, "q": args["q"][:, :, :0], "k": args["k"][:, :, :0], "v": args["v"][:, :, :0]}
    assert not _fast_check(check, empty_dim)
    with pytest.raises(ValueError, match="head_dim must be positive"):
        splitkv.attention_with_lse(**empty_dim)
    bad_prefixes = [(prefix[:, :1], prefix), (prefix, prefix[:4]), (prefix, prefix.float()), (prefix.cpu(), prefix),
                    (prefix[0], prefix), (prefix, None), (None, prefix),
                    (prefix, prefix.transpose(0, 2).contiguous().transpose(0, 2))]  # fmt: skip
    for prefix_k, prefix_v in bad_prefixes:
        assert not _fast_check(check, args, prefix_k=prefix_k, prefix_v=prefix_v)
        with pytest.raises((ValueError, TypeError), match="prefix_[kv] must"):
            splitkv.cascade_attention(args["q"], args["cu_seqlens_q"], prefix_k, prefix_v, args["k"], args["v"],
                                      args["cu_seqlens_k"], max_seqlen_q=3, max_seqlen_k=4)  # fmt: skip


def test_bad_scale_and_backend():
    with pytest.raises(TypeError, match="softmax_scale must be a positive float or None"):
        splitkv.attention_with_lse(**_good(), softmax_scale="0.1")
    with pytest.raises(ValueError, match="backend must be one of"):
        splitkv.attention_with_lse(**_good(), backend="xformers")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="backend='torch' cannot run these inputs: tensors are on cpu"):
            splitkv.attention_with_lse(**_good(), backend="torch")


def test_argument_holes_of_issue_21():
    args = _good(torch.float32)
    with pytest.raises(TypeError, match="causal must be a bool"):
        splitkv.attention_with_lse(**args, causal="False")
    for scale in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="softmax_scale must be a finite positive float"):
            splitkv.attention_with_lse(**args, softmax_scale=scale)
    empty_dim = {**args, "q": args["q"][:, :, :0], "k": args["k"][:, :, :0], "v": args["v"][:, :, :0]}
    with pytest.raises(ValueError, match="head_dim must be positive"):
        splitkv.attention_with_lse(**empty_dim)
    meta = {name: t.to("meta") if isinstance(t, torch.Tensor) else t for name, t in args.items()}
    with pytest.raises(ValueError, match="meta device"):
        splitkv.attention_with_lse(**meta)
    with pytest.raises(ValueError, match="lse_base must be"):
        splitkv.attention_with_lse(**args, lse_base="10")
    for count in (-1, 2.5, "3"):
        with pytest.raises((TypeError, ValueError), match="num_sequences must be an int"):
            splitkv.use_cascade(count, 10, 10, 1, 4, 2, 16)
    q, k, v = args["q"], args["k"], args["v"]
    cu_q, cu_k = args["cu_seqlens_q"], args["cu_seqlens_k"]
    with pytest.raises(ValueError, match="cascade must be True, False or 'auto'"):
        splitkv.cascade_attention(q, cu_q, k[:1], v[:1], k, v, cu_k, cascade="yes")
    with pytest.raises(TypeError, match="cu_seqlens_q must be a torch.Tensor"):
        splitkv.cascade_attention(q, [0, 1, 4], k[:1], v[:1], k, v, cu_k)
    # A falling cu_seqlens_q is reported against itself, not against a max_seqlen_q never passed.
    with pytest.raises(ValueError, match="cu_seqlens_q must rise from 0"):
        splitkv.cascade_attention(q, torch.tensor([0, 4, 1], dtype=torch.int32), k[:1], v[:1], k, v, cu_k)
    # A split count far above the key count is cut to it: the same result, no huge partial states.
    out, lse = splitkv.split_kv_attention(**args, num_splits=60000)
    ref_out, ref_lse = splitkv.attention_with_lse(**args)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
