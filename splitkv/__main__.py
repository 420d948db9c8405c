"""``python -m splitkv build``: compile the CUDA kernels ahead of first use.
``python -m splitkv info``: versions and which backends can run here."""

import sys

import torch

from . import _cuda
from ._triton_support import TRITON_IMPORT_ERROR, interpreter_enabled


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "info"
    if command == "build":
        if not torch.cuda.is_available():
            raise SystemExit("splitkv build: no CUDA device is visible; the CUDA kernels are built for the local GPU")
        print(f"splitkv: CUDA kernels ready: {_cuda.build(verbose='-v' in sys.argv)}")
    elif command == "info":
        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA device: {torch.cuda.is_available()}")
        print(f"triton: {TRITON_IMPORT_ERROR or 'importable'}, interpreter: {interpreter_enabled()}")
        print(f"CUDA kernel sources: {_cuda.source_dir()}")
    else:
        raise SystemExit("usage: python -m splitkv {build [-v],info}")


main()
