"""``python -m splitkv``: the package's command line.

    python -m splitkv build [-v]   compile the CUDA kernels ahead of first use
    python -m splitkv info         versions, and which backends can run here
    python -m splitkv --help       this list

Without a command it prints ``info``. The commands import what they need when they run;
``--help`` costs what ``import splitkv`` costs (about that of ``import torch``).
"""

from __future__ import annotations

import argparse
import sys


def _build(args: argparse.Namespace) -> None:
    import torch

    from . import _cuda

    if not torch.cuda.is_available():
        raise SystemExit("splitkv build: no CUDA device is visible; the CUDA kernels are built for the local GPU")
    print(f"splitkv: CUDA kernels ready: {_cuda.build(verbose=args.verbose)}")


def _info(args: argparse.Namespace) -> None:
    import torch

    from . import _cuda
    from ._triton_support import TRITON_IMPORT_ERROR, interpreter_enabled

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA device: {torch.cuda.is_available()}")
    print(f"triton: {TRITON_IMPORT_ERROR or 'importable'}, interpreter: {interpreter_enabled()}")
    print(f"CUDA kernel sources: {_cuda.source_dir()}")


def parser() -> argparse.ArgumentParser:
    """The ``python -m splitkv`` argument parser (one subcommand per job)."""
    top = argparse.ArgumentParser(
        prog="python -m splitkv",
        description="splitkv: split-KV and cascade attention on NVIDIA GPUs. Without a command: info.",
        epilog="Benchmarks: python -m splitkv.bench --help",
    )
    commands = top.add_subparsers(dest="command", metavar="{build,info}")
    build = commands.add_parser("build", help="compile the CUDA kernels now (needs a GPU and nvcc)",
                                description="Compile the CUDA kernels into the torch extensions cache "
                                "($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); later "
                                "processes load them in milliseconds.")  # fmt: skip
    build.add_argument("-v", "--verbose", action="store_true", help="show the compiler's commands and output")
    build.set_defaults(run=_build)
    info = commands.add_parser("info", help="show the versions and which backends can run here",
                               description="Print the torch, CUDA and triton versions, whether the Triton "
                               "interpreter is on, and where the CUDA kernel sources are.")  # fmt: skip
    info.set_defaults(run=_info)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    (getattr(args, "run", None) or _info)(args)


if __name__ == "__main__":
    main()
