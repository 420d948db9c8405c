"""Split counts on decode shapes: dense ``split_kv_attention``, plain paged attention, cascade.

bf16 decode (one query per sequence, 32 query / 8 KV heads, head_dim 128): for each
(sequences, keys) shape, ``split_kv_attention`` over packed KV and
``paged_attention_with_lse`` over the same KV in shuffled 16-slot pages, both causal,
at 1 to 16 key chunks; then ``cascade_attention`` on the three headline cascade
shapes with the suffix count forced (``choose_num_splits`` patched, the prefix count
following from it as in a real call). Each call is captured in a CUDA graph of one
call and the replay timed with L2 flushed (``median_ms``), so a figure is GPU time
from a cold L2 without host time; the split counts of a shape take turns, 3 rounds.
"rule" is what ``choose_num_splits`` picks. Last, cascades with short suffixes (one to
a few keys per sequence, where the prefix programs are most of the launch) at 1 to 32
prefix chunks (``shared_level_splits`` patched), "rule" its own count; and ("grid") the
prefix rule against its form before the one-wave floor (``one_wave_chunks`` patched to 0)
on a grid of cascades, where the two differ, and ("paged-grid") the same for paged
cascade plans; ("paged-chunks") ``bench paged``'s shared cases at forced shared-run
chunk counts. Run on a GPU machine (device_run.sh step ``split-sweep
[dense|suffix|prefix|grid|paged-grid|paged-chunks ...]``, all by default); prints one line per shape. ``benchmarks/results/split_counts_h200.log``
holds the output of its first copy at b86c94f (the first eight shapes, the same calls
and timing; its page ids were drawn after the inputs from one generator), from which
the rule of 634ba47 was set, then this script's run at be83365.
"""

import functools
import sys
from unittest import mock

import torch
from decode_sweep import decode_batch  # benchmarks/, the script's folder

import splitkv
from splitkv import _planning
from splitkv.bench.cascade import cascade_inputs
from splitkv.bench.common import copy_bandwidth_tbs, graph_replay_timer, interleaved

HQ, HKV, D = 32, 8, 128
copy = copy_bandwidth_tbs()
print(f"copy {copy:.3f} TB/s; SMs {torch.cuda.get_device_properties(0).multi_processor_count}", flush=True)


def graph_ms(fn):
    return graph_replay_timer(fn)[0]


def cascade_call(seqs: int, prefix: int, suffix: int):
    """``(call, floor_us)``: a cascade_attention call on decode inputs of that shape, and its
    KV bytes at the copy rate."""
    q, cu_q, pk, pv, sk, sv, cu_k = cascade_inputs(seqs, prefix, suffix, seed=1)
    call = functools.partial(splitkv.cascade_attention, q, cu_q, pk, pv, sk, sv, cu_k, max_seqlen_q=1,
                             max_seqlen_k=suffix, cascade=True)  # fmt: skip
    return call, 2 * (pk.numel() + sk.numel()) * 2 / (copy * 1e6)


def print_counts(label: str, floor_us: float, rule, rule_key, times: dict) -> None:
    """One line: the rule's count and time (``times[rule_key]``), the fastest, and every count's time."""
    best = min(times, key=times.get)
    cells = "  ".join(f"{s}:{us:7.1f}" for s, us in times.items())
    print(f"{label} floor {floor_us:.1f} us rule {rule} ({times[rule_key]:.1f}) best {best} ({times[best]:.1f}) | "
          f"{cells}", flush=True)  # fmt: skip


def patched(name: str, replacement, fn):
    """``fn()`` with ``_planning.<name>`` replaced: the planners read their rules at call time."""
    with mock.patch.object(_planning, name, replacement):
        return fn()


# (16 | 17 | 32) x 16384 and 32 x 8192: where choose_num_splits' two rules meet.
SHAPES = [(256, 256), (64, 512), (16, 1024), (128, 1024), (32, 2048), (64, 4096), (64, 8704), (8, 16384),
          (16, 16384), (17, 16384), (32, 8192), (32, 16384)]  # fmt: skip
SPLITS = [1, 2, 3, 4, 6, 8, 12, 16]


def dense_and_paged() -> None:
    """Split counts of split_kv_attention and plain paged attention."""
    for seqs, keys in SHAPES:
        q, k, v, cu_q, cu_k = decode_batch(seqs, keys)
        gen = torch.Generator(device="cuda").manual_seed(0)  # the shuffled page ids
        page = 16
        pages = seqs * keys // page
        perm = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32)
        block_table = perm.view(seqs, keys // page)
        k_cache, v_cache = k.view(pages, page, HKV, D), v.view(pages, page, HKV, D)
        used = torch.full((seqs,), keys, dtype=torch.int32, device="cuda")
        floor_us = 2 * k.numel() * 2 / (copy * 1e6)
        rule = _planning.choose_num_splits(seqs, HKV, HQ // HKV, keys, q.device)
        fns = {}
        for s in SPLITS:
            if s > keys // 64:
                continue
            dense = functools.partial(splitkv.split_kv_attention, q, k, v, cu_q, cu_k, 1, keys, causal=True,
                                      num_splits=s)  # fmt: skip
            paged = functools.partial(splitkv.paged_attention_with_lse, q, k_cache, v_cache, block_table, used, cu_q, 1,
                                      keys, causal=True, num_splits=s, backend="triton")  # fmt: skip
            fns[("dense", s)] = graph_ms(dense)
            fns[("paged", s)] = graph_ms(paged)
        times = interleaved(lambda t: t() * 1e3, fns, rounds=3)
        for kind in ("dense", "paged"):
            row = {s: us for (kd, s), us in times.items() if kd == kind}
            best = min(row, key=row.get)
            cells = "  ".join(f"{s}:{us:7.1f}" for s, us in row.items())
            at_rule = row.get(rule, float("nan"))
            print(f"{kind} {seqs:4d} x {keys:6d} floor {floor_us:6.1f} us rule {rule:2d} ({at_rule:.1f}) "
                  f"best {best:2d} ({row[best]:.1f}, {100 * floor_us / row[best]:.0f}% of floor) | {cells}",
                  flush=True)  # fmt: skip


def cascade_suffix() -> None:
    """The cascade's headline cases under other suffix split counts (the rule patched)."""
    rule_fn = _planning.choose_num_splits
    for seqs, prefix, suffix in [(64, 8192, 512), (256, 4096, 256), (16, 32768, 1024)]:
        call, floor_us = cascade_call(seqs, prefix, suffix)
        rule = rule_fn(seqs, HKV, HQ // HKV, suffix, torch.device("cuda"))
        fns = {}
        for s in sorted({rule, 1, 2, 3, 4, 6, 8}):
            fns[s] = patched("choose_num_splits", lambda *args, s=s: s, functools.partial(graph_ms, call))
        times = interleaved(lambda t: t() * 1e3, fns, rounds=3)
        print_counts(f"cascade {seqs} x {prefix} x {suffix}", floor_us, rule, rule, times)


# Short suffixes: (sequences, prefix, suffix). The prefix programs are most of the launch.
PREFIX_SHAPES = [(64, 4096, 1), (64, 4096, 16), (64, 4096, 64), (256, 4096, 1), (16, 32768, 1), (16, 8192, 1),
                 (128, 16384, 1), (8, 4096, 1), (64, 8192, 512)]  # fmt: skip


def cascade_prefix() -> None:
    """Cascades with short suffixes under other prefix split counts (shared_level_splits patched)."""
    rule_fn = _planning.shared_level_splits
    for seqs, prefix, suffix in PREFIX_SHAPES:
        call, floor_us = cascade_call(seqs, prefix, suffix)
        chosen = []

        def recording(*args, chosen=chosen):
            chosen.append(rule_fn(*args))
            return chosen[-1]

        fns = {"rule": patched("shared_level_splits", recording, functools.partial(graph_ms, call))}
        for s in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
            if s <= prefix // _planning.MIN_KEYS_PER_SPLIT:
                fns[s] = patched("shared_level_splits", lambda *args, s=s: s, functools.partial(graph_ms, call))
        times = interleaved(lambda t: t() * 1e3, fns, rounds=3)
        print_counts(f"prefix {seqs} x {prefix} x {suffix}", floor_us, chosen[-1] if chosen else "-", "rule", times)


def as_rule(name: str, fn):
    """``fn()`` under the prefix rule (``"rule"``) or its form before the one-wave floor
    (``"old"``: ``one_wave_chunks`` 0)."""
    return fn() if name == "rule" else patched("one_wave_chunks", lambda sms, tiles: 0, fn)


def prefix_rule_grid() -> None:
    """The prefix rule against its form before the one-wave floor, on a grid of cascades:
    only the shapes where the two counts differ are timed."""
    rule_fn = _planning.shared_level_splits
    for seqs in (16, 32, 64, 128, 256):
        for prefix in (1024, 2048, 4096, 8192, 16384):
            for suffix in (1, 64, 256, 1024):
                call, _floor_us = cascade_call(seqs, prefix, suffix)
                counts, fns = {}, {}
                for name in ("rule", "old"):

                    def recording(*args, name=name, counts=counts):
                        counts[name] = rule_fn(*args)
                        return counts[name]

                    fns[name] = as_rule(name, functools.partial(patched, "shared_level_splits", recording,
                                                                functools.partial(graph_ms, call)))  # fmt: skip
                if counts.get("rule") == counts.get("old"):
                    continue
                times = interleaved(lambda t: t() * 1e3, fns, rounds=3)
                print(f"grid {seqs} x {prefix} x {suffix}: rule {counts['rule']} {times['rule']:.1f} us, old "
                      f"{counts['old']} {times['old']:.1f} us ({times['old'] / times['rule']:.2f}x)",
                      flush=True)  # fmt: skip


def paged_rule_grid() -> None:
    """The same comparison for paged cascade plans: sequences sharing one run of pages
    (page 16), each with its own keys after it."""
    from splitkv.bench import paged as bench_paged

    for seqs, prefix, suffix in [(64, 2048, 1), (64, 2048, 64), (64, 4096, 1), (64, 4096, 64), (128, 2048, 1),
                                 (128, 4096, 1), (128, 4096, 256), (32, 4096, 1)]:  # fmt: skip
        with mock.patch.dict(bench_paged.NODE_KEYS, {0: prefix}):  # node 0: the run every sequence shares
            q, k_cache, v_cache, *tables = bench_paged.build([((0,), suffix)] * seqs, 16)
        plans, fns = {}, {}
        for name in ("rule", "old"):
            plans[name] = as_rule(name, functools.partial(splitkv.plan_cascade, *tables, page_size=16, heads_q=HQ,
                                                          heads_kv=HKV, head_dim=D, dtype=q.dtype))  # fmt: skip
            fns[name] = graph_ms(functools.partial(splitkv.paged_cascade_attention, q, k_cache, v_cache, plans[name]))
        if plans["rule"].num_states == plans["old"].num_states:
            continue
        times = interleaved(lambda t: t() * 1e3, fns, rounds=3)
        print(f"paged {seqs} x {prefix} x {suffix}: rule {plans['rule'].num_states} states {times['rule']:.1f} us, "
              f"old {plans['old'].num_states} states {times['old']:.1f} us ({times['old'] / times['rule']:.2f}x)",
              flush=True)  # fmt: skip


def planned_call(q, k_cache, v_cache, *tables):
    """``(plan, timer)``: a page-16 cascade plan of the tables and its call's graph-replay timer."""
    plan = splitkv.plan_cascade(*tables, page_size=16, heads_q=HQ, heads_kv=HKV, head_dim=D, dtype=q.dtype)
    return plan, graph_ms(functools.partial(splitkv.paged_cascade_attention, q, k_cache, v_cache, plan))


def paged_chunks() -> None:
    """``bench paged``'s shared cases (page 16) with every shared run at other chunk
    counts (shared_level_splits patched), "rule" the plan's own."""
    from splitkv.bench import paged as bench_paged

    for label, case in bench_paged.tree_cases(quick=False).items():
        if all(not path for path, _own in case):
            continue  # nothing shared: no shared run to split
        plan_call = functools.partial(planned_call, *bench_paged.build(case, 16))
        plan, fns = {}, {}
        plan["rule"], fns["rule"] = plan_call()
        for s in (2, 3, 4, 6, 8, 12, 16):
            plan[s], fns[s] = patched("shared_level_splits", lambda *args, s=s: s, plan_call)
        times = interleaved(lambda t: t() * 1e3, fns, rounds=3)
        cells = "  ".join(f"{s} ({plan[s].num_states} states):{us:6.1f}" for s, us in times.items())
        best = min(times, key=times.get)
        print(f"paged chunks, {label}: best {best} ({times[best]:.1f} us) | {cells}", flush=True)


SECTIONS = {"dense": dense_and_paged, "suffix": cascade_suffix, "prefix": cascade_prefix, "grid": prefix_rule_grid,
            "paged-grid": paged_rule_grid, "paged-chunks": paged_chunks}  # fmt: skip

if __name__ == "__main__":
    for section in sys.argv[1:] or SECTIONS:
        SECTIONS[section]()
