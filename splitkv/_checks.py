"""Argument checks shared by the public functions: every bad input becomes a
ValueError or TypeError that names the argument, before any kernel is launched."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def expect_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def expect_float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def expect_rank(name: str, t, rank: int, layout: str) -> torch.Tensor:
    expect_tensor(name, t)
    if t.dim() != rank:
        raise ValueError(f"{name} must be {layout} ({rank} dims), got {_describe(t)}")
    return t


def expect_like(
    name: str,
    t,
    shape: tuple,
    dtype: torch.dtype,
    device: torch.device,
    layout: str,
    contiguous_last: bool = False,
) -> None:
    """``t`` is a tensor of exactly this shape, dtype and device."""
    expect_tensor(name, t)
    if t.shape != shape:
        raise ValueError(f"{name} must be {layout} = {tuple(shape)}, got {_describe(t)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {_describe(t)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {_describe(t)}")
    if contiguous_last:
        expect_contiguous_last(name, t)


def expect_contiguous_last(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")


def expect_writable(name: str, t: torch.Tensor | None) -> None:
    """An output must give every element its own memory (no expanded, stride-0 dims)."""
    if t is not None and any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
        raise ValueError(f"{name} must not be an expanded view (stride 0), got strides {t.stride()}")


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``[first, end)`` bytes from ``t``'s first element to past its last (non-negative strides)."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _meets_elements(t: torch.Tensor, first: int, end: int) -> bool:
    """Whether bytes ``[first, end)`` meet an element of ``t``: exact for a tensor that is
    dense but for its outermost dimension (blocks at a stride, as a slice of stacked
    pairs), else whether they meet its byte range (holes counted as elements)."""
    t_first, t_end = _byte_range(t)
    if not (first < t_end and t_first < end):
        return False
    if t.dim() < 2 or t.stride(0) <= 0:
        return True
    block_first, block_end = _byte_range(t[0])
    block = block_end - block_first
    period = t.stride(0) * t.element_size()
    if block != t[0].numel() * t.element_size() or period < block:
        return True
    # The first block that ends past `first`, and whether it starts before `end`.
    i = max(0, (first - block - t_first) // period + 1)
    return i < t.shape[0] and t_first + i * period < end


def expect_no_partial_overlap(name: str, out: torch.Tensor | None, inputs: dict, *, may_be) -> None:
    """An output may stand exactly in an input's place where ``may_be(out, input)`` says
    so (an in-place merge: each row is read before it is written), else share no memory
    with any of the ``inputs``. One that overlaps an input otherwise would have rows
    written while other rows still read them: a silently wrong result, so it is refused,
    naming both. Checked for a dense output (a view whose elements fill its byte range,
    in any axis order), against each input's elements where its layout tells them
    cheaply (:func:`_meets_elements`), else against its byte range, holes included
    (conservative). A strided output is not checked."""
    # Traced tensors have no addresses: under torch.compile the overlap is not checked.
    if out is None or torch.compiler.is_compiling() or out.numel() == 0:
        return
    out_first, out_end = _byte_range(out)
    if out_end - out_first != out.numel() * out.element_size():
        return
    storage = out.untyped_storage().data_ptr()
    for input_name, t in inputs.items():
        if t.numel() == 0 or t.untyped_storage().data_ptr() != storage or may_be(out, t):
            continue
        if _meets_elements(t, out_first, out_end):
            raise ValueError(f"{name} overlaps {input_name} without being {input_name} itself: an output may be "
                             "an input (in place) or share no memory with the inputs")  # fmt: skip


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are the same elements of one dtype in the same order (one may stand
    for the other; an fp8 view of a float32 input's bytes may not)."""
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()


def is_entry_of(t: torch.Tensor, stacked: torch.Tensor) -> bool:
    """``t`` is ``stacked[i]`` for some ``i`` (as a view), found without building the S views."""
    if (t.dtype != stacked.dtype or stacked.dim() != t.dim() + 1 or t.shape != stacked.shape[1:]
            or t.stride() != stacked.stride()[1:]):  # fmt: skip
        return False
    step = stacked.stride(0) * stacked.element_size()
    offset = t.data_ptr() - stacked.data_ptr()
    return step > 0 and offset % step == 0 and 0 <= offset // step < stacked.shape[0]


def expect_bool(name: str, value) -> bool:
    """A flag is a real bool: a string such as ``'False'`` is refused, not taken as truthy.

    NumPy bools are accepted (they come out of config arrays); ints are not, so a
    count passed in a flag's place is caught.
    """
    if value is True or value is False:  # the common case first: these run on every call
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def expect_scale(name: str, value) -> float | None:
    """None (the caller's default) or a finite positive real, returned as a Python float.

    Python ints and floats and NumPy integer and floating scalars are accepted
    (``numbers.Real``); bools, strings, tensors and complex numbers are a TypeError;
    NaN, infinities, zero and negative values are a ValueError.
    """
    if value is None:
        return None
    if type(value) is not float:  # the common case skips the slower ABC check
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a positive float or None, got {type(value).__name__} {value!r}")
    scale = float(value)
    # Comparisons, not math.isfinite, which cannot trace a float torch.compile made symbolic.
    if not 0.0 < scale < math.inf:
        raise ValueError(f"{name} must be a finite positive float, got {scale!r}")
    return scale


def expect_count(name: str, value, minimum: int = 0) -> int:
    """An integer count ``>= minimum``, returned as a Python int.

    Python and NumPy integers are accepted; bools, floats (even ``2.0``) and strings
    are a TypeError; a value below ``minimum`` is a ValueError.
    """
    if type(value) is not int:  # the common case skips the slower ABC check
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    count = int(value)
    if count < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {count}")
    return count
