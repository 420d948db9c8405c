"""Context-parallel benchmark: decode attention over one long KV sharded across GPUs, and
causal prefill of one long sequence sharded in the zig-zag and contiguous layouts.

One process per GPU (NCCL), spawned once per world size; every rank holds the same
queries and an even, contiguous shard of the KV. Reported per world size: time per
call (median over iterations, the slowest rank's), the local attention and the
combine separately, the bytes each rank receives to combine the states
(:func:`splitkv.distributed.combine_bytes`, plus the shard lengths for causal
queries), and strong-scaling efficiency ``T_1 / (R * T_R)`` against the one-GPU run
of the same code. Rank 0 also checks its result against single-GPU attention over
the whole KV.

    python -m splitkv.bench distributed [--out DIR] [--world-sizes 1 2 4]
    python -m splitkv.bench distributed --cpu   # gloo on CPU, tiny sizes: a smoke run of this script
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import splitkv
from splitkv import distributed as cp

from .common import add_out_argument, environment, markdown_table, text_table, write_outputs

HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128


def _timed(fn, iterations: int, device: torch.device) -> tuple[float, object]:
    """Median µs per call of ``fn`` (which runs collectives: every rank runs the same
    number of iterations, so no rank waits on a call the others never make)."""
    for _ in range(3):
        result = fn()
    samples = []
    for _ in range(iterations):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            result = fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples), result


def _across_ranks(us: float, device: torch.device, op=dist.ReduceOp.MAX) -> float:
    """The slowest (``MAX``) or fastest (``MIN``) rank's time."""
    t = torch.tensor([us], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def _decode(world, rank, device, dtype, tokens, queries, iterations):
    gen = torch.Generator(device=device).manual_seed(0)  # the same whole KV on every rank
    k = torch.randn(tokens, HEADS_KV, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    v = torch.randn(tokens, HEADS_KV, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    start, end = rank * tokens // world, (rank + 1) * tokens // world
    k_shard, v_shard = k[start:end], v[start:end]
    rows = []
    for num_q in queries:
        q = torch.randn(num_q, HEADS_Q, HEAD_DIM, device=device, dtype=dtype, generator=gen)
        cu_q = torch.tensor([0, num_q], device=device, dtype=torch.int32)
        cu_k = torch.tensor([0, end - start], device=device, dtype=torch.int32)
        args = (q, k_shard, v_shard, cu_q, cu_k, num_q, end - start)
        local_us, _ = _timed(lambda args=args: cp._shard_state(*args, True, HEAD_DIM**-0.5, "auto", None, world, rank),
                             iterations, device)  # fmt: skip
        row = {"world": world, "kv_tokens": tokens, "queries": num_q, "local_us": _across_ranks(local_us, device)}
        for combine in ("all_gather", "all_reduce"):
            us, (out, _) = _timed(lambda args=args, combine=combine: cp.context_parallel_attention(
                *args, causal=True, combine=combine), iterations, device)  # fmt: skip
            row[f"{combine}_us"] = _across_ranks(us, device)
            counted = cp.combine_bytes(world, num_q, HEADS_Q, HEAD_DIM, q.element_size())[combine]
            # Causal queries past the first also all-gather the shard lengths (int64 per sequence).
            row[f"{combine}_bytes"] = counted + (8 * (world - 1) if num_q > 1 and world > 1 else 0)
        row["auto"] = cp.choose_combine(world, q.element_size())
        if rank == 0:
            whole = (q, k, v, cu_q, torch.tensor([0, tokens], device=device, dtype=torch.int32), num_q, tokens)
            want, _ = splitkv.split_kv_attention(*whole, causal=True)
            row["max_diff"] = (out.float() - want.float()).abs().max().item()
            if world == 1:  # single-GPU baselines over the whole KV
                row["split_kv_us"], _ = _timed(lambda whole=whole: splitkv.split_kv_attention(*whole, causal=True),
                                               iterations, device)  # fmt: skip
                row["unsplit_us"], _ = _timed(lambda whole=whole: splitkv.attention_with_lse(*whole, causal=True),
                                              iterations, device)  # fmt: skip
                row["unsplit_backend"] = splitkv.explain_attention(*whole, causal=True).splitlines()[0]
        rows.append(row)
    del k, v
    return rows


def _prefill(world, rank, device, dtype, tokens, iterations):
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(tokens, HEADS_Q, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    k = torch.randn(tokens, HEADS_KV, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    v = torch.randn(tokens, HEADS_KV, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    cu = torch.tensor([0, tokens], device=device, dtype=torch.int32)
    rows = []
    for layout in cp.LAYOUTS:
        q_s, cu_s = cp.shard_sequences(q, cu, rank, world, layout=layout)
        k_s, _ = cp.shard_sequences(k, cu, rank, world, layout=layout)
        v_s, _ = cp.shard_sequences(v, cu, rank, world, layout=layout)
        max_s = int((cu_s[1:] - cu_s[:-1]).max())

        def call(q_s=q_s, k_s=k_s, v_s=v_s, cu_s=cu_s, max_s=max_s, layout=layout):
            return cp.context_parallel_prefill(q_s, k_s, v_s, cu_s, max_s, layout=layout)

        us, (out_s, _) = _timed(call, iterations, device)
        # Every rank receives the other ranks' K and V (padded to the longest shard).
        kv_bytes = (world - 1) * 2 * k_s.shape[0] * HEADS_KV * HEAD_DIM * k.element_size()
        row = {"world": world, "tokens": tokens, "layout": layout, "us": _across_ranks(us, device),
               "fastest_rank_us": _across_ranks(us, device, dist.ReduceOp.MIN), "kv_bytes": kv_bytes}  # fmt: skip
        # Rank 0's queries against single-GPU causal attention over the whole sequence.
        want, _ = splitkv.attention_with_lse(q, k, v, cu, cu, tokens, tokens, causal=True)
        want_s, _ = cp.shard_sequences(want, cu, rank, world, layout=layout)
        row["max_diff"] = (out_s.float() - want_s.float()).abs().max().item()
        rows.append(row)
    return rows


def _worker(rank, world, init_method, config, result_path):
    device = torch.device("cuda", rank) if config["backend"] == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(config["backend"], init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # fmt: skip
    try:
        dtype = getattr(torch, config["dtype"])
        decode = _decode(world, rank, device, dtype, config["kv_tokens"], config["queries"], config["iterations"])
        prefill = _prefill(world, rank, device, dtype, config["prefill_tokens"], config["prefill_iterations"])
        if rank == 0:
            Path(result_path).write_text(json.dumps({"decode": decode, "prefill": prefill}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(world: int, config: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        mp.spawn(_worker, args=(world, f"file://{tmp}/rendezvous", config, str(result)), nprocs=world, join=True)
        return json.loads(result.read_text())


def plot(decode: list[dict], prefill: list[dict], env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for num_q in sorted({r["queries"] for r in decode}):
        picked = sorted((r for r in decode if r["queries"] == num_q), key=lambda r: r["world"])
        left.plot([r["world"] for r in picked], [min(r["all_gather_us"], r["all_reduce_us"]) for r in picked], "o-",
                  label=f"{num_q} queries")  # fmt: skip
    left.set_xlabel("GPUs")
    left.set_ylabel("µs per decode step (best combine)")
    left.set_title(f"decode over {decode[0]['kv_tokens']} KV tokens")
    for layout in sorted({r["layout"] for r in prefill}):
        picked = sorted((r for r in prefill if r["layout"] == layout), key=lambda r: r["world"])
        right.plot([r["world"] for r in picked], [r["us"] / 1e3 for r in picked], "o-", label=layout)
    right.set_xlabel("GPUs")
    right.set_ylabel("ms per call")
    right.set_title(f"causal prefill of {prefill[0]['tokens']} tokens")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"context parallel, bf16, 32 q / 8 kv heads, d=128: {env['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _tables(decode: list[dict], prefill: list[dict]) -> tuple[list, list, list, list]:
    base = {r["queries"]: min(r["all_gather_us"], r["all_reduce_us"]) for r in decode if r["world"] == 1}
    decode_header = ["GPUs", "KV tokens", "queries", "local attention", "all_gather", "all_reduce", "auto picks",
                     "bytes in (gather / reduce)", "speedup vs 1 GPU", "efficiency", "max diff"]  # fmt: skip
    decode_rows = []
    for r in decode:
        best = min(r["all_gather_us"], r["all_reduce_us"])
        speedup = base[r["queries"]] / best if r["queries"] in base else float("nan")
        decode_rows.append([r["world"], r["kv_tokens"], r["queries"], f"{r['local_us']:.1f}us",
                            f"{r['all_gather_us']:.1f}us", f"{r['all_reduce_us']:.1f}us", r["auto"],
                            f"{r['all_gather_bytes']} / {r['all_reduce_bytes']}", f"{speedup:.2f}x",
                            f"{speedup / r['world']:.0%}", f"{r['max_diff']:.3g}"])  # fmt: skip
    base_p = {r["layout"]: r["us"] for r in prefill if r["world"] == 1}
    prefill_header = ["GPUs", "tokens", "layout", "per call (slowest rank)", "fastest rank", "KV bytes in",
                      "speedup vs 1 GPU", "efficiency", "max diff"]  # fmt: skip
    prefill_rows = []
    for r in prefill:
        speedup = base_p[r["layout"]] / r["us"] if r["layout"] in base_p else float("nan")
        prefill_rows.append([r["world"], r["tokens"], r["layout"], f"{r['us'] / 1e3:.2f}ms",
                             f"{r['fastest_rank_us'] / 1e3:.2f}ms", r["kv_bytes"], f"{speedup:.2f}x",
                             f"{speedup / r['world']:.0%}", f"{r['max_diff']:.3g}"])  # fmt: skip
    return decode_header, decode_rows, prefill_header, prefill_rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitkv.bench distributed", description=__doc__)
    add_out_argument(parser, "distributed")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=None, help="default: 1, 2, 4, ... GPUs present")
    parser.add_argument("--kv-tokens", type=int, default=1 << 20, help="decode: tokens of the one sharded KV")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 8, 64], help="decode: query tokens (causal)")
    parser.add_argument("--prefill-tokens", type=int, default=65536)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU with tiny sizes (checks the script)")
    args = parser.parse_args(argv)
    if args.cpu:
        config = {"backend": "gloo", "dtype": "float32", "kv_tokens": 4096, "queries": [1, 4],
                  "prefill_tokens": 256, "iterations": 3, "prefill_iterations": 2}  # fmt: skip
        worlds = args.world_sizes or [1, 2]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the distributed benchmark needs CUDA devices (or --cpu for a gloo smoke run)")
        config = {"backend": "nccl", "dtype": "bfloat16", "kv_tokens": args.kv_tokens, "queries": args.queries,
                  "prefill_tokens": args.prefill_tokens, "iterations": args.iterations,
                  "prefill_iterations": max(3, args.iterations // 5)}  # fmt: skip
        count = torch.cuda.device_count()
        worlds = args.world_sizes or [w for w in (1, 2, 4, 8) if w <= count]
        if max(worlds) > count:
            raise SystemExit(f"--world-sizes {max(worlds)} needs that many GPUs; {count} visible")
    env = environment()
    env["gpus"] = torch.cuda.device_count()
    env["nccl_nvls_enable"] = os.environ.get("NCCL_NVLS_ENABLE")
    decode, prefill = [], []
    for world in worlds:
        result = run_world(world, config)
        decode += result["decode"]
        prefill += result["prefill"]
        print(f"world {world}: done", flush=True)
    decode.sort(key=lambda r: (r["queries"], r["world"]))
    prefill.sort(key=lambda r: (r["layout"], r["world"]))
    decode_header, decode_rows, prefill_header, prefill_rows = _tables(decode, prefill)
    baselines = [r for r in decode if "split_kv_us" in r]
    base_header = ["queries", "split_kv_attention", "unsplit attention_with_lse", "unsplit backend"]
    base_rows = [[r["queries"], f"{r['split_kv_us']:.1f}us", f"{r['unsplit_us']:.1f}us", r["unsplit_backend"]]
                 for r in baselines]  # fmt: skip
    preface = (
        f"Device: {env['device']} x {env['gpus']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"{env['date']}; backend {config['backend']}, NCCL_NVLS_ENABLE={env['nccl_nvls_enable']}. "
        f"{config['dtype']}, {HEADS_Q} query heads, {HEADS_KV} KV heads, head_dim {HEAD_DIM}. Times: median of "
        f"{config['iterations']} calls (prefill {config['prefill_iterations']}), the slowest rank's, CUDA events. "
        "Decode: one sequence, its KV in even contiguous shards, causal queries at its end; local attention = the "
        "rank's partial state alone; bytes in = bytes each rank receives to combine. Efficiency = T_1 / (R x T_R). "
        "max diff: rank 0 against single-GPU attention over the whole KV.\n\n"
    )
    markdown = (preface + "Decode:\n\n" + markdown_table(decode_header, decode_rows)
                + "\nOne-GPU baselines over the whole KV:\n\n" + markdown_table(base_header, base_rows)
                + "\nCausal prefill of one sequence:\n\n" + markdown_table(prefill_header, prefill_rows))  # fmt: skip
    write_outputs(args.out, "distributed", {"env": env, "config": config, "decode": decode, "prefill": prefill},
                  markdown)  # fmt: skip
    written = ["distributed.json", "distributed.md"]
    try:
        plot(decode, prefill, env, args.out / "distributed.png")
        written.append("distributed.png")
    except ImportError:
        print("matplotlib is not installed: no plot")
    print(text_table(decode_header, decode_rows) + "\n")
    print(text_table(base_header, base_rows) + "\n")
    print(text_table(prefill_header, prefill_rows))
    print(f"\nwrote {', '.join(written)} in {args.out}")
