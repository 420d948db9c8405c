"""The Triton attention forward against the float64 reference, and the reference against SDPA.

Without CUDA the Triton kernel runs under the Triton interpreter on CPU tensors, so the
shapes here stay small; with CUDA the same tests run on the GPU with longer sequences.
These tests are about the internal kernel and its launch path (splitkv._attention_kernels,
splitkv._attention_triton, the C++ launcher), so they use its private names; the public
functions are tested in test_attention.py and test_cascade.py.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from attention_reference import reference64

# Internal on purpose: test_reference_* below test the package's reference implementation itself.
from splitkv._attention_reference import reference_attention_with_lse

if not torch.cuda.is_available():
    # Must be set before triton is first imported: @triton.jit reads it at decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from splitkv._attention_triton import Prefix, triton_attention_with_lse
except ImportError:
    triton_attention_with_lse = None

requires_triton = pytest.mark.skipif(
    triton_attention_with_lse is None, reason="triton is not importable, so the Triton kernel cannot be tested"
)

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}
# (query length, key length) per sequence: a 1-token decode, an empty query sequence,
# a square prefill, an empty key sequence, Lq > Lk (leading causal rows see no key)
# and Lq < Lk.
FIXED_LENGTHS = [(1, 33), (0, 4), (37, 37), (5, 0), (20, 9), (3, 50)]
if ON_CUDA:
    FIXED_LENGTHS += [(1, 4097), (300, 300), (700, 260), (64, 2000)]
MAX_RANDOM_LENGTH = 600 if ON_CUDA else 40


def _randn(shape, dtype, gen, strided):
    """Normal samples on DEVICE; with ``strided`` a non-contiguous slice of a wider buffer
    (extra heads and padded last dim) whose last dim stays contiguous."""
    tokens, heads, head_dim = shape
    if not strided:
        return torch.randn(shape, generator=gen).to(DEVICE, dtype)
    wide = torch.randn((tokens, heads + 3, head_dim + 8), generator=gen).to(DEVICE, dtype)
    return wide[:, 2 : 2 + heads, 5 : 5 + head_dim]


def _make_inputs(lengths, heads_q, heads_kv, head_dim, dtype, gen, strided=False):
    lens_q = [lq for lq, _ in lengths]
    lens_k = [lk for _, lk in lengths]
    q = _randn((sum(lens_q), heads_q, head_dim), dtype, gen, strided)
    k = _randn((sum(lens_k), heads_kv, head_dim), dtype, gen, strided)
    v = _randn((sum(lens_k), heads_kv, head_dim), dtype, gen, strided)
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)


def _nan_filled_empty(*args, _empty=torch.empty, **kwargs):
    tensor = _empty(*args, **kwargs)
    return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor


def _run_triton(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, num_splits=1):
    """The kernel with its outputs poisoned with NaN, so an element it forgets to write fails."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", _nan_filled_empty)
        return triton_attention_with_lse(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, num_splits=num_splits)


def _assert_matches(out, lse, ref_out, ref_lse, dtype):
    """Close to the reference, with rows the reference leaves empty exactly 0 / -inf."""
    empty = torch.isneginf(ref_lse)  # [heads, tokens]
    assert torch.isneginf(lse[empty]).all(), "rows with no visible key must have lse == -inf"
    assert (out.transpose(0, 1)[empty] == 0).all(), "rows with no visible key must have out == 0"
    assert torch.isfinite(lse[~empty]).all()
    assert torch.isfinite(out).all()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol["atol"], rtol=tol["rtol"])


def _merge_splits(out_splits, lse_splits):
    """Exact merge of split states [splits, tokens, heads, dim] / [splits, heads, tokens]."""
    lse_max = lse_splits.max(dim=0).values
    lse_max = lse_max.masked_fill(torch.isneginf(lse_max), 0.0)
    weights = torch.exp(lse_splits - lse_max)  # [splits, heads, tokens]
    total = weights.sum(dim=0)
    out = torch.einsum("sht,sthd->thd", weights, out_splits)
    out = out / total.clamp_min(torch.finfo(total.dtype).tiny).T[..., None]
    return out, lse_max + torch.log(total)


def _chunk_reference(q, k, v, cu_q, cu_k, causal, scale, num_splits, split):
    """Reference state of one split: every query token becomes its own non-causal
    sequence over the keys of the chunk it can see (causal by absolute key position).
    Runs on the CPU, where its many tiny sequences are quicker than on a GPU."""
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    key_index, key_counts = [], []
    for q_start, q_end, k_start, k_end in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]):
        len_q, len_k = q_end - q_start, k_end - k_start
        chunk = -(-len_k // num_splits)
        lo = min(split * chunk, len_k)
        hi = min(lo + chunk, len_k)
        for i in range(len_q):
            end = min(hi, i + len_k - len_q + 1) if causal else hi
            visible = range(k_start + lo, k_start + max(end, lo))
            key_index.extend(visible)
            key_counts.append(len(visible))
    index = torch.tensor(key_index, dtype=torch.long, device=q.device)
    cu_rows = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    cu_keys = torch.tensor([0] + key_counts, device=q.device).cumsum(0).to(torch.int32)
    return reference64(q, k[index], v[index], cu_rows, cu_keys, 1, max(key_counts, default=0), False, scale)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_sdpa(causal):
    gen = torch.Generator().manual_seed(1)
    len_q, len_k = (13, 13) if causal else (7, 11)  # SDPA's is_causal is top-left aligned
    heads, head_dim, scale = 4, 16, 0.3
    q = torch.randn(len_q, heads, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(len_k, heads, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(len_k, heads, head_dim, generator=gen, dtype=torch.float64)
    cu_q = torch.tensor([0, len_q], dtype=torch.int32)
    cu_k = torch.tensor([0, len_k], dtype=torch.int32)

    out, lse = reference_attention_with_lse(q, k, v, cu_q, cu_k, len_q, len_k, causal, scale)

    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=causal, scale=scale
    ).transpose(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(len_q, len_k, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=1e-12, rtol=1e-12)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64


def test_reference_empty_rows_and_gqa():
    gen = torch.Generator().manual_seed(2)
    # Sequence 0 has no keys; in sequence 1 (Lq=4 > Lk=2) causal rows 0 and 1 see no key.
    q = torch.randn(7, 4, 8, generator=gen).to(torch.float16)
    k = torch.randn(2, 2, 8, generator=gen).to(torch.float16)
    v = torch.randn(2, 2, 8, generator=gen).to(torch.float16)
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 0, 2], dtype=torch.int32)

    out, lse = reference_attention_with_lse(q, k, v, cu_q, cu_k, 4, 2, True, 0.5)

    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    assert out.shape == (7, 4, 8) and lse.shape == (4, 7)
    empty_tokens = [0, 1, 2, 3, 4]
    assert torch.isneginf(lse[:, empty_tokens]).all()
    assert (out[empty_tokens] == 0).all()
    # Token 6 (the last query) sees both keys; query head 3 uses kv head 1.
    scores = (k[:, 1].double() @ q[6, 3].double()) * 0.5
    torch.testing.assert_close(lse[3, 6].double(), torch.logsumexp(scores, 0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[6, 3].double(), torch.softmax(scores, 0) @ v[:, 1].double(), atol=1e-3, rtol=1e-3)


KERNEL_CASES = [
    # dtype, head_dim, heads_q, heads_kv, causal
    (torch.float32, 64, 4, 4, True),
    (torch.float32, 40, 8, 2, False),
    (torch.float32, 96, 8, 1, True),
    (torch.float16, 72, 8, 1, True),
    (torch.float16, 128, 4, 1, False),
    (torch.bfloat16, 80, 8, 2, False),
    (torch.bfloat16, 256, 2, 2, True),
]
if ON_CUDA:
    # Each (dtype, head_dim) pair has its own tile sizes and shared-memory footprint;
    # causal alternates so that both variants meet every dtype and most head dims.
    KERNEL_CASES += [
        (dtype, head_dim, 8, 2, (i + j) % 2 == 0)
        for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16))
        for j, head_dim in enumerate((40, 64, 72, 80, 96, 128, 256))
    ]


def _case_id(value):
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


@requires_triton
@pytest.mark.parametrize("dtype, head_dim, heads_q, heads_kv, causal", KERNEL_CASES, ids=_case_id)
def test_triton_matches_reference(dtype, head_dim, heads_q, heads_kv, causal):
    gen = torch.Generator().manual_seed(head_dim + heads_q)
    inputs = _make_inputs(FIXED_LENGTHS, heads_q, heads_kv, head_dim, dtype, gen)
    scale = head_dim**-0.5

    out, lse = _run_triton(*inputs, causal, scale)

    assert out.shape == inputs[0].shape and out.dtype == dtype
    assert lse.shape == (heads_q, inputs[0].shape[0]) and lse.dtype == torch.float32
    _assert_matches(out, lse, *reference64(*inputs, causal, scale), dtype)


@requires_triton
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triton_random_batches(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    batch = int(torch.randint(2, 7, (), generator=gen))
    lengths = torch.randint(0, MAX_RANDOM_LENGTH + 1, (batch, 2), generator=gen).tolist()
    dtype = [torch.float32, torch.float16, torch.bfloat16][seed]
    heads_kv = 2
    heads_q = heads_kv * [1, 4, 8][seed]
    causal = seed != 1
    inputs = _make_inputs(lengths, heads_q, heads_kv, 64, dtype, gen)

    out, lse = _run_triton(*inputs, causal, 0.125)

    _assert_matches(out, lse, *reference64(*inputs, causal, 0.125), dtype)


@requires_triton
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_case_id)
def test_triton_decode(dtype, num_splits):
    # One query per sequence and 8 query heads per kv head: the rows of a block are
    # the query heads of one group, which is what makes decode use the tensor cores.
    gen = torch.Generator().manual_seed(11)
    lengths = [(1, lk) for lk in (0, 1, 17, 64, 3 * MAX_RANDOM_LENGTH)]
    inputs = _make_inputs(lengths, 16, 2, 128, dtype, gen)

    out, lse = _run_triton(*inputs, True, 128**-0.5, num_splits=num_splits)

    if num_splits > 1:
        out, lse = _merge_splits(out.double(), lse.double())
    _assert_matches(out, lse, *reference64(*inputs, True, 128**-0.5), dtype)


@requires_triton
@pytest.mark.parametrize(
    "num_splits, dtype, head_dim, heads_q, heads_kv, causal",
    [
        (3, torch.float32, 64, 8, 2, True),
        (8, torch.bfloat16, 40, 8, 1, True),
        (8, torch.float16, 128, 2, 2, False),
    ],
    ids=_case_id,
)
def test_triton_splits(num_splits, dtype, head_dim, heads_q, heads_kv, causal):
    gen = torch.Generator().manual_seed(num_splits * head_dim)
    inputs = _make_inputs(FIXED_LENGTHS, heads_q, heads_kv, head_dim, dtype, gen)
    q, k, v, cu_q, cu_k = inputs[:5]
    scale = head_dim**-0.5

    out_splits, lse_splits = _run_triton(*inputs, causal, scale, num_splits=num_splits)

    total_q = q.shape[0]
    assert out_splits.shape == (num_splits, total_q, heads_q, head_dim) and out_splits.dtype == torch.float32
    assert lse_splits.shape == (num_splits, heads_q, total_q) and lse_splits.dtype == torch.float32
    for split in range(num_splits):
        ref_out, ref_lse = _chunk_reference(q, k, v, cu_q, cu_k, causal, scale, num_splits, split)
        # Partial outputs are fp32, but the products were computed from dtype inputs.
        _assert_matches(out_splits[split].cpu(), lse_splits[split].cpu(), ref_out, ref_lse, dtype)

    merged_out, merged_lse = _merge_splits(out_splits.double(), lse_splits.double())
    _assert_matches(merged_out, merged_lse, *reference64(*inputs, causal, scale), dtype)
    out, lse = _run_triton(*inputs, causal, scale)
    torch.testing.assert_close(merged_out.to(dtype), out, **TOLERANCES[dtype])
    torch.testing.assert_close(merged_lse.float(), lse, **TOLERANCES[dtype])


@requires_triton
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_strided_inputs(num_splits):
    gen = torch.Generator().manual_seed(7 + num_splits)
    dtype, causal = torch.float16, True
    inputs = _make_inputs(FIXED_LENGTHS, 8, 2, 72, dtype, gen, strided=True)
    q, k, v = inputs[:3]
    assert not q.is_contiguous() and not k.is_contiguous() and q.stride(-1) == 1

    out, lse = _run_triton(*inputs, causal, 0.1, num_splits=num_splits)
    dense_out, dense_lse = _run_triton(
        q.contiguous(), k.contiguous(), v.contiguous(), *inputs[3:], causal, 0.1, num_splits
    )

    torch.testing.assert_close(out, dense_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, dense_lse, atol=0, rtol=0)
    if num_splits == 1:
        _assert_matches(out, lse, *reference64(*inputs, causal, 0.1), dtype)


@requires_triton
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_inline_prefix(num_splits):
    """prefix_splits = 0: the first key chunk's programs walk the shared prefix before
    their own keys; merged, the states equal those of the prefix run in its own chunks."""
    gen = torch.Generator().manual_seed(23 + num_splits)
    dtype, scale = torch.float32, 0.2
    q, k, v, cu_q, cu_k, max_q, max_k = _make_inputs([(1, 5), (3, 3), (2, 40), (1, 0)], 4, 2, 32, dtype, gen)
    prefix_k, prefix_v = (torch.randn((37, 2, 32), generator=gen).to(DEVICE, dtype) for _ in range(2))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", _nan_filled_empty)
        inline = triton_attention_with_lse(q, k, v, cu_q, cu_k, max_q, max_k, True, scale, num_splits=num_splits,
                                           prefix=Prefix(prefix_k, prefix_v, 0, inline=True))  # fmt: skip
        chunked = triton_attention_with_lse(q, k, v, cu_q, cu_k, max_q, max_k, True, scale, num_splits=num_splits,
                                            prefix=Prefix(prefix_k, prefix_v, 2, inline=False))  # fmt: skip
    assert inline[0].shape[0] == (num_splits if num_splits > 1 else q.shape[0])
    inline_out, inline_lse = _merge_splits(inline[0].double(), inline[1].double()) if num_splits > 1 else inline
    _assert_matches(inline_out, inline_lse, *_merge_splits(chunked[0].double(), chunked[1].double()), dtype)


@requires_triton
@pytest.mark.parametrize(("splits", "inline"), [(0, False), (2, True), (-3, False)])
def test_a_prefix_that_names_no_kernel_mode_is_refused(splits, inline):
    """An inline prefix has no chunks of its own and a prefix pass at least one: the other
    two combinations are refused before anything launches, not read as some mode."""
    gen = torch.Generator().manual_seed(29)
    q, k, v, cu_q, cu_k, max_q, max_k = _make_inputs([(1, 5), (2, 9)], 4, 2, 32, torch.float32, gen)
    prefix_k, prefix_v = (torch.randn((7, 2, 32), generator=gen).to(DEVICE) for _ in range(2))
    with pytest.raises(ValueError, match=f"prefix: no kernel mode for splits={splits} with inline={inline}"):
        triton_attention_with_lse(
            q, k, v, cu_q, cu_k, max_q, max_k, True, 0.2, prefix=Prefix(prefix_k, prefix_v, splits, inline)
        )


@pytest.mark.parametrize(
    "q_len,k_len,prefix_len,prefix_splits,num_splits",
    [(1, 33, 70, 3, 1), (1, 0, 40, 2, 1), (3, 40, 37, 2, 3), (5, 2, 19, 1, 2), (4, 0, 0, 1, 1), (1, 50, 33, 0, 3)],
)
def test_fused_merge_equals_the_merged_states(q_len, k_len, prefix_len, prefix_splits, num_splits):
    """One sequence: the launch that also merges (the last program of each tile to finish
    merges its states) writes the exact merge of the states it leaves, every element
    (outputs poisoned with NaN), and leaves its counters zero for the next launch; the
    second and third launches give the first's bits."""
    from splitkv._attention_triton import Prefix, fused_merge_counters, launch_attention

    gen = torch.Generator().manual_seed(31 + q_len + prefix_splits)
    dtype, scale, heads_q, heads_kv, head_dim = torch.float16, 0.2, 8, 2, 40
    q, k, v, cu_q, cu_k, max_q, max_k = _make_inputs([(q_len, k_len)], heads_q, heads_kv, head_dim, dtype, gen)
    prefix_k, prefix_v = (_randn((prefix_len, heads_kv, head_dim), dtype, gen, True) for _ in range(2))
    num_states = prefix_splits + num_splits
    counters = torch.zeros(fused_merge_counters(heads_q, heads_kv, max_q) + 5, dtype=torch.int32, device=DEVICE)
    results = []
    for _ in range(3):
        states = torch.full((num_states, q_len, heads_q, head_dim), float("nan"), device=DEVICE)
        lses = torch.full((num_states, heads_q, q_len), float("nan"), device=DEVICE)
        final = torch.full((q_len, heads_q, head_dim), float("nan"), dtype=dtype, device=DEVICE)
        final_lse = torch.full((heads_q, q_len), float("nan"), device=DEVICE)
        launch_attention(q, k, v, cu_q, cu_k, max_q, max_k, True, scale, num_splits, states, lses,
                         Prefix(prefix_k, prefix_v, prefix_splits, inline=prefix_splits == 0), None,
                         (final, final_lse, counters))  # fmt: skip
        results.append((final, final_lse))
        assert (counters == 0).all()
    want_out, want_lse = _merge_splits(states.double(), lses.double())
    _assert_matches(final.float(), final_lse, want_out, want_lse, dtype)
    for other in results[:-1]:
        for got, want in zip(other, results[-1]):
            torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=False)


@pytest.mark.skipif(not ON_CUDA, reason="many programs racing to merge need a GPU")
def test_fused_merge_under_contention():
    """Many split programs per tile finish close together on the GPU: 200 launches of
    one decode step over a long prefix, each writing the same bits, with the counters
    zero after each; and a launch without the LSE writes the same output."""
    from splitkv._attention_triton import Prefix, fused_merge_counters, launch_attention

    gen = torch.Generator().manual_seed(37)
    q, k, v, cu_q, cu_k, max_q, max_k = _make_inputs([(2, 300)], 32, 8, 128, torch.bfloat16, gen)
    prefix_k, prefix_v = (_randn((8192, 8, 128), torch.bfloat16, gen, False) for _ in range(2))
    states = torch.empty((64 + 4, 2, 32, 128), device=DEVICE)
    lses = torch.empty((64 + 4, 32, 2), device=DEVICE)
    counters = torch.zeros(fused_merge_counters(32, 8, max_q), dtype=torch.int32, device=DEVICE)
    outputs = []
    for launch in range(200):
        final = torch.full((2, 32, 128), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        final_lse = torch.full((32, 2), float("nan"), device=DEVICE) if launch else None
        launch_attention(q, k, v, cu_q, cu_k, max_q, max_k, True, 0.08, 4, states, lses,
                         Prefix(prefix_k, prefix_v, 64, inline=False), None, (final, final_lse, counters))  # fmt: skip
        outputs.append((final, final_lse))
    assert (counters == 0).all()
    want_out, want_lse = _merge_splits(states.double(), lses.double())
    _assert_matches(outputs[-1][0].float(), outputs[-1][1], want_out, want_lse, torch.bfloat16)
    for final, final_lse in outputs:
        torch.testing.assert_close(final, outputs[-1][0], atol=0, rtol=0)
        if final_lse is not None:
            torch.testing.assert_close(final_lse, outputs[-1][1], atol=0, rtol=0)


def _launch_cases(gen):
    """bf16 inputs that triton specialises differently: aligned, strided, an odd head
    size, and copies that start one element into their buffer (not 16-byte aligned)."""
    aligned = _make_inputs([(1, 300), (4, 70)], 8, 2, 64, torch.bfloat16, gen)
    strided = _make_inputs([(1, 300), (4, 70)], 8, 2, 64, torch.bfloat16, gen, strided=True)
    odd_head = _make_inputs([(3, 90)], 6, 1, 40, torch.bfloat16, gen)
    misaligned = [t.new_empty(t.numel() + 1)[1:].view(t.shape).copy_(t) for t in aligned[:3]]
    return aligned, strided, odd_head, (*misaligned, *aligned[3:])


def _cpp_launcher():
    """The attention kernel's launcher, skipping the test where it keeps triton's own launch."""
    from splitkv import _attention_triton, _cuda

    if _cuda.env_flag("SPLITKV_DISABLE_CUDA") or _cuda.load_error():
        pytest.skip(f"the CUDA extension is not loaded: {_cuda.load_error() or 'SPLITKV_DISABLE_CUDA is set'}")
    launcher = _attention_triton._launch_attention_kernel
    if not launcher.enabled:
        import triton

        pytest.skip(f"triton {triton.__version__} launches through JITFunction.run here")
    return launcher


@pytest.mark.skipif(not ON_CUDA, reason="the C++ launch of compiled kernels runs only on CUDA")
def test_compiled_launcher_picks_tritons_kernel():
    """Every launch from C++ runs the kernel triton itself would pick for those arguments:
    alignment, strides divisible by 16 or not, values of 1, splits and prefix states,
    each twice so that the second launch takes the cached kernel."""
    from splitkv import _attention_kernels, _attention_triton

    launcher = _cpp_launcher()
    launches = []

    def recording(*launch):
        launches.append(launch)
        launcher(*launch)

    aligned, strided, odd_head, misaligned = _launch_cases(torch.Generator().manual_seed(11))
    dtype = aligned[0].dtype
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_attention_triton, "_launch_attention_kernel", recording)
        for inputs in (aligned, strided, odd_head, misaligned):
            for num_splits in (1, 3):
                results = [_run_triton(*inputs, True, 0.125, num_splits) for _ in range(2)]
                for first, second in zip(*results):
                    torch.testing.assert_close(second, first, atol=0, rtol=0)
                if num_splits == 1:
                    _assert_matches(*results[1], *reference64(*inputs, True, 0.125), dtype)
    assert misaligned[0].data_ptr() % 16 != 0 and len(launches) == 16
    for grid, args, constexprs, num_warps, num_stages, device_index in launches:
        assert device_index == torch.cuda.current_device()
        config = launcher.configs[(constexprs, num_warps, num_stages)]
        picked = _attention_kernels.attention_fwd_kernel.run(
            *args, *constexprs, grid=grid, warmup=True, num_warps=num_warps, num_stages=num_stages
        )
        assert launcher.cache.function(config, device_index, args) == picked.function != 0


@pytest.mark.skipif(not ON_CUDA, reason="the C++ launch of compiled kernels runs only on CUDA")
def test_launch_from_cpp_matches_tritons_launch():
    """For aligned, strided, odd-head-size and misaligned inputs, with splits and with a
    shared prefix, every kernel launches from C++ after its first launch and writes the
    very bits that triton's own launch writes; kinds that do not match a kernel's
    parameters are refused."""
    from splitkv import _attention_kernels, _attention_triton, _cuda
    from splitkv._triton_launch import _direct_entry

    launcher = _cpp_launcher()
    gen = torch.Generator().manual_seed(12)
    aligned, strided, odd_head, misaligned = _launch_cases(gen)
    prefix_k, prefix_v = (_randn((200, 2, 64), aligned[0].dtype, gen, False) for _ in range(2))
    from_cpp, last_launch = [], [None]

    def counting(*launch):
        last_launch[0] = launch
        _, args, constexprs, num_warps, num_stages, device_index = launch
        config = launcher.configs.get((constexprs, num_warps, num_stages))
        known = config is not None and launcher.cache.function(config, device_index, args) != 0
        from_cpp.append(known)
        launcher(*launch)

    def run_all():
        results = []
        for inputs in (aligned, strided, odd_head, misaligned):
            for num_splits in (1, 3):
                results += _run_triton(*inputs, True, 0.125, num_splits)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "empty", _nan_filled_empty)
            results += triton_attention_with_lse(
                *aligned, True, 0.125, num_splits=2, prefix=Prefix(prefix_k, prefix_v, 3, inline=False)
            )
        return results

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launcher, "enabled", False)
        patch.setattr(launcher, "cache", None)
        by_triton = run_all()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_attention_triton, "_launch_attention_kernel", counting)
        patch.setattr(launcher, "cache", _cuda.eager_ops.TritonLaunchCache())
        run_all()  # triton launches each specialisation once, then the cache holds it
        from_cpp.clear()
        got = run_all()
        assert len(from_cpp) == 9 and all(from_cpp) and len(launcher.cache) == 9
    for g, want in zip(got, by_triton):
        torch.testing.assert_close(g, want, atol=0, rtol=0)
    grid, args, constexprs, num_warps, num_stages, _ = last_launch[0]
    compiled = _attention_kernels.attention_fwd_kernel.run(
        *args, *constexprs, grid=grid, warmup=True, num_warps=num_warps, num_stages=num_stages
    )
    function, threads, shared, kinds = _direct_entry(compiled, len(args))
    device_index = torch.cuda.current_device()
    cache = _cuda.eager_ops.TritonLaunchCache()
    cache.add(0, device_index, args, (function, threads, shared, kinds))
    assert cache.function(0, device_index, args) == function != 0
    # One kind too few, a 64-bit int where the kernel takes 32 bits (only the driver's
    # parameter sizes tell), a pointer where it takes an int, an unknown kind.
    first_int = kinds.index("i")
    for wrong in (kinds[:-1], kinds.replace("i", "l", 1),
                  kinds[:first_int] + "p" + kinds[first_int + 1:], kinds.replace("i", "?", 1)):  # fmt: skip
        cache.add(0, device_index, args, (function, threads, shared, wrong))
        assert cache.function(0, device_index, args) == 0


@pytest.mark.skipif(not ON_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launch_on_a_device_other_than_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: the launch (through triton's own launch
    the first time, from C++ after) runs on cuda:1 and gives the results it gives
    there when cuda:1 is current."""
    from splitkv import _cuda

    gen = torch.Generator().manual_seed(13)
    inputs = _make_inputs([(1, 300), (4, 70)], 8, 2, 64, torch.bfloat16, gen)
    on_one = [t.to("cuda:1") if isinstance(t, torch.Tensor) else t for t in inputs]
    _cuda.load_error()
    with torch.cuda.device(1):
        want = [_run_triton(*on_one, True, 0.125, num_splits) for num_splits in (1, 3)]
    with torch.cuda.device(0):
        for _ in range(3):  # triton launches the first time, C++ after
            got = [_run_triton(*on_one, True, 0.125, num_splits) for num_splits in (1, 3)]
            for got_pair, want_pair in zip(got, want):
                for g, w in zip(got_pair, want_pair):
                    assert g.device == torch.device("cuda:1")
                    torch.testing.assert_close(g, w, atol=0, rtol=0)
