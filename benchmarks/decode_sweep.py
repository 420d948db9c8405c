"""Tile sweep of splitkv's Triton attention kernel on decode shapes (issue 19).

For each decode shape (one query per sequence, bf16, 32 query / 8 KV heads, head_dim
128), times ``split_kv_attention`` (backend Triton, its own split count and twice it)
under each (BLOCK_N, num_warps, num_stages), with L2 flushed (the tiles of a shape
taking turns over 3 rounds, the median kept), and prints each time
against the KV bytes' floor at the measured device-to-device copy rate (read +
write), as issue 19 counts it. ``torch.amax`` over 2 GiB is timed too, as a lower
bound of the read-only rate: on the H200 at 405302a it read 3.48 TB/s while the
attention kernel streamed 4.3-4.5 TB/s, so a torch reduction is no read ceiling.
Run on a GPU machine: ``python benchmarks/decode_sweep.py`` (device_run.sh step
``decode-sweep``); writes ``decode_sweep.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from pathlib import Path

import torch

import splitkv
from splitkv import _attention_triton
from splitkv._planning import varlen_num_splits
from splitkv.bench.common import copy_bandwidth_tbs, environment, interleaved, median_ms

SHAPES = [  # (sequences, keys per sequence)
    (256, 256),
    (64, 512),
    (16, 1024),
    (64, 8704),
    (256, 4352),
    (1, 1 << 20),
]
HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128


def decode_batch(seqs: int, keys: int):
    """``(q, k, v, cu_seqlens_q, cu_seqlens_k)`` of one decode query per sequence over
    ``keys`` packed keys each (bf16, HEADS_Q / HEADS_KV heads of HEAD_DIM, seed 0)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(seqs, HEADS_Q, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(seqs * keys, HEADS_KV, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    cu_q = torch.arange(seqs + 1, device="cuda", dtype=torch.int32)
    return q, k, v, cu_q, cu_q * keys


def amax_read_tbs(num_bytes: int = 2 << 30) -> float:
    """Bytes read per second by ``torch.amax`` over ``num_bytes`` (its write is 2 bytes)."""
    x = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    ms = median_ms(lambda: torch.amax(x))
    return num_bytes / (ms * 1e-3) / 1e12


def with_tile(default_config, config, fn):
    """``fn()`` with the attention kernel's (BLOCK_N, num_warps, num_stages) set to
    ``config`` (None: the default tile), BLOCK_M kept."""

    def launch_config(head_dim_pad, dtype, rows_pow2, keys_pow2):
        block_m, block_n, warps, stages = default_config(head_dim_pad, dtype, rows_pow2, keys_pow2)
        return (block_m, block_n, warps, stages) if config is None else (block_m, *config)

    _attention_triton._launch_config = launch_config
    try:
        return fn()
    finally:
        _attention_triton._launch_config = default_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    copy_tbs, amax_tbs = copy_bandwidth_tbs(), amax_read_tbs()
    print(f"device-to-device copy: {copy_tbs:.3f} TB/s (the floor's rate); torch.amax reads {amax_tbs:.3f} TB/s",
          flush=True)  # fmt: skip
    default_config = _attention_triton._launch_config
    rows = []
    for seqs, keys in SHAPES:
        q, k, v, cu_q, cu_k = decode_batch(seqs, keys)
        kv_bytes = 2 * k.numel() * k.element_size()
        floor_us = kv_bytes / (copy_tbs * 1e6)
        splits = varlen_num_splits(q, k, cu_q, 1, keys)
        configs = [("default", None)] + [
            (f"n{bn} w{w} s{s}", (bn, w, s)) for bn, w, s in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4))
        ]
        # Every tile at the default split count; the default tile at 2x and 4x the splits.
        runs = [(splits, name, config) for name, config in configs]
        runs += [(n * splits, "default", None) for n in (2, 4)]
        timed = {}
        for num_splits, name, config in runs:
            call = functools.partial(splitkv.split_kv_attention, q, k, v, cu_q, cu_k, 1, keys,
                                     num_splits=num_splits)  # fmt: skip
            try:
                with_tile(default_config, config, call)  # compiles the tile
            except Exception as error:  # noqa: BLE001 (a tile that does not fit shared memory: report, go on)
                print(f"{seqs} x {keys} splits {num_splits} {name}: {type(error).__name__}", flush=True)
                continue
            timed[(num_splits, name)] = functools.partial(
                with_tile, default_config, config, functools.partial(median_ms, call, rep_ms=20)
            )
        # The tiles take turns, 3 rounds: a single pass timed the same tile 52 and 99 us on
        # 64 x 512 keys (the first tile of a shape was often slow).
        medians = interleaved(lambda time_it: time_it() * 1e3, timed, rounds=3)
        for (num_splits, name), us in medians.items():
            rows.append({"seqs": seqs, "keys": keys, "splits": num_splits, "config": name, "us": us,
                         "kv_mb": kv_bytes / 1e6, "floor_us": floor_us, "of_floor": floor_us / us})  # fmt: skip
            print(f"{seqs:4d} x {keys:8d} splits {num_splits:3d} {name:12s} {us:9.1f} us "
                  f"{100 * floor_us / us:5.1f}% of the floor ({floor_us:.1f} us)", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_sweep.json").write_text(
        json.dumps(
            {"environment": environment(), "copy_tbs": copy_tbs, "amax_read_tbs": amax_tbs, "rows": rows}, indent=2
        )
        + "\n"
    )
    best = {}
    for row in rows:
        key = (row["seqs"], row["keys"])
        if key not in best or row["us"] < best[key]["us"]:
            best[key] = row
    for (seqs, keys), row in best.items():
        default = min(r["us"] for r in rows if (r["seqs"], r["keys"]) == (seqs, keys) and r["config"] == "default")
        print(f"best {seqs} x {keys}: {row['config']} splits {row['splits']} {row['us']:.1f} us "
              f"({100 * row['of_floor']:.0f}% of floor), default tile {default:.1f} us (best of its split counts)")  # fmt: skip


if __name__ == "__main__":
    main()
