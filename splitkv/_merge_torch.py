"""Plain-torch merge of partial attention states and its backward: the reference, and
the fallback on any device.

Computes in float32 (float64 inputs stay float64), with the semantics of the
kernels: an lse of +inf or -inf is an empty state whose output is never used;
all states empty gives output 0 and lse -inf; a NaN lse propagates. ``lse_scale``
turns the stored LSE into natural log (``LN2`` for base 2) and the merged LSE is
stored divided by it (see splitkv/_lse.py); LSE tensors arrive as ``[heads, tokens]``
views whatever their storage layout.
"""

from __future__ import annotations

import torch
from einops import rearrange

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize(values: torch.Tensor, dtype: torch.dtype, output_scale) -> torch.Tensor:
    """``values / output_scale`` (default 1) saturated to the range of the fp8 ``dtype``;
    other dtypes are returned as they are (the copy into the output casts them)."""
    if dtype not in FP8_DTYPES:
        return values
    limit = torch.finfo(dtype).max
    if output_scale is None:
        output_scale = 1.0
    if torch.is_tensor(output_scale):  # one element, of any shape: a scalar, so that it cannot broadcast values
        output_scale = output_scale.to(values.device).reshape(())
    scaled = values.float() / output_scale
    # clamp keeps NaN; the cast would turn an out-of-range value into NaN (e4m3fn has no inf).
    return scaled.clamp(-limit, limit).to(dtype)


def _weights(lses: torch.Tensor, lse_scale: float, compute_dtype: torch.dtype):
    """(natural-log lses [states, tokens, heads], empty mask, merged natural lse [tokens, heads],
    weights [states, tokens, heads], all-empty mask)."""
    lses = rearrange(lses.to(compute_dtype) * lse_scale, "s h t -> s t h")
    empty = torch.isinf(lses)
    m = torch.where(empty, float("-inf"), lses).amax(dim=0)  # [tokens, heads]; NaN propagates
    all_empty = empty.all(dim=0)
    m = torch.where(all_empty, 0.0, m)  # keeps -inf - -inf out of the exponent
    scale = torch.where(empty, 0.0, torch.exp(lses - m))  # [states, tokens, heads]
    total = scale.sum(dim=0)
    weights = torch.where(all_empty, 0.0, scale / total)
    merged_lse = torch.where(all_empty, float("-inf"), m + torch.log(total))
    return empty, weights, merged_lse


def merge_states_torch(
    output: torch.Tensor,
    output_lse: torch.Tensor | None,
    states: torch.Tensor,  # [states, tokens, heads, head_dim]
    lses: torch.Tensor,  # [states, heads, tokens]
    lse_scale: float = 1.0,
    output_scale=None,
) -> None:
    compute_dtype = torch.promote_types(states.dtype, torch.float32)
    empty, weights, merged_lse = _weights(lses, lse_scale, compute_dtype)
    # An empty state's output may hold anything: it must not reach the sum as 0 * inf.
    contributions = torch.where(empty[..., None], 0.0, states.to(compute_dtype)) * weights[..., None]
    output.copy_(quantize(contributions.sum(dim=0), output.dtype, output_scale))
    if output_lse is not None:
        output_lse.copy_(rearrange(merged_lse / lse_scale, "t h -> h t"))


def merge_attn_states_torch(
    output: torch.Tensor,
    output_lse: torch.Tensor | None,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    lse_scale: float = 1.0,
    output_scale=None,
) -> None:
    merge_states_torch(
        output,
        output_lse,
        torch.stack([prefix_output, suffix_output]),
        torch.stack([prefix_lse, suffix_lse]),
        lse_scale,
        output_scale,
    )


def merge_states_backward_torch(
    grad_states: torch.Tensor,  # [states, tokens, heads, head_dim], written
    grad_lses: torch.Tensor,  # [states, heads, tokens], written
    grad_output: torch.Tensor,  # [tokens, heads, head_dim]
    grad_lse: torch.Tensor | None,  # [heads, tokens], None: the merged lse is not used
    states: torch.Tensor,
    lses: torch.Tensor,
    lse_scale: float = 1.0,
) -> None:
    """With w_i the merge weights: dO_i = w_i dO and dlse_i = w_i (lse_scale <dO, O_i - O> + dlse),
    O recomputed from the states (exact). Empty states get 0, NaN lses give NaN."""
    compute_dtype = torch.promote_types(states.dtype, torch.float32)
    empty, weights, _ = _weights(lses, lse_scale, compute_dtype)
    values = torch.where(empty[..., None], 0.0, states.to(compute_dtype))
    merged = (values * weights[..., None]).sum(dim=0)  # [tokens, heads, head_dim]
    grad_output = grad_output.to(compute_dtype)
    grad_states.copy_(weights[..., None] * grad_output)
    # <dO, O_i - O>; an empty state's term is multiplied by its weight 0.
    dots = ((values - merged) * grad_output).sum(dim=-1) * lse_scale  # [states, tokens, heads]
    if grad_lse is not None:
        dots = dots + rearrange(grad_lse.to(compute_dtype), "h t -> t h")
    grad_lses.copy_(rearrange(weights * dots, "s t h -> s h t"))


def merge_attn_states_backward_torch(
    grad_prefix_output, grad_prefix_lse, grad_suffix_output, grad_suffix_lse,
    grad_output, grad_lse, prefix_output, prefix_lse, suffix_output, suffix_lse, lse_scale: float = 1.0,
) -> None:  # fmt: skip
    grad_states = torch.empty((2, *prefix_output.shape), dtype=grad_prefix_output.dtype, device=prefix_output.device)
    grad_lses = torch.empty((2, *prefix_lse.shape), dtype=grad_prefix_lse.dtype, device=prefix_lse.device)
    merge_states_backward_torch(
        grad_states, grad_lses, grad_output, grad_lse,
        torch.stack([prefix_output, suffix_output]), torch.stack([prefix_lse, suffix_lse]), lse_scale,
    )  # fmt: skip
    grad_prefix_output.copy_(grad_states[0])
    grad_suffix_output.copy_(grad_states[1])
    grad_prefix_lse.copy_(grad_lses[0])
    grad_suffix_lse.copy_(grad_lses[1])
