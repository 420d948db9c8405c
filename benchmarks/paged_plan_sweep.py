"""The paged cascade plan's launch taken apart: which programs hold its time, and which tiles suit each kind.

For each sharing case of ``python -m splitkv.bench paged`` (page 16), the plan's one
launch is timed with its program table filtered: the shared runs' programs alone, the
sequences' own programs alone, and all of them; under the plan's tile configuration and
others (wide row tile and its warps, BLOCK_N, pipeline depth, a register cap that lets more
blocks share an SM), some with every shared run at twice the rule's chunks; and as two
launches, the shared runs under a wide configuration and the own programs under a narrow
one, one after the other on one stream and side by side on two. Each figure is the replay of a CUDA graph of one call, L2 flushed (``median_ms``),
the variants of a case taking turns over 3 rounds; each variant's states, merged, are
checked against the plan's own result first. Run on a GPU machine (device_run.sh step
``plan-sweep``; step ``ncu-plan`` runs ``paged_plan_sweep.py ncu`` under ncu).
"""

from __future__ import annotations

import sys
from unittest import mock

import torch
import triton

import splitkv
from splitkv import _paged_triton, _planning
from splitkv.bench.common import graph_replay_timer, interleaved
from splitkv.bench.paged import DTYPE, HEAD_DIM, HEADS_KV, HEADS_Q, build, tree_cases
from splitkv.paged import DYNAMIC_KEY_HI, ITEM_FIELDS, plan_launch_shape, plan_state_buffers

PAGE = 16
# (wide row tile, BLOCK_N, num_stages, maxnreg, num_warps) of the plan's one launch. At
# cbbdb6a a first sweep of 4-warp tiles (wide 16 to 64, BLOCK_N 32 / 64, 2 to 4 stages,
# caps of 128 / 168 registers) found none faster than the plan's own on all three cases.
CONFIGS = [(64, 64, 3, None, 4), (64, 32, 3, 168, 4), (64, 64, 3, None, 8), (128, 64, 3, None, 8),
           (128, 64, 2, None, 8), (128, 32, 3, None, 8)]  # fmt: skip
# Two launches: the shared runs under a plan of these (wide tile, BLOCK_N, stages, maxnreg,
# warps), the own programs under the narrow (BLOCK_N, stages), 4 warps.
SHARED_CONFIGS = [(64, 64, 3, None, 4), (128, 64, 3, None, 8), (128, 64, 2, None, 8)]
# One launch with every shared run at this many times the rule's chunks: 128-row tiles
# at twice the chunks have the programs of 64-row tiles at the rule's (the sweep at
# faec5c7 ran 128-row tiles at the rule's count only, on half as many programs).
CHUNK_SCALED = [((128, 64, 3, None, 8), 2), ((64, 64, 3, None, 4), 2)]
OWN_CONFIGS = [(64, 3), (32, 3)]


def patched_launch_config(wide_m: int, block_n: int, stages: int, warps: int):
    """``launch_config`` as the plan sees it: the narrow tile as usual, the wide one
    ``wide_m`` rows of ``warps`` warps; ``block_n`` / ``stages`` for both."""
    base = _paged_triton.launch_config

    def config(head_dim, dtype, rows_pow2):
        pad, block_m, _bn, narrow_warps, _st = base(head_dim, dtype, rows_pow2)
        if block_m > 16:
            return pad, min(block_m, wide_m), block_n, warps, stages
        return pad, block_m, block_n, narrow_warps, stages

    return config


def raw_launcher(maxnreg):
    """Triton's own launch, with a register cap (the C++ fast launch takes none)."""
    kernel = _paged_triton._paged_fwd_kernel
    extra = {} if maxnreg is None else {"maxnreg": maxnreg}

    def launch(grid, args, constexprs, num_warps, num_stages, device_index):
        kernel[grid](*args, *constexprs, num_warps=num_warps, num_stages=num_stages, **extra)

    return launch


def make_plan(tables, config, chunk_scale: int = 1):
    """The plan under ``config``'s tiles, every shared run at ``chunk_scale`` times the rule's chunks."""
    wide_m, block_n, stages, _maxnreg, warps = config
    rule = _planning.shared_level_splits
    # The plan caps its wide tile at ROWS_PER_PROGRAM rows.
    with (
        mock.patch.object(_paged_triton, "launch_config", patched_launch_config(wide_m, block_n, stages, warps)),
        mock.patch.object(_planning, "ROWS_PER_PROGRAM", max(_planning.ROWS_PER_PROGRAM, wide_m)),
        mock.patch.object(_planning, "shared_level_splits", lambda *args: chunk_scale * rule(*args)),
    ):
        return splitkv.plan_cascade(*tables, page_size=PAGE, heads_q=HEADS_Q, heads_kv=HEADS_KV, head_dim=HEAD_DIM,
                                    dtype=DTYPE)  # fmt: skip


def launcher_for(q, k_cache, v_cache, plan, states, lses, programs, tile_config, wide_m, maxnreg):
    """``fn()`` launching ``programs`` (rows of the plan's program table) of the plan."""
    items, tokens, _all = plan.launch_tables[:3]
    flat = programs.reshape(-1).contiguous()
    grid = programs.shape[0] * HEADS_KV
    launch = raw_launcher(maxnreg)

    def fn():
        with mock.patch.object(_paged_triton, "_launch_paged_kernel", launch):
            _paged_triton.launch_paged(q, k_cache, v_cache, states, lses, plan.block_table, plan.seqused_k,
                                       plan.cu_seqlens_q, True, HEAD_DIM ** -0.5, tile_config, grid, items=items,
                                       item_tokens=tokens, programs=flat, wide_block_m=wide_m)  # fmt: skip

    return fn


def split_programs(plan):
    """``(all, shared, own)``: the rows of the plan's program table (item, row block, split),
    those of the shared runs' items and those of the sequences' own."""
    items = plan.launch_tables[0].view(-1, ITEM_FIELDS)
    programs = plan.launch_tables[2].view(-1, 3)
    # Column 4 of an item is key_hi (splitkv/paged.py's item table).
    shared = items[programs[:, 0].long(), 4] != DYNAMIC_KEY_HI
    return programs, programs[shared], programs[~shared]


def two_streams(first, second):
    side = torch.cuda.Stream()

    def fn():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first()
        second()
        torch.cuda.current_stream().wait_stream(side)

    return fn


def main() -> None:
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}", flush=True)
    for name, case in tree_cases(False).items():
        q, k_cache, v_cache, *tables = build(case, PAGE)
        base = splitkv.plan_cascade(*tables, page_size=PAGE, heads_q=HEADS_Q, heads_kv=HEADS_KV, head_dim=HEAD_DIM,
                                    dtype=DTYPE)  # fmt: skip
        if not base.shared:
            continue
        want = splitkv.paged_cascade_attention(q, k_cache, v_cache, base)[0].float()
        fns, diffs = {}, {}
        for config, chunk_scale in [(config, 1) for config in CONFIGS] + CHUNK_SCALED:
            key = config if chunk_scale == 1 else (config, f"{chunk_scale}x chunks")
            plan = make_plan(tables, config, chunk_scale)
            tile_config, wide_m, _grid = plan_launch_shape(plan.launch_configs, 0)
            everything, shared, own = split_programs(plan)
            states, lses = plan_state_buffers(q, plan.num_states, needs_fill=True)
            for part, programs in (("all", everything), ("shared", shared), ("own", own)):
                fn = launcher_for(q, k_cache, v_cache, plan, states, lses, programs, tile_config, wide_m, config[3])
                fns[(key, part)] = fn
            fns[(key, "all")]()
            got = splitkv.merge_states(states, lses, output_dtype=q.dtype)[0].float()
            diffs[key] = (got - want).abs().max().item()
        # Two launches: a plan's shared runs under its own config, the own programs narrow
        # (4 warps; the wide tile 16, so that its path compiles small).
        for config in SHARED_CONFIGS:
            plan = make_plan(tables, config)
            tile_config, wide_m, _grid = plan_launch_shape(plan.launch_configs, 0)
            _everything, shared, own = split_programs(plan)
            states, lses = plan_state_buffers(q, plan.num_states, needs_fill=True)
            shared_fn = launcher_for(q, k_cache, v_cache, plan, states, lses, shared, tile_config, wide_m, config[3])
            for block_n, stages in OWN_CONFIGS:
                narrow = (tile_config[0], tile_config[1], block_n, 4, stages)
                own_fn = launcher_for(q, k_cache, v_cache, plan, states, lses, own, narrow, tile_config[1], None)
                key = ("two launches", config, block_n, stages)
                fns[(key, "shared")] = shared_fn
                fns[(key, "own")] = own_fn
                fns[(key, "one stream")] = lambda a=shared_fn, b=own_fn: (a(), b())
                fns[(key, "two streams")] = two_streams(shared_fn, own_fn)
                fns[(key, "two streams")]()
                got = splitkv.merge_states(states, lses, output_dtype=q.dtype)[0].float()
                diffs[key] = (got - want).abs().max().item()
        graphs = {key: graph_replay_timer(fn)[0] for key, fn in fns.items()}
        times = interleaved(lambda t: t() * 1e3, graphs, rounds=3)
        _everything, shared, own = split_programs(base)
        print(f"\n== {name}: plan {plan_launch_shape(base.launch_configs, 0)}, {base.num_states} states, "
              f"{len(shared)} shared / {len(own)} own work items", flush=True)  # fmt: skip
        for config in dict.fromkeys(key for key, _part in fns):
            parts = "  ".join(f"{part} {us:6.1f}" for (key, part), us in times.items() if key == config)
            print(f"{config!s:48s} max diff {diffs[config]:.2e} | {parts}", flush=True)


def profile() -> None:
    """For ncu (device_run.sh step ``ncu-plan``, which profiles only between
    ``torch.cuda.profiler.start`` and ``stop``): on the first two cases, the plan's launch
    with the shared runs' programs alone, the own programs alone and all of them, once
    each; on the first, also the packed cascade's passes launch over the same batch."""
    from splitkv.bench.paged import NODE_KEYS, packed_cascade_args
    from splitkv.cascade import cascade_stages

    runs = []
    for name, case in list(tree_cases(False).items())[:2]:
        q, k_cache, v_cache, *tables = build(case, PAGE)
        plan = splitkv.plan_cascade(*tables, page_size=PAGE, heads_q=HEADS_Q, heads_kv=HEADS_KV, head_dim=HEAD_DIM,
                                    dtype=DTYPE)  # fmt: skip
        tile_config, wide_m, _grid = plan_launch_shape(plan.launch_configs, 0)
        states, lses = plan_state_buffers(q, plan.num_states, needs_fill=True)
        for part, programs in zip(("all", "shared", "own"), split_programs(plan)):
            runs.append((f"{name}: {part}", launcher_for(q, k_cache, v_cache, plan, states, lses, programs,
                                                         tile_config, wide_m, None)))  # fmt: skip
        if name.startswith("1 prompt"):
            args, max_suffix = packed_cascade_args(q, k_cache, v_cache, plan.block_table, plan.seqused_k,
                                                   NODE_KEYS[case[0][0][0]], PAGE)  # fmt: skip
            stages = dict(cascade_stages(*args, 1, max_suffix, HEAD_DIM**-0.5, True))
            runs.append((f"{name}: packed cascade passes", stages["passes"]))
    for _name, fn in runs:
        fn()  # compiles
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, fn in runs:
        print(f"profiled: {name}", flush=True)
        fn()
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    profile() if sys.argv[1:] == ["ncu"] else main()
