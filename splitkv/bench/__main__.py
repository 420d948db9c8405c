"""``python -m splitkv.bench NAME [options]``: run one benchmark (``--help`` lists them;
``python -m splitkv.bench NAME --help`` gives that benchmark's options)."""

from __future__ import annotations

import argparse
import sys

from . import cascade, distributed, hf, merge, paged

#: name -> (entry point taking argv, one line on what it measures)
BENCHMARKS = {
    "merge": (merge.main, "the merge kernels against the copy bandwidth; GPU"),
    "cascade": (cascade.main, "cascade attention against full attention; GPU"),
    "distributed": (distributed.main, "context-parallel attention; NCCL, or gloo with --cpu"),
    "paged": (paged.main, "paged attention, cascade over shared pages; GPU"),
    "hf": (hf.main, "transformers generate() against generate_shared; GPU"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m splitkv.bench",
        description="Run one splitkv benchmark. Results go to a fresh folder, ./splitkv-bench-results/"
        "NAME-<date-time>/, unless --out DIR says where (--out benchmarks/results updates the committed ones).",
        epilog="Options of one benchmark: python -m splitkv.bench NAME --help",
    )
    names = top.add_subparsers(dest="benchmark", metavar="{" + ",".join(BENCHMARKS) + "}", required=True)
    for name, (_, summary) in BENCHMARKS.items():
        # The benchmark parses its own options; add_help=False lets NAME --help reach it.
        names.add_parser(name, help=summary, add_help=False)
    return top


def main(argv: list[str] | None = None) -> None:
    args, rest = parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    BENCHMARKS[args.benchmark][0](rest)


if __name__ == "__main__":
    main()
