"""Launching a Triton kernel with less host time than ``kernel[grid](...)``.

On every launch, triton's ``JITFunction.run`` binds the arguments, works out how it
specialises on them, hashes that into its cache key and hands the compiled kernel
to a generic Python runner. For the attention kernel (35 runtime arguments, 12
constexprs) that is more host time than the GPU time of a small decode step.

:class:`CompiledLauncher` launches each kernel that triton compiled from C++ once
it has been launched through ``JITFunction.run`` (``TritonLaunchCache`` in
csrc/triton_launch.cpp): one call reads the arguments, builds a key of what triton
specialises on (each tensor's dtype and 16-byte alignment, each integer's being
1, its divisibility by 16 and its 32/64-bit width, the constexprs and the launch
options), finds the compiled kernel and calls ``cuLaunchKernel`` on the device's
current stream. That takes kernels that need none of the runner's extras (no
scratch memory, one CTA per cluster, no cooperative or programmatic launch, no
launch hooks set when first launched), and only after the driver confirms,
parameter by parameter, that the kernel takes the arguments as triton's signature
of the specialisation says, followed by triton's two scratch pointers
(``cuFuncGetParamInfo`` on those parameters only: a query past the last one would
fail, which compute-sanitizer reports). Any other kernel, and every
kernel when the CUDA extension cannot load (splitkv/_cuda.py; it is built on the
first launch, as the merges build it) or ``SPLITKV_DISABLE_CUDA=1``, keeps
triton's own launch. tests/test_attention_kernels.py checks on the GPU that the
kernel the key finds is the one triton itself picks.

The key holds no triton options set at run time (``knobs``, e.g. debug or launch
hooks): a change of them after a specialisation's first launch is not seen by
that specialisation.
"""

from __future__ import annotations

import torch
import triton

from . import _cuda
from ._triton_support import interpreter_enabled

# The compiled kernel's signature (all kernel arguments, constexprs included, in
# order) and the specialisation rules above are those of triton 3.6 to 3.9 (3.6 ran
# on the GPU; the 3.9 source is the same); other versions keep triton's own launch.
_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
_RUNNER_TESTED = (3, 6) <= _VERSION <= (3, 9)
# Pointers triton 3.6 to 3.9's launcher passes after the kernel's arguments (its global
# and profile scratch buffers): the C++ cache checks exactly these with the driver.
_SCRATCH_PARAMS = 2
# Argument kinds of csrc/compiled_launch.h, by triton's signature type.
_KINDS = {"i32": "i", "i64": "l", "fp32": "f", "constexpr": "x"}


def _hook_set(hook) -> bool:
    # triton 3.6 keeps each launch hook as a chain of callables, empty when none is set.
    return hook is not None and bool(getattr(hook, "calls", True))


def _direct_entry(compiled, num_args: int) -> tuple | None:
    """``TritonLaunchCache.add``'s description of a compiled kernel, ``(function,
    threads per block, dynamic shared bytes, kinds)`` (see the module docstring; the
    cache checks the kinds against the arguments and the kernel's parameters), or
    None when the kernel needs triton's runner."""
    metadata, knobs = compiled.metadata, triton.knobs.runtime
    if (getattr(metadata, "global_scratch_size", 0) or getattr(metadata, "profile_scratch_size", 0)
            or getattr(metadata, "num_ctas", 1) != 1 or getattr(metadata, "launch_cooperative_grid", False)
            or getattr(metadata, "launch_pdl", False) or getattr(metadata, "tensordesc_meta", None)
            or _hook_set(knobs.launch_enter_hook) or _hook_set(knobs.launch_exit_hook)
            or not compiled.function):  # fmt: skip
        return None
    types = list(compiled.src.signature.values())[:num_args]
    # An unknown type ("?") is a kind the cache refuses.
    kinds = "".join("p" if t.startswith("*") else _KINDS.get(t, "?") for t in types)
    threads = metadata.num_warps * getattr(metadata, "warp_size", 32)
    return (compiled.function, threads, metadata.shared, kinds)


class CompiledLauncher:
    """``launcher(grid, args, constexprs, num_warps, num_stages, device_index)`` runs
    ``kernel[grid](*args, *constexprs, num_warps=..., num_stages=...)`` on CUDA device
    ``device_index`` (the tensors' device, which need not be the current one; None for
    the interpreter's CPU tensors), from C++ after the first launch of each
    specialisation. Arguments are positional, in the kernel's order, runtime ones first."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        # (constexprs, num_warps, num_stages) -> the number the C++ cache keys them by.
        self.configs: dict[tuple, int] = {}
        self.cache = None  # TritonLaunchCache, made on the first launch that can use it
        self.enabled = _RUNNER_TESTED and not interpreter_enabled()

    def __call__(self, grid: tuple, args: tuple, constexprs: tuple, num_warps: int, num_stages: int,
                 device_index: int | None) -> None:  # fmt: skip
        cache, status = self.cache, 0
        if cache is not None:
            config = self.configs.get((constexprs, num_warps, num_stages))
            if config is not None:
                # Makes device_index's context current and launches on its current stream.
                status = cache.launch(config, device_index, grid, args)
                if status > 0:
                    return
        elif self.enabled and device_index is not None:
            cache = self._make_cache()
        # triton launches on the current CUDA device.
        if device_index is None or device_index == torch.cuda.current_device():
            compiled = self.kernel[grid](*args, *constexprs, num_warps=num_warps, num_stages=num_stages)
        else:
            with torch.cuda.device(device_index):
                compiled = self.kernel[grid](*args, *constexprs, num_warps=num_warps, num_stages=num_stages)
        if cache is not None and status == 0:
            config = self.configs.setdefault((constexprs, num_warps, num_stages), len(self.configs))
            cache.add(config, device_index, args, _direct_entry(compiled, len(args)))

    def _make_cache(self):
        if _cuda.env_flag("SPLITKV_DISABLE_CUDA") or _cuda.load_error():
            self.enabled = False
            return None
        self.cache = _cuda.eager_ops.TritonLaunchCache(_SCRATCH_PARAMS)
        return self.cache
