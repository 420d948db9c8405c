"""The CUDA merge kernels: compiled just in time on first GPU use and cached across processes.

``torch.utils.cpp_extension`` builds the torch binding in ``csrc/`` (one file per
job: ``merge_ops.cu`` around the header ``merge_attn_states.cuh``,
``attention_checks.cpp``, ``triton_launch.cpp`` around ``compiled_launch.h`` (the
launch of triton's compiled kernels from C++: splitkv/_triton_launch.py), and
``module.cpp``, compiled in parallel) with ninja into the torch extensions cache (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``). The
library name carries a hash of the sources, so an edited kernel is rebuilt and a
built one is loaded in milliseconds. ``python -m splitkv build`` builds ahead of
time.

Environment:
    SPLITKV_DISABLE_CUDA=1   never use the CUDA kernels (auto picks Triton), and
                             so never build them: Triton kernels then launch
                             through triton's own launch path.
    SPLITKV_REQUIRE_CUDA=1   a failed build raises instead of warning once and
                             falling back to Triton.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

_SOURCES = ("module.cpp", "merge_ops.cu", "attention_checks.cpp", "triton_launch.cpp")
_HEADERS = ("bindings.h", "merge_attn_states.cuh", "compiled_launch.h")
_CUDA_FLAGS = ("-O3", "-std=c++17", "-lineinfo")

# None: not tried yet; "": loaded; otherwise why it could not be loaded.
_load_error: str | None = None
_fakes_registered = False
#: The compiled module once loaded: the merges' eager fast paths and TritonLaunchCache.
eager_ops = None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def source_dir() -> Path:
    shipped = Path(__file__).with_name("csrc")  # an installed wheel carries the sources here
    return shipped if shipped.is_dir() else Path(__file__).resolve().parent.parent / "csrc"


def _library_name(src: Path) -> str:
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        digest.update((src / name).read_bytes())
    digest.update(" ".join(_CUDA_FLAGS).encode())
    digest.update(torch.__version__.encode())
    return f"splitkv_cuda_{digest.hexdigest()[:12]}"


def build(verbose: bool = False) -> str:
    """Compile (or load from the cache) the CUDA ops and register them; returns the library path."""
    global eager_ops
    from torch.utils import cpp_extension

    src = source_dir()
    name = _library_name(src)
    build_dir = Path(cpp_extension._get_build_directory(name, verbose))
    if not (build_dir / f"{name}.so").exists():
        print(f"splitkv: compiling the CUDA merge kernels into {build_dir} (once, about a minute)", file=sys.stderr)
    module = cpp_extension.load(
        name=name,
        sources=[str(src / s) for s in _SOURCES],
        extra_include_paths=[str(src)],
        extra_cuda_cflags=list(_CUDA_FLAGS),
        verbose=verbose,
    )
    _register_fakes()
    eager_ops = module
    return module.__file__


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    # The ops only mutate their outputs, so under FakeTensor (torch.compile,
    # opcheck) they have nothing to compute: shapes are already fixed.
    for op in ("splitkv::merge_attn_states", "splitkv::merge_states", "splitkv::merge_attn_states_backward",
               "splitkv::merge_states_backward"):  # fmt: skip
        torch.library.register_fake(op)(lambda *args: None)
    _fakes_registered = True


def load_error() -> str:
    """``""`` when the CUDA ops are loaded, else why not. Builds them on the first call."""
    global _load_error
    if _load_error is None:
        if not torch.cuda.is_available():
            _load_error = "no CUDA device is visible"
        else:
            try:
                build()
                _load_error = ""
            except Exception as exc:  # any build failure (no nvcc, wrong toolkit, ...) means "fall back"
                _load_error = f"the CUDA kernels could not be built: {type(exc).__name__}: {exc}".strip()
                if env_flag("SPLITKV_REQUIRE_CUDA"):
                    raise RuntimeError(f"splitkv: SPLITKV_REQUIRE_CUDA=1 and {_load_error}") from exc
                warnings.warn(f"splitkv: {_load_error}; falling back to Triton", RuntimeWarning, stacklevel=3)
    return _load_error


# torch.compile treats the result as a constant: it calls load_error() once in Python
# while tracing (a first call may build the extension, which no graph can hold) and
# keeps the answer. This is all torch.compiler.assume_constant_result does (it sets
# this one attribute), but the decorator imports torch._dynamo, about 2 s, at
# ``import splitkv``; tests/test_import.py checks the decorator still sets exactly this.
load_error._dynamo_marked_constant = True
