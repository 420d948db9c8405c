"""``python -m splitkv.bench hf``: Hugging Face ``generate()`` with one shared prompt, stock vs splitkv.

A Llama-architecture model built from ``LlamaConfig`` with random weights (bf16; by
default about 1.1B parameters: hidden 2048, 16 layers, 32 query / 8 KV heads,
intermediate 8192, vocab 32000) generates ``--sequences`` continuations of one
``--prompt``-token prompt, ``--new-tokens`` tokens each (sampling with top_k=1, so
the tokens are the greedy ones and the two runs can be compared):

- stock: ``model.generate(prompt, num_return_sequences=n)`` with
  ``attn_implementation="sdpa"`` and its default cache (the prompt repeated n times);
- splitkv: :func:`splitkv.integrations.transformers.generate_shared` with
  ``attn_implementation="splitkv"`` (the prompt's KV computed and stored once).

Both ways warm up at the full length first, then take turns over ``--repeat`` timed
runs (default 3), so that a machine's drift reaches both alike. Reported for each way:
the run with the (lower) median decode step, with the range over the runs (every run's
step is in the JSON) and the median TTFT of the runs: time to first token (a run of
one new token), the decode step (median time between two steps' tokens, from a
streamer) and tokens/s, peak GPU memory above
the weights (``torch.cuda.max_memory_allocated``, reset before each run), the KV
bytes the cache holds at the end, and the fraction of generated tokens both runs
agree on (bf16: ties may break differently). A same-tokens check in fp32 at a small
size comes first. ``--quick``: a tiny model on the CPU or GPU (a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from .common import add_out_argument, environment, markdown_table, text_table, write_outputs

BILLION = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=32000)  # fmt: skip
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=512)  # fmt: skip


def _build(size: dict, max_len: int, dtype, device, attn: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**size, max_position_embeddings=max_len, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


def _kv_bytes(cache) -> int:
    """Bytes of the K/V tensors a cache holds (allocated, so a SharedPrefixCache's room to grow counts)."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "prefix_keys", "prefix_values", "row_keys", "row_values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class _StepTimer:
    """A generate() streamer that records when each step's tokens arrive (generate copies
    them to the host, a sync, every step, the same for both runs)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _run(model, prompt, sequences: int, new_tokens: int, shared: bool, **extra):
    from splitkv.integrations.transformers import generate_shared

    kwargs = dict(max_new_tokens=new_tokens, do_sample=True, top_k=1, return_dict_in_generate=True, **extra)
    if shared:
        return generate_shared(model, prompt, None, num_return_sequences=sequences, **kwargs)
    ids = prompt[None]
    return model.generate(ids, attention_mask=torch.ones_like(ids), num_return_sequences=sequences, **kwargs)


def warm_up(model, prompt, sequences: int, new_tokens: int, shared: bool) -> None:
    """The timed runs' own shapes, at their full length, so that every Triton
    specialisation they use is compiled and the caching allocator holds the memory a
    growing cache takes (stock's DynamicCache grows by reallocation) before the timing.
    splitkv's kernels see the cache's capacity (prompt + new tokens), not the growing
    key count, as max_seqlen_k, so the full-length run and the one-token (TTFT) run are
    the only two shapes."""
    _run(model, prompt, sequences, new_tokens, shared)
    _run(model, prompt, sequences, 1, shared)
    _sync(prompt.device)


def measure(model, prompt, sequences: int, new_tokens: int, shared: bool) -> dict:
    """One timed run (after :func:`warm_up`): time to first token, decode step time and
    tokens/s, peak memory above the weights, KV bytes, the tokens and the first step's logits."""
    device = prompt.device
    start = time.perf_counter()
    first = _run(model, prompt, sequences, 1, shared, output_logits=True)
    _sync(device)
    first_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    timer = _StepTimer()
    start = time.perf_counter()
    result = _run(model, prompt, sequences, new_tokens, shared, streamer=timer)
    _sync(device)
    total_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    # put() is called once with the prompt, then once per new token.
    steps = sorted(b - a for a, b in zip(timer.times[2:], timer.times[3:]))
    step_s = steps[len(steps) // 2] if steps else float("nan")
    return {
        "ttft_s": first_s,
        "total_s": total_s,
        "decode_step_ms": step_s * 1e3,
        "decode_tokens_per_s": sequences / step_s,
        "decode_tokens_per_s_whole_run": sequences * (new_tokens - 1) / max(total_s - first_s, 1e-9),
        "peak_above_weights_GB": None if peak is None else peak / 1e9,
        "kv_GB": _kv_bytes(result.get("cache", result.get("past_key_values"))) / 1e9,
        "tokens": result.sequences[:, prompt.shape[0] :].cpu(),
        "first_logits": first.logits[0][0].float().cpu(),
    }


def median_run(results: list[dict]) -> dict:
    """The run with the (lower) median decode step, with every run's step and their range;
    its TTFT the (lower) median of the runs' own TTFTs, each run's in ``ttft_s_runs``."""
    steps = [r["decode_step_ms"] for r in results]
    ttfts = [r["ttft_s"] for r in results]
    chosen = sorted(results, key=lambda r: r["decode_step_ms"])[(len(results) - 1) // 2]
    return dict(chosen, ttft_s=sorted(ttfts)[(len(ttfts) - 1) // 2], ttft_s_runs=ttfts, decode_step_ms_runs=steps,
                decode_step_ms_range=[min(steps), max(steps)])  # fmt: skip


def same_tokens_check(device, quick: bool) -> dict:
    """fp32, small model: generate_shared's tokens and logits against stock sdpa generate()."""
    size = TINY if quick else dict(TINY, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=1000)  # fmt: skip
    model = _build(size, 2048, torch.float32, device, "splitkv")
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("sdpa")
    prompt = torch.randint(1, size["vocab_size"], (64 if quick else 512,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    kwargs = dict(max_new_tokens=16, do_sample=True, top_k=1, return_dict_in_generate=True, output_logits=True)
    from splitkv.integrations.transformers import generate_shared

    ours = generate_shared(model, prompt, None, num_return_sequences=4, **kwargs)
    ref = stock.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), num_return_sequences=4, **kwargs)
    diff = max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits))
    return {"same_tokens": bool(torch.equal(ours.sequences, ref.sequences)), "max_logit_diff": diff,
            "prompt": prompt.shape[0], "sequences": 4, "new_tokens": 16, "size": size}  # fmt: skip


class _DecodeProfiler:
    """A generate() streamer that runs torch.profiler over the decode steps only: from the first
    token's arrival (after the prefill) to the end."""

    def __init__(self, prof):
        self.prof, self.puts = prof, 0

    def put(self, value):
        self.puts += 1
        if self.puts == 2:  # the prompt, then the prefill's token: decoding starts now
            self.prof.start()

    def end(self):
        if self.puts >= 2:
            self.prof.stop()


def _profile(model, prompt, sequences: int, shared: bool, steps: int = 16, rows: int = 12) -> None:
    """Prints torch.profiler's top ops (by self device time, then host time) over ``steps - 1``
    decode steps of one run (after a warm-up run of the same length)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if prompt.is_cuda else [])
    _run(model, prompt, sequences, steps, shared)
    prof = profile(activities=activities)
    _run(model, prompt, sequences, steps, shared, streamer=_DecodeProfiler(prof))
    _sync(prompt.device)
    averages = prof.key_averages()
    print(f"profile of {steps - 1} decode steps, {'splitkv' if shared else 'stock'} (totals over the steps):")
    if prompt.is_cuda:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=rows))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitkv.bench hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_out_argument(parser, "hf")
    parser.add_argument("--quick", action="store_true", help="a tiny model, short prompt (CPU smoke test)")
    parser.add_argument("--prompt", type=int, default=8192, help="shared prompt tokens")
    parser.add_argument("--sequences", type=int, default=32, help="num_return_sequences")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs of each way, taking turns; the median run is reported (default 3; "
                             "1 with --quick)")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top ops over 15 decode steps of each run")  # fmt: skip
    args = parser.parse_args(argv)
    out_dir = args.out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.quick and device.type != "cuda":
        raise SystemExit("the full hf benchmark needs a CUDA device (use --quick for a CPU smoke test)")
    import splitkv.integrations.transformers  # noqa: F401  (registers attn_implementation="splitkv")

    if args.quick:
        args.prompt, args.sequences = min(args.prompt, 64), min(args.sequences, 4)
        args.new_tokens = min(args.new_tokens, 8)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    env = environment()
    check = same_tokens_check(device, args.quick)
    print(f"same-tokens check (fp32, prompt {check['prompt']}, 4 sequences, 16 new tokens): "
          f"same tokens {check['same_tokens']}, max logit diff {check['max_logit_diff']:.2e}")  # fmt: skip

    size = TINY if args.quick else BILLION
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = _build(size, args.prompt + args.new_tokens + 8, dtype, device, "sdpa")
    parameters = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(1, size["vocab_size"], (args.prompt,), generator=torch.Generator().manual_seed(2)).to(device)
    ways = (("stock (sdpa, DynamicCache)", "sdpa", False), ("splitkv", "splitkv", True))
    for _, attn, shared in ways:
        model.set_attn_implementation(attn)
        warm_up(model, prompt, args.sequences, args.new_tokens, shared)
    timed = {name: [] for name, _, _ in ways}
    for _ in range(args.repeat):
        for name, attn, shared in ways:
            model.set_attn_implementation(attn)
            timed[name].append(measure(model, prompt, args.sequences, args.new_tokens, shared))
    runs = {name: median_run(results) for name, results in timed.items()}
    stock, ours = runs.values()
    if args.profile:
        for attn, shared in (("sdpa", False), ("splitkv", True)):
            model.set_attn_implementation(attn)
            _profile(model, prompt, args.sequences, shared)
    agree = (stock["tokens"] == ours["tokens"]).float().mean().item()
    first_diff = (stock["first_logits"] - ours["first_logits"]).abs().max().item()
    first_scale = stock["first_logits"].abs().max().item()
    top2 = stock["first_logits"].topk(2).values
    first_margin = (top2[0] - top2[1]).item()

    def gb(value):
        return "-" if value is None else f"{value:.2f}"

    header = ["run", "TTFT", f"decode step (median of {args.repeat} runs; range)", "decode tok/s",
              "peak mem above weights GB", "KV GB"]  # fmt: skip
    table = [[name, f"{r['ttft_s'] * 1e3:.0f} ms",
              f"{r['decode_step_ms']:.1f} ms ({r['decode_step_ms_range'][0]:.1f}-{r['decode_step_ms_range'][1]:.1f})",
              f"{r['decode_tokens_per_s']:.0f}", gb(r["peak_above_weights_GB"]), gb(r["kv_GB"])]
             for name, r in runs.items()]  # fmt: skip
    ratios = {
        "ttft_speedup": stock["ttft_s"] / ours["ttft_s"],
        "decode_speedup": ours["decode_tokens_per_s"] / stock["decode_tokens_per_s"],
        "kv_memory_ratio": stock["kv_GB"] / ours["kv_GB"],
        "peak_memory_ratio": (None if stock["peak_above_weights_GB"] is None
                              else stock["peak_above_weights_GB"] / ours["peak_above_weights_GB"]),  # fmt: skip
    }
    table.append(["stock / splitkv", f"{ratios['ttft_speedup']:.1f}x faster", "-", f"{ratios['decode_speedup']:.2f}x",
                  "-" if ratios["peak_memory_ratio"] is None else f"{ratios['peak_memory_ratio']:.1f}x less",
                  f"{ratios['kv_memory_ratio']:.1f}x less"])  # fmt: skip
    preface = (f"Device: {env['device']}; torch {env['torch']}; {env['date']}. Llama from LlamaConfig, "
               f"{parameters / 1e9:.2f}B parameters, random weights, {str(dtype).split('.')[-1]}; "
               f"one {args.prompt}-token "
               f"prompt, num_return_sequences={args.sequences}, {args.new_tokens} new tokens (top_k=1 sampling). "
               f"Generated tokens agreeing between the runs: {agree * 100:.1f}%; first step's logits: max abs diff "
               f"{first_diff:.3g} (largest logit {first_scale:.3g}, top-1 margin {first_margin:.3g}). Decode step: "
               f"median time between two steps' tokens, in the median of {args.repeat} runs that took turns with the "
               "other way's. Same-tokens check in fp32: "
               f"{check['same_tokens']} (max logit diff {check['max_logit_diff']:.1e}).")  # fmt: skip
    print(preface + "\n" + text_table(header, table))
    payload = {"env": env, "parameters": parameters, "dtype": str(dtype), "prompt": args.prompt,
               "sequences": args.sequences, "new_tokens": args.new_tokens, "repeat": args.repeat,
               "token_agreement": agree,
               "first_step_logits": {"max_abs_diff": first_diff, "largest": first_scale, "top1_margin": first_margin},
               "same_tokens_check": check, "ratios": ratios,
               "runs": {name: {k: v for k, v in r.items() if k not in ("tokens", "first_logits")}
                        for name, r in runs.items()}}  # fmt: skip
    write_outputs(out_dir, "hf", payload, preface + "\n\n" + markdown_table(header, table))
    print(f"results in {out_dir}")
