"""LSE conventions: the base of the logarithm and the layout of the ``[heads, tokens]`` tensor.

Kernels compute in natural log. An LSE in base 2 (FlashInfer's) is read as
``lse_2 * LN2`` and written as ``lse_e * LOG2E``; ``+inf``/``-inf``/NaN are kept by
the scale. A ``"th"`` (``[tokens, heads]``) LSE is handed to the kernels as its
transposed view, so no convention costs a copy.

Every public function that takes ``lse_base`` / ``lse_layout`` validates them
with :func:`expect_lse_convention` (one place, so the error text is the same).
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)  # natural log of 2: lse_e = lse_2 * LN2
LOG2E = 1.0 / LN2  # log2(e): lse_2 = lse_e * LOG2E

LSE_BASES = ("e", "2")
LSE_LAYOUTS = ("ht", "th")


def expect_lse_convention(lse_base, lse_layout) -> None:
    """``lse_base`` is ``"e"`` or ``"2"`` and ``lse_layout`` is ``"ht"`` or ``"th"``; else a ValueError naming it."""
    if not isinstance(lse_base, str) or lse_base not in LSE_BASES:
        raise ValueError(f"lse_base must be 'e' (natural log) or '2' (log2), got {lse_base!r}")
    if not isinstance(lse_layout, str) or lse_layout not in LSE_LAYOUTS:
        raise ValueError(f"lse_layout must be 'ht' ([heads, tokens]) or 'th' ([tokens, heads]), got {lse_layout!r}")


def lse_to_natural_factor(lse_base: str) -> float:
    """The factor that turns an LSE in ``lse_base`` into natural log (1.0 or LN2)."""
    return LN2 if lse_base == "2" else 1.0


def as_heads_tokens(lse: torch.Tensor, lse_layout: str) -> torch.Tensor:
    """A view of ``lse`` as ``[..., heads, tokens]`` (the kernels' layout); no copy."""
    return lse.transpose(-1, -2) if lse_layout == "th" else lse
