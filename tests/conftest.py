"""On a machine without a GPU the Triton kernels run under the interpreter;
TRITON_INTERPRET must be set before any kernel is defined, so before splitkv's
Triton modules are imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
