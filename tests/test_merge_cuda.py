"""The CUDA merge op on a GPU: opcheck, torch.compile, CUDA graphs, every vector width,
64-bit offsets, and agreement between the three backends."""

import math

import pytest
import torch
from merge_reference import LSE_TOLERANCE, TOLERANCES, random_states, reference_merge

import splitkv
from splitkv import _cuda

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; the CUDA kernel cannot run on CPU"
)


@pytest.fixture(scope="module", autouse=True)
def built_ops():
    assert _cuda.load_error() == "", _cuda.load_error()


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_lse", [True, False])
def test_opcheck(dtype, with_lse):
    states, lses = random_states(3, 37, 4, 128, dtype, "cuda", _g(0))
    out = torch.empty_like(states[0])
    out_lse = torch.empty_like(lses[0]) if with_lse else None
    torch.library.opcheck(
        torch.ops.splitkv.merge_attn_states.default, (out, out_lse, states[0], lses[0], states[1], lses[1])
    )
    torch.library.opcheck(torch.ops.splitkv.merge_states.default, (out, out_lse, states, lses))


def test_torch_compile_fullgraph():
    states, lses = random_states(2, 613, 8, 128, torch.bfloat16, "cuda", _g(1), inf_fraction=0)

    def attention_tail(prefix, prefix_lse, suffix, suffix_lse):
        out, lse = splitkv.merge_attn_states(prefix, prefix_lse, suffix, suffix_lse)
        return out.float() * 2.0, lse + 1.0

    compiled = torch.compile(attention_tail, fullgraph=True)
    got = compiled(states[0], lses[0], states[1], lses[1])
    want = attention_tail(states[0], lses[0], states[1], lses[1])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_cuda_graph_capture_and_replay():
    states, lses = random_states(2, 256, 16, 128, torch.float16, "cuda", _g(2))
    static_states, static_lses = states.clone(), lses.clone()
    out, out_lse = torch.empty_like(states[0]), torch.empty_like(lses[0])

    def step():
        splitkv.merge_attn_states(
            static_states[0], static_lses[0], static_states[1], static_lses[1], output=out, output_lse=out_lse
        )

    step()  # builds and warms up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (3, 4):
        new_states, new_lses = random_states(2, 256, 16, 128, torch.float16, "cuda", _g(seed))
        static_states.copy_(new_states)
        static_lses.copy_(new_lses)
        out.fill_(float("nan"))
        graph.replay()
        ref_out, ref_lse = reference_merge(list(new_states.unbind(0)), list(new_lses.unbind(0)))
        torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[torch.float16])
        torch.testing.assert_close(out_lse.double(), ref_lse, **LSE_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0, 1, 2, 4])
@pytest.mark.parametrize("head_dim", [64, 65, 80])
def test_every_vector_width(dtype, offset, head_dim):
    """Views that start `offset` elements into their storage, and head sizes that are not a
    multiple of 8, take the 8-, 4- and 2-byte paths of the kernel."""
    tokens, heads = 97, 3
    states, lses = random_states(2, tokens, heads, head_dim, dtype, "cuda", _g(offset * 100 + head_dim))
    storage = torch.empty(2, tokens * heads * head_dim + offset, dtype=dtype, device="cuda")
    views = [storage[i, offset:].view(tokens, heads, head_dim) for i in range(2)]
    for v, s in zip(views, states):
        v.copy_(s)
    out_storage = torch.full((tokens * heads * head_dim + offset,), float("nan"), dtype=dtype, device="cuda")
    out = out_storage[offset:].view(tokens, heads, head_dim)
    splitkv.merge_attn_states(views[0], lses[0], views[1], lses[1], output=out, backend="cuda")
    ref_out, _ = reference_merge(list(states.unbind(0)), list(lses.unbind(0)))
    torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[dtype])
    n_out, _ = splitkv.merge_states(storage[:, offset:].view(2, tokens, heads, head_dim), lses, backend="cuda")
    torch.testing.assert_close(n_out.double(), ref_out, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_offsets_past_2_31_elements(backend):
    """A token stride large enough that token * stride passes 2^31 elements."""
    tokens, heads, head_dim = 3, 2, 64
    stride = 2**30 + 64
    storage = torch.zeros(stride * (tokens - 1) + heads * head_dim, dtype=torch.bfloat16, device="cuda")
    prefix = storage.as_strided((tokens, heads, head_dim), (stride, head_dim, 1))
    states, lses = random_states(2, tokens, heads, head_dim, torch.bfloat16, "cuda", _g(5), inf_fraction=0)
    prefix.copy_(states[0])
    out, lse = splitkv.merge_attn_states(prefix, lses[0], states[1], lses[1], backend=backend)
    ref_out, ref_lse = reference_merge(list(states.unbind(0)), list(lses.unbind(0)))
    torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(lse.double(), ref_lse, **LSE_TOLERANCE)
    del storage


@pytest.mark.slow
def test_row_just_below_2_31_elements():
    """One row of 2^31 - 8 elements: its offsets fit 32 bits, but the kernel's offset
    within the row runs a turn past head_dim before its loop ends, so the launch must not
    take 32-bit offsets (it looped forever, writing 2^31 elements before the row)."""
    head_dim = 2**31 - 8
    prefix = torch.ones(1, 1, head_dim, dtype=torch.bfloat16, device="cuda")
    suffix = torch.full_like(prefix, 3.0)
    lse = torch.zeros(1, 1, device="cuda")
    out, merged_lse = splitkv.merge_attn_states(prefix, lse, suffix, lse.clone(), backend="cuda")
    del prefix, suffix
    assert bool((out == 2.0).all())
    torch.testing.assert_close(merged_lse, torch.full_like(lse, math.log(2.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_backends_agree(dtype):
    """The seed's cross-check: CUDA vs Triton vs torch on one input, max abs differences printed."""
    states, lses = random_states(2, 4096, 16, 128, dtype, "cuda", _g(6), inf_fraction=0.01)
    results = {b: splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], backend=b) for b in
               ("cuda", "triton", "torch")}  # fmt: skip
    for a, b in (("cuda", "triton"), ("triton", "torch"), ("cuda", "torch")):
        out_diff = (results[a][0].float() - results[b][0].float()).abs().max().item()
        lse_diff = (results[a][1] - results[b][1]).abs().max().item()
        print(f"{dtype} max abs diff ({a} vs {b}): output {out_diff:.3g}, lse {lse_diff:.3g}")
        torch.testing.assert_close(results[a][0], results[b][0], **TOLERANCES[dtype])
        torch.testing.assert_close(results[a][1], results[b][1], **LSE_TOLERANCE)


def test_auto_picks_cuda_and_env_disables_it(monkeypatch):
    states, lses = random_states(2, 8, 2, 64, torch.float16, "cuda", _g(7))
    assert splitkv.explain_merge(states[0], lses[0], states[1], lses[1]).splitlines()[0].endswith("-> cuda")
    monkeypatch.setenv("SPLITKV_DISABLE_CUDA", "1")
    assert splitkv.explain_merge(states[0], lses[0], states[1], lses[1]).splitlines()[0].endswith("-> triton")
