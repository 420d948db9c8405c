"""merge_attn_states / merge_states: every backend against a float64 reference."""

import warnings
import zlib

import pytest
import torch
from grids import grid, rotate
from merge_reference import LSE_TOLERANCE, TOLERANCES, random_states, reference_merge

import splitkv
from splitkv import _cuda
from splitkv._triton_support import TRITON_IMPORT_ERROR

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; the CUDA kernel cannot run on CPU")


def backends():
    names = ["torch"]
    if not TRITON_IMPORT_ERROR:
        names.append("triton")  # on CPU: under TRITON_INTERPRET=1 (conftest)
    names.append(pytest.param("cuda", marks=needs_cuda))
    return names


# (tokens, heads, head_dim): every head size and token count of interest, each
# head count from 1 to 64, without the full cross product.
SHAPES = [
    (0, 4, 128),
    (1, 1, 64),
    (7, 3, 72),
    (613, 8, 80),
    (613, 16, 96),
    (7, 64, 128),
    (4096, 2, 192),
    (1, 32, 256),
    (37, 5, 512),
    (613, 48, 128),
]
LARGE_SHAPES = [(4096, 32, 128), (4096, 64, 256)]  # GPU, or the torch backend on CPU


def _generator(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def generator(request):
    """Fresh random inputs for every test case, reproducible from its name."""
    return _generator(zlib.crc32(request.node.name.encode()))


def _check_against_reference(out, lse, states, lses, dtype):
    ref_out, ref_lse = reference_merge(list(states.unbind(0)), list(lses.unbind(0)))
    torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[dtype], equal_nan=False)
    if lse is not None:
        torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOLERANCE)


# Grids in the default run: cases up to _CHEAP_ELEMENTS (all states together) at every
# dtype, larger ones at one dtype (rotating); the Triton interpreter takes seconds on CPU
# past _INTERPRETER_ELEMENTS, so those cases, like the large shapes, run under -m slow.
_CHEAP_ELEMENTS = 50_000
_INTERPRETER_ELEMENTS = 500_000


def _in_default_run(elements: int, index: int, dtype, backend) -> bool:
    if elements > _CHEAP_ELEMENTS and dtype is not rotate(index, DTYPES):
        return False
    return backend != "triton" or elements <= _INTERPRETER_ELEMENTS


def _two_states_default(tokens, heads, head_dim, dtype, backend) -> bool:
    shape = (tokens, heads, head_dim)
    return shape in SHAPES and _in_default_run(2 * tokens * heads * head_dim, SHAPES.index(shape), dtype, backend)


@pytest.mark.parametrize("tokens,heads,head_dim,dtype,backend",
                         grid([pytest.param(*s, id="x".join(map(str, s))) for s in SHAPES + LARGE_SHAPES], DTYPES,
                              backends(), default=_two_states_default))  # fmt: skip
def test_two_states_match_reference(backend, dtype, tokens, heads, head_dim, generator):
    if (tokens, heads, head_dim) in LARGE_SHAPES and backend == "triton" and not HAS_CUDA:
        pytest.skip("large shape: too slow for the Triton interpreter on CPU (runs on GPU)")
    states, lses = random_states(2, tokens, heads, head_dim, dtype, DEVICE, generator)
    # Poisoned result buffers: an element the kernel does not write stays NaN.
    output = torch.full((tokens, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    output_lse = torch.full((heads, tokens), float("nan"), device=DEVICE)
    out, lse = splitkv.merge_attn_states(
        states[0], lses[0], states[1], lses[1], output=output, output_lse=output_lse, backend=backend
    )
    assert out is output and lse is output_lse
    _check_against_reference(out, lse, states, lses, dtype)


# head_dim 2056 is wider than one block of threads moves at once (256 x 8 half elements): the
# CUDA kernel then loops over the row. Few rows with 8 or more states (a decode step's one
# token of 32 heads among them) take the CUDA kernel that splits each row's states over
# several thread groups.
N_STATE_SHAPES = [(0, 2, 64), (1, 32, 128), (7, 3, 72), (613, 8, 128), (37, 5, 512), (3, 1, 2056)]
NUM_STATES = [1, 2, 3, 8, 13, 33]


def _n_states_default(tokens, heads, head_dim, num_states, dtype, backend) -> bool:
    index = N_STATE_SHAPES.index((tokens, heads, head_dim)) + NUM_STATES.index(num_states)
    return _in_default_run(num_states * tokens * heads * head_dim, index, dtype, backend)


@pytest.mark.parametrize("tokens,heads,head_dim,num_states,dtype,backend",
                         grid(N_STATE_SHAPES, NUM_STATES, DTYPES, backends(), default=_n_states_default))  # fmt: skip
def test_n_states_match_reference(backend, dtype, num_states, tokens, heads, head_dim, generator):
    states, lses = random_states(num_states, tokens, heads, head_dim, dtype, DEVICE, generator)
    output = torch.full((tokens, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    output_lse = torch.full((heads, tokens), float("nan"), device=DEVICE)
    splitkv.merge_states(states, lses, output=output, output_lse=output_lse, backend=backend)
    _check_against_reference(output, output_lse, states, lses, dtype)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_states(backend, dtype):
    """+inf and -inf both mean empty; the empty side's output (here inf/NaN) is ignored;
    both empty gives exactly 0 and -inf."""
    inf, nan = float("inf"), float("nan")
    pairs = [(inf, 0.5), (-inf, 0.5), (0.5, inf), (0.5, -inf), (inf, inf), (-inf, -inf), (inf, -inf), (-inf, inf)]
    tokens, heads, head_dim = len(pairs), 2, 64
    g = _generator(1)
    prefix = torch.randn(tokens, heads, head_dim, generator=g).to(dtype)
    suffix = torch.randn(tokens, heads, head_dim, generator=g).to(dtype)
    prefix_lse = torch.tensor([p for p, _ in pairs]).repeat(heads, 1)
    suffix_lse = torch.tensor([s for _, s in pairs]).repeat(heads, 1)
    prefix[torch.isinf(prefix_lse).t()] = nan
    suffix[torch.isinf(suffix_lse).t()] = inf
    args = [t.to(DEVICE) for t in (prefix, prefix_lse, suffix, suffix_lse)]
    out, lse = splitkv.merge_attn_states(*args, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    assert not out.isnan().any() and not lse.isnan().any()
    for row, (p, s) in enumerate(pairs):
        if abs(p) == inf and abs(s) == inf:
            assert (out[row] == 0).all() and (lse[:, row] == -inf).all()
        elif abs(p) == inf:
            assert torch.equal(out[row], suffix[row]) and torch.allclose(lse[:, row], suffix_lse[:, row])
        else:
            assert torch.equal(out[row], prefix[row]) and torch.allclose(lse[:, row], prefix_lse[:, row])


@pytest.mark.parametrize("backend", ["auto", *backends()])
def test_zero_head_dim_still_merges_the_lses(backend):
    """head_dim 0: no output elements, but every (head, token) has its merged lse, and the
    lses' gradients sum to 1 over the states (the Triton and CUDA kernels returned before
    writing any: uninitialised memory)."""
    lses = torch.randn(3, 2, 5, generator=_generator(4)).to(DEVICE)
    states = torch.empty(3, 5, 2, 0, device=DEVICE)
    want = torch.logsumexp(lses.double(), 0)
    if backend == "cuda":
        with pytest.raises(ValueError, match="head_dim is 0"):
            splitkv.merge_states(states, lses, backend=backend)
        return
    _, lse = splitkv.merge_states(states, lses, backend=backend)
    _, lse_two = splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], backend=backend)
    torch.testing.assert_close(lse.double(), want)
    torch.testing.assert_close(lse_two.double(), torch.logsumexp(lses[:2].double(), 0))
    grad_lses = lses.clone().requires_grad_()
    splitkv.merge_states(states, grad_lses, backend=backend)[1].sum().backward()
    torch.testing.assert_close(grad_lses.grad.sum(0).double(), torch.ones_like(want))


@pytest.mark.parametrize("backend", backends())
def test_nan_lse_is_not_hidden(backend):
    nan = float("nan")
    pairs = [(nan, 0.5), (0.5, nan), (nan, float("-inf")), (float("inf"), nan), (nan, nan), (0.5, 1.5)]
    tokens, heads, head_dim = len(pairs), 1, 64
    g = _generator(2)
    prefix, suffix = (torch.randn(tokens, heads, head_dim, generator=g, device="cpu").to(DEVICE) for _ in range(2))
    prefix_lse = torch.tensor([[p for p, _ in pairs]], device=DEVICE)
    suffix_lse = torch.tensor([[s for _, s in pairs]], device=DEVICE)
    out, lse = splitkv.merge_attn_states(prefix, prefix_lse, suffix, suffix_lse, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    for row in range(tokens - 1):
        assert out[row].isnan().all() and lse[0, row].isnan(), row
    assert not out[-1].isnan().any() and not lse[0, -1].isnan()
    n_out, n_lse = splitkv.merge_states(
        torch.stack([prefix, suffix]), torch.stack([prefix_lse, suffix_lse]), backend=backend
    )
    torch.testing.assert_close(n_out.cpu(), out, equal_nan=True)
    torch.testing.assert_close(n_lse.cpu(), lse, equal_nan=True)


@pytest.mark.parametrize("backend", backends())
def test_nan_lse_among_many_states(backend):
    """A NaN lse in any of 33 states (wherever it falls in the CUDA kernel's split of a
    row's states) makes that row's output and lse NaN; a row without one stays finite."""
    num_states, heads = 33, 5
    states, lses = random_states(num_states, 1, heads, 128, torch.float32, DEVICE, _generator(6), inf_fraction=0)
    for head, state in enumerate([0, 5, 17, 32]):
        lses[state, head, 0] = float("nan")
    out, lse = splitkv.merge_states(states, lses, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    for head in range(4):
        assert out[0, head].isnan().all() and lse[head, 0].isnan(), head
    assert not out[0, 4].isnan().any() and not lse[4, 0].isnan()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_views(backend, dtype):
    """Outputs as slices of wider buffers, LSE as transposed [tokens, heads] storage,
    results written into views; memory around the views is left alone."""
    tokens, heads, head_dim = 613, 6, 72
    g = _generator(3)
    states, lses = random_states(2, tokens, heads, head_dim, dtype, DEVICE, g)
    wide = torch.randn(2, tokens, 2 * heads, head_dim + 8, generator=g).to(dtype=dtype, device=DEVICE)
    wide[:, :, ::2, :head_dim] = states  # head stride 2 * (head_dim + 8), token stride 2 * heads * (head_dim + 8)
    views = [wide[i, :, ::2, :head_dim] for i in range(2)]
    lse_storage = lses.transpose(1, 2).contiguous()  # [2, tokens, heads]
    lse_views = [lse_storage[i].t() for i in range(2)]  # [heads, tokens], token stride = heads
    out_buffer = torch.full((tokens, heads + 2, head_dim + 3), 7.0, dtype=dtype, device=DEVICE)
    out_view = out_buffer[:, 1 : heads + 1, 1 : head_dim + 1]
    lse_buffer = torch.full((tokens + 1, heads), 7.0, device=DEVICE)
    lse_view = lse_buffer[1:].t()
    splitkv.merge_attn_states(
        views[0], lse_views[0], views[1], lse_views[1], output=out_view, output_lse=lse_view, backend=backend
    )
    _check_against_reference(out_view, lse_view, states, lses, dtype)
    untouched = torch.ones_like(out_buffer, dtype=torch.bool)
    untouched[:, 1 : heads + 1, 1 : head_dim + 1] = False
    assert (out_buffer[untouched] == 7.0).all()
    assert (lse_buffer[0] == 7.0).all()
    # The N-way merge reads the same strided states through a stacked view.
    n_out, n_lse = splitkv.merge_states(wide[:, :, ::2, :head_dim], lse_storage.transpose(1, 2), backend=backend)
    _check_against_reference(n_out, n_lse, states, lses, dtype)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("into", ["prefix", "suffix"])
# 128: each row's threads lie in one warp of the CUDA kernel (a warp barrier orders the
# row's lse reads before its store); 96: rows straddle warps (a block barrier).
@pytest.mark.parametrize("head_dim", [128, 96])
def test_in_place(backend, dtype, into, head_dim):
    tokens, heads = 613, 8
    states, lses = random_states(2, tokens, heads, head_dim, dtype, DEVICE, _generator(4))
    # LSE in transposed storage, as a caller holding [tokens, heads] would pass it.
    prefix, suffix = states[0].clone(), states[1].clone()
    prefix_lse, suffix_lse = (x.t().contiguous().t() for x in lses)
    target, target_lse = (prefix, prefix_lse) if into == "prefix" else (suffix, suffix_lse)
    out, lse = splitkv.merge_attn_states(
        prefix, prefix_lse, suffix, suffix_lse, output=target, output_lse=target_lse, backend=backend
    )
    assert out is target and lse is target_lse
    _check_against_reference(out, lse, states, lses, dtype)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("num_states,tokens", [(5, 613), (33, 1)])
def test_in_place_n_states(backend, num_states, tokens):
    states, lses = random_states(num_states, tokens, 8, 128, torch.float16, DEVICE, _generator(5))
    work, work_lses = states.clone(), lses.clone()
    splitkv.merge_states(work, work_lses, output=work[0], output_lse=work_lses[0], backend=backend)
    _check_against_reference(work[0], work_lses[0], states, lses, torch.float16)


@pytest.mark.parametrize("backend", backends())
def test_return_lse_false(backend):
    states, lses = random_states(2, 37, 4, 64, torch.bfloat16, DEVICE, _generator(6))
    out, lse = splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], return_lse=False, backend=backend)
    assert lse is None
    _check_against_reference(out, None, states, lses, torch.bfloat16)
    out, lse = splitkv.merge_states(states, lses, return_lse=False, backend=backend)
    assert lse is None
    _check_against_reference(out, None, states, lses, torch.bfloat16)


def test_auto_backend_choice():
    states, lses = random_states(2, 4, 2, 64, torch.float16, DEVICE, _generator(7))
    report = splitkv.explain_merge(states[0], lses[0], states[1], lses[1])
    expected = "cuda" if HAS_CUDA else "torch"
    assert report.splitlines()[0] == f"merge_attn_states(backend='auto') -> {expected}", report
    if not HAS_CUDA:
        assert "cuda: tensors are on cpu" in report
        assert "triton: auto runs Triton only on CUDA tensors" in report or TRITON_IMPORT_ERROR
    with pytest.raises(ValueError, match="backend must be one of"):
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], backend="cutlass")


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_backend_refused_on_cpu():
    states, lses = random_states(2, 4, 2, 64, torch.float16, "cpu", _generator(8))
    with pytest.raises(ValueError, match="backend='cuda' cannot run these inputs: tensors are on cpu"):
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], backend="cuda")


def test_build_failure_falls_back_or_raises(monkeypatch):
    """A failed build warns once and reports the reason; SPLITKV_REQUIRE_CUDA=1 raises."""

    def broken_build(verbose=False):
        raise OSError("nvcc not found")

    # Internal on purpose: the test is about the loader itself, with a build that fails and its cache reset.
    monkeypatch.setattr(_cuda, "build", broken_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_cuda, "_load_error", None)
    with pytest.warns(RuntimeWarning, match="could not be built: OSError: nvcc not found; falling back to Triton"):
        assert "nvcc not found" in _cuda.load_error()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "nvcc not found" in _cuda.load_error()  # cached: no second warning
    monkeypatch.setattr(_cuda, "_load_error", None)
    monkeypatch.setenv("SPLITKV_REQUIRE_CUDA", "1")
    with pytest.raises(RuntimeError, match="SPLITKV_REQUIRE_CUDA=1 and the CUDA kernels could not be built"):
        _cuda.load_error()


# --- bad input -------------------------------------------------------------------


def _good(tokens=5, heads=3, head_dim=64, dtype=torch.float16):
    g = _generator(10)
    return {
        "prefix_output": torch.randn(tokens, heads, head_dim, generator=g).to(dtype),
        "prefix_lse": torch.randn(heads, tokens, generator=g),
        "suffix_output": torch.randn(tokens, heads, head_dim, generator=g).to(dtype),
        "suffix_lse": torch.randn(heads, tokens, generator=g),
    }


BAD_INPUTS = [
    ("prefix_output", lambda a: a["prefix_output"][0], ValueError, "prefix_output must be \\[tokens, heads, head_dim\\]"),
    ("suffix_output", lambda a: a["suffix_output"][:4], ValueError, "suffix_output must be \\[tokens, heads, head_dim\\]"),
    ("suffix_output", lambda a: a["suffix_output"].float(), TypeError, "suffix_output must have dtype torch.float16"),
    ("prefix_output", lambda a: a["prefix_output"].double(), TypeError, "prefix_output must be float32, float16 or bfloat16"),
    ("prefix_output", lambda a: a["prefix_output"].transpose(1, 2).contiguous().transpose(1, 2), ValueError,
     "prefix_output must have a contiguous last dim"),
    ("suffix_output", lambda a: a["suffix_output"].transpose(1, 2).contiguous().transpose(1, 2), ValueError,
     "suffix_output must have a contiguous last dim"),
    ("prefix_lse", lambda a: a["prefix_lse"].half(), TypeError, "prefix_lse must have dtype torch.float32"),
    ("suffix_lse", lambda a: a["suffix_lse"].t(), ValueError, "suffix_lse must be \\[heads, tokens\\]"),
    ("prefix_lse", lambda a: a["prefix_lse"][None], ValueError, "prefix_lse must be \\[heads, tokens\\]"),
    ("suffix_lse", lambda a: a["suffix_lse"].to("meta"), ValueError, "suffix_lse must be on cpu"),
    ("suffix_output", lambda a: a["suffix_output"].to("meta"), ValueError, "suffix_output must be on cpu"),
    ("prefix_lse", lambda a: a["prefix_lse"].numpy(), TypeError, "prefix_lse must be a torch.Tensor"),
    ("return_lse", lambda a: "False", TypeError, "return_lse must be a bool"),  # not taken as truthy
]


@pytest.mark.parametrize("name,corrupt,exc,message", BAD_INPUTS)
def test_bad_input_names_the_argument(name, corrupt, exc, message):
    args = _good()
    args[name] = corrupt(args)
    output = torch.full_like(args["prefix_output"] if name != "prefix_output" else _good()["prefix_output"], 3.0)
    before = output.clone()
    with pytest.raises(exc, match=message):
        splitkv.merge_attn_states(**args, output=output)
    assert torch.equal(output, before)  # rejected before anything ran


def test_bad_outputs():
    args = _good()
    with pytest.raises(ValueError, match="output must be \\[tokens, heads, head_dim\\]"):
        splitkv.merge_attn_states(**args, output=torch.empty(5, 3, 32, dtype=torch.float16))
    with pytest.raises(TypeError, match="output must have dtype torch.float16"):
        splitkv.merge_attn_states(**args, output=torch.empty(5, 3, 64))
    with pytest.raises(ValueError, match="output must not be an expanded view"):
        splitkv.merge_attn_states(**args, output=torch.empty(1, 3, 64, dtype=torch.float16).expand(5, 3, 64))
    with pytest.raises(TypeError, match="output_lse must have dtype torch.float32"):
        splitkv.merge_attn_states(**args, output_lse=torch.empty(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="output_lse must be \\[heads, tokens\\]"):
        splitkv.merge_attn_states(**args, output_lse=torch.empty(5, 3))


def test_bad_n_way_inputs():
    states = torch.randn(3, 5, 2, 64)
    lses = torch.randn(3, 2, 5)
    with pytest.raises(ValueError, match="outputs must be \\[num_states, tokens, heads, head_dim\\]"):
        splitkv.merge_states(states[0], lses)
    with pytest.raises(ValueError, match="at least one state"):
        splitkv.merge_states(states[:0], lses[:0])
    with pytest.raises(ValueError, match="lses must be \\[num_states, heads, tokens\\]"):
        splitkv.merge_states(states, lses[:2])
    with pytest.raises(TypeError, match="lses must have dtype torch.float32"):
        splitkv.merge_states(states, lses.double())
    with pytest.raises(TypeError, match="outputs must be float32, float16 or bfloat16"):
        splitkv.merge_states(states.to(torch.int32), lses)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("output_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_partials_into_narrow_output(backend, output_dtype, generator):
    """Split-KV kernels keep float32 partials; the N-way merge writes the final dtype directly."""
    states, lses = random_states(6, 613, 8, 128, torch.float32, DEVICE, generator)
    output = torch.full((613, 8, 128), float("nan"), dtype=output_dtype, device=DEVICE)
    splitkv.merge_states(states, lses, output=output, backend=backend)
    _check_against_reference(output, None, states, lses, output_dtype)
    out, _ = splitkv.merge_states(states, lses, output_dtype=output_dtype, backend=backend)
    assert out.dtype == output_dtype
    torch.testing.assert_close(out, output, equal_nan=False)
    with pytest.raises(TypeError, match="the output dtype must be that of outputs"):
        splitkv.merge_states(states.to(output_dtype), lses, output_dtype=torch.float32, backend=backend)


@pytest.mark.parametrize("backend", backends())
def test_output_partly_overlapping_an_input_is_refused(backend):
    """An output may be an input itself (in place) or apart from the inputs; a view that
    overlaps an input otherwise would race with its reads, so it is refused by name."""
    tokens, heads, head_dim = 8, 2, 16
    states, lses = random_states(2, tokens, heads, head_dim, torch.float32, DEVICE, _generator(21))
    n = tokens * heads * head_dim
    flat = torch.cat([states.reshape(-1), states.new_zeros(head_dim)])
    prefix = flat[:n].view(tokens, heads, head_dim)
    shifted = flat[head_dim : head_dim + n].view(tokens, heads, head_dim)  # one row past prefix's start
    with pytest.raises(ValueError, match="output overlaps prefix_output"):
        splitkv.merge_attn_states(prefix, lses[0], states[1], lses[1], output=shifted, backend=backend)
    lse_flat = torch.cat([lses[0].reshape(-1), lses.new_zeros(1)])
    with pytest.raises(ValueError, match="output_lse overlaps suffix_lse"):
        splitkv.merge_attn_states(states[0], lses[0], states[1], lse_flat[:-1].view(heads, tokens),
                                  output_lse=lse_flat[1:].view(heads, tokens), backend=backend)  # fmt: skip
    work = torch.cat([states.reshape(-1), states.new_zeros(head_dim)])
    stacked = work[: 2 * n].view(2, tokens, heads, head_dim)
    with pytest.raises(ValueError, match="output overlaps outputs"):
        splitkv.merge_states(stacked, lses, output=work[head_dim : head_dim + n].view(tokens, heads, head_dim),
                             backend=backend)  # fmt: skip
    # Exactly an input, or a state of the stack: allowed (the in-place tests check the values).
    splitkv.merge_states(stacked, lses.clone(), output=stacked[1], backend=backend)
    # An output over an input of the other kind, and a dense output over a strided
    # input's range: Triton had returned 2.5 off for both, unrefused.
    shared = torch.randn(n, device=DEVICE)
    with pytest.raises(ValueError, match="output_lse overlaps prefix_output"):
        splitkv.merge_attn_states(shared.view(tokens, heads, head_dim), lses[0], states[1], lses[1],
                                  output_lse=shared[: heads * tokens].view(heads, tokens), backend=backend)  # fmt: skip
    with pytest.raises(ValueError, match="output overlaps lses"):
        splitkv.merge_states(states, shared[: 2 * heads * tokens].view(2, heads, tokens),
                             output=shared.view(tokens, heads, head_dim), backend=backend)  # fmt: skip
    # An fp8 output over a float32 input's first bytes has its shape and strides, not
    # its dtype: not in place (row r would land in input row r / 4's bytes).
    as_fp8 = torch.randn(tokens, heads, head_dim, device=DEVICE)
    fp8_view = as_fp8.view(-1).view(torch.uint8)[:n].view(torch.float8_e4m3fn).view(tokens, heads, head_dim)
    with pytest.raises(ValueError, match="output overlaps prefix_output"):
        splitkv.merge_attn_states(as_fp8, lses[0], states[1], lses[1], output=fp8_view, backend=backend)
    # The output buffer and output_lse over each other.
    joint = torch.empty(n, device=DEVICE)
    with pytest.raises(ValueError, match="output_lse overlaps output"):
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], output=joint.view(tokens, heads, head_dim),
                                  output_lse=joint[: heads * tokens].view(heads, tokens), backend=backend)  # fmt: skip
    # output_lse over a float32 output's first row (its shape and strides when head_dim == tokens).
    square = torch.empty(heads, heads, heads, device=DEVICE)
    with pytest.raises(ValueError, match="output_lse overlaps output"):
        splitkv.merge_states(torch.randn(2, heads, heads, heads, device=DEVICE),
                             torch.randn(2, heads, heads, device=DEVICE), output=square, output_lse=square[0],
                             backend=backend)  # fmt: skip
    # A dense output in a strided input's gaps shares none of its elements: allowed.
    pairs = torch.randn(2, 2, tokens, heads, head_dim, device=DEVICE)
    merged, _ = splitkv.merge_states(pairs[:, 0], lses, output=pairs[0, 1], backend=backend)
    torch.testing.assert_close(merged, splitkv.merge_states(pairs[:, 0].clone(), lses, backend="torch")[0])
    wide = torch.randn(tokens, heads, 2 * head_dim, device=DEVICE)
    with pytest.raises(ValueError, match="output overlaps prefix_output"):
        splitkv.merge_attn_states(wide[..., :head_dim], lses[0], states[1], lses[1],
                                  output=wide.view(-1)[n:].view(tokens, heads, head_dim), backend=backend)  # fmt: skip
