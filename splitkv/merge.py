"""Merging partial attention states: the composable stage of split-KV and cascade attention.

Attention over a KV sequence split into disjoint pieces gives, per piece, an
output ``O_i`` and the log-sum-exp ``lse_i`` of its attention scores. The pieces
merge exactly::

    m = max_i lse_i
    O = sum_i exp(lse_i - m) * O_i / sum_i exp(lse_i - m)
    lse = m + log(sum_i exp(lse_i - m))

Conventions, for every function here:

* outputs are ``[tokens, heads, head_dim]`` in float32, float16 or bfloat16,
  with any token and head strides and a contiguous ``head_dim`` axis;
* LSE is float32 ``[heads, tokens]``, natural log (flash-attn's varlen layout;
  a transposed view of ``[tokens, heads]`` storage works without a copy). An
  LSE in base 2 (FlashInfer's) must be multiplied by ``ln 2`` first;
* an LSE of ``+inf`` or ``-inf`` marks an empty state (flash-attn 2 reports
  ``+inf`` for a row that saw no key): its output is ignored. When every state
  is empty the result is output 0 and LSE ``-inf``, never NaN. A NaN LSE is not
  empty: it propagates to the result;
* math is float32 whatever the storage dtype.
"""

from __future__ import annotations

import torch

from . import _cuda
from ._checks import (
    FLOAT_DTYPES,
    expect_contiguous_last,
    expect_float_dtype,
    expect_like,
    expect_rank,
    expect_writable,
)
from ._merge_torch import merge_attn_states_torch, merge_states_torch
from ._registry import Backend, BackendRegistry
from ._triton_support import TRITON_IMPORT_ERROR, interpreter_enabled

__all__ = ["MERGE_BACKENDS", "explain_merge", "merge_attn_states", "merge_states"]

_MAX_ROWS = 2**31 - 1  # the CUDA kernel indexes (token, head) rows with int32


def _cuda_why_not(states: torch.Tensor, rows: int) -> str | None:
    if not states.is_cuda:
        return f"tensors are on {states.device.type}, the CUDA kernel needs CUDA tensors"
    if _cuda.env_flag("SPLITKV_DISABLE_CUDA"):
        return "disabled by SPLITKV_DISABLE_CUDA=1"
    if rows > _MAX_ROWS:
        return f"tokens * heads = {rows} is over the kernel's int32 row index (2^31 - 1)"
    return _cuda.load_error() or None


def _triton_why_not(states: torch.Tensor, rows: int) -> str | None:
    if TRITON_IMPORT_ERROR:
        return f"triton is not importable ({TRITON_IMPORT_ERROR})"
    if states.is_cuda or (states.device.type == "cpu" and interpreter_enabled()):
        return None
    return f"tensors are on {states.device.type}; Triton runs CUDA tensors (CPU ones under TRITON_INTERPRET=1)"


def _triton_why_not_auto(states: torch.Tensor, rows: int) -> str | None:
    return None if states.is_cuda else "auto runs Triton only on CUDA tensors (the interpreter is for tests)"


def _no_reason(states: torch.Tensor, rows: int) -> str | None:
    return None


def _run_cuda_two(*args) -> None:
    torch.ops.splitkv.merge_attn_states.default(*args)


def _run_cuda_n(*args) -> None:
    torch.ops.splitkv.merge_states.default(*args)


def _run_triton_two(*args) -> None:
    from ._merge_triton import merge_attn_states_triton

    merge_attn_states_triton(*args)


def _run_triton_n(*args) -> None:
    from ._merge_triton import merge_states_triton

    merge_states_triton(*args)


#: The merge backends in order of preference; ``explain_merge`` reports on them.
MERGE_BACKENDS = BackendRegistry(
    "merge_attn_states",
    [
        Backend("cuda", _run_cuda_two, _cuda_why_not),
        Backend("triton", _run_triton_two, _triton_why_not, _triton_why_not_auto),
        Backend("torch", merge_attn_states_torch, _no_reason),
    ],
)
_MERGE_N_BACKENDS = BackendRegistry(
    "merge_states",
    [
        Backend("cuda", _run_cuda_n, _cuda_why_not),
        Backend("triton", _run_triton_n, _triton_why_not, _triton_why_not_auto),
        Backend("torch", merge_states_torch, _no_reason),
    ],
)


def _check_two(prefix_output, prefix_lse, suffix_output, suffix_lse, output, output_lse) -> None:
    expect_rank("prefix_output", prefix_output, 3, "[tokens, heads, head_dim]")
    expect_float_dtype("prefix_output", prefix_output)
    expect_contiguous_last("prefix_output", prefix_output)
    shape, dtype, device = prefix_output.shape, prefix_output.dtype, prefix_output.device
    lse_shape = (shape[1], shape[0])
    layout, lse_layout = "[tokens, heads, head_dim]", "[heads, tokens]"
    expect_like("suffix_output", suffix_output, shape, dtype, device, layout, contiguous_last=True)
    expect_like("prefix_lse", prefix_lse, lse_shape, torch.float32, device, lse_layout)
    expect_like("suffix_lse", suffix_lse, lse_shape, torch.float32, device, lse_layout)
    if output is not None:
        expect_like("output", output, shape, dtype, device, layout, contiguous_last=True)
        expect_writable("output", output)
    if output_lse is not None:
        expect_like("output_lse", output_lse, lse_shape, torch.float32, device, lse_layout)
        expect_writable("output_lse", output_lse)


def _check_n(states, lses, output, output_lse, output_dtype) -> torch.dtype:
    """Checks the N-way inputs; returns the output dtype."""
    expect_rank("outputs", states, 4, "[num_states, tokens, heads, head_dim]")
    expect_float_dtype("outputs", states)
    expect_contiguous_last("outputs", states)
    num_states, tokens, heads, head_dim = states.shape
    if num_states == 0:
        raise ValueError("outputs must hold at least one state (num_states = 0)")
    device = states.device
    expect_like("lses", lses, (num_states, heads, tokens), torch.float32, device, "[num_states, heads, tokens]")
    if output is not None:
        output_dtype = expect_rank("output", output, 3, "[tokens, heads, head_dim]").dtype
    elif output_dtype is None:
        output_dtype = states.dtype
    if output_dtype != states.dtype and (states.dtype != torch.float32 or output_dtype not in FLOAT_DTYPES):
        raise TypeError(
            f"the output dtype must be that of outputs ({states.dtype}), or outputs must be float32 "
            f"(partials merged into a narrower output); got {output_dtype}"
        )
    if output is not None:
        layout = "[tokens, heads, head_dim]"
        expect_like("output", output, (tokens, heads, head_dim), output_dtype, device, layout, True)
        expect_writable("output", output)
    if output_lse is not None:
        expect_like("output_lse", output_lse, (heads, tokens), torch.float32, device, "[heads, tokens]")
        expect_writable("output_lse", output_lse)
    return output_dtype


def merge_attn_states(
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    *,
    output: torch.Tensor | None = None,
    output_lse: torch.Tensor | None = None,
    return_lse: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge two partial attention states of the same queries over disjoint keys.

    Args:
        prefix_output: ``[tokens, heads, head_dim]`` float32, float16 or bfloat16;
            any token and head strides, contiguous ``head_dim``.
        prefix_lse: ``[heads, tokens]`` float32 natural-log LSE of ``prefix_output``
            (any strides, e.g. ``lse_tokens_heads.t()``). ``+inf``/``-inf``: empty.
        suffix_output: like ``prefix_output`` (same shape and dtype).
        suffix_lse: like ``prefix_lse``.
        output: optional ``[tokens, heads, head_dim]`` result buffer (same dtype;
            any strides, contiguous ``head_dim``). It may be ``prefix_output`` or
            ``suffix_output`` itself (in-place merge), but must not otherwise
            overlap an input.
        output_lse: optional ``[heads, tokens]`` float32 buffer for the merged LSE;
            it may be ``prefix_lse`` or ``suffix_lse`` itself.
        return_lse: with ``output_lse=None``, ``False`` skips computing and
            writing the merged LSE (returned as ``None``).
        backend: ``"auto"`` (CUDA kernel for CUDA tensors, else Triton on the GPU,
            else torch), ``"cuda"``, ``"triton"`` or ``"torch"``. See
            :func:`explain_merge`.

    Returns:
        ``(output, output_lse)``: ``[tokens, heads, head_dim]`` in the input dtype
        and ``[heads, tokens]`` float32 natural log (or ``None``, see ``return_lse``).

    Example::

        >>> out, lse = splitkv.merge_attn_states(prefix_out, prefix_lse, suffix_out, suffix_lse)
        >>> # in place, into the prefix state:
        >>> splitkv.merge_attn_states(prefix_out, prefix_lse, suffix_out, suffix_lse,
        ...                           output=prefix_out, output_lse=prefix_lse)
    """
    eager = _cuda.eager_ops
    if eager is not None and (backend == "auto" or backend == "cuda") and not torch.compiler.is_compiling():
        # One C++ call that checks, allocates and launches; None means "not for me".
        result = eager.merge_attn_states(prefix_output, prefix_lse, suffix_output, suffix_lse, output, output_lse,
                                         return_lse)  # fmt: skip
        if result is not None:
            return result
    _check_two(prefix_output, prefix_lse, suffix_output, suffix_lse, output, output_lse)
    num_tokens, num_heads, _ = prefix_output.shape
    impl = MERGE_BACKENDS.select(backend, prefix_output, num_tokens * num_heads)
    if output is None:
        output = prefix_output.new_empty(prefix_output.shape)
    if output_lse is None and return_lse:
        output_lse = prefix_lse.new_empty(prefix_lse.shape)
    impl.run(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse)
    return output, output_lse


def merge_states(
    outputs: torch.Tensor,
    lses: torch.Tensor,
    *,
    output: torch.Tensor | None = None,
    output_lse: torch.Tensor | None = None,
    return_lse: bool = True,
    output_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge ``num_states`` partial attention states in one pass (no chain of pairwise merges).

    Args:
        outputs: ``[num_states, tokens, heads, head_dim]`` float32, float16 or
            bfloat16; any leading strides, contiguous ``head_dim``.
        lses: ``[num_states, heads, tokens]`` float32 natural-log LSE, any strides.
        output, output_lse, return_lse, backend: as in :func:`merge_attn_states`;
            ``output`` may be ``outputs[i]`` itself and ``output_lse`` may be
            ``lses[i]`` itself.
        output_dtype: dtype of the result when ``output`` is not given (default:
            that of ``outputs``). float32 partials (what split-KV kernels keep)
            may merge straight into a float16 or bfloat16 result.

    Returns:
        ``(output [tokens, heads, head_dim], output_lse [heads, tokens] or None)``.

    Example::

        >>> # partial states of 8 KV chunks, e.g. from split-KV decoding
        >>> out, lse = splitkv.merge_states(chunk_outputs, chunk_lses)
    """
    eager = _cuda.eager_ops
    if eager is not None and (backend == "auto" or backend == "cuda") and not torch.compiler.is_compiling():
        result = eager.merge_states(outputs, lses, output, output_lse, return_lse, output_dtype)
        if result is not None:
            return result
    output_dtype = _check_n(outputs, lses, output, output_lse, output_dtype)
    _, num_tokens, num_heads, head_dim = outputs.shape
    impl = _MERGE_N_BACKENDS.select(backend, outputs, num_tokens * num_heads)
    if output is None:
        output = outputs.new_empty((num_tokens, num_heads, head_dim), dtype=output_dtype)
    if output_lse is None and return_lse:
        output_lse = lses.new_empty((num_heads, num_tokens))
    impl.run(output, output_lse, outputs, lses)
    return output, output_lse


def explain_merge(
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    *,
    backend: str = "auto",
) -> str:
    """Which backend :func:`merge_attn_states` would take for these inputs, and why not the others.

    Example::

        >>> print(splitkv.explain_merge(po, pl, so, sl))
        merge_attn_states(backend='auto') -> triton
          cuda: disabled by SPLITKV_DISABLE_CUDA=1
          triton: chosen
          torch: a preferred backend can run these inputs
    """
    _check_two(prefix_output, prefix_lse, suffix_output, suffix_lse, None, None)
    num_tokens, num_heads, _ = prefix_output.shape
    return MERGE_BACKENDS.explain(backend, prefix_output, num_tokens * num_heads)
