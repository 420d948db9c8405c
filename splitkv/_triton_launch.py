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

Once the CUDA extension is loaded (splitkv/_cuda.py; the merges load it), a kernel
launches from C++ instead (``launch_triton`` in csrc/ops.cu): the runner's Python
(the current stream, launch hooks, scratch buffers, the argument parsing of its
generic launcher) cost about as much host time as the key. That takes kernels
that need none of the runner's extras (no scratch memory, one CTA per cluster, no
cooperative or programmatic launch, no launch hooks set when first launched),
and only after the driver confirms, parameter by parameter, that the kernel takes
the arguments as triton's signature of the specialisation says
(``cuFuncGetParamInfo``); any other kernel keeps the runner.

The key holds no triton options set at run time (``knobs``, e.g. debug or launch
hooks): a change of them after a specialisation's first launch is not seen by
that specialisation.
"""

from __future__ import annotations

import torch
import triton

from . import _cuda
from ._triton_support import interpreter_enabled

# The runner's arguments (all kernel arguments, constexprs included, in order) and
# the specialisation rules above are those of triton 3.6 to 3.9 (3.6 ran on the
# GPU; the 3.9 source is the same); other versions take the regular path.
_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
_RUNNER_TESTED = (3, 6) <= _VERSION <= (3, 9)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
# Argument kinds of csrc/compiled_launch.h, by triton's signature type.
_KINDS = {"i32": "i", "i64": "l", "fp32": "f", "constexpr": "x"}


def _specialisation(args: tuple) -> tuple:
    """What triton specialises a launch on: for a tensor its dtype and 16-byte alignment;
    for an int one code for being 1 (4), else divisible by 16 (+1) and 32-bit (+2);
    for anything else its type. One flat comprehension: this runs on every launch."""
    return tuple([
        (4 if a == 1 else (not a & 15) + 2 * (_INT32_MIN <= a <= _INT32_MAX)) if type(a) is int
        else (a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor)
        else type(a)
        for a in args
    ])  # fmt: skip


def _hook_set(hook) -> bool:
    # triton 3.6 keeps each launch hook as a chain of callables, empty when none is set.
    return hook is not None and bool(getattr(hook, "calls", True))


def _direct_entry(compiled, num_args: int) -> tuple | None:
    """``launch_triton``'s description of a compiled kernel (see the module docstring),
    or None when the kernel needs triton's runner."""
    metadata, knobs = compiled.metadata, triton.knobs.runtime
    if (getattr(metadata, "global_scratch_size", 0) or getattr(metadata, "profile_scratch_size", 0)
            or getattr(metadata, "num_ctas", 1) != 1 or getattr(metadata, "launch_cooperative_grid", False)
            or getattr(metadata, "launch_pdl", False) or getattr(metadata, "tensordesc_meta", None)
            or _hook_set(knobs.launch_enter_hook) or _hook_set(knobs.launch_exit_hook)
            or not compiled.function):  # fmt: skip
        return None
    types = list(compiled.src.signature.values())[:num_args]
    kinds = "".join("p" if t.startswith("*") else _KINDS.get(t, "?") for t in types)
    if len(kinds) != num_args or "?" in kinds:
        return None
    trailing = _cuda.eager_ops.triton_trailing_params(compiled.function, kinds)
    if trailing < 0:
        return None
    threads = metadata.num_warps * getattr(metadata, "warp_size", 32)
    return (compiled.function, threads, metadata.shared, kinds, trailing)


class CompiledLauncher:
    """``launcher(grid, args, constexprs, num_warps, num_stages, device_index)`` runs
    ``kernel[grid](*args, *constexprs, num_warps=..., num_stages=...)`` on CUDA device
    ``device_index`` (the tensors' device, which need not be the current one; None for
    the interpreter's CPU tensors), skipping ``JITFunction.run`` after the first launch
    of each specialisation. Arguments are positional, in the kernel's order, runtime
    ones first."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.compiled: dict[tuple, object] = {}
        # key -> launch_triton's entry, or None where the runner stays.
        self.direct: dict[tuple, tuple | None] = {}
        self.enabled = _RUNNER_TESTED and not interpreter_enabled()

    def key(self, args: tuple, constexprs: tuple, num_warps: int, num_stages: int, device_index: int) -> tuple:
        return (device_index, constexprs, num_warps, num_stages, _specialisation(args))

    def __call__(self, grid: tuple, args: tuple, constexprs: tuple, num_warps: int, num_stages: int,
                 device_index: int | None) -> None:  # fmt: skip
        key = None
        if self.enabled:
            key = self.key(args, constexprs, num_warps, num_stages, device_index)
            direct = self.direct.get(key)
            if direct is not None:
                # Makes device_index's context current and launches on its current stream.
                _cuda.eager_ops.launch_triton(direct, device_index, grid, args)
                return
        # triton launches on the current CUDA device.
        if device_index is None or device_index == torch.cuda.current_device():
            self._run(key, grid, args, constexprs, num_warps, num_stages)
            return
        with torch.cuda.device(device_index):
            self._run(key, grid, args, constexprs, num_warps, num_stages)

    def _run(self, key: tuple | None, grid: tuple, args: tuple, constexprs: tuple, num_warps: int,
             num_stages: int) -> None:  # fmt: skip
        compiled = self.compiled.get(key) if key is not None else None
        if compiled is None:
            launched = self.kernel[grid](*args, *constexprs, num_warps=num_warps, num_stages=num_stages)
            if key is not None:
                self.compiled[key] = launched
            return
        if _cuda.eager_ops is not None and key not in self.direct:
            # Decided once per kernel, after the extension is loaded (the merges load it).
            self.direct[key] = _direct_entry(compiled, len(args))
        # The runner takes all three grid dimensions.
        compiled[grid + (1,) * (3 - len(grid))](*args, *constexprs)
