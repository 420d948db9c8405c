"""``python -m splitkv.bench {merge,...} [options]``: run one benchmark."""

import sys

from . import cascade, distributed, hf, merge

BENCHMARKS = {"merge": merge.main, "cascade": cascade.main, "distributed": distributed.main, "hf": hf.main}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        raise SystemExit(f"usage: python -m splitkv.bench {{{','.join(BENCHMARKS)}}} [options]")
    BENCHMARKS[sys.argv[1]](sys.argv[2:])


main()
