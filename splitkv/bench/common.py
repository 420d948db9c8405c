"""Timing and reporting shared by the benchmarks: median times with L2 flushed,
CUDA-graph replay, host overhead, the device's copy bandwidth, and the
JSON / markdown / PNG outputs."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def environment() -> dict:
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
    }


def median_ms(fn: Callable[[], object], rep_ms: int = 200) -> float:
    """Median device time of ``fn`` in ms over about ``rep_ms`` of runs, L2 flushed before
    every run (CUDA events)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def interleaved(measure: Callable[[Callable[[], object]], float], fns: dict[str, Callable[[], object]],
                rounds: int = 5) -> dict[str, float]:  # fmt: skip
    """Median over ``rounds`` of ``measure(fn)`` for each of ``fns``, which take turns in
    every round: the host speed of the lent machines drifted by up to 2x over minutes,
    and taking turns makes the drift weigh on every function alike."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(measure(fn))
    return {name: statistics.median(times) for name, times in samples.items()}


def capture_graph(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """``(graph, result)``: ``fn()`` run once on a side stream (the warm-up that compiles
    kernels and allocates, outside the capture), then captured in a CUDA graph; ``result``
    is what the captured call returned, refreshed by each ``graph.replay()``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def graph_replay_timer(fn: Callable[[], object], rep_ms: int = 60) -> tuple[Callable[[], float], object]:
    """``(timer, result)``: ``fn`` captured in a CUDA graph of one call, ``timer()`` the
    median ms of its replay with L2 flushed before each (``median_ms``: GPU time from a
    cold L2, no host time), ``result`` what the captured call returned, refreshed by
    each replay. The sweeps under ``benchmarks/`` time their variants this way."""
    graph, result = capture_graph(fn)
    return functools.partial(median_ms, graph.replay, rep_ms), result


def graph_replay_us(fn: Callable[[], object], calls_per_graph: int = 20, replays: int = 50) -> float:
    """Median time per call in µs when ``calls_per_graph`` calls replay from one CUDA graph
    (launch gaps shrink to what the GPU itself needs; inputs stay hot in L2)."""
    graph, _ = capture_graph(lambda: [fn() for _ in range(calls_per_graph)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls_per_graph)
    return statistics.median(times)


def host_overhead_us(fn: Callable[[], object], calls: int = 2000, repeats: int = 7) -> float:
    """Time per call in µs of ``calls`` back-to-back calls with no sync between them
    (median over repeats): the larger of the host time and the GPU time of a call, so
    the host overhead on a shape too small for the GPU to be the bottleneck."""
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        # Waiting for the GPU inside the timing makes a GPU-bound call count its GPU time.
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(samples)


def copy_bandwidth_tbs(num_bytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth, bytes read + written per second, in TB/s."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e12


#: Where results go without ``--out``: a fresh folder per run under the working directory,
#: so a run from a checkout never overwrites the committed ``benchmarks/results/``.
DEFAULT_OUT_ROOT = Path("splitkv-bench-results")


def add_out_argument(parser: argparse.ArgumentParser, stem: str) -> None:
    """``--out DIR``: where the JSON / markdown / PNG go; default a fresh folder named by the time."""
    fresh = DEFAULT_OUT_ROOT / f"{stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    parser.add_argument("--out", type=Path, default=fresh, metavar="DIR",
                        help=f"folder for the JSON, markdown and PNG (default: a fresh {DEFAULT_OUT_ROOT}/{stem}-"
                        "<date-time>/; pass --out benchmarks/results to update the committed results)")  # fmt: skip


def write_outputs(out_dir: Path, stem: str, payload: dict, markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)
