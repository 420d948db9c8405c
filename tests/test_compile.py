"""torch.compile and CUDA graphs over splitkv's ops: fullgraph tracing gives the eager
result, a decode step compiles once for all sequence lengths, bad input keeps its
clear error, and (on the GPU) a whole multi-layer decode step is captured in a CUDA
graph and replayed with new lengths."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import splitkv
from splitkv.bench.common import capture_graph
from splitkv.nn import SharedPrefixKVCache

from test_attention_autograd import dense_attention64

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _varlen(lens_q, lens_k, heads_q=4, heads_kv=2, head_dim=16, device="cpu", dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), heads_q, head_dim, generator=generator).to(device, dtype)
    k = torch.randn(sum(lens_k), heads_kv, head_dim, generator=generator).to(device, dtype)
    v = torch.randn(sum(lens_k), heads_kv, head_dim, generator=generator).to(device, dtype)

    def bounds(lens):
        return torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)

    return q, k, v, bounds(lens_q), bounds(lens_k)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_ops_under_fullgraph_compile_give_the_eager_result(device):
    # CPU: aot_eager (fast); GPU: Inductor in bfloat16, the Triton kernels and flash attention.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, cu_q, cu_k = _varlen([2, 0, 3], [4, 2, 5], device=device, dtype=dtype)
    used = torch.tensor([3, 2, 5], dtype=torch.int32, device=device)
    if device == "cuda":  # long enough for the split kernel to split
        q, k, v, cu_q, cu_k = _varlen([2, 0, 3], [400, 20, 700], device=device, dtype=dtype)
        used = torch.tensor([300, 20, 650], dtype=torch.int32, device=device)
    max_k = int((cu_k[1:] - cu_k[:-1]).max())

    def step(q, k, v):
        out, lse = splitkv.attention_with_lse(q, k, v, cu_q, cu_k, 3, max_k, causal=True, seqused_k=used)
        split_out, split_lse = splitkv.split_kv_attention(q, k, v, cu_q, cu_k, 3, max_k, causal=True, num_splits=2)
        prefix_k, prefix_v = k[:3], v[:3]
        cascade_out, cascade_lse = splitkv.cascade_attention(q, cu_q, prefix_k, prefix_v, k, v, cu_k,
                                                             return_lse=True, seqused_k=used)  # fmt: skip
        return out * 2, lse, split_out, split_lse, cascade_out, cascade_lse

    counter = CompileCounterWithBackend("aot_eager" if device == "cpu" else "inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    expected = step(q, k, v)
    got = compiled(q, k, v)
    assert counter.frame_count == 1
    exact = {"rtol": 0, "atol": 0} if device == "cpu" else {"rtol": 1e-2, "atol": 1e-2}  # Inductor's own `* 2`
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, equal_nan=True, **exact)
    # ... and against a float64 reference written in the tests
    cpu = [t.cpu() for t in (q, k, v, cu_q, cu_k, used)]
    ref_out, ref_lse = dense_attention64(*cpu[:5], True, 16**-0.5, cpu[5])
    tol = {"atol": 1e-5, "rtol": 1e-5} if device == "cpu" else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(got[0].double().cpu(), 2 * ref_out, **tol)
    torch.testing.assert_close(got[1].double().cpu(), ref_lse, atol=1e-3, rtol=1e-3)
    full_ref_out, _ = dense_attention64(*cpu[:5], True, 16**-0.5)
    torch.testing.assert_close(got[2].double().cpu(), full_ref_out, **tol)


def test_compiled_attention_backward_matches_eager():
    q, k, v, cu_q, cu_k = _varlen([2, 3], [4, 5], seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def loss(q, k, v):
        out, lse = splitkv.attention_with_lse(q, k, v, cu_q, cu_k, 3, 5, causal=True)
        return (out * out).sum() + lse.sum()

    loss(*leaves).backward()
    expected = [t.grad for t in leaves]
    compiled_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.compile(loss, backend="aot_eager", fullgraph=True)(*compiled_leaves).backward()
    for e, t in zip(expected, compiled_leaves):
        torch.testing.assert_close(t.grad, e)


def _layer_stack(weights, heads_q, heads_kv, head_dim):
    """A toy model: per layer, q/k/v from one matmul, the cache step's attention, a residual."""

    def layer_stack(step, x):
        for layer, w in enumerate(weights):
            qkv = (x @ w).view(x.shape[0], heads_q + 2 * heads_kv, head_dim)
            q, k, v = qkv.split([heads_q, heads_kv, heads_kv], dim=1)
            x = x + step.attention(layer, q.contiguous(), k.contiguous(), v.contiguous()).flatten(1)
        return x

    return layer_stack


@pytest.mark.parametrize("mode", ["cascade", "plain"])
def test_decode_steps_compile_once_for_every_length(mode, monkeypatch):
    # The cascade's two-pass path (the CPU's without the interpreter, as a user's CPU run has
    # it): 40 Triton launches in the interpreter would take a minute, and the op is as opaque
    # to the compiler either way.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layers, batch, heads_q, heads_kv, head_dim = 2, 3, 4, 2, 16
    # Two caches fed the same inputs: one stepped by the compiled function, one eagerly.
    caches = [SharedPrefixKVCache(layers, batch, heads_q, heads_kv, head_dim, capacity=32, mode=mode,
                                  dtype=torch.float32) for _ in range(2)]  # fmt: skip
    generator = torch.Generator().manual_seed(2)
    weights = [torch.randn(heads_q * head_dim, (heads_q + 2 * heads_kv) * head_dim, generator=generator) * 0.1
               for _ in range(layers)]  # fmt: skip

    layer_stack = _layer_stack(weights, heads_q, heads_kv, head_dim)

    prefix_x = torch.randn(5, heads_q * head_dim, generator=generator)
    suffix_x = torch.randn(5, heads_q * head_dim, generator=generator)
    for cache in caches:
        layer_stack(cache.prefill_prefix(5), prefix_x)
        layer_stack(cache.begin_step([2, 0, 3]), suffix_x)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer_stack, backend=counter, fullgraph=True)
    for _ in range(20):
        x = torch.randn(batch, heads_q * head_dim, generator=generator)
        got = compiled(caches[0].begin_step([1] * batch), x)
        expected = layer_stack(caches[1].begin_step([1] * batch), x)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compiles for 20 decode steps"
    assert caches[0].suffix_lengths == caches[1].suffix_lengths == [22, 20, 23]


def test_loading_the_cuda_extension_does_not_recompile(monkeypatch):
    """The eager C++ fast paths hang on a module global that is None until the CUDA
    extension loads; a traced read of it would be a guard, and the compiled function would
    recompile the first time the extension loads after it was traced (seen on the H200)."""
    from splitkv import _cuda

    q, k, v, cu_q, cu_k = _varlen([2, 3], [4, 5])

    def step(q):
        out, lse = splitkv.attention_with_lse(q, k, v, cu_q, cu_k, 3, 5, causal=True)
        two, _ = splitkv.merge_attn_states(out, lse, out, lse)
        many, _ = splitkv.merge_states(torch.stack([out, two]), torch.stack([lse, lse]))
        return many

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    first = compiled(q)
    monkeypatch.setattr(_cuda, "eager_ops", object())  # "loaded": never called while tracing
    torch.testing.assert_close(compiled(q), first, rtol=0, atol=0)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles: the extension's loading caused a recompile"


def test_compiled_decode_step_equals_eager():
    # The same decode steps, eager and compiled, on two caches fed the same inputs.
    caches = [SharedPrefixKVCache(1, 2, 4, 2, 16, capacity=8, mode="cascade", dtype=torch.float32) for _ in range(2)]
    generator = torch.Generator().manual_seed(3)
    prefix = [torch.randn(4, h, 16, generator=generator) for h in (4, 2, 2)]
    for cache in caches:
        cache.prefill_prefix(4).attention(0, *prefix)

    def attend(step, q, k, v):
        return step.attention(0, q, k, v) * 1.0

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        qkv = [torch.randn(2, h, 16, generator=generator) for h in (4, 2, 2)]
        eager = attend(caches[0].begin_step([1, 1]), *qkv)
        got = compiled(caches[1].begin_step([1, 1]), *qkv)
        torch.testing.assert_close(got, eager, rtol=0, atol=0)


def test_bad_input_keeps_its_error_under_compile():
    q, k, v, cu_q, cu_k = _varlen([2], [3])

    def call(q):
        return splitkv.attention_with_lse(q, k, v, cu_q.long(), cu_k, 2, 3)

    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype torch.int32"):
        call(q)
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype torch.int32"):
        torch.compile(call, backend="aot_eager")(q)


def test_new_scale_values_keep_fullgraph():
    """A second float value makes dynamo's float symbolic: the scale checks are
    comparisons it can trace (math.isfinite was not, and broke fullgraph on the second
    softmax_scale or fp8 output_scale of a step), and bad values keep their message."""
    q, k, v, cu_q, cu_k = _varlen([1, 1], [2, 3])

    def attend(q, scale):
        return splitkv.attention_with_lse(q, k, v, cu_q, cu_k, 1, 3, softmax_scale=scale)[0]

    def merge_fp8(out, lse, scale):
        return splitkv.merge_attn_states(out, lse, out, lse, output_dtype=torch.float8_e4m3fn, output_scale=scale,
                                         backend="torch")[0].float()  # fmt: skip

    compiled_attend = torch.compile(attend, backend="aot_eager", fullgraph=True)
    compiled_merge = torch.compile(merge_fp8, backend="aot_eager", fullgraph=True)
    lse = torch.randn(4, 2)
    for scale in (0.25, 0.3, 0.4):
        torch.testing.assert_close(compiled_attend(q, scale), attend(q, scale), rtol=0, atol=0)
        out = attend(q, scale)
        torch.testing.assert_close(compiled_merge(out, lse, 2 * scale), merge_fp8(out, lse, 2 * scale), rtol=0, atol=0)
    # fullgraph reports a raised error as Unsupported with the error as its cause: torch
    # 2.13 keeps the message there; torch 2.11 names only the type (ObservedValueError).
    with pytest.raises(Exception) as raised:
        compiled_attend(q, float("nan"))
    _expect_observed_value_error(raised.value, "softmax_scale must be a finite positive float, got nan")
    with pytest.raises(Exception) as raised:
        compiled_merge(attend(q, 0.25), lse, -1.0)
    _expect_observed_value_error(raised.value, "output_scale must be finite and positive")
    # Without fullgraph the refusal runs eagerly, with its message on every torch.
    with pytest.raises(ValueError, match="softmax_scale must be a finite positive float, got nan"):
        torch.compile(attend, backend="aot_eager")(q, float("nan"))


def _expect_observed_value_error(error: BaseException, message: str) -> None:
    cause = repr(error.__cause__)
    assert message in cause or "ObservedValueError" in cause, cause


@pytest.mark.slow  # Inductor's CPU compile: about 40 s on 2 busy cores
def test_cascade_under_inductor():
    # The case of issue 16: Inductor compiling a function that calls cascade_attention.
    q, k, v, cu_q, cu_k = _varlen([1, 2], [3, 4], seed=4)
    prefix_k, prefix_v = k[:2].clone(), v[:2].clone()

    def step(q):
        return splitkv.cascade_attention(q * 1.5, cu_q, prefix_k, prefix_v, k, v, cu_k, max_seqlen_q=2,
                                         max_seqlen_k=4) + 1  # fmt: skip

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(q), step(q))


def _ops():
    return [torch.ops.splitkv.attention_with_lse.default, torch.ops.splitkv.split_kv_attention.default,
            torch.ops.splitkv.cascade_attention.default]  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, cu_q, cu_k = _varlen([2, 3], [4, 5], device=device, dtype=dtype)
    scale = 0.25
    attention, split_kv, cascade = _ops()
    grad = [t.clone().requires_grad_() for t in (q, k, v)] if device == "cpu" else [q, k, v]
    torch.library.opcheck(attention, (*grad, cu_q, cu_k, 3, 5, True, scale, None, "auto"))
    torch.library.opcheck(split_kv, (q, k, v, cu_q, cu_k, 3, 5, True, scale, 2))
    torch.library.opcheck(cascade, (q, cu_q, k[:2].contiguous(), v[:2].contiguous(), k, v, cu_k, scale, True, 3, 5,
                                    -1, None))  # fmt: skip


@GPU
@pytest.mark.parametrize("mode", ["cascade", "plain"])
def test_cuda_graph_replays_a_multi_layer_decode_step(mode):
    layers, batch, heads_q, heads_kv, head_dim = 3, 4, 8, 2, 64
    device, dtype = torch.device("cuda"), torch.bfloat16
    kwargs = dict(capacity=64, mode=mode, dtype=dtype, device=device)
    caches = [SharedPrefixKVCache(layers, batch, heads_q, heads_kv, head_dim, **kwargs) for _ in range(2)]
    generator = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    weights = [randn(heads_q * head_dim, (heads_q + 2 * heads_kv) * head_dim) * 0.05 for _ in range(layers)]

    layer_stack = _layer_stack(weights, heads_q, heads_kv, head_dim)

    prompt, suffix = randn(300, heads_q * head_dim), randn(10, heads_q * head_dim)
    for cache in caches:
        layer_stack(cache.prefill_prefix(300), prompt)
        layer_stack(cache.begin_step([1, 2, 3, 4]), suffix)
    graph_cache, eager_cache = caches
    static_x = torch.zeros(batch, heads_q * head_dim, device=device, dtype=dtype)
    # The first decode step runs eagerly on both caches (on a side stream for the graph's:
    # the warm-up that compiles the kernels before the capture), then is captured.
    step = graph_cache.begin_step([1] * batch)
    layer_stack(eager_cache.begin_step([1] * batch), static_x)
    graph, static_out = capture_graph(lambda: layer_stack(step, static_x))
    for _ in range(10):  # each replay: new lengths (one more key per sequence), new inputs
        x = randn(batch, heads_q * head_dim)
        assert graph_cache.begin_step([1] * batch) is step
        static_x.copy_(x)
        graph.replay()
        expected = layer_stack(eager_cache.begin_step([1] * batch), x)
        torch.testing.assert_close(static_out, expected, atol=2e-2, rtol=2e-2)
    assert graph_cache.suffix_lengths == eager_cache.suffix_lengths == [12, 13, 14, 15]
