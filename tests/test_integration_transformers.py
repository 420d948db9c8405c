"""splitkv.integrations.transformers against stock transformers (sdpa), on tiny random models."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'splitkv[hf]')")

from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

from splitkv._triton_support import interpreter_enabled  # noqa: E402
from splitkv.integrations.transformers import (  # noqa: E402
    SharedPrefixCache,
    _cache_argument,
    generate_shared,
    splitkv_attention,
)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None, pad_token_id=0)  # fmt: skip
# The forward's cache argument: "cache" in newer transformers, "past_key_values" before.
CACHE = _cache_argument(transformers.LlamaForCausalLM)
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**TINY, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**TINY, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**TINY, "sliding_window": None, **kw}),
}


def model_pair(arch, dtype=torch.float32, device="cpu", **config_kw):
    """The same random weights under attn_implementation 'splitkv' and 'sdpa'."""
    torch.manual_seed(0)
    config = CONFIGS[arch](**config_kw)
    ours = AutoModelForCausalLM.from_config(config, attn_implementation="splitkv", dtype=dtype).to(device).eval()
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype)
    stock = stock.to(device).eval()
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def prompts(generator_seed=1, shared_len=20, suffix_lens=(5, 0, 3), vocab=96, device="cpu"):
    g = torch.Generator().manual_seed(generator_seed)
    shared = torch.randint(1, vocab, (shared_len,), generator=g)
    suffixes = [torch.randint(1, vocab, (n,), generator=g) for n in suffix_lens]
    return shared.to(device), [s.to(device) for s in suffixes]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["greedy", "sample_top1"])
def test_generate_shared_matches_stock_generate(arch, mode):
    ours, stock = model_pair(arch)
    shared, suffixes = prompts()
    kwargs = dict(max_new_tokens=16, return_dict_in_generate=True, output_logits=True)
    nrs = 4 if mode == "sample_top1" else 1
    kwargs.update(dict(do_sample=True, top_k=1) if mode == "sample_top1" else dict(do_sample=False))
    result = generate_shared(ours, shared, suffixes, num_return_sequences=nrs, **kwargs)
    assert result.sequences.shape[0] == len(suffixes) * nrs
    longest = len(shared) + max(len(s) for s in suffixes) + 16
    assert result.sequences.shape[1] == longest
    for i, suffix in enumerate(suffixes):
        alone = torch.cat([shared, suffix])[None]
        expected = stock.generate(alone, attention_mask=torch.ones_like(alone), num_return_sequences=nrs, **kwargs)
        for r in range(nrs):
            row = i * nrs + r
            n = expected.sequences.shape[1]
            assert torch.equal(result.sequences[row, :n], expected.sequences[r]), (arch, mode, i, r)
            assert (result.sequences[row, n:] == 0).all()  # right-padded with the pad token
            for step, (got, want) in enumerate(zip(result.logits, expected.logits)):
                torch.testing.assert_close(got[row], want[r], atol=1e-4, rtol=0, msg=f"{arch} step {step} row {row}")


@pytest.mark.parametrize("case", ["no_suffixes", "empty_shared"])
def test_generate_shared_edge_prompts(case):
    """suffix_ids=None (one request: the shared prompt alone) and an empty shared prompt."""
    ours, stock = model_pair("llama")
    shared, suffixes = prompts(suffix_lens=(6, 2))
    if case == "empty_shared":
        shared = shared[:0]
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=1)
    got = generate_shared(ours, shared, None if case == "no_suffixes" else suffixes, num_return_sequences=2, **kwargs)
    for i, suffix in enumerate([shared[:0]] if case == "no_suffixes" else suffixes):
        alone = torch.cat([shared, suffix])[None]
        want = stock.generate(alone, attention_mask=torch.ones_like(alone), num_return_sequences=2, **kwargs)
        assert torch.equal(got[2 * i : 2 * i + 2, : want.shape[1]], want), (case, i)


def test_generate_shared_eos_right_pads():
    """Sequences that stop at EOS at different steps come back right-padded with the pad token,
    each equal to stock generate() of its prompt alone."""
    ours, stock = model_pair("llama")
    shared, suffixes = prompts()
    alone = torch.cat([shared, suffixes[0]])[None]
    free = stock.generate(alone, attention_mask=torch.ones_like(alone), max_new_tokens=16, do_sample=False)
    kwargs = dict(max_new_tokens=16, do_sample=False, eos_token_id=int(free[0, alone.shape[1] + 4]), pad_token_id=0)
    got = generate_shared(ours, shared, suffixes, **kwargs)
    lengths = []
    for i, suffix in enumerate(suffixes):
        alone = torch.cat([shared, suffix])[None]
        want = stock.generate(alone, attention_mask=torch.ones_like(alone), **kwargs)[0]
        lengths.append(want.shape[0])
        assert torch.equal(got[i, : want.shape[0]], want) and (got[i, want.shape[0] :] == 0).all(), i
    assert got.shape[1] == max(lengths) and lengths[0] < len(shared) + len(suffixes[0]) + 16  # one stopped early


def teacher_forced_splitkv(model, shared, suffixes, forced, cache=None):
    """Logits [R, T, vocab] of the shared-prefix path: prefill shared once, the suffixes as one
    left-padded batch, then T - 1 forced tokens one at a time (decode steps)."""
    cache = SharedPrefixCache(model.config) if cache is None else cache
    prefix_len = shared.shape[0]
    model(shared[None], **{CACHE: cache})
    rows, longest = len(suffixes), max(s.shape[0] for s in suffixes)
    cache.share_prefix(rows)
    ids = torch.zeros((rows, longest), dtype=torch.long, device=shared.device)
    own = torch.zeros_like(ids)
    for i, s in enumerate(suffixes):
        ids[i, longest - s.shape[0] :], own[i, longest - s.shape[0] :] = s, 1
    mask = torch.cat([torch.ones((rows, prefix_len), dtype=torch.long, device=ids.device), own], 1)
    positions = (prefix_len + own.cumsum(1) - 1).clamp(min=0)
    logits = [model(ids, attention_mask=mask, position_ids=positions, **{CACHE: cache}).logits[:, -1]]
    positions = positions[:, -1:]
    for t in range(forced.shape[1] - 1):
        mask, positions = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), positions + 1
        out = model(forced[:, t : t + 1], attention_mask=mask, position_ids=positions, **{CACHE: cache})
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1).float()


def teacher_forced_stock(model, shared, suffixes, forced):
    """The same logits from each [shared ; suffix_i ; forced_i] run alone, no cache."""
    rows = []
    for i, s in enumerate(suffixes):
        seq = torch.cat([shared, s, forced[i, :-1]])[None]
        start = shared.shape[0] + s.shape[0] - 1
        rows.append(model(seq, use_cache=False).logits[0, start : start + forced.shape[1]])
    return torch.stack(rows).float()


def test_teacher_forced_logits_cpu():
    ours, stock = model_pair("llama")
    shared, suffixes = prompts(suffix_lens=(4, 1, 7))
    forced = torch.randint(1, 96, (3, 6), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(teacher_forced_splitkv(ours, shared, suffixes, forced),
                               teacher_forced_stock(stock, shared, suffixes, forced), atol=1e-4, rtol=0)  # fmt: skip


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="cascade_attention's Triton path needs CUDA"))  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_teacher_forced_logits_rows_grow_past_powers_of_two(device):
    """Decode steps past 16 and 32 own keys (20 + 13 .. 20 + 36 keys in all) while the rows regrow
    twice (no reserve: 13, 26, then 52 slots), left-padded rows among them: logits as stock's."""
    ours, stock = model_pair("llama", device=device)
    shared, suffixes = prompts(suffix_lens=(13, 1, 7), device=device)
    forced = torch.randint(1, 96, (3, 24), generator=torch.Generator().manual_seed(5)).to(device)
    cache = SharedPrefixCache(ours.config)
    with torch.no_grad():
        got = teacher_forced_splitkv(ours, shared, suffixes, forced, cache)
        want = teacher_forced_stock(stock, shared, suffixes, forced)
    assert cache.layers[0].row_keys.shape[1] == 52  # it did regrow
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.skipif(not interpreter_enabled(), reason="runs the CUDA path on CPU tensors under TRITON_INTERPRET=1 "
                    "(set by tests/conftest.py where no GPU is; on a GPU the GPU tests run that path)")
def test_cascade_path_in_the_triton_interpreter(monkeypatch):
    """The CUDA path (cascade_attention over the cache's slots, seqused_k, capacities as
    max_seqlen_*) run on the CPU by the Triton interpreter: left-padded rows, regrowth, logits as stock's."""
    import splitkv.integrations.transformers as integration

    # Internal on purpose: the CUDA path is chosen by device alone, so no public switch runs it on a CPU.
    monkeypatch.setattr(integration, "_runs_cascade", lambda device: True)
    ours, stock = model_pair("llama")
    shared, suffixes = prompts(suffix_lens=(13, 1, 7))
    forced = torch.randint(1, 96, (3, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = teacher_forced_splitkv(ours, shared, suffixes, forced)
        want = teacher_forced_stock(stock, shared, suffixes, forced)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_attention_reads_the_cache_in_place(monkeypatch, device):
    """Every layer's attention op is handed the SharedPrefixCache's own storage (its data_ptr and
    its whole size: no gather or copy of the cache per layer or step) and the prefix as stored,
    once per layer per forward; on the GPU, cascade_attention runs without a host sync."""
    import splitkv.integrations.transformers as integration

    ours, _ = model_pair("llama", device=device)
    shared, suffixes = prompts(suffix_lens=(4, 1, 7), device=device)
    forced = torch.randint(1, 96, (3, 5), generator=torch.Generator().manual_seed(2)).to(device)
    cache = SharedPrefixCache(ours.config)
    calls = {"rows": 0, "prefix": 0}

    def stored(kind):
        # (data_ptr, numel) of a layer's stored K and V of that kind, the whole tensor.
        return [[(t.data_ptr(), t.numel()) for t in (getattr(la, f"{kind}_keys"), getattr(la, f"{kind}_values"))]
                for la in cache.layers if la.is_initialized]  # fmt: skip

    def storage_check(real, cascade):
        def wrapper(q, *args, **kwargs):
            # cascade_attention(q, cu_q, prefix_k, prefix_v, suffix_k, suffix_v, ...); attention_with_lse(q, k, v, ...)
            kv = [(t.data_ptr(), t.numel()) for t in (args[3:5] if cascade else args[:2])]
            if kv in stored("row"):
                calls["rows"] += 1
                if cascade:
                    prefix = [(t.data_ptr(), t.numel()) for t in args[1:3]]
                    assert prefix in stored("prefix") or prefix[0][1] == 0, prefix
            elif not cascade and kv in stored("prefix"):  # the CPU path's prefix pass
                calls["prefix"] += 1
            else:
                raise AssertionError(f"the attention op got KV that is not the cache's storage: {kv}")
            if not cascade:
                return real(q, *args, **kwargs)
            torch.cuda.set_sync_debug_mode("error")  # the per-layer path must not sync with the host
            try:
                return real(q, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return wrapper

    monkeypatch.setattr(integration, "attention_with_lse", storage_check(integration.attention_with_lse, False))
    monkeypatch.setattr(integration, "cascade_attention", storage_check(integration.cascade_attention, True))
    with torch.no_grad():
        teacher_forced_splitkv(ours, shared, suffixes, forced, cache)
    layers, forwards = len(cache.layers), 2 + forced.shape[1] - 1  # prefix, suffixes, decode steps
    assert calls["rows"] == layers * forwards
    # On the CPU the prefix is its own pass in every forward after share_prefix.
    assert calls["prefix"] == (0 if device == "cuda" else layers * (forwards - 1))


def test_stock_cache_left_padding_and_refusals():
    """attn_implementation='splitkv' with transformers' own cache: left padding is honoured,
    right padding refused."""
    ours, stock = model_pair("qwen2")
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0 left-padded
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    got = ours(ids, attention_mask=mask, position_ids=positions).logits
    want = stock(ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(got[0, 4:], want[0, 4:], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="left padding"):
        ours(ids, attention_mask=mask.flip(1))


def test_refusals():
    ours, stock = model_pair("llama")
    shared, suffixes = prompts()
    with pytest.raises(ValueError, match="beam search"):
        generate_shared(ours, shared, suffixes, max_new_tokens=4, num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_shared(ours, shared, suffixes, max_length=40)
    with pytest.raises(TypeError, match="attention_mask"):
        generate_shared(ours, shared, suffixes, max_new_tokens=4, attention_mask=None)
    with pytest.raises(TypeError, match="1-D LongTensor"):
        generate_shared(ours, shared[None], suffixes, max_new_tokens=4)
    with pytest.raises(ValueError, match="attn_implementation='splitkv'"):
        generate_shared(stock, shared, suffixes, max_new_tokens=4)
    with pytest.raises(ValueError, match="only with attn_implementation='splitkv'"):
        stock(shared[None], **{CACHE: SharedPrefixCache(stock.config)})
    cache = SharedPrefixCache(ours.config)
    ours(shared[None], **{CACHE: cache})
    cache.share_prefix(2)
    with pytest.raises(ValueError, match="beam search"):
        cache.reorder_cache(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="shared prefix"):
        mask = torch.ones((2, shared.shape[0] + 1), dtype=torch.long)
        mask[0, 0] = 0
        ours(torch.tensor([[1], [2]]), attention_mask=mask, **{CACHE: cache})
    # Left-padded rows: the mask must come at every step, with the padding of the cached tokens unchanged.
    for later_mask, match in ((None, "every step"), ("moved", "changes the padding")):
        cache = SharedPrefixCache(ours.config)
        ours(shared[None], **{CACHE: cache})
        cache.share_prefix(2)
        mask = torch.ones((2, shared.shape[0] + 2), dtype=torch.long)
        mask[0, shared.shape[0]] = 0
        ours(torch.tensor([[0, 1], [2, 3]]), attention_mask=mask, **{CACHE: cache})
        later = None if later_mask is None else torch.ones((2, shared.shape[0] + 3), dtype=torch.long)
        if later is not None:
            later[1, shared.shape[0]] = 0  # row 0's padded token attended, row 1's first token padded
        with pytest.raises(ValueError, match=match):
            ours(torch.tensor([[4], [5]]), attention_mask=later, **{CACHE: cache})
    cache = SharedPrefixCache(ours.config)
    padded = torch.ones((1, shared.shape[0]), dtype=torch.long)
    padded[0, 0] = 0
    ours(shared[None], attention_mask=padded, **{CACHE: cache})
    with pytest.raises(ValueError, match="cannot be padded"):
        cache.share_prefix(2)
    # The model features cascade attention does not compute.
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="soft-capping"):
        splitkv_attention(torch.nn.Module(), q, k, k, None, softcap=30.0)
    with pytest.raises(ValueError, match="dropout"):
        splitkv_attention(torch.nn.Module(), q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match="ALiBi"):
        SharedPrefixCache(LlamaConfig(**TINY, alibi=True))
    with pytest.raises(ValueError, match="soft-capping"):
        SharedPrefixCache(LlamaConfig(**TINY, attn_logit_softcapping=50.0))
    windowed, _ = model_pair("mistral", sliding_window=8)
    with pytest.raises(ValueError, match="sliding"):
        windowed(shared[None])
    with pytest.raises(ValueError, match="sliding"):
        SharedPrefixCache(windowed.config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 cascade attention on the GPU needs CUDA")
def test_teacher_forced_logits_bf16_gpu():
    """bf16 on the GPU (cascade_attention's Triton kernel), a model of 4 layers with hidden 1024,
    16 query / 4 KV heads of 64, a 2048-token shared prompt, 8 suffixes of 1-61 tokens, 8 decode steps.
    Tolerance: splitkv's bf16 logits are as close to the fp32 (sdpa) logits as stock bf16 sdpa's
    are (max abs error at most 1.5x stock's + 0.02)."""
    size = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)  # fmt: skip
    ours, stock = model_pair("llama", dtype=torch.bfloat16, device="cuda", **size)
    _, stock32 = model_pair("llama", dtype=torch.float32, device="cuda", **size)
    shared, suffixes = prompts(shared_len=2048, suffix_lens=(1, 7, 16, 33, 61, 2, 40, 9), vocab=4096, device="cuda")
    forced = torch.randint(1, 4096, (8, 8), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        exact = teacher_forced_stock(stock32, shared, suffixes, forced)
        stock_error = (teacher_forced_stock(stock, shared, suffixes, forced) - exact).abs().max().item()
        ours_error = (teacher_forced_splitkv(ours, shared, suffixes, forced) - exact).abs().max().item()
    assert ours_error <= 1.5 * stock_error + 0.02, (ours_error, stock_error)


def test_what_silently_differed_from_stock_is_refused_or_matched():
    """Cases a review found giving other tokens than stock generate() without an error:
    a static cache (its unfilled slots were attended), a model that transforms K/V after
    the cache update (JetMoe: the step attended to its new tokens alone), processors that
    read the prompt's ids across generate_shared's padding, and num_return_sequences from
    a generation config (ignored); and configs refused although every layer is full."""
    ours, stock = model_pair("llama")
    ids = torch.randint(1, 96, (1, 7), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="static / preallocated cache"):
        ours.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    greedy = {"max_new_tokens": 3, "do_sample": False}
    assert torch.equal(ours.generate(ids, **greedy), stock.generate(ids, **greedy))  # the dynamic cache still runs

    shared, suffixes = prompts(suffix_lens=(1, 6))
    for name, value in (("repetition_penalty", 3.0), ("no_repeat_ngram_size", 1)):
        with pytest.raises(ValueError, match=name):
            generate_shared(ours, shared, suffixes, **greedy, **{name: value})
    equal = [suffixes[1], suffixes[1]]  # no padding: the processors read the real prompt
    got = generate_shared(ours, shared, equal, **greedy, repetition_penalty=3.0)
    want = stock.generate(torch.cat([shared, suffixes[1]])[None].repeat(2, 1), **greedy, repetition_penalty=3.0)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="use_cache=False"):
        generate_shared(ours, shared, suffixes, **greedy, use_cache=False)

    config = transformers.GenerationConfig(num_return_sequences=3, do_sample=True, top_k=1, max_new_tokens=3)
    assert generate_shared(ours, shared, suffixes, generation_config=config).shape[0] == 2 * 3

    from transformers import JetMoeConfig, Qwen2MoeConfig

    jetmoe = JetMoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
                          intermediate_size=64, num_local_experts=2, num_experts_per_tok=2, eos_token_id=None,
                          pad_token_id=0, bos_token_id=1)  # fmt: skip
    repeats_kv = AutoModelForCausalLM.from_config(jetmoe, attn_implementation="splitkv").eval()
    for shared_ids, new in ((shared, 3), (shared[:1], 1)):  # the check at the next update, and at the end
        with pytest.raises(ValueError, match="transforms K/V after cache.update"):
            generate_shared(repeats_kv, shared_ids, suffixes, max_new_tokens=new, do_sample=False)

    SharedPrefixCache(Qwen2MoeConfig(**{**TINY, "sliding_window": 0}, moe_intermediate_size=32,
                                     shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2))  # fmt: skip
    full_layers, full_stock = model_pair("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    got = generate_shared(full_layers, shared, suffixes[1:], max_new_tokens=4, do_sample=False)
    assert torch.equal(got, full_stock.generate(torch.cat([shared, suffixes[1]])[None], max_new_tokens=4,
                                                do_sample=False))  # fmt: skip
    with pytest.raises(ValueError, match="sliding"):
        SharedPrefixCache(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8, max_window_layers=1))
