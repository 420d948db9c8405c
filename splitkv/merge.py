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
* LSE is float32 ``[heads, tokens]``, natural log (flash-attn's varlen layout)
  by default; ``lse_layout="th"`` takes and returns ``[tokens, heads]`` and
  ``lse_base="2"`` log2 (FlashInfer's), with no copy (splitkv/_lse.py);
* an LSE of ``+inf`` or ``-inf`` marks an empty state (flash-attn 2 reports
  ``+inf`` for a row that saw no key): its output is ignored. When every state
  is empty the result is output 0 and LSE ``-inf``, never NaN. A NaN LSE is not
  empty: it propagates to the result;
* math is float32 whatever the storage dtype;
* both merges are differentiable (functional custom ops with a backward on every
  backend) when an input requires grad.
"""

from __future__ import annotations

import math

import torch

from . import _cuda
from ._checks import (
    FLOAT_DTYPES,
    expect_bool,
    expect_contiguous_last,
    expect_float_dtype,
    expect_like,
    expect_no_partial_overlap,
    expect_rank,
    expect_writable,
    is_entry_of,
    same_view,
)
from ._lse import as_heads_tokens, expect_lse_convention, lse_to_natural_factor
from ._merge_torch import (
    FP8_DTYPES,
    merge_attn_states_backward_torch,
    merge_attn_states_torch,
    merge_states_backward_torch,
    merge_states_torch,
)
from ._registry import Backend, BackendRegistry
from ._triton_support import TRITON_IMPORT_ERROR, interpreter_enabled

__all__ = ["MERGE_BACKENDS", "explain_merge", "merge_attn_states", "merge_states"]

_MAX_ROWS = 2**31 - 1  # the CUDA kernel indexes (token, head) rows with int32


def _cuda_why_not(states: torch.Tensor, rows: int, output_dtype: torch.dtype) -> str | None:
    if not states.is_cuda:
        return f"tensors are on {states.device.type}, the CUDA kernel needs CUDA tensors"
    if _cuda.env_flag("SPLITKV_DISABLE_CUDA"):
        return "disabled by SPLITKV_DISABLE_CUDA=1"
    if rows > _MAX_ROWS:
        return f"tokens * heads = {rows} is over the kernel's int32 row index (2^31 - 1)"
    if states.shape[-1] == 0:
        return "head_dim is 0: the CUDA kernels write no lse for it"
    return _cuda.load_error() or None


def _triton_why_not(states: torch.Tensor, rows: int, output_dtype: torch.dtype) -> str | None:
    if TRITON_IMPORT_ERROR:
        return f"triton is not importable ({TRITON_IMPORT_ERROR})"
    if states.is_cuda or (states.device.type == "cpu" and interpreter_enabled()):
        return None
    return f"tensors are on {states.device.type}; Triton runs CUDA tensors (CPU ones under TRITON_INTERPRET=1)"


def _triton_why_not_auto(states: torch.Tensor, rows: int, output_dtype: torch.dtype) -> str | None:
    return None if states.is_cuda else "auto runs Triton only on CUDA tensors (the interpreter is for tests)"


def _no_reason(states: torch.Tensor, rows: int, output_dtype: torch.dtype) -> str | None:
    return None


def _cuda_output_scale(output_scale) -> tuple[float, torch.Tensor | None]:
    """The CUDA ops' (output_scale, output_scale_tensor) for a float, a tensor or None."""
    if output_scale is None:
        return 1.0, None
    return (1.0, output_scale) if torch.is_tensor(output_scale) else (float(output_scale), None)


# Every backend's forward takes (outputs written, inputs, lse_scale, output_scale).
def _run_cuda_two(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse, lse_scale, output_scale):
    torch.ops.splitkv.merge_attn_states.default(
        output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse, lse_scale,
        *_cuda_output_scale(output_scale),
    )  # fmt: skip


def _run_cuda_n(output, output_lse, states, lses, lse_scale, output_scale) -> None:
    torch.ops.splitkv.merge_states.default(output, output_lse, states, lses, lse_scale, *_cuda_output_scale(output_scale))


def _run_cuda_two_backward(*args) -> None:
    torch.ops.splitkv.merge_attn_states_backward.default(*args)


def _run_cuda_n_backward(*args) -> None:
    torch.ops.splitkv.merge_states_backward.default(*args)


def _run_triton_two(*args) -> None:
    from ._merge_triton import merge_attn_states_triton

    merge_attn_states_triton(*args)


def _run_triton_n(*args) -> None:
    from ._merge_triton import merge_states_triton

    merge_states_triton(*args)


def _run_triton_two_backward(*args) -> None:
    from ._merge_triton import merge_attn_states_backward_triton

    merge_attn_states_backward_triton(*args)


def _run_triton_n_backward(*args) -> None:
    from ._merge_triton import merge_states_backward_triton

    merge_states_backward_triton(*args)


def _run_torch_n_backward(grad_states, grad_lses, grad_output, grad_lse, states, lses, output, output_lse, lse_scale):
    # The torch backward recomputes the merged output from the states instead of reading it.
    merge_states_backward_torch(grad_states, grad_lses, grad_output, grad_lse, states, lses, lse_scale)


def _registry(name: str, cuda, triton, torch_run) -> BackendRegistry:
    return BackendRegistry(
        name,
        [
            Backend("cuda", cuda, _cuda_why_not),
            Backend("triton", triton, _triton_why_not, _triton_why_not_auto),
            Backend("torch", torch_run, _no_reason),
        ],
    )


#: The merge backends in order of preference; ``explain_merge`` reports on them.
MERGE_BACKENDS = _registry("merge_attn_states", _run_cuda_two, _run_triton_two, merge_attn_states_torch)
_MERGE_N_BACKENDS = _registry("merge_states", _run_cuda_n, _run_triton_n, merge_states_torch)
_MERGE_BACKWARD_BACKENDS = _registry(
    "merge_attn_states (backward)", _run_cuda_two_backward, _run_triton_two_backward, merge_attn_states_backward_torch
)
_MERGE_N_BACKWARD_BACKENDS = _registry(
    "merge_states (backward)", _run_cuda_n_backward, _run_triton_n_backward, _run_torch_n_backward
)


def _lse_shape(heads: int, tokens: int, lse_layout: str) -> tuple[tuple[int, int], str]:
    return ((heads, tokens), "[heads, tokens]") if lse_layout == "ht" else ((tokens, heads), "[tokens, heads]")


def _check_output_dtype(output_dtype, input_dtype: torch.dtype, output_scale, device, n_way: bool) -> torch.dtype:
    """The result's dtype: that of the inputs, an fp8 dtype (with ``output_scale``), or for
    the N-way merge of float32 partials float16/bfloat16; checks ``output_scale``."""
    if output_dtype is None:
        output_dtype = input_dtype
    if not isinstance(output_dtype, torch.dtype):
        raise TypeError(f"output_dtype must be a torch.dtype, got {type(output_dtype).__name__}")
    narrower = n_way and input_dtype in (torch.float32, torch.float64) and output_dtype in FLOAT_DTYPES
    if output_dtype != input_dtype and output_dtype not in FP8_DTYPES and not narrower:
        name = "outputs" if n_way else "prefix_output"
        narrow = ", or outputs must be float32 (partials merged into a narrower output)" if n_way else ""
        raise TypeError(
            f"the output dtype must be that of {name} ({input_dtype}) or an fp8 dtype (float8_e4m3fn, "
            f"float8_e5m2){narrow}; got {output_dtype}"
        )
    if output_scale is None:
        return output_dtype
    if output_dtype not in FP8_DTYPES:
        raise ValueError(f"output_scale applies to an fp8 output only; the output dtype is {output_dtype}")
    if torch.is_tensor(output_scale):
        if output_scale.numel() != 1 or output_scale.dtype != torch.float32 or output_scale.device != device:
            raise ValueError(
                f"output_scale must be a float or a one-element float32 tensor on {device}, got shape "
                f"{tuple(output_scale.shape)}, dtype {output_scale.dtype}, device {output_scale.device}"
            )
    elif isinstance(output_scale, bool) or not isinstance(output_scale, (int, float)):
        raise TypeError(f"output_scale must be a float or a float32 tensor, got {type(output_scale).__name__}")
    elif not 2.0**-150 < output_scale < math.inf:  # as expect_scale: traceable for a symbolic float
        # The kernels divide by it in float32, where 2**-150 and below round to 0 (0 / 0: NaN).
        raise ValueError(f"output_scale must be finite and positive, above 2**-150 (0 in float32), "
                         f"got {float(output_scale)}")  # fmt: skip
    return output_dtype


def _expect_state_dtype(name: str, states: torch.Tensor, backend: str) -> torch.dtype:
    """float32/float16/bfloat16 states, or float64 on the torch backend (for gradcheck);
    returns the dtype the LSEs must have (float64 with float64 states, else float32)."""
    if states.dtype == torch.float64 and backend == "torch":
        return torch.float64
    expect_float_dtype(name, states)
    return torch.float32


def _check_two(prefix_output, prefix_lse, suffix_output, suffix_lse, output, output_lse, lse_layout="ht",
               output_dtype=None, output_scale=None, backend="auto") -> torch.dtype:  # fmt: skip
    """Checks the two-state inputs; returns the output dtype."""
    expect_rank("prefix_output", prefix_output, 3, "[tokens, heads, head_dim]")
    lse_dtype = _expect_state_dtype("prefix_output", prefix_output, backend)
    expect_contiguous_last("prefix_output", prefix_output)
    shape, dtype, device = prefix_output.shape, prefix_output.dtype, prefix_output.device
    lse_shape, lse_name = _lse_shape(shape[1], shape[0], lse_layout)
    layout = "[tokens, heads, head_dim]"
    expect_like("suffix_output", suffix_output, shape, dtype, device, layout, contiguous_last=True)
    expect_like("prefix_lse", prefix_lse, lse_shape, lse_dtype, device, lse_name)
    expect_like("suffix_lse", suffix_lse, lse_shape, lse_dtype, device, lse_name)
    if output is not None and output_dtype is None:
        # An output buffer of another dtype is reported against the inputs' dtype below.
        output_dtype = expect_rank("output", output, 3, layout).dtype
        output_dtype = output_dtype if output_dtype in FP8_DTYPES else dtype
    output_dtype = _check_output_dtype(output_dtype, dtype, output_scale, device, n_way=False)
    if output is not None:
        expect_like("output", output, shape, output_dtype, device, layout, contiguous_last=True)
        expect_writable("output", output)
    if output_lse is not None:
        expect_like("output_lse", output_lse, lse_shape, lse_dtype, device, lse_name)
        expect_writable("output_lse", output_lse)
    inputs = {"prefix_output": prefix_output, "suffix_output": suffix_output, "prefix_lse": prefix_lse,
              "suffix_lse": suffix_lse}  # fmt: skip
    expect_no_partial_overlap("output", output, inputs, may_be=same_view)
    expect_no_partial_overlap("output_lse", output_lse, _with_output(inputs, output), may_be=same_view)
    return output_dtype


def _with_output(inputs: dict, output: torch.Tensor | None) -> dict:
    """What ``output_lse`` must not partly overlap: the inputs and the output buffer."""
    return inputs if output is None else {**inputs, "output": output}


def _check_n(states, lses, output, output_lse, output_dtype, lse_layout="ht", output_scale=None,
             backend="auto") -> torch.dtype:  # fmt: skip
    """Checks the N-way inputs; returns the output dtype."""
    expect_rank("outputs", states, 4, "[num_states, tokens, heads, head_dim]")
    lse_dtype = _expect_state_dtype("outputs", states, backend)
    expect_contiguous_last("outputs", states)
    num_states, tokens, heads, head_dim = states.shape
    if num_states == 0:
        raise ValueError("outputs must hold at least one state (num_states = 0)")
    device = states.device
    lse_shape, lse_name = _lse_shape(heads, tokens, lse_layout)
    expect_like("lses", lses, (num_states, *lse_shape), lse_dtype, device, f"[num_states, {lse_name[1:]}")
    if output is not None:
        out_dtype = expect_rank("output", output, 3, "[tokens, heads, head_dim]").dtype
        output_dtype = out_dtype if output_dtype is None else output_dtype  # a disagreement: expect_like says so
    output_dtype = _check_output_dtype(output_dtype, states.dtype, output_scale, device, n_way=True)
    if output is not None:
        layout = "[tokens, heads, head_dim]"
        expect_like("output", output, (tokens, heads, head_dim), output_dtype, device, layout, True)
        expect_writable("output", output)
    if output_lse is not None:
        expect_like("output_lse", output_lse, lse_shape, lse_dtype, device, lse_name)
        expect_writable("output_lse", output_lse)
    # Each buffer may stand only for an entry of its own kind (a float32 output[0] can
    # have an lse's shape and strides).
    inputs = {"outputs": states, "lses": lses}
    expect_no_partial_overlap("output", output, inputs, may_be=lambda t, of: of is states and is_entry_of(t, of))
    expect_no_partial_overlap("output_lse", output_lse, _with_output(inputs, output),
                              may_be=lambda t, of: of is lses and is_entry_of(t, of))  # fmt: skip
    return output_dtype


def _refuse_buffers_with_grad(function: str, output, output_lse, output_dtype) -> None:
    if output is not None or output_lse is not None:
        raise ValueError(
            f"{function}: output= and output_lse= are overwritten in place, which autograd cannot track; "
            "an input requires grad, so leave them None (or run under torch.no_grad())"
        )
    if output_dtype in FP8_DTYPES:
        raise ValueError(f"{function}: an fp8 output ({output_dtype}) is not differentiable; an input requires grad")


def _readable(grad: torch.Tensor) -> torch.Tensor:
    # Gradients arrive with any strides (expanded, stride 0, from a .sum()); the kernels
    # take any strides but a contiguous last dim, and the C++ checks refuse stride 0.
    if grad.stride(-1) == 1 and all(st != 0 or n == 1 for st, n in zip(grad.stride(), grad.shape)):
        return grad
    return grad.contiguous()


def _grad_lse_ht(grad_lse, lse_layout: str):
    """The merged lse's gradient as a [heads, tokens] view (None when the lse was unused)."""
    return None if grad_lse is None else as_heads_tokens(_readable(grad_lse), lse_layout)


# The differentiable merges: functional custom ops (new tensors out, nothing mutated),
# so that autograd, torch.compile and CUDA graphs see them as single ops. The public
# functions take them only when an input requires grad; otherwise the mutating ops
# above write into the caller's buffers.
@torch.library.custom_op("splitkv::merge_attn_states_differentiable", mutates_args=())
def _merge_two_differentiable(
    prefix_output: torch.Tensor, prefix_lse: torch.Tensor, suffix_output: torch.Tensor, suffix_lse: torch.Tensor,
    lse_scale: float, lse_layout: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    num_tokens, num_heads, _ = prefix_output.shape
    impl = MERGE_BACKENDS.select(backend, prefix_output, num_tokens * num_heads, prefix_output.dtype)
    output = torch.empty_like(prefix_output, memory_format=torch.contiguous_format)
    output_lse = prefix_lse.new_empty(prefix_lse.shape)
    impl.run(output, as_heads_tokens(output_lse, lse_layout), prefix_output, as_heads_tokens(prefix_lse, lse_layout),
             suffix_output, as_heads_tokens(suffix_lse, lse_layout), lse_scale, None)  # fmt: skip
    return output, output_lse


@_merge_two_differentiable.register_fake
def _(prefix_output, prefix_lse, suffix_output, suffix_lse, lse_scale, lse_layout, backend):
    return torch.empty_like(prefix_output, memory_format=torch.contiguous_format), prefix_lse.new_empty(
        prefix_lse.shape
    )


@torch.library.custom_op("splitkv::merge_attn_states_grad", mutates_args=())
def _merge_two_grad(
    grad_output: torch.Tensor, grad_lse: torch.Tensor | None, prefix_output: torch.Tensor, prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor, suffix_lse: torch.Tensor, lse_scale: float, lse_layout: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    num_tokens, num_heads, _ = prefix_output.shape
    impl = _MERGE_BACKWARD_BACKENDS.select(backend, prefix_output, num_tokens * num_heads, prefix_output.dtype)
    grads = _merge_two_grad_fake(grad_output, grad_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                                 lse_scale, lse_layout, backend)  # fmt: skip
    ht = [as_heads_tokens(g, lse_layout) for g in grads[1::2]]
    impl.run(grads[0], ht[0], grads[2], ht[1], _readable(grad_output), _grad_lse_ht(grad_lse, lse_layout),
             prefix_output, as_heads_tokens(prefix_lse, lse_layout), suffix_output,
             as_heads_tokens(suffix_lse, lse_layout), lse_scale)  # fmt: skip
    return grads


@_merge_two_grad.register_fake
def _merge_two_grad_fake(grad_output, grad_lse, prefix_output, prefix_lse, suffix_output, suffix_lse, lse_scale,
                         lse_layout, backend):  # fmt: skip
    new_output = lambda: torch.empty_like(prefix_output, memory_format=torch.contiguous_format)  # noqa: E731
    return new_output(), prefix_lse.new_empty(prefix_lse.shape), new_output(), prefix_lse.new_empty(prefix_lse.shape)


def _merge_two_setup(ctx, inputs, output) -> None:
    prefix_output, prefix_lse, suffix_output, suffix_lse, ctx.lse_scale, ctx.lse_layout, ctx.backend = inputs
    ctx.save_for_backward(prefix_output, prefix_lse, suffix_output, suffix_lse)


def _merge_two_backward(ctx, grad_output, grad_lse):
    grads = _merge_two_grad(grad_output, grad_lse, *ctx.saved_tensors, ctx.lse_scale, ctx.lse_layout, ctx.backend)
    return (*grads, None, None, None)


_merge_two_differentiable.register_autograd(_merge_two_backward, setup_context=_merge_two_setup)


@torch.library.custom_op("splitkv::merge_states_differentiable", mutates_args=())
def _merge_n_differentiable(
    states: torch.Tensor, lses: torch.Tensor, output_dtype: torch.dtype, lse_scale: float, lse_layout: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    _, num_tokens, num_heads, _ = states.shape
    impl = _MERGE_N_BACKENDS.select(backend, states, num_tokens * num_heads, output_dtype)
    output, output_lse = _merge_n_differentiable_fake(states, lses, output_dtype, lse_scale, lse_layout, backend)
    impl.run(output, as_heads_tokens(output_lse, lse_layout), states, as_heads_tokens(lses, lse_layout), lse_scale,
             None)  # fmt: skip
    return output, output_lse


@_merge_n_differentiable.register_fake
def _merge_n_differentiable_fake(states, lses, output_dtype, lse_scale, lse_layout, backend):
    return states.new_empty(states.shape[1:], dtype=output_dtype), lses.new_empty(lses.shape[1:])


@torch.library.custom_op("splitkv::merge_states_grad", mutates_args=())
def _merge_n_grad(
    grad_output: torch.Tensor, grad_lse: torch.Tensor | None, states: torch.Tensor, lses: torch.Tensor,
    output: torch.Tensor, output_lse: torch.Tensor, lse_scale: float, lse_layout: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    _, num_tokens, num_heads, _ = states.shape
    impl = _MERGE_N_BACKWARD_BACKENDS.select(backend, states, num_tokens * num_heads, output.dtype)
    grad_states, grad_lses = _merge_n_grad_fake(grad_output, grad_lse, states, lses, output, output_lse, lse_scale,
                                                lse_layout, backend)  # fmt: skip
    impl.run(grad_states, as_heads_tokens(grad_lses, lse_layout), _readable(grad_output),
             _grad_lse_ht(grad_lse, lse_layout), states, as_heads_tokens(lses, lse_layout), output,
             as_heads_tokens(output_lse, lse_layout), lse_scale)  # fmt: skip
    return grad_states, grad_lses


@_merge_n_grad.register_fake
def _merge_n_grad_fake(grad_output, grad_lse, states, lses, output, output_lse, lse_scale, lse_layout, backend):
    return torch.empty_like(states, memory_format=torch.contiguous_format), lses.new_empty(lses.shape)


def _merge_n_setup(ctx, inputs, output) -> None:
    states, lses, _, ctx.lse_scale, ctx.lse_layout, ctx.backend = inputs
    ctx.save_for_backward(states, lses, *output)


def _merge_n_backward(ctx, grad_output, grad_lse):
    states, lses, output, output_lse = ctx.saved_tensors
    states_dtype = states.dtype
    if output.dtype in (torch.float16, torch.bfloat16):
        # A float16/bfloat16 result: the backward's <grad_output, states_i - output> would
        # read the rounded result and carry its rounding into the lses gradient (0.04-0.08
        # off at head_dim 128 for float32 partials into bf16, seen on the H200; 0.2 for bf16
        # states into bf16, whose gradients then no longer sum to 0 over the states), so the
        # backward runs in float32 (float64 for float64 partials) on the merge recomputed
        # so. For 16-bit states that costs a float32 copy of them.
        compute_dtype = torch.promote_types(states.dtype, torch.float32)
        states, grad_output = states.to(compute_dtype), grad_output.to(compute_dtype)
        output, _ = _merge_n_differentiable(states, lses, compute_dtype, ctx.lse_scale, ctx.lse_layout, ctx.backend)
    grad_states, grad_lses = _merge_n_grad(grad_output, grad_lse, states, lses, output, output_lse, ctx.lse_scale,
                                           ctx.lse_layout, ctx.backend)  # fmt: skip
    return grad_states.to(states_dtype), grad_lses, None, None, None, None


_merge_n_differentiable.register_autograd(_merge_n_backward, setup_context=_merge_n_setup)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


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
    lse_base: str = "e",
    lse_layout: str = "ht",
    output_dtype: torch.dtype | None = None,
    output_scale: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge two partial attention states of the same queries over disjoint keys.

    Differentiable with respect to all four inputs (both outputs and both LSEs), through
    the merged output and the merged LSE, on every backend (CUDA, Triton, torch; the
    torch backend also takes float64, for ``torch.autograd.gradcheck``); an empty state
    (LSE ``+inf``/``-inf``) gets zero gradients. When an input requires grad, ``output=``
    and ``output_lse=`` buffers and fp8 outputs are refused (ValueError).

    Args:
        prefix_output: ``[tokens, heads, head_dim]`` float32, float16 or bfloat16;
            any token and head strides, contiguous ``head_dim``.
        prefix_lse: float32 LSE of ``prefix_output``, ``[heads, tokens]`` (or
            ``[tokens, heads]`` with ``lse_layout="th"``), any strides.
            ``+inf``/``-inf``: empty.
        suffix_output: like ``prefix_output`` (same shape and dtype).
        suffix_lse: like ``prefix_lse``.
        output: optional ``[tokens, heads, head_dim]`` result buffer (the output dtype;
            any strides, contiguous ``head_dim``). It may be ``prefix_output`` or
            ``suffix_output`` itself (in-place merge); a dense view that
            otherwise overlaps an input (any of the four, or the byte range of a
            strided one) is refused (ValueError), and a strided one must not.
        output_lse: optional float32 buffer for the merged LSE (``lse_layout``);
            it may be ``prefix_lse`` or ``suffix_lse`` itself, the same rules.
        return_lse: with ``output_lse=None``, ``False`` skips computing and
            writing the merged LSE (returned as ``None``).
        backend: ``"auto"`` (CUDA kernel for CUDA tensors, else Triton on the GPU,
            else torch), ``"cuda"``, ``"triton"`` or ``"torch"``. See
            :func:`explain_merge`.
        lse_base: ``"e"`` (natural log, flash-attn's and vLLM's) or ``"2"`` (log2,
            FlashInfer's), for the input LSEs and the merged LSE alike.
        lse_layout: ``"ht"`` (``[heads, tokens]``) or ``"th"`` (``[tokens, heads]``),
            for the input LSEs and the merged LSE alike; no copy either way.
        output_dtype: the result's dtype: the inputs' (default),
            ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``; with ``output``,
            ``output``'s (a different one is refused).
        output_scale: for an fp8 output, the stored value is ``output / output_scale``
            saturated to the fp8 range (NaN stays NaN); a positive float above
            2**-150 (it is divided by in float32) or a one-element float32 tensor on
            the inputs' device, whose value is not read (default 1).

    Returns:
        ``(output, output_lse)``: ``[tokens, heads, head_dim]`` in the output dtype
        and the float32 merged LSE in ``lse_base`` and ``lse_layout`` (or ``None``,
        see ``return_lse``).

    Example:
        >>> import torch, splitkv
        >>> prefix_out, suffix_out = torch.randn(2, 5, 4, 8).unbind(0)
        >>> prefix_lse, suffix_lse = torch.randn(2, 4, 5).unbind(0)
        >>> out, lse = splitkv.merge_attn_states(prefix_out, prefix_lse, suffix_out, suffix_lse)
        >>> out.shape, lse.shape
        (torch.Size([5, 4, 8]), torch.Size([4, 5]))
        >>> # in place, into the prefix state:
        >>> _ = splitkv.merge_attn_states(prefix_out, prefix_lse, suffix_out, suffix_lse,
        ...                               output=prefix_out, output_lse=prefix_lse)
    """
    # is_compiling() first, as in attention.check_attention_inputs: no guard on eager_ops.
    eager = None if torch.compiler.is_compiling() else _cuda.eager_ops
    # The C++ call takes a real bool; expect_bool below names anything else.
    if (eager is not None and lse_base == "e" and lse_layout == "ht" and (backend == "auto" or backend == "cuda")
            and type(return_lse) is bool):  # fmt: skip
        # One C++ call that checks, allocates and launches (an fp8 result with a float
        # scale too); None means "not for me" (including inputs that require grad).
        result = eager.merge_attn_states(prefix_output, prefix_lse, suffix_output, suffix_lse, output, output_lse,
                                         return_lse, output_dtype, output_scale)  # fmt: skip
        if result is not None:
            return result
    return_lse = expect_bool("return_lse", return_lse)
    expect_lse_convention(lse_base, lse_layout)
    output_dtype = _check_two(prefix_output, prefix_lse, suffix_output, suffix_lse, output, output_lse, lse_layout,
                              output_dtype, output_scale, backend)  # fmt: skip
    lse_scale = lse_to_natural_factor(lse_base)
    if _needs_grad(prefix_output, prefix_lse, suffix_output, suffix_lse):
        _refuse_buffers_with_grad("merge_attn_states", output, output_lse, output_dtype)
        merged, merged_lse = _merge_two_differentiable(prefix_output, prefix_lse, suffix_output, suffix_lse,
                                                       lse_scale, lse_layout, backend)  # fmt: skip
        return merged, merged_lse if return_lse else None
    num_tokens, num_heads, _ = prefix_output.shape
    impl = MERGE_BACKENDS.select(backend, prefix_output, num_tokens * num_heads, output_dtype)
    if output is None:
        output = prefix_output.new_empty(prefix_output.shape, dtype=output_dtype)
    if output_lse is None and return_lse:
        output_lse = prefix_lse.new_empty(prefix_lse.shape)
    impl.run(output, None if output_lse is None else as_heads_tokens(output_lse, lse_layout), prefix_output,
             as_heads_tokens(prefix_lse, lse_layout), suffix_output, as_heads_tokens(suffix_lse, lse_layout),
             lse_scale, output_scale)  # fmt: skip
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
    lse_base: str = "e",
    lse_layout: str = "ht",
    output_scale: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge ``num_states`` partial attention states in one pass (no chain of pairwise merges).

    Differentiable with respect to ``outputs`` and ``lses``, through the merged output
    and LSE, on every backend (as :func:`merge_attn_states`). The backward reads the
    merged output; where float32 partials were merged into a float16/bfloat16 result,
    it recomputes that output in float32 first (one more forward pass), so the
    rounding of the result does not reach the ``lses`` gradient.

    Args:
        outputs: ``[num_states, tokens, heads, head_dim]`` float32, float16 or
            bfloat16; any leading strides, contiguous ``head_dim``.
        lses: float32 ``[num_states, heads, tokens]`` (``[num_states, tokens, heads]``
            with ``lse_layout="th"``), any strides.
        output, output_lse, return_lse, backend, lse_base, lse_layout, output_scale:
            as in :func:`merge_attn_states`; ``output`` may be ``outputs[i]`` itself
            and ``output_lse`` may be ``lses[i]`` itself (other overlaps as there).
        output_dtype: dtype of the result (default: that of ``output`` when
            given, else of ``outputs``; a dtype other than ``output``'s is
            refused). float32 partials (what split-KV kernels keep)
            may merge straight into a float16 or bfloat16 result; any input into
            ``torch.float8_e4m3fn`` or ``torch.float8_e5m2`` (see ``output_scale``).

    Returns:
        ``(output [tokens, heads, head_dim], output_lse or None)``, the LSE in
        ``lse_base`` and ``lse_layout``.

    Example:
        >>> import torch, splitkv
        >>> chunk_outputs = torch.randn(8, 3, 2, 16)  # partial states of 8 KV chunks
        >>> chunk_lses = torch.randn(8, 2, 3)
        >>> out, lse = splitkv.merge_states(chunk_outputs, chunk_lses)
        >>> out.shape, lse.shape
        (torch.Size([3, 2, 16]), torch.Size([2, 3]))
    """
    eager = None if torch.compiler.is_compiling() else _cuda.eager_ops
    # The C++ call takes a real bool; expect_bool below names anything else.
    if (eager is not None and lse_base == "e" and lse_layout == "ht" and (backend == "auto" or backend == "cuda")
            and type(return_lse) is bool):  # fmt: skip
        result = eager.merge_states(outputs, lses, output, output_lse, return_lse, output_dtype, output_scale)
        if result is not None:
            return result
    return_lse = expect_bool("return_lse", return_lse)
    expect_lse_convention(lse_base, lse_layout)
    output_dtype = _check_n(outputs, lses, output, output_lse, output_dtype, lse_layout, output_scale, backend)
    lse_scale = lse_to_natural_factor(lse_base)
    if _needs_grad(outputs, lses):
        _refuse_buffers_with_grad("merge_states", output, output_lse, output_dtype)
        merged, merged_lse = _merge_n_differentiable(outputs, lses, output_dtype, lse_scale, lse_layout, backend)
        return merged, merged_lse if return_lse else None
    _, num_tokens, num_heads, head_dim = outputs.shape
    impl = _MERGE_N_BACKENDS.select(backend, outputs, num_tokens * num_heads, output_dtype)
    if output is None:
        output = outputs.new_empty((num_tokens, num_heads, head_dim), dtype=output_dtype)
    if output_lse is None and return_lse:
        output_lse = lses.new_empty(lses.shape[1:])
    impl.run(output, None if output_lse is None else as_heads_tokens(output_lse, lse_layout), outputs,
             as_heads_tokens(lses, lse_layout), lse_scale, output_scale)  # fmt: skip
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

    Not differentiable (it runs nothing).

    Args:
        prefix_output, prefix_lse, suffix_output, suffix_lse, backend: as in
            :func:`merge_attn_states` (LSEs ``[heads, tokens]``).

    Returns:
        One line naming the chosen backend, then one line per backend.

    Example:
        >>> import torch, splitkv
        >>> po, so = torch.randn(2, 3, 2, 8).unbind(0)
        >>> pl, sl = torch.randn(2, 2, 3).unbind(0)
        >>> report = splitkv.explain_merge(po, pl, so, sl)
        >>> print(report.splitlines()[0])  # then one line per backend: chosen, or why not
        merge_attn_states(backend='auto') -> torch
    """
    _check_two(prefix_output, prefix_lse, suffix_output, suffix_lse, None, None, backend=backend)
    num_tokens, num_heads, _ = prefix_output.shape
    return MERGE_BACKENDS.explain(backend, prefix_output, num_tokens * num_heads, prefix_output.dtype)
