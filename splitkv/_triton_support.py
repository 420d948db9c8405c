"""Whether Triton can run here: importable at all, and whether its interpreter is on."""

from __future__ import annotations

import importlib.util
import os

# Triton is a Linux-only dependency; elsewhere its backends report why not.
TRITON_IMPORT_ERROR = "" if importlib.util.find_spec("triton") is not None else "package not installed"
# The in-project Triton kernels' largest head_dim (one tile holds a whole head); the
# attention backends declare it (splitkv/attention.py), the kernels' wrappers enforce it.
TRITON_MAX_HEAD_DIM = 256


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on CPU tensors; it is read when a kernel is defined."""
    return os.environ.get("TRITON_INTERPRET") == "1"
