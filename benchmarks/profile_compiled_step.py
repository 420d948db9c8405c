"""Where the host time of a compiled (not graph-captured) decode step goes, both ways of
examples/shared_prefix_batching.py: each way's step is compiled once and warmed on two
generations of the same sizes, then one generation runs under cProfile (host functions
by their own time) and one under torch.profiler (ops by self CPU time).

    python benchmarks/profile_compiled_step.py [--batch 64 --prefix 8192 --suffix 256 --new-tokens 16]

On a GPU only (benchmarks/device_run.sh step profile-compiled)."""

import argparse
import cProfile
import importlib.util
import io
import pathlib
import pstats
import random
import sys

import torch

_EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "shared_prefix_batching.py"


def _example():
    spec = importlib.util.spec_from_file_location("shared_prefix_batching", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the example's dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prefix", type=int, default=8192)
    parser.add_argument("--suffix", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rows", type=int, default=25, help="rows of each profile table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_compiled_step.py needs a CUDA device")
    demo = _example()
    # The example's GPU model: 4 layers, hidden 2048, 16 query / 4 KV heads x 128, vocab 32000, bf16.
    config = demo.LlamaConfig(32000, 2048, 64 * ((8 * 2048 // 3 + 63) // 64), 4, 16, 4, 128)
    model = demo.build_model(config, 0, "cuda", torch.bfloat16)
    rng = random.Random(0)
    suffix_lens = [rng.randint(args.suffix // 2, args.suffix) for _ in range(args.batch)]
    suffix_lens[0] = 0
    prompt, suffixes = demo.make_requests(config, args.prefix, suffix_lens, 1)
    for way, generate in (("(a) per-request caches", demo.generate_usual), ("(b) shared prefix", demo.generate_shared)):
        runner = demo.DecodeRunner(model, compile=True)

        def run():
            return generate(model, prompt, suffixes, args.new_tokens, runner=runner)

        for _ in range(2):
            g = run()
            print(f"{way}: compiled step {1e3 * g.decode_s / max(1, g.decode_steps):.2f} ms", flush=True)
        profile = cProfile.Profile()
        profile.enable()
        g = run()
        profile.disable()
        print(f"{way}: step under cProfile {1e3 * g.decode_s / max(1, g.decode_steps):.2f} ms")
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.rows)
        print(out.getvalue())
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            run()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                        max_name_column_width=60))  # fmt: skip


if __name__ == "__main__":
    main()
