"""Launching a Triton kernel with less host time than ``kernel[grid](...)``.

On every launch, triton's ``JITFunction.run`` binds the arguments, works out how it
specialises on them and hashes that into its cache key. For the attention kernel
(35 runtime arguments, 12 constexprs) that is a visible share of the launch's host
time, which is itself more than the GPU time of a small decode step.

:class:`CompiledLauncher` keeps triton's own compiled kernel under a cheaper key
that holds the same information (each tensor's dtype and 16-byte alignment, each
integer's being 1, its divisibility by 16 and its 32/64-bit width, the constexprs
and the launch options) and launches it through ``CompiledKernel``'s runner, the
call ``JITFunction.run`` itself ends in. The first launch of each key goes through
``JITFunction.run``, which compiles or finds the kernel. tests/test_attention_kernels.py
checks on the GPU that the kernel found by the key is the one triton itself picks.
The key holds no triton options set at run time (``knobs``, e.g. debug): a change of
them after a specialisation's first launch is not seen by that specialisation.
"""

from __future__ import annotations

import torch
import triton

from ._triton_support import interpreter_enabled

# The runner's arguments (all kernel arguments, constexprs included, in order) and
# the specialisation rules above are those of triton 3.6 to 3.9 (3.6 ran on the
# GPU; the 3.9 source is the same); other versions take the regular path.
_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
_RUNNER_TESTED = (3, 6) <= _VERSION <= (3, 9)
_INT32 = range(-(2**31), 2**31)


def _specialisation(args: tuple) -> tuple:
    """What triton specialises a launch on, for tensor, int and float arguments."""
    return tuple(
        (a.dtype, a.data_ptr() % 16 == 0)
        if isinstance(a, torch.Tensor)
        else (a == 1, a % 16 == 0, a in _INT32)
        if type(a) is int
        else type(a)
        for a in args
    )


class CompiledLauncher:
    """``launcher(grid, args, constexprs, num_warps, num_stages, device_index)`` runs
    ``kernel[grid](*args, *constexprs, num_warps=..., num_stages=...)``, skipping
    ``JITFunction.run`` after the first launch of each specialisation. Arguments are
    positional, in the kernel's order, runtime ones first; ``device_index`` is the
    tensors' CUDA device, which must be the current one (the caller knows it already)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.compiled: dict[tuple, object] = {}
        self.enabled = _RUNNER_TESTED and not interpreter_enabled()

    def key(self, args: tuple, constexprs: tuple, num_warps: int, num_stages: int, device_index: int) -> tuple:
        return (device_index, constexprs, num_warps, num_stages, _specialisation(args))

    def __call__(self, grid: tuple, args: tuple, constexprs: tuple, num_warps: int, num_stages: int,
                 device_index: int) -> None:  # fmt: skip
        if not self.enabled:
            self.kernel[grid](*args, *constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        key = self.key(args, constexprs, num_warps, num_stages, device_index)
        compiled = self.compiled.get(key)
        if compiled is None:
            self.compiled[key] = self.kernel[grid](*args, *constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        # The runner takes all three grid dimensions.
        compiled[grid + (1,) * (3 - len(grid))](*args, *constexprs)
