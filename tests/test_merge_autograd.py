"""Gradients of merge_attn_states and merge_states on every backend, against a float64
merge written here (logsumexp form) differentiated by torch.autograd."""

import pytest
import torch

import splitkv

ON_CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not ON_CUDA, reason="the CUDA kernels need a CUDA device")


def reference_merge(states, lses):
    """float64 merge of states [S, T, H, D] with natural-log lses [S, H, T], differentiable;
    empty states (+-inf) are masked out before logsumexp so their gradients are exactly 0."""
    states, lses = states.double(), lses.double()
    empty = torch.isinf(lses)
    finite = torch.where(empty, float("-inf"), lses)
    merged_lse = torch.logsumexp(finite, dim=0)  # [H, T]; all empty -> -inf
    safe = torch.where(torch.isinf(merged_lse), 0.0, merged_lse)
    weights = torch.where(empty, 0.0, torch.exp(torch.where(empty, 0.0, finite) - safe))  # [S, H, T]
    values = torch.where(empty.transpose(1, 2)[..., None], 0.0, states)
    out = (weights.transpose(1, 2)[..., None] * values).sum(dim=0)
    return out, merged_lse


def _inputs(num_states, tokens, heads, head_dim, dtype, device, seed, empties=True):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(num_states, tokens, heads, head_dim, generator=gen, dtype=torch.float64)
    lses = (torch.rand(num_states, heads, tokens, generator=gen, dtype=torch.float64) - 0.5) * 6
    if empties:
        lses[0, 0, 0] = float("inf")
        lses[-1, -1, -1] = float("-inf")
        lses[:, 0, -1] = float("inf")  # a row where every state is empty
        states[0, 0, 0] = float("nan")  # an empty state's output never reaches a gradient
        states[:, -1, 0] = float("nan")
    return states.to(device, dtype), lses.to(device, torch.float64 if dtype == torch.float64 else torch.float32)


def _loss_weights(tokens, heads, head_dim, device, seed):
    gen = torch.Generator().manual_seed(seed + 100)
    return (torch.randn(tokens, heads, head_dim, generator=gen, dtype=torch.float64).to(device),
            torch.randn(heads, tokens, generator=gen, dtype=torch.float64).to(device))  # fmt: skip


def _grads(merge, states, lses, out_weight, lse_weight):
    """Gradients of a loss through both outputs; the merged lse's -inf rows take weight 0."""
    states = states.detach().clone().requires_grad_()
    lses = lses.detach().clone().requires_grad_()
    out, lse = merge(states, lses)
    finite = torch.where(torch.isinf(lse), 0.0, lse.double())
    loss = (out.double() * out_weight).sum() + (finite * lse_weight).sum()
    loss.backward()
    return states.grad, lses.grad


def _two(backend):
    return lambda s, l: splitkv.merge_attn_states(s[0], l[0], s[1], l[1], backend=backend)  # noqa: E741


def _n(backend):
    return lambda s, l: splitkv.merge_states(s, l, backend=backend)  # noqa: E741


def test_gradcheck_torch_backend():
    states, lses = _inputs(2, 3, 2, 5, torch.float64, "cpu", 0, empties=False)
    po, so = states.unbind(0)
    pl, sl = lses.unbind(0)
    args = [t.clone().requires_grad_() for t in (po, pl, so, sl)]
    assert torch.autograd.gradcheck(lambda *a: splitkv.merge_attn_states(*a, backend="torch"), args)
    n_states, n_lses = _inputs(3, 2, 2, 3, torch.float64, "cpu", 1, empties=False)
    n_args = [n_states.requires_grad_(), n_lses.requires_grad_()]
    assert torch.autograd.gradcheck(lambda s, l: splitkv.merge_states(s, l, backend="torch"), n_args)  # noqa: E741


@pytest.mark.parametrize("merge", ["two", "n"])
@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_gradients_match_float64(merge, backend):
    """fp32 gradients (with empty states, an all-empty row, NaN in empty states' outputs,
    odd head_dim) against the float64 reference's; empty states get exactly 0."""
    device = "cuda" if ON_CUDA and backend != "torch" else "cpu"
    num_states = 2 if merge == "two" else 5
    tokens, heads, head_dim = 4, 3, 7
    states, lses = _inputs(num_states, tokens, heads, head_dim, torch.float32, device, 2)
    weights = _loss_weights(tokens, heads, head_dim, device, 2)
    got = _grads((_two if merge == "two" else _n)(backend), states, lses, *weights)
    want = _grads(reference_merge, states.double(), lses.double(), *weights)
    for g, w in zip(got, want):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=2e-5)
    empty = torch.isinf(lses)
    assert (got[1][empty] == 0).all()
    assert (got[0][empty.transpose(1, 2)] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_nan_lse_propagates_to_gradients(backend):
    # Triton runs CUDA tensors on a GPU machine (CPU ones only under the interpreter).
    device = "cuda" if ON_CUDA and backend != "torch" else "cpu"
    states, lses = _inputs(2, 2, 1, 4, torch.float32, device, 3, empties=False)
    lses[0, 0, 1] = float("nan")
    gs, gl = _grads(_two(backend), states, lses, *_loss_weights(2, 1, 4, device, 3))
    assert torch.isnan(gl[:, 0, 1]).all() and torch.isnan(gs[:, 1, 0]).all()
    assert not torch.isnan(gl[:, 0, 0]).any()


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_strided_views_and_unused_lse(backend):
    """Strided (non-contiguous) inputs, LSEs as transposed views, and a loss through the
    output only (no gradient for the merged lse)."""
    device = "cuda" if ON_CUDA and backend != "torch" else "cpu"
    states, lses = _inputs(2, 3, 2, 6, torch.float32, device, 4)
    wide = torch.zeros(2, 3, 4, 8, device=device)
    wide[:, :, ::2, :6] = states
    lse_storage = lses.transpose(1, 2).contiguous()  # [S, T, H]
    views = wide[:, :, ::2, :6].detach().requires_grad_()
    lse_views = lse_storage.transpose(1, 2).detach().requires_grad_()
    out, _ = splitkv.merge_attn_states(views[0], lse_views[0], views[1], lse_views[1], backend=backend)
    out.sum().backward()
    ref_states = states.double().requires_grad_()
    ref_lses = lses.double().requires_grad_()
    reference_merge(ref_states, ref_lses)[0].sum().backward()
    torch.testing.assert_close(views.grad.double(), ref_states.grad, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse_views.grad.double(), ref_lses.grad, atol=2e-5, rtol=2e-5)


def test_output_buffers_and_fp8_refused_with_grad():
    states, lses = _inputs(2, 2, 2, 4, torch.float32, "cpu", 5, empties=False)
    states.requires_grad_()
    with pytest.raises(ValueError, match="output= and output_lse= are overwritten in place"):
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], output=torch.empty(2, 2, 4))
    with pytest.raises(ValueError, match="output= and output_lse= are overwritten in place"):
        splitkv.merge_states(states, lses, output_lse=torch.empty(2, 2))
    with pytest.raises(ValueError, match="not differentiable"):
        splitkv.merge_states(states, lses, output_dtype=torch.float8_e4m3fn)
    with torch.no_grad():  # no grad wanted: the buffers are fine
        out, _ = splitkv.merge_states(states, lses, output=torch.empty(2, 2, 4))
    assert not out.requires_grad


def test_compile_fullgraph_backward():
    """torch.compile(fullgraph=True) through the differentiable ops and their backward."""
    states, lses = _inputs(3, 3, 2, 4, torch.float32, "cpu", 6)
    weights = _loss_weights(3, 2, 4, "cpu", 6)

    def merge(s, l):  # noqa: E741
        return splitkv.merge_states(s, l, backend="torch", lse_base="2", lse_layout="th")

    compiled = torch.compile(merge, fullgraph=True, backend="aot_eager")
    lses_th = lses.transpose(1, 2).contiguous()
    got = _grads(compiled, states, lses_th, *[weights[0], weights[1].t()])
    want = _grads(merge, states, lses_th, *[weights[0], weights[1].t()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_opcheck_differentiable_ops():
    states, lses = _inputs(2, 3, 2, 4, torch.float32, "cpu", 7, empties=False)
    torch.library.opcheck(
        torch.ops.splitkv.merge_states_differentiable.default,
        (states.requires_grad_(), lses.requires_grad_(), torch.float32, 1.0, "ht", "torch"),
    )
    po, so = states.detach().unbind(0)
    pl, sl = lses.detach().unbind(0)
    torch.library.opcheck(
        torch.ops.splitkv.merge_attn_states_differentiable.default,
        tuple(t.clone().requires_grad_() for t in (po, pl, so, sl)) + (1.0, "ht", "torch"),
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float32_partials_into_bfloat16_gradients(backend):
    """float32 partials merged into a bfloat16 result: the lses gradient must not carry
    the result's rounding (before the backward recomputed the merge in float32, the
    Triton and CUDA backwards were 0.04-0.08 off here; what is left is grad_output's own
    bf16 rounding, about 0.017)."""
    device = "cuda" if ON_CUDA and backend != "torch" else "cpu"
    weights = _loss_weights(33, 4, 128, device, 8)
    states, lses = _inputs(4, 33, 4, 128, torch.float32, device, 9)
    got = _grads(lambda s, l: splitkv.merge_states(s, l, output_dtype=torch.bfloat16, backend=backend), states, lses,
                 *weights)  # noqa: E741  # fmt: skip
    want = _grads(reference_merge, states.double(), lses.double(), *weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=2.5e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_sixteen_bit_states_lse_gradients(backend, dtype):
    """16-bit states merged into their own dtype: the lses gradient must not carry the
    rounded result (the Triton backward read it, 0.2 off here, and the gradients of one
    row no longer summed to 0 over the states). grad_output is exact in the dtype, so
    the float64 reference sees the same one."""
    device = "cuda" if ON_CUDA and backend != "torch" else "cpu"
    states, lses = _inputs(4, 64, 2, 128, torch.float64, device, 11, empties=False)
    states, lses = (states * 4).to(dtype), lses.float()
    out_weight = _loss_weights(64, 2, 128, device, 11)[0].to(dtype).double()
    no_lse_weight = torch.zeros(2, 64, dtype=torch.float64, device=device)
    _, got = _grads(lambda s, l: splitkv.merge_states(s, l, backend=backend), states, lses, out_weight,
                    no_lse_weight)  # fmt: skip
    _, want = _grads(reference_merge, states.double(), lses.double(), out_weight, no_lse_weight)
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=0)
    # The merge does not change when every lse of a row moves by the same amount.
    assert got.double().sum(0).abs().max() < 1e-3
    if backend == "torch" and dtype == torch.bfloat16:
        # float64 partials into a 16-bit result keep a float64 backward.
        states, lses = _inputs(4, 64, 2, 128, torch.float64, device, 12, empties=False)
        got = _grads(lambda s, l: splitkv.merge_states(s, l, output_dtype=dtype, backend=backend), states, lses,
                     out_weight, no_lse_weight)  # fmt: skip
        want = _grads(reference_merge, states, lses, out_weight, no_lse_weight)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 200])
def test_cuda_gradients_narrow_dtypes(dtype, head_dim):
    """The CUDA backward in 16-bit types against float64, for both merges, and fp32 partials
    merged into a narrow output (the N-way backward reads the rounded merged output)."""
    weights = _loss_weights(33, 4, head_dim, "cuda", 8)
    tol = {"atol": 3e-2, "rtol": 3e-2}
    for merge, num_states in ((_two("cuda"), 2), (_n("cuda"), 6)):
        states, lses = _inputs(num_states, 33, 4, head_dim, dtype, "cuda", 8)
        got = _grads(merge, states, lses, *weights)
        want = _grads(reference_merge, states.double(), lses.double(), *weights)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, **tol)
    states, lses = _inputs(4, 33, 4, head_dim, torch.float32, "cuda", 9)
    got = _grads(lambda s, l: splitkv.merge_states(s, l, output_dtype=dtype, backend="cuda"), states, lses, *weights)  # noqa: E741
    want = _grads(reference_merge, states.double(), lses.double(), *weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **tol)


@NEEDS_CUDA
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graphed_forward_and_backward(backend):
    """Forward and backward captured in CUDA graphs (make_graphed_callables) give the
    eager gradients."""
    states, lses = _inputs(3, 16, 4, 64, torch.float32, "cuda", 10, empties=False)
    weights = _loss_weights(16, 4, 64, "cuda", 10)

    def merge(s, l):  # noqa: E741
        return splitkv.merge_states(s, l, backend=backend)

    sample = (states.clone().requires_grad_(), lses.clone().requires_grad_())
    graphed = torch.cuda.make_graphed_callables(merge, sample)
    got = _grads(graphed, states, lses, weights[0].float(), weights[1].float())
    want = _grads(merge, states, lses, weights[0].float(), weights[1].float())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
