"""The cascade launch's prefix tile on decode shapes (issue 19).

One launch runs the prefix pass and the suffix pass, with one warp count. For each
(sequences, prefix, suffix) shape (``splitkv.bench.cascade.cascade_inputs``: bf16, 32 query / 8 KV
heads, head_dim 128, one query per sequence), times ``cascade_attention`` with the prefix tile the launch chooses
(``launch``), the prefix pass's own 128-row, 8-warp tile (``wide``: what every launch
took before 9ee85b4), the 64-row, 4-warp tile (``m64``) and a 32-row one (``m32``); eager
(median, L2 flushed) and one captured call replayed (L2 flushed), the variants taking
turns over 3 rounds. ``max diff`` is against the ``wide`` tile's output.
``benchmarks/results/cascade_prefix_tile_h200.log`` holds the run (at be83365, where
the launch took the wide tile) that set ``_attention_triton._narrow_prefix_tile``.
Run on a GPU machine: ``python benchmarks/prefix_tile_sweep.py``.
"""

import functools

import splitkv
from splitkv import _attention_triton
from splitkv.bench.cascade import cascade_inputs
from splitkv.bench.common import copy_bandwidth_tbs, graph_replay_timer, interleaved, median_ms

SHAPES = [(64, 8192, 512), (256, 4096, 256), (16, 32768, 1024), (32, 4096, 256), (256, 32768, 1),
          (256, 4096, 4096), (64, 4096, 1), (128, 16384, 64)]  # fmt: skip
_default_config = _attention_triton._launch_config
_default_narrow = _attention_triton._narrow_prefix_tile


def _rows_capped(cap):
    """A launch config whose tiles have at most ``cap`` rows (4 warps)."""

    def config(head_dim_pad, dtype, rows_pow2, keys_pow2):
        block_m, block_n, warps, stages = _default_config(head_dim_pad, dtype, rows_pow2, keys_pow2)
        return (cap, block_n, 4, stages) if block_m > cap else (block_m, block_n, warps, stages)

    return config


VARIANTS = {  # name: (launch config, narrow-prefix rule)
    "launch": (_default_config, _default_narrow),
    "wide": (_default_config, lambda *args: False),
    "m64": (_rows_capped(64), _default_narrow),
    "m32": (_rows_capped(32), _default_narrow),
}


def under(variant, fn):
    """``fn()`` with the attention launch's tile rules set to ``variant``."""
    _attention_triton._launch_config, _attention_triton._narrow_prefix_tile = VARIANTS[variant]
    try:
        return fn()
    finally:
        _attention_triton._launch_config, _attention_triton._narrow_prefix_tile = _default_config, _default_narrow


def main() -> None:
    copy_tbs = copy_bandwidth_tbs()
    print(f"copy {copy_tbs:.3f} TB/s", flush=True)
    for seqs, prefix, suffix in SHAPES:
        batch = cascade_inputs(seqs, prefix, suffix, seed=1)
        prefix_k, suffix_k = batch[2], batch[4]
        floor_us = 2 * (prefix_k.numel() + suffix_k.numel()) * 2 / (copy_tbs * 1e6)
        call = functools.partial(splitkv.cascade_attention, *batch, max_seqlen_q=1, max_seqlen_k=suffix)
        want = under("wide", call).float()
        timed = {}
        for name in VARIANTS:
            diff = (under(name, call).float() - want).abs().max().item()
            timed[(name, "eager")] = functools.partial(under, name, functools.partial(median_ms, call, 40))
            timed[(name, "graph")], _ = under(name, functools.partial(graph_replay_timer, call, 40))
            print(f"  {name}: max diff vs wide {diff:.2e}", flush=True)
        times = interleaved(lambda time_it: time_it() * 1e3, timed, rounds=3)
        cells = "  ".join(f"{name}/{mode}:{us:7.1f}" for (name, mode), us in times.items())
        print(f"{seqs} x {prefix} x {suffix} floor {floor_us:.1f} us | {cells}", flush=True)


if __name__ == "__main__":
    main()
