"""Float64 reference for merging partial attention states, written independently of
splitkv's backends (through logsumexp rather than max-and-rescale)."""

import torch


def reference_merge(outputs, lses):
    """outputs: list of [tokens, heads, head_dim]; lses: list of [heads, tokens].
    Returns float64 (output [tokens, heads, head_dim], lse [heads, tokens])."""
    lse = torch.stack([x.double() for x in lses])  # [states, heads, tokens]
    empty = torch.isinf(lse)
    lse = lse.masked_fill(empty, float("-inf"))
    merged_lse = torch.logsumexp(lse, dim=0)  # all -inf -> -inf; NaN -> NaN
    all_empty = empty.all(dim=0)
    weights = torch.exp(lse - merged_lse)  # NaN where every state is empty
    weights = torch.where(empty | all_empty, 0.0, weights)
    out = 0
    for w, o in zip(weights, outputs):
        o = torch.where(w.t()[..., None] == 0, 0.0, o.double())  # an empty state's output is ignored
        out = out + w.t()[..., None] * o
    if not torch.is_tensor(out):
        raise ValueError("no states")
    return out, merged_lse


def random_states(num_states, tokens, heads, head_dim, dtype, device, generator, inf_fraction=0.1):
    """Random partial states whose LSEs span a wide range, so that each state
    dominates some rows, with +inf/-inf (empty) LSEs sprinkled in, including rows
    where every state is empty. Empty states' outputs hold NaN, which must not leak."""
    outputs = torch.randn(num_states, tokens, heads, head_dim, generator=generator, dtype=torch.float32)
    base = (torch.rand(heads, tokens, generator=generator) - 0.5) * 40
    lses = torch.stack([base + (torch.rand(heads, tokens, generator=generator) - 0.5) * 60 for _ in range(num_states)])
    if inf_fraction > 0:
        pick = torch.rand(num_states, heads, tokens, generator=generator)
        lses = torch.where(pick < inf_fraction / 2, float("inf"), lses)
        lses = torch.where((pick >= inf_fraction / 2) & (pick < inf_fraction), float("-inf"), lses)
        all_empty_rows = torch.rand(heads, tokens, generator=generator) < inf_fraction / 2
        lses = torch.where(all_empty_rows, float("inf"), lses)
        empty = torch.isinf(lses).transpose(1, 2)[..., None]  # [states, tokens, heads, 1]
        outputs = torch.where(empty, float("nan"), outputs)
    return outputs.to(dtype=dtype, device=device), lses.to(device)


TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 1e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 8e-3, "rtol": 8e-3},
}
LSE_TOLERANCE = {"atol": 1e-4, "rtol": 1e-5}
