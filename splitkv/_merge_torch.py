"""Plain-torch merge of partial attention states: the reference, and the fallback on any device.

Computes in float32 (float64 inputs stay float64), with the semantics of the
kernels: an lse of +inf or -inf is an empty state whose output is never used;
all states empty gives output 0 and lse -inf; a NaN lse propagates.
"""

from __future__ import annotations

import torch
from einops import rearrange


def merge_states_torch(
    output: torch.Tensor,
    output_lse: torch.Tensor | None,
    states: torch.Tensor,  # [states, tokens, heads, head_dim]
    lses: torch.Tensor,  # [states, heads, tokens]
) -> None:
    compute_dtype = torch.promote_types(states.dtype, torch.float32)
    lses = rearrange(lses.to(compute_dtype), "s h t -> s t h")
    empty = torch.isinf(lses)
    m = torch.where(empty, float("-inf"), lses).amax(dim=0)  # [tokens, heads]; NaN propagates
    all_empty = empty.all(dim=0)
    m = torch.where(all_empty, 0.0, m)  # keeps -inf - -inf out of the exponent
    scale = torch.where(empty, 0.0, torch.exp(lses - m))  # [states, tokens, heads]
    total = scale.sum(dim=0)
    weights = torch.where(all_empty, 0.0, scale / total)
    # An empty state's output may hold anything: it must not reach the sum as 0 * inf.
    contributions = torch.where(empty[..., None], 0.0, states.to(compute_dtype)) * weights[..., None]
    output.copy_(contributions.sum(dim=0))
    if output_lse is not None:
        merged_lse = torch.where(all_empty, float("-inf"), m + torch.log(total))
        output_lse.copy_(rearrange(merged_lse, "t h -> h t"))


def merge_attn_states_torch(
    output: torch.Tensor,
    output_lse: torch.Tensor | None,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
) -> None:
    merge_states_torch(
        output, output_lse, torch.stack([prefix_output, suffix_output]), torch.stack([prefix_lse, suffix_lse])
    )
