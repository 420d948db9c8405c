"""LSE conventions (base e / 2, layout [heads, tokens] / [tokens, heads]) and fp8 outputs of
both merges, against the float64 reference of tests/merge_reference.py."""

import math

import pytest
import torch
from merge_reference import random_states, reference_merge

import splitkv

ON_CUDA = torch.cuda.is_available()
BACKENDS = ["torch", "triton"] + (["cuda"] if ON_CUDA else [])
DEVICE = "cuda" if ON_CUDA else "cpu"


def _device(backend):
    return "cpu" if backend == "torch" else DEVICE


def _to_convention(lse_ht: torch.Tensor, lse_base: str, lse_layout: str) -> torch.Tensor:
    """A natural-log [.., heads, tokens] LSE stored in the given convention (a strided view for "th")."""
    lse = lse_ht / math.log(2.0) if lse_base == "2" else lse_ht
    return lse.transpose(-1, -2).contiguous().transpose(-1, -2).transpose(-1, -2) if lse_layout == "th" else lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lse_base,lse_layout", [("2", "ht"), ("e", "th"), ("2", "th")])
def test_conventions_match_reference(backend, lse_base, lse_layout):
    device = _device(backend)
    gen = torch.Generator().manual_seed(11)
    states, lses = random_states(3, 5, 3, 24, torch.float32, device, gen)
    want_out, want_lse = reference_merge(list(states), list(lses))
    lses_conv = _to_convention(lses, lse_base, lse_layout)
    assert lse_layout == "ht" or lses_conv.shape == (3, 5, 3)
    factor = 1 / math.log(2.0) if lse_base == "2" else 1.0
    want_lse_conv = want_lse * factor if lse_layout == "ht" else (want_lse * factor).t()
    convention = {"lse_base": lse_base, "lse_layout": lse_layout, "backend": backend}

    out, lse = splitkv.merge_states(states, lses_conv, **convention)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=2e-5, equal_nan=True)
    torch.testing.assert_close(lse.double(), want_lse_conv, atol=1e-4, rtol=1e-5)
    out2, lse2 = splitkv.merge_attn_states(states[0], lses_conv[0], states[1], lses_conv[1], **convention)
    want2_out, want2_lse = reference_merge([states[0], states[1]], [lses[0], lses[1]])
    torch.testing.assert_close(out2.double(), want2_out, atol=2e-5, rtol=2e-5)
    want2 = want2_lse * factor if lse_layout == "ht" else (want2_lse * factor).t()
    torch.testing.assert_close(lse2.double(), want2, atol=1e-4, rtol=1e-5)
    # in place into a buffer of the convention's layout
    buffer = torch.full_like(lses_conv[0], float("nan"))
    splitkv.merge_attn_states(states[0], lses_conv[0], states[1], lses_conv[1], output_lse=buffer, **convention)
    torch.testing.assert_close(buffer.double(), want2, atol=1e-4, rtol=1e-5)


def test_bad_conventions_name_the_argument():
    states = torch.randn(2, 3, 2, 8)
    lses = torch.randn(2, 2, 3)
    with pytest.raises(ValueError, match="lse_base must be 'e'"):
        splitkv.merge_states(states, lses, lse_base="10")
    with pytest.raises(ValueError, match="lse_layout must be 'ht'"):
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], lse_layout="TH")
    with pytest.raises(ValueError, match=r"prefix_lse must be \[tokens, heads\]"):
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], lse_layout="th")


# The backends of the fp8 tests: Triton only on a GPU.
FP8_BACKENDS = [
    "torch",
    pytest.param("cuda", marks=pytest.mark.skipif(not ON_CUDA, reason="the CUDA kernels need a CUDA device")),
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not ON_CUDA, reason="the Triton interpreter's fp8 cast rounds some values a binade low (-124 -> -64)"
        ),
    ),
]


def _quantised_reference(out64: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    return (out64 / scale).clamp(-limit, limit).to(dtype)


@pytest.mark.parametrize("backend", FP8_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scale_kind", ["float", "tensor", "tensor-1x1x1x1"])
def test_fp8_output(backend, dtype, scale_kind):
    device = _device(backend)
    gen = torch.Generator().manual_seed(12)
    states, lses = random_states(2, 6, 2, 16, torch.bfloat16, device, gen)
    states = states * 300  # some values beyond e4m3's 448 after the scale: saturated, not NaN
    want_out, want_lse = reference_merge(list(states), list(lses))
    scale = 0.5
    # One element of any shape is a scale (the torch backend once broadcast a 4-d one over the output).
    shape = (1, 1, 1, 1) if scale_kind == "tensor-1x1x1x1" else (1,)
    output_scale = scale if scale_kind == "float" else torch.full(shape, scale, device=device)
    want = _quantised_reference(want_out, dtype, scale).float()
    for out, lse in (
        splitkv.merge_states(states, lses, output_dtype=dtype, output_scale=output_scale, backend=backend),
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], output_dtype=dtype,
                                  output_scale=output_scale, backend=backend),  # fmt: skip
    ):
        assert out.dtype == dtype
        got = out.float()
        # one fp8 step apart at most (the merge rounds through float32 and bf16 inputs)
        step = torch.where(want.abs() > 0, want.abs() * (2**-3 if dtype == torch.float8_e4m3fn else 2**-2), 1e-2)
        assert ((got - want).abs() <= step).all()
        assert not torch.isnan(got).any()
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-5)
    limit = torch.finfo(dtype).max
    saturated, _ = splitkv.merge_states(states, lses, output_dtype=dtype, output_scale=1e-3, backend=backend)
    assert saturated.float().abs().max() == limit
    # without a scale: divided by 1, still saturated (a plain cast would give NaN for e4m3fn)
    unscaled, _ = splitkv.merge_states(states * (limit / 100), lses, output_dtype=dtype, backend=backend)
    assert unscaled.float().abs().max() == limit and not torch.isnan(unscaled.float()).any()


@pytest.mark.parametrize("backend", FP8_BACKENDS)
@pytest.mark.parametrize("scale", [1e-39, 3e38, 1e39], ids=["subnormal", "subnormal-reciprocal", "past-float32"])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_fp8_scales_at_float32_edges(backend, scale, scale_kind):
    """Scales whose float32 value or reciprocal is not a normal float (the CUDA kernel
    divides through the reciprocal only where it is one): the division's fp8 values,
    saturated or 0, and 0 for rows whose states are all empty, never NaN."""
    device = _device(backend)
    dtype = torch.float8_e4m3fn
    gen = torch.Generator().manual_seed(13)
    states, lses = random_states(2, 6, 2, 16, torch.bfloat16, device, gen, inf_fraction=0)
    lses[:, :, 0] = float("-inf")  # token 0: every state empty, output exactly 0
    want_out, _ = reference_merge(list(states), list(lses))
    scale32 = torch.tensor([scale], dtype=torch.float32)  # what every kernel divides by
    want = _quantised_reference(want_out, dtype, scale32.double().item()).float().cpu()
    output_scale = scale if scale_kind == "float" else scale32.to(device)
    fp8 = {"output_dtype": dtype, "output_scale": output_scale, "backend": backend}
    for out, _lse in (
        splitkv.merge_states(states, lses, **fp8),
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], **fp8),
    ):
        got = out.float().cpu()
        assert not torch.isnan(got).any()
        assert (got[0] == 0).all()
        step = torch.where(want.abs() > 0, want.abs() * 2**-3, 1e-2)
        assert ((got - want).abs() <= step).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_output_keeps_nan(backend, dtype):
    """A NaN LSE (or output value) gives NaN in an fp8 result, as in a 16-bit one: the
    saturation keeps NaN (Triton's tl.clamp had made it -max by default)."""
    if backend == "triton" and not ON_CUDA and dtype == torch.float8_e4m3fn:
        pytest.skip("the Triton interpreter's float32 -> e4m3 cast turns NaN into 384")
    device = _device(backend)
    ones = torch.ones(2, 1, 4, device=device)
    lse = torch.tensor([[float("nan"), 0.0]], device=device)
    fp8 = {"output_dtype": dtype, "backend": backend}
    for scale in (None, 0.5):
        two, _ = splitkv.merge_attn_states(ones, lse, ones, torch.zeros_like(lse), output_scale=scale, **fp8)
        many, _ = splitkv.merge_states(torch.stack([ones, ones]), torch.stack([lse, torch.zeros_like(lse)]),
                                       output_scale=scale, **fp8)  # fmt: skip
        for out in (two, many):
            assert torch.isnan(out[0].float()).all() and (out[1].float() == 1 / (scale or 1)).all()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if ON_CUDA else []))
def test_fp8_bad_scales(device):
    # On CUDA the C++ fast path sees these first: it must leave each to the Python errors.
    states = torch.randn(2, 3, 2, 8, device=device)
    lses = torch.randn(2, 2, 3, device=device)
    fp8 = torch.float8_e4m3fn
    with pytest.raises(TypeError, match="output_scale must be a float or a float32 tensor"):
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], output_dtype=fp8, output_scale=True)
    with pytest.raises(ValueError, match="output_scale must be finite and positive"):
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], output_dtype=fp8, output_scale=-1.0)
    with pytest.raises(ValueError, match="output_scale applies to an fp8 output only"):
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], output_scale=2.0)
    with pytest.raises(TypeError):  # an output buffer of another dtype than output_dtype asks for
        splitkv.merge_states(states, lses, output=torch.empty(3, 2, 8, device=device), output_dtype=torch.float16)
    with pytest.raises(ValueError, match="output_scale must be finite and positive"):
        splitkv.merge_states(states, lses, output_dtype=fp8, output_scale=0.0)
    for tiny in (1e-46, 2.0**-150):  # positive, but 0 in float32: the kernels divided by 0
        with pytest.raises(ValueError, match="above 2\\*\\*-150"):
            splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], output_dtype=fp8, output_scale=tiny)
    with pytest.raises(ValueError, match="output_scale must be a float or a one-element float32 tensor"):
        splitkv.merge_states(states, lses, output_dtype=fp8, output_scale=torch.ones(2))
    with pytest.raises(ValueError, match="output_scale applies to an fp8 output only"):
        splitkv.merge_states(states, lses, output_scale=2.0)
    with pytest.raises(TypeError, match="the output dtype must be"):
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], output_dtype=torch.float16)
    with pytest.raises(ValueError, match=f"output_scale must be a float or a one-element float32 tensor on {device}"):
        splitkv.merge_states(states, lses, output_dtype=fp8, output_scale=torch.ones(1, dtype=torch.float64))


_ALL_OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.skipif(not ON_CUDA, reason="the CUDA ops need a CUDA device")
def test_cuda_ops_opcheck_with_scales():
    """The mutating CUDA ops with an LSE scale and an fp8 output scale (float and tensor)."""
    from splitkv import _cuda

    assert _cuda.load_error() == ""
    gen = torch.Generator().manual_seed(13)
    states, lses = random_states(2, 8, 2, 64, torch.bfloat16, "cuda", gen, inf_fraction=0)
    out_lse = torch.empty(2, 8, device="cuda")
    scale = torch.tensor([0.5], device="cuda")
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        out = torch.empty(8, 2, 64, dtype=dtype, device="cuda")
        # opcheck's schema test does arithmetic on the outputs, which torch has no fp8
        # kernels for ("mul_cuda" not implemented for Float8_e4m3fn, seen on the H200): an
        # fp8 output gets the fake-tensor test only (its values: test_fp8_output).
        utils = ("test_faketensor",) if dtype == torch.float8_e4m3fn else _ALL_OPCHECK_TESTS
        torch.library.opcheck(torch.ops.splitkv.merge_states.default,
                              (out, out_lse, states, lses, math.log(2.0), 0.5, None), test_utils=utils)  # fmt: skip
        args = (out, out_lse, states[0], lses[0], states[1], lses[1], math.log(2.0), 1.0, scale)
        torch.library.opcheck(torch.ops.splitkv.merge_attn_states.default, args, test_utils=utils)


def test_compile_fullgraph_with_conventions_and_fp8():
    """torch.compile(fullgraph=True) of the in-place (mutating op) path with log2 [tokens,
    heads] LSEs and an fp8 output, against eager."""
    gen = torch.Generator().manual_seed(14)
    states, lses = random_states(3, 4, 2, 8, torch.float32, "cpu", gen)
    lses_th = (lses / math.log(2.0)).transpose(1, 2).contiguous()

    def merge(s, l):  # noqa: E741
        out = torch.empty(4, 2, 8, dtype=torch.float8_e4m3fn)
        lse = torch.empty(4, 2)
        splitkv.merge_states(s, l, output=out, output_lse=lse, lse_base="2", lse_layout="th", output_scale=0.25,
                             backend="torch")  # fmt: skip
        return out.float(), lse

    compiled = torch.compile(merge, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(states, lses_th), merge(states, lses_th)):
        torch.testing.assert_close(got, want, equal_nan=True)
