"""Merge benchmark: the seed table (torch / Triton / CUDA), achieved bandwidth against the
measured copy ceiling, CUDA-graph replay, host overhead per call, and the N-way merge.

    python -m splitkv.bench merge [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

import splitkv

from .common import (
    add_out_argument,
    copy_bandwidth_tbs,
    environment,
    graph_replay_us,
    host_overhead_us,
    interleaved,
    markdown_table,
    median_ms,
    text_table,
    write_outputs,
)

BACKENDS = ("torch", "triton", "cuda")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def seed_configs(quick: bool) -> list[tuple[int, int, int, str]]:
    """(tokens, heads, head_dim, dtype): the seed document's grid plus long, wide and fp32 rows."""
    token_counts = [256, 512, 1024, 4096] if quick else [256, 512, 613, 1024, 1536, 4096]
    configs = [
        (t, h, 128, dt) for dt in ("float16", "bfloat16") for h in (16, 32, 48) for t in token_counts
    ]
    configs += [(t, 32, 128, dt) for dt in ("float16", "bfloat16") for t in (16384, 65536)]
    configs += [(4096, 32, d, "bfloat16") for d in (64, 256)]
    configs += [(t, 32, 128, "float32") for t in (4096, 65536)]
    return configs


def merge_bytes(num_states: int, tokens: int, heads: int, head_dim: int, element_size: int) -> int:
    """Fewest bytes a merge moves: every state's output and lse read once, the result written once."""
    rows = tokens * heads
    return (num_states + 1) * rows * (head_dim * element_size + 4)


def _inputs(num_states, tokens, heads, head_dim, dtype):
    states = torch.randn(num_states, tokens, heads, head_dim, device="cuda", dtype=dtype)
    lses = (torch.rand(num_states, heads, tokens, device="cuda") - 0.5) * 20
    return states, lses


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def bench_two_states(tokens, heads, head_dim, dtype_name, copy_tbs, graphs: bool) -> dict:
    dtype = DTYPES[dtype_name]
    states, lses = _inputs(2, tokens, heads, head_dim, dtype)
    args = (states[0], lses[0], states[1], lses[1])
    row = {"tokens": tokens, "heads": heads, "head_dim": head_dim, "dtype": dtype_name}
    results = {}
    for backend in BACKENDS:
        out = torch.empty_like(states[0])
        out_lse = torch.empty_like(lses[0])

        def call(backend=backend, out=out, out_lse=out_lse):
            splitkv.merge_attn_states(*args, output=out, output_lse=out_lse, backend=backend)

        row[f"{backend}_ms"] = median_ms(call)
        results[backend] = (out, out_lse)
        if graphs and backend != "torch":
            # 200 calls per replay, so that the replay's own launch (a few µs) is not
            # counted as part of each call (it was 0.3 µs per call at 20).
            row[f"{backend}_graph_us"] = graph_replay_us(call, calls_per_graph=200)
    num_bytes = merge_bytes(2, tokens, heads, head_dim, states.element_size())
    row["bytes"] = num_bytes
    row["speedup"] = row["triton_ms"] / row["cuda_ms"]
    for backend in BACKENDS:
        row[f"{backend}_tbs"] = num_bytes / (row[f"{backend}_ms"] * 1e-3) / 1e12
    row["cuda_pct_copy"] = 100 * row["cuda_tbs"] / copy_tbs
    row["diff_cuda_triton"] = _max_diff(results["cuda"][0], results["triton"][0])
    row["diff_triton_torch"] = _max_diff(results["triton"][0], results["torch"][0])
    row["diff_cuda_torch"] = _max_diff(results["cuda"][0], results["torch"][0])
    row["lse_diff_cuda_torch"] = _max_diff(results["cuda"][1], results["torch"][1])
    return row


def bench_n_states(num_states, tokens, heads, head_dim, dtype_name, copy_tbs) -> dict:
    dtype = DTYPES[dtype_name]
    states, lses = _inputs(num_states, tokens, heads, head_dim, dtype)
    row = {"states": num_states, "tokens": tokens, "heads": heads, "head_dim": head_dim, "dtype": dtype_name}
    out = torch.empty_like(states[0])
    out_lse = torch.empty_like(lses[0])
    for backend in BACKENDS:
        row[f"{backend}_ms"] = median_ms(
            lambda b=backend: splitkv.merge_states(states, lses, output=out, output_lse=out_lse, backend=b)
        )

    def chained():
        # What a library with only a two-state merge does: accumulate in place, one state at a time.
        splitkv.merge_attn_states(states[0], lses[0], states[1], lses[1], output=out, output_lse=out_lse)
        for i in range(2, num_states):
            splitkv.merge_attn_states(out, out_lse, states[i], lses[i], output=out, output_lse=out_lse)

    row["chained_cuda_ms"] = median_ms(chained)
    num_bytes = merge_bytes(num_states, tokens, heads, head_dim, states.element_size())
    row["bytes"] = num_bytes
    row["cuda_tbs"] = num_bytes / (row["cuda_ms"] * 1e-3) / 1e12
    row["cuda_pct_copy"] = 100 * row["cuda_tbs"] / copy_tbs
    row["speedup_vs_chained"] = row["chained_cuda_ms"] / row["cuda_ms"]
    ref, _ = splitkv.merge_states(states, lses, backend="torch")
    got, _ = splitkv.merge_states(states, lses, backend="cuda")
    row["diff_cuda_torch"] = _max_diff(got, ref)
    return row


def bench_training(tokens: int, heads: int, head_dim: int, copy_tbs: float) -> dict:
    """The two-state merge's backward (the op autograd calls, gradient buffers allocated
    as there) and the fp8 (e4m3) forward beside the bf16 one, bf16 inputs."""
    states, lses = _inputs(2, tokens, heads, head_dim, torch.bfloat16)
    args = (states[0], lses[0], states[1], lses[1])
    grad_output, grad_lse = torch.randn_like(states[0]), torch.randn_like(lses[0])
    row = {"tokens": tokens, "heads": heads, "head_dim": head_dim, "dtype": "bfloat16"}
    rows = tokens * heads
    # read prefix, suffix and d output, write both output gradients; lses, d lse and d lses
    backward_bytes = rows * (5 * head_dim * states.element_size() + 5 * 4)
    grad_op = torch.ops.splitkv.merge_attn_states_grad.default
    for backend in ("triton", "cuda"):
        row[f"backward_{backend}_ms"] = median_ms(
            lambda b=backend: grad_op(grad_output, grad_lse, *args, 1.0, "ht", b)
        )
        row[f"backward_{backend}_tbs"] = backward_bytes / (row[f"backward_{backend}_ms"] * 1e-3) / 1e12
    row["backward_cuda_pct_copy"] = 100 * row["backward_cuda_tbs"] / copy_tbs
    got = grad_op(grad_output, grad_lse, *args, 1.0, "ht", "cuda")
    want = grad_op(grad_output, grad_lse, *args, 1.0, "ht", "triton")
    row["backward_diff_cuda_triton"] = max(_max_diff(g, w) for g, w in zip(got, want))
    fp8 = torch.float8_e4m3fn
    out8 = torch.empty(states[0].shape, dtype=fp8, device="cuda")
    out_lse = torch.empty_like(lses[0])
    out16 = torch.empty_like(states[0])
    # The four calls take turns: the CUDA fp8 row read 333-425 us at 65536 x 32 x 128
    # from one run to the next when each was timed once (benchmarks/NOTES.md).
    calls = {}
    for backend in ("triton", "cuda"):
        calls[f"fp8_{backend}_ms"] = functools.partial(splitkv.merge_attn_states, *args, output=out8,
                                                       output_lse=out_lse, output_scale=0.5, backend=backend)  # fmt: skip
        calls[f"bf16_{backend}_ms"] = functools.partial(splitkv.merge_attn_states, *args, output=out16,
                                                        output_lse=out_lse, backend=backend)  # fmt: skip
    row.update(interleaved(median_ms, calls))
    return row


def bench_host_overhead() -> dict:
    states, lses = _inputs(2, 1, 8, 128, torch.bfloat16)
    args = (states[0], lses[0], states[1], lses[1])
    out, out_lse = torch.empty_like(states[0]), torch.empty_like(lses[0])
    op = torch.ops.splitkv.merge_attn_states.default
    return {
        "shape": "1 x 8 x 128 bfloat16",
        "public_api_auto_us": host_overhead_us(lambda: splitkv.merge_attn_states(*args)),
        "public_api_preallocated_us": host_overhead_us(
            lambda: splitkv.merge_attn_states(*args, output=out, output_lse=out_lse)
        ),
        "raw_custom_op_us": host_overhead_us(lambda: op(out, out_lse, *args)),
        "public_api_triton_us": host_overhead_us(lambda: splitkv.merge_attn_states(*args, backend="triton")),
        "torch_add_us": host_overhead_us(lambda: torch.add(states[0], states[1], out=out)),
    }


def plot(rows: list[dict], copy_tbs: float, env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    picked = sorted((r for r in rows if r["dtype"] == "bfloat16" and r["head_dim"] == 128), key=lambda r: r["bytes"])
    for backend in BACKENDS:
        ax.plot([r["bytes"] / 1e6 for r in picked], [r[f"{backend}_tbs"] for r in picked], "o-", label=backend)
    ax.axhline(copy_tbs, color="gray", linestyle="--", label=f"measured copy {copy_tbs:.2f} TB/s")
    ax.set_xscale("log")
    ax.set_xlabel("bytes moved per merge (MB, read + write)")
    ax.set_ylabel("effective bandwidth (TB/s), L2 flushed")
    ax.set_title(f"merge_attn_states, bf16, head_dim 128: {env['device']}, torch {env['torch']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitkv.bench merge", description=__doc__)
    add_out_argument(parser, "merge")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the merge benchmark needs a CUDA device")

    env = environment()
    copy_tbs = copy_bandwidth_tbs()
    print(f"{env['device']}: measured device-to-device copy {copy_tbs:.3f} TB/s (read + write)", flush=True)

    rows = []
    for tokens, heads, head_dim, dtype_name in seed_configs(args.quick):
        graphs = tokens <= 1024
        rows.append(bench_two_states(tokens, heads, head_dim, dtype_name, copy_tbs, graphs))
    n_rows = [bench_n_states(s, 4096, 32, 128, "bfloat16", copy_tbs) for s in (2, 4, 8, 16)]
    t_rows = [bench_training(t, 32, 128, copy_tbs) for t in (4096, 65536)]
    overhead = bench_host_overhead()

    header = ["tokens", "heads", "headsize", "dtype", "device", "torch", "triton", "cuda", "speedup",
              "cuda TB/s", "% copy", "cuda graph", "max diff cuda/triton", "max diff cuda/torch"]  # fmt: skip
    table = [
        [r["tokens"], r["heads"], r["head_dim"], r["dtype"], env["device"],
         f"{r['torch_ms']:.5f}ms", f"{r['triton_ms']:.5f}ms", f"{r['cuda_ms']:.5f}ms", f"{r['speedup']:.4f}x",
         f"{r['cuda_tbs']:.3f}", f"{r['cuda_pct_copy']:.1f}%",
         f"{r['cuda_graph_us']:.2f}us" if "cuda_graph_us" in r else "-",
         f"{r['diff_cuda_triton']:.3g}", f"{r['diff_cuda_torch']:.3g}"]
        for r in rows
    ]  # fmt: skip
    n_header = ["states", "tokens", "heads", "headsize", "dtype", "torch", "triton", "cuda", "chained 2-way cuda",
                "speedup vs chained", "cuda TB/s", "% copy", "max diff cuda/torch"]  # fmt: skip
    n_table = [
        [r["states"], r["tokens"], r["heads"], r["head_dim"], r["dtype"], f"{r['torch_ms']:.5f}ms",
         f"{r['triton_ms']:.5f}ms", f"{r['cuda_ms']:.5f}ms", f"{r['chained_cuda_ms']:.5f}ms",
         f"{r['speedup_vs_chained']:.2f}x", f"{r['cuda_tbs']:.3f}", f"{r['cuda_pct_copy']:.1f}%",
         f"{r['diff_cuda_torch']:.3g}"]
        for r in n_rows
    ]  # fmt: skip
    t_header = ["tokens", "heads", "headsize", "dtype", "backward triton", "backward cuda", "backward cuda TB/s",
                "% copy", "fp8 fwd triton", "bf16 fwd triton", "fp8 fwd cuda", "bf16 fwd cuda",
                "max diff bwd cuda/triton"]  # fmt: skip
    t_table = [
        [r["tokens"], r["heads"], r["head_dim"], r["dtype"], f"{r['backward_triton_ms']:.5f}ms",
         f"{r['backward_cuda_ms']:.5f}ms", f"{r['backward_cuda_tbs']:.3f}", f"{r['backward_cuda_pct_copy']:.1f}%",
         f"{r['fp8_triton_ms']:.5f}ms", f"{r['bf16_triton_ms']:.5f}ms", f"{r['fp8_cuda_ms']:.5f}ms",
         f"{r['bf16_cuda_ms']:.5f}ms",
         f"{r['backward_diff_cuda_triton']:.3g}"]
        for r in t_rows
    ]  # fmt: skip
    o_table = [[k, f"{v:.2f}" if isinstance(v, float) else v] for k, v in overhead.items()]

    preface = (
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"{env['date']}. Times are medians with L2 flushed (triton.testing.do_bench); graph = per call "
        f"under CUDA-graph replay (L2 hot). Bandwidth counts bytes read + written once; measured "
        f"device-to-device copy: {copy_tbs:.3f} TB/s.\n\n"
    )
    markdown = (
        preface
        + "## Two-state merge\n\n" + markdown_table(header, table)
        + "\n## N-way merge\n\n" + markdown_table(n_header, n_table)
        + "\n## Backward (two-state) and fp8 output\n\n" + markdown_table(t_header, t_table)
        + "\n## Host overhead per call (µs)\n\n" + markdown_table(["call", "µs"], o_table)
    )  # fmt: skip
    payload = {"env": env, "copy_tbs": copy_tbs, "two_states": rows, "n_states": n_rows, "training": t_rows,
               "host_overhead": overhead}  # fmt: skip
    write_outputs(args.out, "merge", payload, markdown)
    plot(rows, copy_tbs, env, args.out / "merge.png")
    print(text_table(header, table))
    print()
    print(text_table(n_header, n_table))
    print()
    print(text_table(t_header, t_table))
    print()
    print(text_table(["call", "µs"], o_table))
    print(f"\nwrote {args.out}/merge.json, merge.md, merge.png")
