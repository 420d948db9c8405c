"""Paged benchmark: decode (one query per sequence) over a paged KV cache whose block
tables share prefixes by page id. The cascade plan (:func:`splitkv.plan_cascade` +
:func:`splitkv.paged_cascade_attention`) against plain paged attention over the same
block tables (splitkv's own Triton paged kernel, since torch 2.11's flash attention
takes no block_table) and, where the tree is one prefix, against the packed
:func:`splitkv.cascade_attention`.

    python -m splitkv.bench paged [--out DIR] [--quick] [--sweep]
    python -m splitkv.bench paged --plan-host   # plan_cascade's host time alone, no GPU

Without ``--out`` the JSON and the table go to a fresh folder (printed; see ``--help``).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

import splitkv

from .common import (
    add_out_argument,
    copy_bandwidth_tbs,
    environment,
    graph_replay_us,
    interleaved,
    markdown_table,
    median_ms,
    text_table,
    write_outputs,
)

HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
KV_TOKEN_BYTES = 2 * HEADS_KV * HEAD_DIM * 2


def tree_cases(quick: bool) -> dict[str, list[tuple[tuple[int, ...], int]]]:
    """Each case as a list of sequences: (path of shared node ids, own key count). A node
    id names a run of keys shared by every sequence whose path holds it."""
    cases = {}
    samples = 16 if quick else 64
    cases["1 prompt 8192 x 64 samples, suffix 0..512"] = [((0,), round(512 * i / (samples - 1)))
                                                           for i in range(samples)]  # fmt: skip
    cases["8 prompts 4096 x 16 samples, suffix 256"] = [((p + 1,), 256) for p in range(8) for _ in range(16)]
    cases["3 levels: 4096 system, 8 x 2048 few-shot, 8 x 256"] = [((100, 101 + f), 256) for f in range(8)
                                                                  for _ in range(8)]  # fmt: skip
    cases["no sharing: 64 x 4096"] = [((), 4096) for _ in range(64)]
    return cases


NODE_KEYS = {0: 8192, **{p + 1: 4096 for p in range(8)}, 100: 4096, **{101 + f: 2048 for f in range(8)}}


def build_tables(case: list, page_size: int, seed: int = 0, device: str = "cpu"):
    """``(block_table, seqused_k, cu_seqlens_q)`` of ``case`` on ``device`` (page ids
    shuffled), and the page count: what the plan reads."""
    gen = torch.Generator().manual_seed(seed)
    node_pages = {}
    next_page = 0
    rows, used = [], []
    for path, own in case:
        row = []
        for node in path:
            if node not in node_pages:
                count = NODE_KEYS[node] // page_size
                node_pages[node] = list(range(next_page, next_page + count))
                next_page += count
            row += node_pages[node]
        own_pages = -(-own // page_size) + 1  # room for one more page of growth
        row += list(range(next_page, next_page + own_pages))
        next_page += own_pages
        rows.append(row)
        used.append(sum(NODE_KEYS[n] for n in path) + own)
    permutation = torch.randperm(next_page, generator=gen).tolist()
    width = max(len(r) for r in rows)
    table = [[permutation[p] for p in r] + [0] * (width - len(r)) for r in rows]
    block_table = torch.tensor(table, dtype=torch.int32, device=device)
    seqused_k = torch.tensor(used, dtype=torch.int32, device=device)
    cu_seqlens_q = torch.arange(len(case) + 1, dtype=torch.int32, device=device)
    return block_table, seqused_k, cu_seqlens_q, next_page


def build(case: list, page_size: int, seed: int = 0):
    """Paged cache, block table, seqused_k, cu_seqlens_q and q for ``case`` on the GPU
    (:func:`build_tables`)."""
    block_table, seqused_k, cu_seqlens_q, num_pages = build_tables(case, page_size, seed, "cuda")
    kv = torch.randn(num_pages, 2, page_size, HEADS_KV, HEAD_DIM, device="cuda", dtype=DTYPE)
    q = torch.randn(len(case), HEADS_Q, HEAD_DIM, device="cuda", dtype=DTYPE)
    return q, kv[:, 0], kv[:, 1], block_table, seqused_k, cu_seqlens_q


def packed_cascade_args(q, k_cache, v_cache, block_table, seqused_k, prefix_len: int, page_size: int):
    """The same batch as cascade_attention's packed layout: the shared prefix gathered
    once, each sequence's own keys packed."""
    prefix_pages = block_table[0, : prefix_len // page_size].long()
    prefix_k = k_cache[prefix_pages].flatten(0, 1)
    prefix_v = v_cache[prefix_pages].flatten(0, 1)
    suffix_k, suffix_v, lengths = [], [], []
    for row, used in zip(block_table.tolist(), seqused_k.tolist()):
        own = used - prefix_len
        pages = torch.tensor(row[prefix_len // page_size:], device=q.device).long()
        suffix_k.append(k_cache[pages].flatten(0, 1)[:own])
        suffix_v.append(v_cache[pages].flatten(0, 1)[:own])
        lengths.append(own)
    cu_k = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
    cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return (q, cu_q, prefix_k, prefix_v, torch.cat(suffix_k), torch.cat(suffix_v), cu_k), max(lengths)


def plan_stages(q, k_cache, v_cache, plan) -> list[tuple[str, object]]:
    """The launches of a shared plan and its merge, each as ``(name, fn)``: what
    :func:`splitkv.paged_cascade_attention` runs, to time one at a time. Calling them
    in order leaves the result in the returned merge's output."""
    from splitkv.paged import plan_launch_shape, plan_state_buffers, run_plan_launch

    states, lses = plan_state_buffers(q, plan.num_states, needs_fill=True)
    scale = q.shape[2] ** -0.5
    stages = []
    for index in range(len(plan.launch_tables) // 3):
        config, wide_block_m, grid = plan_launch_shape(plan.launch_configs, index)
        launch = functools.partial(run_plan_launch, index, q, k_cache, v_cache, states, lses, plan.block_table,
                                   plan.seqused_k, plan.cu_seqlens_q, plan.launch_tables, plan.launch_configs,
                                   scale)  # fmt: skip
        stages.append((f"launch {index} (BLOCK_M {config[1]} / {wide_block_m}, {grid} programs)", launch))
    stages.append((f"merge of {plan.num_states} states", lambda: splitkv.merge_states(states, lses,
                                                                                       output_dtype=q.dtype)))
    return stages


def bench_case(name: str, case: list, page_size: int, floor_tbs: float) -> dict:
    """One case's row; ``floor_tbs`` is the device's copy rate measured in the same run (the byte floor)."""
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = build(case, page_size)
    max_k = int(seqused_k.max())
    plan_kwargs = dict(page_size=page_size, heads_q=HEADS_Q, heads_kv=HEADS_KV, head_dim=HEAD_DIM, dtype=DTYPE)
    host = []
    for _ in range(5):
        start = time.perf_counter()
        plan = splitkv.plan_cascade(block_table, seqused_k, cu_seqlens_q, **plan_kwargs)
        host.append((time.perf_counter() - start) * 1e6)
    row = {"case": name, "page_size": page_size, "sequences": len(case), "plan_host_us": statistics.median(host),
           "kept_runs": sum(r.kept for r in plan.runs), "runs": len(plan.runs), "num_states": plan.num_states,
           "kv_MB_plain": plan.kv_bytes_plain / 1e6, "kv_MB_plan": plan.kv_bytes_plan / 1e6,
           "floor_us_plain": plan.kv_bytes_plain / (floor_tbs * 1e6),
           "floor_us_plan": plan.kv_bytes_plan / (floor_tbs * 1e6)}  # fmt: skip

    def plain():
        return splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 1, max_k,
                                                causal=True, backend="triton")  # fmt: skip

    def cascade():
        return splitkv.paged_cascade_attention(q, k_cache, v_cache, plan)

    fns = {"plain": plain, "plan": cascade}
    one_prefix = all(len(path) == 1 for path, _ in case) and len({path for path, _ in case}) == 1
    if one_prefix:
        packed_args, max_suffix = packed_cascade_args(q, k_cache, v_cache, block_table, seqused_k,
                                                      NODE_KEYS[case[0][0][0]], page_size)  # fmt: skip

        def packed():
            return splitkv.cascade_attention(*packed_args, max_seqlen_q=1, max_seqlen_k=max_suffix)

        fns["packed_cascade"] = packed
    # Every way against the reference backend (pages gathered, attention in torch math).
    want = splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, 1, max_k,
                                            causal=True, backend="reference")[0].float()  # fmt: skip
    for fn_name, fn in fns.items():
        got = fn()
        got = (got[0] if isinstance(got, tuple) else got).float()
        row[f"{fn_name}_max_diff"] = (got - want).abs().max().item()
    if plan.shared:
        # Where the plan's time goes: each launch and the merge alone (L2 flushed).
        row["plan_stages_us"] = {stage: median_ms(fn, rep_ms=40) * 1e3 for stage, fn in plan_stages(q, k_cache,
                                                                                                    v_cache, plan)}
    eager = interleaved(lambda fn: median_ms(fn, rep_ms=60), fns, rounds=3)
    for fn_name in fns:
        row[f"{fn_name}_eager_us"] = eager[fn_name] * 1e3
        row[f"{fn_name}_graph_us"] = graph_replay_us(fns[fn_name])
    row["speedup_eager"] = row["plain_eager_us"] / row["plan_eager_us"]
    row["speedup_graph"] = row["plain_graph_us"] / row["plan_graph_us"]
    row["plain_pct_of_floor"] = 100 * row["floor_us_plain"] / row["plain_eager_us"]
    row["plan_pct_of_floor"] = 100 * row["floor_us_plan"] / row["plan_eager_us"]
    return row


def sweep_plain(page_size: int) -> list[dict]:
    """GPU time of the plain paged kernel on 64 x 4096 keys for a few launch configurations."""
    from splitkv._paged_triton import launch_paged

    case = tree_cases(False)["no sharing: 64 x 4096"]
    q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = build(case, page_size)
    kv_bytes = int(seqused_k.sum()) * KV_TOKEN_BYTES
    rows = []
    for splits in (1, 2):
        for block_n in (32, 64, 128):
            for warps, stages in ((4, 2), (4, 3), (8, 3)):
                out = torch.empty((splits, q.shape[0], HEADS_Q, HEAD_DIM), device="cuda",
                                  dtype=torch.float32 if splits > 1 else DTYPE)  # fmt: skip
                lse = torch.empty((splits, HEADS_Q, q.shape[0]), device="cuda")
                config = (HEAD_DIM, 16, block_n, warps, stages)
                grid = q.shape[0] * HEADS_KV * splits

                def run(out=out, lse=lse, config=config, grid=grid, splits=splits):
                    launch_paged(q, k_cache, v_cache, out, lse, block_table, seqused_k, cu_seqlens_q, True,
                                 HEAD_DIM**-0.5, config, grid, 1, splits)  # fmt: skip

                try:
                    us = median_ms(run, rep_ms=40) * 1e3
                except Exception as error:  # noqa: BLE001 (a config that does not compile is reported)
                    rows.append({"splits": splits, "block_n": block_n, "warps": warps, "stages": stages,
                                 "error": str(error)[:80]})  # fmt: skip
                    continue
                rows.append({"page_size": page_size, "splits": splits, "block_n": block_n, "warps": warps,
                             "stages": stages, "us": us, "TB_per_s": kv_bytes / us / 1e6})  # fmt: skip
    return rows


def plan_host_times(calls: int = 200) -> list[dict]:
    """Host time of :func:`splitkv.plan_cascade` alone (median of ``calls`` calls) on
    CPU tables of every case: what a serving engine pays per step before its upload."""
    rows = []
    for page_size in (16, 128):
        for name, case in tree_cases(False).items():
            block_table, seqused_k, cu_seqlens_q, _pages = build_tables(case, page_size)
            kwargs = dict(page_size=page_size, heads_q=HEADS_Q, heads_kv=HEADS_KV, head_dim=HEAD_DIM, dtype=DTYPE)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                plan = splitkv.plan_cascade(block_table, seqused_k, cu_seqlens_q, **kwargs)
                times.append((time.perf_counter() - start) * 1e6)
            rows.append({"case": name, "page_size": page_size, "plan_host_us": statistics.median(times),
                         "kept_runs": sum(r.kept for r in plan.runs), "runs": len(plan.runs)})  # fmt: skip
    return rows


def plot(rows: list[dict], env: dict, path) -> None:
    """Speedup of the plan over plain paged attention per case, eager and graph-replayed, per page size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    page_sizes = sorted({r["page_size"] for r in rows})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / (2 * len(page_sizes))
    for i, (page_size, key) in enumerate((p, k) for p in page_sizes for k in ("speedup_eager", "speedup_graph")):
        by_case = {r["case"]: r[key] for r in rows if r["page_size"] == page_size}
        ax.bar([c + (i - len(page_sizes) + 0.5) * width for c in range(len(cases))],
               [by_case.get(case, 0) for case in cases], width,
               label=f"page {page_size}, {'eager' if key == 'speedup_eager' else 'graph replay'}")  # fmt: skip
    ax.axhline(1.0, color="gray", linestyle="--")
    ax.set_xticks(range(len(cases)), [c.replace(", ", ",\n") for c in cases], fontsize=7)
    ax.set_ylabel("speedup over plain paged attention")
    ax.legend(fontsize=7)
    ax.set_title(f"paged cascade, bf16, {HEADS_Q} q / {HEADS_KV} kv heads, d={HEAD_DIM}: {env['device']}, "
                 f"{env['date']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitkv.bench paged", description=__doc__.splitlines()[0])
    add_out_argument(parser, "paged")
    parser.add_argument("--quick", action="store_true", help="fewer samples in case 1, page size 16 only")
    parser.add_argument("--sweep", action="store_true", help="also sweep the plain kernel's launch configuration")
    parser.add_argument("--plan-host", action="store_true",
                        help="only time plan_cascade's host side on CPU tables (runs without a GPU)")
    args = parser.parse_args(argv)
    if args.plan_host:
        header = ["case", "page", "runs (kept)", "plan host us (median)"]
        table = [[r["case"], r["page_size"], f"{r['runs']} ({r['kept_runs']})", f"{r['plan_host_us']:.0f}"]
                 for r in plan_host_times()]  # fmt: skip
        print(text_table(header, table))
        return
    out_dir = args.out
    env = environment()
    copy_tbs = copy_bandwidth_tbs()
    rows = []
    for page_size in (16,) if args.quick else (16, 128):
        for name, case in tree_cases(args.quick).items():
            row = bench_case(name, case, page_size, copy_tbs)
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    sweep = []
    if args.sweep:
        for page_size in (16, 128):
            sweep += sweep_plain(page_size)
    header = ["case", "page", "KV MB plain / plan", "plan host us", "plain us (eager / graph)",
              "plan us (eager / graph)", "packed cascade us (eager / graph)", "speedup eager / graph",
              "plain % of floor", "plan % of floor"]  # fmt: skip
    table = [[r["case"], r["page_size"], f"{r['kv_MB_plain']:.0f} / {r['kv_MB_plan']:.0f}", f"{r['plan_host_us']:.0f}",
              f"{r['plain_eager_us']:.1f} / {r['plain_graph_us']:.1f}",
              f"{r['plan_eager_us']:.1f} / {r['plan_graph_us']:.1f}",
              (f"{r['packed_cascade_eager_us']:.1f} / {r['packed_cascade_graph_us']:.1f}"
               if "packed_cascade_eager_us" in r else "-"),
              f"{r['speedup_eager']:.2f}x / {r['speedup_graph']:.2f}x", f"{r['plain_pct_of_floor']:.0f}%",
              f"{r['plan_pct_of_floor']:.0f}%"] for r in rows]  # fmt: skip
    preface = (f"# Paged decode with shared prefixes ({env['device']}, torch {env['torch']}, triton {env['triton']}, "
               f"{env['date']})\n\nbf16, {HEADS_Q} query / {HEADS_KV} KV heads, head_dim {HEAD_DIM}, one query per "
               "sequence. Plain: splitkv's Triton paged kernel without sharing (torch's flash attention takes no "
               f"block_table in this torch). Eager: L2 flushed, median; graph: CUDA-graph replay. Floor: KV bytes at "
               f"the device-to-device copy rate measured in this run, {copy_tbs:.3f} TB/s. Max diffs: against "
               "the reference backend.\n\n")  # fmt: skip
    markdown = preface + markdown_table(header, table)
    if sweep:
        keys = ["page_size", "splits", "block_n", "warps", "stages", "us", "TB_per_s"]
        markdown += "\n## Plain kernel launch configurations (64 x 4096)\n\n" + markdown_table(
            keys, [[f"{r.get(k, '-'):.2f}" if isinstance(r.get(k), float) else r.get(k, r.get("error", "-"))
                    for k in keys] for r in sweep])  # fmt: skip
    write_outputs(out_dir, "paged", {"environment": env, "copy_tbs": copy_tbs, "rows": rows, "sweep": sweep},
                  markdown)  # fmt: skip
    plot(rows, env, out_dir / "paged.png")
    print(text_table(header, table))
    print(f"written to {out_dir}")
