"""Cascade benchmark: shared-prefix decoding (one query per sequence), cascade attention
against full varlen attention over each sequence's materialised ``[prefix ; suffix_i]`` KV
(the layout of a system without prefix sharing), with the time of each cascade stage and
the KV memory each layout needs.

    python -m splitkv.bench cascade [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import splitkv
from splitkv.cascade import cascade_splits, cascade_stages

from .common import (
    add_out_argument,
    environment,
    graph_replay_us,
    host_overhead_us,
    interleaved,
    markdown_table,
    median_ms,
    text_table,
    write_outputs,
)

HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128
HEADLINE = [(64, 8192, 512), (256, 4096, 256), (16, 32768, 1024)]  # (sequences, prefix, suffix)
# Full-layout KV above this is skipped (it must fit next to the cascade layout).
_MAX_FULL_KV_BYTES = 24 << 30
# Back-to-back timing: calls per sample, and rounds in which full and cascade take
# turns. Host-bound calls of tens of µs varied by ±10% from sample to sample on the
# lent machines: the median of more rounds is steadier.
_B2B_CALLS, _B2B_ROUNDS = 100, 9


def grid(quick: bool) -> list[tuple[int, int, int]]:
    sequences = [1, 16, 256] if quick else [1, 4, 16, 64, 256]
    prefixes = [0, 4096, 32768] if quick else [0, 512, 4096, 16384, 32768]
    suffixes = [1, 4096] if quick else [1, 256, 4096]
    return [(b, p, s) for b in sequences for p in prefixes for s in suffixes]


def cascade_inputs(num_sequences: int, prefix_len: int, suffix_len: int, seed: int | None = None) -> tuple:
    """``(q, cu_seqlens_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_seqlens_k)`` of one
    decode query per sequence over a shared ``prefix_len`` keys and ``suffix_len`` keys of
    its own: bf16 on the GPU, HEADS_Q / HEADS_KV heads of HEAD_DIM, from ``seed`` if given."""
    dtype, device = torch.bfloat16, "cuda"
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(num_sequences, HEADS_Q, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    prefix_k, prefix_v = (torch.randn(prefix_len, HEADS_KV, HEAD_DIM, device=device, dtype=dtype, generator=gen)
                          for _ in range(2))  # fmt: skip
    suffix_k, suffix_v = (torch.randn(num_sequences * suffix_len, HEADS_KV, HEAD_DIM, device=device, dtype=dtype,
                                      generator=gen) for _ in range(2))  # fmt: skip
    cu_q = torch.arange(num_sequences + 1, device=device, dtype=torch.int32)
    return q, cu_q, prefix_k, prefix_v, suffix_k, suffix_v, cu_q * suffix_len


def bench_case(num_sequences: int, prefix_len: int, suffix_len: int) -> dict:
    kv_token_bytes = 2 * HEADS_KV * HEAD_DIM * 2
    full_bytes = num_sequences * (prefix_len + suffix_len) * kv_token_bytes
    row = {"sequences": num_sequences, "prefix": prefix_len, "suffix": suffix_len,
           "full_kv_GB": full_bytes / 1e9,
           "cascade_kv_GB": (prefix_len + num_sequences * suffix_len) * kv_token_bytes / 1e9}  # fmt: skip
    if full_bytes > _MAX_FULL_KV_BYTES:
        row["skipped"] = "full layout too large for the benchmark"
        return row
    cascade_args = cascade_inputs(num_sequences, prefix_len, suffix_len)
    q, cu_q, prefix_k, prefix_v, suffix_k, suffix_v, _cu_k = cascade_args
    scale = HEAD_DIM**-0.5

    # The full layout, built once outside the timing: each sequence owns [prefix ; suffix_i].
    full_k = torch.cat([torch.cat([prefix_k, suffix_k[i * suffix_len:(i + 1) * suffix_len]])
                        for i in range(num_sequences)])  # fmt: skip
    full_v = torch.cat([torch.cat([prefix_v, suffix_v[i * suffix_len:(i + 1) * suffix_len]])
                        for i in range(num_sequences)])  # fmt: skip
    cu_full = cu_q * (prefix_len + suffix_len)
    full_args = (q, full_k, full_v, cu_q, cu_full, 1, prefix_len + suffix_len)
    row["full_backend"] = splitkv.explain_attention(*full_args, causal=True).splitlines()[0].split("-> ")[1]
    lengths = {"max_seqlen_q": 1, "max_seqlen_k": suffix_len}

    def full():
        return splitkv.attention_with_lse(*full_args, causal=True)

    def cascade():
        return splitkv.cascade_attention(*cascade_args, **lengths)

    def forced_cascade():
        return splitkv.cascade_attention(*cascade_args, **lengths, cascade=True)

    # Eager calls of a few tens of µs are host-bound: full and cascade take turns.
    eager = interleaved(lambda fn: median_ms(fn, rep_ms=40), {"full": full, "cascade": cascade,
                                                               "forced_cascade": forced_cascade})  # fmt: skip
    row.update({f"{name}_ms": ms for name, ms in eager.items()})
    # Cascade with no prefix is plain attention (no prefix split count).
    row["prefix_splits"] = None
    if prefix_len:
        row["prefix_splits"], _ = cascade_splits(num_sequences, HEADS_Q, HEADS_KV, HEAD_DIM, num_sequences, 1,
                                                 suffix_len, prefix_len, q.device)  # fmt: skip
    for name, stage in cascade_stages(*cascade_args, 1, suffix_len, scale, False):
        row[f"{name}_ms"] = median_ms(stage)
    row["speedup"] = row["full_ms"] / row["cascade_ms"]
    # Replayed from a CUDA graph, as a serving loop runs its decode step, launch costs
    # vanish and what is left is GPU time (inputs partly hot in L2 across replays).
    row["full_graph_us"] = graph_replay_us(full)
    row["cascade_graph_us"] = graph_replay_us(cascade)
    row["graph_speedup"] = row["full_graph_us"] / row["cascade_graph_us"]
    # Back to back, as an eager serving loop issues calls: per call, the larger of the
    # host time and the GPU time (do_bench above hides host time behind its L2 flush).
    b2b = interleaved(lambda fn: host_overhead_us(fn, _B2B_CALLS, 1), {"full": full, "cascade": cascade},
                      rounds=_B2B_ROUNDS)  # fmt: skip
    row["full_b2b_us"], row["cascade_b2b_us"] = b2b["full"], b2b["cascade"]
    row["b2b_speedup"] = row["full_b2b_us"] / row["cascade_b2b_us"]

    got = splitkv.cascade_attention(*cascade_args, **lengths)
    want, _ = splitkv.attention_with_lse(*full_args, causal=True)
    row["max_diff"] = (got.float() - want.float()).abs().max().item()
    del full_k, full_v
    return row


def sweep_prefix_splits(num_sequences: int, prefix_len: int, suffix_len: int) -> list[dict]:
    """GPU time of the two cascade stages for prefix split counts around the chosen one."""
    inputs = cascade_inputs(num_sequences, prefix_len, suffix_len)
    q = inputs[0]
    args = (*inputs, 1, suffix_len, HEAD_DIM**-0.5, False)
    chosen, suffix_splits = cascade_splits(num_sequences, HEADS_Q, HEADS_KV, HEAD_DIM, num_sequences, 1, suffix_len,
                                           prefix_len, q.device)  # fmt: skip
    rows = []
    for splits in sorted({max(1, chosen // 4), max(1, chosen // 2), chosen, 2 * chosen, 4 * chosen}):
        times = {name: median_ms(stage) * 1e3 for name, stage in cascade_stages(*args, prefix_splits=splits)}
        rows.append({"sequences": num_sequences, "prefix": prefix_len, "suffix": suffix_len, "prefix_splits": splits,
                     "chosen": splits == chosen, "suffix_splits": suffix_splits,
                     **{f"{name}_us": us for name, us in times.items()}})  # fmt: skip
    return rows


def _us_or_dash(us: float | None) -> str:
    return "-" if us is None else f"{us:.1f}us"


def plot(rows: list[dict], env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    panels = [("speedup", "eager (L2 flushed)"), ("graph_speedup", "CUDA-graph replay")]
    for ax, (key, title) in zip(axes, panels):
        for suffix in sorted({r["suffix"] for r in rows}):
            for prefix in sorted({r["prefix"] for r in rows}):
                picked = sorted((r for r in rows if r["suffix"] == suffix and r["prefix"] == prefix and key in r),
                                key=lambda r: r["sequences"])  # fmt: skip
                if picked:
                    ax.plot([r["sequences"] for r in picked], [r[key] for r in picked], "o-",
                            label=f"prefix {prefix}, suffix {suffix}")  # fmt: skip
        ax.axhline(1.0, color="gray", linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequences sharing the prefix (one query token each)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup of cascade over full attention")
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"cascade decode, bf16, 32 q / 8 kv heads, d=128: {env['device']}, {env['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitkv.bench cascade", description=__doc__)
    add_out_argument(parser, "cascade")
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the cascade benchmark needs a CUDA device")
    env = environment()
    sweep = [r for case in HEADLINE for r in sweep_prefix_splits(*case)]
    sweep_header = ["sequences", "prefix", "suffix", "prefix splits", "suffix splits", "passes", "merge", "sum"]
    sweep_table = [[r["sequences"], r["prefix"], r["suffix"],
                    f"{r['prefix_splits']}{' (chosen)' if r['chosen'] else ''}", r["suffix_splits"],
                    f"{r['passes_us']:.1f}us", _us_or_dash(r.get("merge_us")),
                    f"{r['passes_us'] + r.get('merge_us', 0.0):.1f}us"]
                   for r in sweep]  # fmt: skip
    print(text_table(sweep_header, sweep_table) + "\n")
    cases = HEADLINE + [c for c in grid(args.quick) if c not in HEADLINE]
    rows = []
    for case in cases:
        rows.append(bench_case(*case))
        torch.cuda.empty_cache()

    header = ["sequences", "prefix", "suffix", "full (" + rows[0].get("full_backend", "?") + ")", "cascade",
              "speedup", "prefix splits", "passes", "merge", "forced cascade", "full graph", "cascade graph", "graph speedup",
              "full b2b", "cascade b2b", "b2b speedup", "KV full GB", "KV cascade GB", "max diff"]  # fmt: skip
    table = []
    for r in rows:
        if "skipped" in r:
            table.append([r["sequences"], r["prefix"], r["suffix"], "-", "-", r["skipped"]] + ["-"] * 10
                         + [f"{r['full_kv_GB']:.2f}", f"{r['cascade_kv_GB']:.2f}", "-"])  # fmt: skip
            continue
        table.append([r["sequences"], r["prefix"], r["suffix"], f"{r['full_ms'] * 1e3:.1f}us",
                      f"{r['cascade_ms'] * 1e3:.1f}us", f"{r['speedup']:.2f}x", "-" if r["prefix_splits"] is None else r["prefix_splits"],
                      f"{r['passes_ms'] * 1e3:.1f}us", _us_or_dash(r["merge_ms"] * 1e3 if "merge_ms" in r else None),
                      f"{r['forced_cascade_ms'] * 1e3:.1f}us",
                      f"{r['full_graph_us']:.1f}us", f"{r['cascade_graph_us']:.1f}us", f"{r['graph_speedup']:.2f}x",
                      f"{r['full_b2b_us']:.1f}us", f"{r['cascade_b2b_us']:.1f}us", f"{r['b2b_speedup']:.2f}x",
                      f"{r['full_kv_GB']:.2f}", f"{r['cascade_kv_GB']:.2f}", f"{r['max_diff']:.3g}"])  # fmt: skip
    preface = (
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; {env['date']}. "
        "Decode: one query token per sequence, bf16, 32 query heads, 8 KV heads, head_dim 128. Medians with L2 "
        "flushed; full, cascade and forced cascade take turns in 5 rounds (for b2b, full and cascade in "
        f"{_B2B_ROUNDS}), so that the host's speed, which drifted over minutes on the lent machine, weighs on them "
        "alike. full = attention_with_lse over per-sequence [prefix ; suffix_i] KV (built outside the timing); "
        "cascade = cascade_attention (auto path); prefix splits = the chosen prefix chunk count (0: the "
        "single-launch cascade, in which each sequence's programs walk the prefix themselves and no merge runs); "
        "passes = the one Triton launch of the prefix and suffix passes, merge = the N-way merge, each timed alone "
        "(one sequence: no merge stage, the launch merges its own states; in a CUDA graph it keeps the merge); "
        "graph = per call when 20 calls replay from one CUDA graph "
        f"(no launch cost; inputs partly hot in L2); b2b = per call when {_B2B_CALLS} calls are issued back to back "
        "without a sync, as an eager loop runs them: the larger of host and GPU time (do_bench's L2 flush "
        "before each call hides host time up to the flush's own GPU time; this does not).\n\n"
    )
    sweep_md = (
        "\n\nPrefix split counts around the chosen one (cascade_splits), GPU time of each stage alone, "
        "headline cases:\n\n" + markdown_table(sweep_header, sweep_table)
    )
    write_outputs(args.out, "cascade", {"env": env, "rows": rows, "prefix_split_sweep": sweep},
                  preface + markdown_table(header, table) + sweep_md)  # fmt: skip
    plot(rows, env, args.out / "cascade.png")
    print(text_table(header, table))
    print(f"\nwrote {args.out}/cascade.json, cascade.md, cascade.png")
