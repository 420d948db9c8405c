"""``import splitkv`` stays light: the torch.compile machinery (torch._dynamo, about
2 s), triton and the optional backends are imported when first used, not at import;
and ``_cuda.load_error`` is still a constant to torch.compile."""

import json
import os
import subprocess
import sys

import torch

from splitkv import _cuda

# Each of these costs from 0.3 s (triton) to 2 s (torch._dynamo) at import.
_HEAVY = ("torch._dynamo", "torch._inductor", "triton", "flash_attn", "torch.nn.attention.varlen", "matplotlib")


def test_import_pulls_in_no_compile_machinery():
    code = f"import json, sys, splitkv; print(json.dumps([m for m in {_HEAVY!r} if m in sys.modules]))"
    # A fresh interpreter without TRITON_INTERPRET: the import a user's program does.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_load_error_is_marked_constant_as_the_decorator_marks():
    # _cuda sets the attribute torch.compiler.assume_constant_result sets, without
    # importing torch._dynamo at import time; if torch changes how the decorator
    # marks a function, this fails and _cuda.py must follow.
    def probe() -> str:
        return ""

    before = dict(vars(probe))
    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe
    added = {k: v for k, v in vars(probe).items() if k not in before}
    assert added == {"_dynamo_marked_constant": True}
    assert vars(_cuda.load_error).get("_dynamo_marked_constant") is True


def test_load_error_under_torch_compile_fullgraph(monkeypatch):
    # The first call may come while tracing (it decides, and may build, the CUDA
    # ops: nothing a graph can hold); as a constant it runs once in Python instead.
    # Internal on purpose: the test is about the loader's cached answer (_load_error) under tracing.
    monkeypatch.setattr(_cuda, "_load_error", None)

    def uses_it(x):
        return x + len(_cuda.load_error())

    compiled = torch.compile(uses_it, fullgraph=True, backend="eager")
    x = torch.zeros(3)
    got = compiled(x)
    expected = len(_cuda.load_error())  # decided by the traced call; "" only with a GPU and a build
    assert _cuda._load_error is not None
    assert torch.equal(got, x + expected)
