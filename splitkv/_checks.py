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


def expect_bool(name: str, value) -> bool:
    """A flag is a real bool: a string such as ``'False'`` is refused, not taken as truthy.

    NumPy bools are accepted (they come out of config arrays); ints are not, so a
    count passed in a flag's place is caught.
    """
    if isinstance(value, (bool, np.bool_)):
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
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float or None, got {type(value).__name__} {value!r}")
    scale = float(value)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"{name} must be a finite positive float, got {value!r}")
    return scale


def expect_count(name: str, value, minimum: int = 0) -> int:
    """An integer count ``>= minimum``, returned as a Python int.

    Python and NumPy integers are accepted; bools, floats (even ``2.0``) and strings
    are a TypeError; a value below ``minimum`` is a ValueError.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    count = int(value)
    if count < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {count}")
    return count
