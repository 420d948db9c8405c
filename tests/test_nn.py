"""splitkv.nn.SharedPrefixKVCache inside a model: cascade generation gives the tokens of the usual way.

The model and both generation loops are the example's (examples/shared_prefix_batching.py):
(a) every request prefills [prompt ; suffix_i] into its own cache, plain causal attention;
(b) the prompt is prefilled once into a SharedPrefixKVCache, then cascade attention.
On a machine without a GPU, conftest.py sets TRITON_INTERPRET=1, so (b) runs the Triton
cascade kernel in the interpreter: the model is kept tiny to stay fast.
"""

import sys
from pathlib import Path

import pytest
import torch
from attention_reference import TOLERANCES

import splitkv
from splitkv.nn import SharedPrefixKVCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import shared_prefix_batching as demo

HAS_CUDA = torch.cuda.is_available()
TINY = demo.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, heads_q=4, heads_kv=2,
                        head_dim=16)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return demo.build_model(TINY, seed=0)


GREEDY_CASES = [  # (prompt tokens, suffix tokens per request (0: empty at first), new tokens, cache mode)
    (12, [5, 0, 9], 5, "cascade"),
    (20, [3], 4, "cascade"),  # a batch of one
    (7, [0, 2, 11, 4, 1], 4, "cascade"),
    (9, [0, 0], 3, "cascade"),  # no suffixes: the prompt's own logits start both requests
    (16, [6, 0, 3], 4, "plain"),  # per-request prefix copies, attention_with_lse
    (16, [6, 0, 3], 4, "auto"),
]


@pytest.mark.parametrize("case", GREEDY_CASES, ids=str)
def test_greedy_tokens_identical(model, case):
    prefix_len, suffix_lens, new_tokens, mode = case
    prompt, suffixes = demo.make_requests(TINY, prefix_len, suffix_lens, seed=prefix_len)
    usual = demo.generate_usual(model, prompt, suffixes, new_tokens)
    shared = demo.generate_shared(model, prompt, suffixes, new_tokens, mode=mode)
    assert shared.tokens.shape == (len(suffix_lens), new_tokens)
    assert torch.equal(shared.tokens, usual.tokens), f"\nusual:\n{usual.tokens}\nshared ({mode}):\n{shared.tokens}"
    batch, capacity = len(suffix_lens), max(suffix_lens) + new_tokens
    expected = {"cascade": True, "plain": False}.get(mode) or splitkv.use_cascade(
        batch, prefix_len, batch * capacity, batch, TINY.heads_q, TINY.heads_kv, TINY.head_dim, 4
    )
    assert shared.uses_cascade is expected


def test_attention_outputs_match_layer_by_layer(model):
    """Every attention output inside the model, layer by layer: decode steps row for row;
    the suffix prefill against the suffix rows, the prompt pass against every request's prompt rows."""
    prefix_len, suffix_lens, new_tokens = 10, [4, 0, 7], 4
    prompt, suffixes = demo.make_requests(TINY, prefix_len, suffix_lens, seed=3)
    seen = {"usual": {}, "shared": {}}

    def recorder(way):
        return lambda phase, layer, out: seen[way].__setitem__((phase, layer), out.clone())

    usual = demo.generate_usual(model, prompt, suffixes, new_tokens, on_attention=recorder("usual"))
    shared = demo.generate_shared(model, prompt, suffixes, new_tokens, on_attention=recorder("shared"))
    assert torch.equal(shared.tokens, usual.tokens)
    tol = TOLERANCES[torch.float32]
    phases = [f"decode{t}" for t in range(1, new_tokens)]
    for layer in range(TINY.num_layers):
        for phase in phases:
            where = f"{phase}, layer {layer}"
            torch.testing.assert_close(seen["shared"][phase, layer], seen["usual"][phase, layer], **tol,
                                       msg=lambda m, where=where: f"{where}: {m}")  # fmt: skip
        start, cu = 0, 0
        for length in suffix_lens:
            usual_prefill = seen["usual"]["prefill", layer]
            torch.testing.assert_close(
                seen["shared"]["prefix", layer], usual_prefill[start : start + prefix_len], **tol
            )
            torch.testing.assert_close(seen["shared"]["prefill", layer][cu : cu + length],
                                       usual_prefill[start + prefix_len : start + prefix_len + length], **tol)  # fmt: skip
            start, cu = start + prefix_len + length, cu + length
    assert set(seen["shared"]) == {(p, layer) for p in ["prefix", "prefill"] + phases for layer in range(2)}


def test_usual_prefill_in_groups_gives_the_same_tokens(model):
    """The usual way prefills a group of requests per forward when a budget is set: same result."""
    prompt, suffixes = demo.make_requests(TINY, 10, [4, 0, 7, 2], seed=3)
    whole = demo.generate_usual(model, prompt, suffixes, 4, keep_logits=True)
    grouped = demo.generate_usual(model, prompt, suffixes, 4, keep_logits=True, prefill_tokens=15)
    assert torch.equal(whole.tokens, grouped.tokens)
    torch.testing.assert_close(whole.logits, grouped.logits)


def test_cache_grows_past_its_capacity(model):
    prompt, suffixes = demo.make_requests(TINY, 8, [3, 0, 5], seed=5)
    usual = demo.generate_usual(model, prompt, suffixes, 5)
    shared = demo.generate_shared(model, prompt, suffixes, 5, capacity=1)
    assert torch.equal(shared.tokens, usual.tokens)


def test_cache_holds_the_prefix_once():
    cache = SharedPrefixKVCache(3, 4, 8, 2, 16, capacity=10, mode="cascade", dtype=torch.float32)
    plain = SharedPrefixKVCache(3, 4, 8, 2, 16, capacity=10, mode="plain", dtype=torch.float32)
    token_bytes = 3 * 2 * 2 * 16 * 4  # layers, K and V, heads_kv, head_dim, float32
    for c in (cache, plain):
        step = c.prefill_prefix(50)
        for layer in range(3):
            step.attention(layer, torch.randn(50, 8, 16), torch.randn(50, 2, 16), torch.randn(50, 2, 16))
        step = c.begin_step([2, 0, 1, 3])
        for layer in range(3):
            step.attention(layer, torch.randn(6, 8, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16))
    assert cache.memory().used == token_bytes * (50 + 6)
    assert cache.memory().allocated == token_bytes * (50 + 4 * 10)
    assert plain.memory().used == token_bytes * (4 * 50 + 6)
    assert plain.memory().allocated == token_bytes * 4 * (50 + 10)
    assert cache.suffix_kv(1, 3)[0].shape == plain.suffix_kv(1, 3)[0].shape == (3, 2, 16)
    assert cache.prefix_kv(2)[0].shape == plain.prefix_kv(2)[0].shape == (50, 2, 16)


def test_auto_mode_follows_use_cascade():
    # A long prefix shared by many decoding sequences: the cost model keeps it once.
    big = SharedPrefixKVCache(1, 64, 32, 8, 128, capacity=512, mode="auto", dtype=torch.bfloat16, device="meta")
    big.prefill_prefix(8192)
    assert big.uses_cascade is splitkv.use_cascade(64, 8192, 64 * 512, 64, 32, 8, 128) is True
    one = SharedPrefixKVCache(1, 1, 32, 8, 128, capacity=512, mode="auto", dtype=torch.bfloat16, device="meta")
    one.prefill_prefix(8192)
    assert one.uses_cascade is False  # nothing to share


@pytest.mark.parametrize("mode", ["cascade", "plain"])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_decode_steps_advance_in_place(mode, device):
    """Consecutive decode steps advance the reused step's plan on the device (positions and
    used keys one further), a step of another kind in between included; on a GPU with no
    host-device sync (a copy from the host would wait for the previous step)."""
    prefix_len, heads_q, heads_kv, head_dim = 3, 4, 2, 8
    cache = SharedPrefixKVCache(1, 3, heads_q, heads_kv, head_dim, capacity=16, mode=mode, dtype=torch.float32,
                                device=device)  # fmt: skip
    cache.prefill_prefix(prefix_len)
    cache.begin_step([2, 0, 1])
    base = 0 if cache.uses_cascade else prefix_len  # plain mode stores each sequence's prefix copy first
    decode = [1, 1, 1]
    for schedule in [decode] * 3 + [[0, 2, 1]] + [decode] * 2:
        before = list(cache.suffix_lengths)
        follows_decode = device == "cuda" and schedule == decode and cache._decode_is_latest
        if follows_decode:
            torch.cuda.set_sync_debug_mode("error")  # a host-device sync raises
        try:
            step = cache.begin_step(schedule)
        finally:
            if follows_decode:
                torch.cuda.set_sync_debug_mode("default")
        if schedule == decode:
            assert step.positions.tolist() == [prefix_len + n for n in before]
            assert step.seqused_k.tolist() == [base + n + 1 for n in before]
    assert cache.suffix_lengths == [7, 7, 7]


def test_misuse_is_reported():
    cache = SharedPrefixKVCache(1, 2, 4, 2, 16, capacity=4, mode="cascade", dtype=torch.float32)
    step = cache.prefill_prefix(3)
    with pytest.raises(ValueError, match=r"k must be \[tokens, heads, head_dim\] = \(3, 2, 16\)"):
        step.attention(0, torch.randn(3, 4, 16), torch.randn(3, 4, 16), torch.randn(3, 2, 16))
    with pytest.raises(TypeError, match="q must be torch.float32"):
        step.attention(0, torch.randn(3, 4, 16).double(), torch.randn(3, 2, 16), torch.randn(3, 2, 16))
    step.attention(0, torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16))
    with pytest.raises(RuntimeError, match="the prefix is already set"):
        cache.prefill_prefix(3)
    decode = cache.begin_step([1, 1])
    with pytest.raises(RuntimeError, match="this step is stale"):
        step.attention(0, torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16))
    # The reused decode step goes stale too once another kind of step is planned: it would
    # write over the rows that step reserved and read with the old lengths.
    cache.begin_step([1, 0])
    with pytest.raises(RuntimeError, match="this decode step is stale: a later begin_step"):
        decode.attention(0, torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16))
    assert cache.begin_step([1, 1]) is decode  # the next decode step refreshes the same object
    decode.attention(0, torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16))
    with pytest.raises(ValueError, match="new_tokens must hold 2 non-negative counts"):
        cache.begin_step([1])
    with pytest.raises(ValueError, match="mode must be one of"):
        SharedPrefixKVCache(1, 2, 4, 2, 16, mode="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="bf16 generation through the Triton cascade kernel needs a CUDA device")
def test_bf16_generation_on_cuda():
    """bf16: logits within a tolerance, most tokens identical, agreement rate reported.

    The two ways round differently (cascade merges float32 partial states of the prefix
    and the suffix into bf16; plain attention rounds one pass), so their logits differ by
    a few bf16 ulps. Where the two best logits of a step are closer than that, greedy
    argmax can pick a different token, and the request's continuation differs from then
    on; identical ids cannot be expected in bf16, only close logits along the same path.
    """
    config = demo.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_layers=2, heads_q=8,
                              heads_kv=2, head_dim=64)  # fmt: skip
    model = demo.build_model(config, seed=0, device="cuda", dtype=torch.bfloat16)
    suffix_lens = [0] + [16 + (37 * i) % 49 for i in range(1, 16)]
    prompt, suffixes = demo.make_requests(config, 512, suffix_lens, seed=1)
    new_tokens = 16
    usual = demo.generate_usual(model, prompt, suffixes, new_tokens, keep_logits=True)
    # Teacher-forced on the usual way's tokens, so every step's logits are comparable.
    forced = demo.generate_shared(model, prompt, suffixes, new_tokens, forced=usual.tokens, keep_logits=True)
    free = demo.generate_shared(model, prompt, suffixes, new_tokens)
    forced_agree = (forced.logits.argmax(-1) == usual.logits.argmax(-1)).float().mean().item()
    agree = (free.tokens == usual.tokens).float().mean().item()
    print(f"bf16 agreement: {100 * agree:.1f}% of generated tokens, {100 * forced_agree:.1f}% of teacher-forced steps")
    # Logits have unit spread here; 0.125 is 4 bf16 ulps at magnitude 4 (a CPU run of this
    # configuration differs by at most 0.031).
    torch.testing.assert_close(forced.logits, usual.logits, atol=0.125, rtol=0.02)
    assert forced_agree >= 0.9
    assert agree > 0.5


@pytest.mark.parametrize("mode", ["cascade", "plain"])
def test_compiled_decode_steps_give_the_eager_tokens(model, mode, monkeypatch):
    # The example's --compile on both ways (aot_eager: the tracing, without Inductor's CPU
    # compile time); the cascade's two-pass path, as the Triton interpreter would be slow here.
    monkeypatch.setattr(splitkv.cascade, "triton_can_run", lambda q: False)
    prompt, suffixes = demo.make_requests(TINY, 10, [3, 0, 5])
    runs = []
    for runner in (None, demo.DecodeRunner(model, compile=True, backend="aot_eager")):
        usual = demo.generate_usual(model, prompt, suffixes, 6, keep_logits=True, runner=runner)
        shared = demo.generate_shared(model, prompt, suffixes, 6, mode=mode, keep_logits=True, runner=runner)
        runs.append((usual, shared))
    for eager, compiled in zip(*runs):
        assert torch.equal(eager.tokens, compiled.tokens)
        torch.testing.assert_close(compiled.logits, eager.logits, **TOLERANCES[torch.float32])
        assert compiled.decode_steps == 4 and eager.decode_steps == 5  # the compiling step is setup
