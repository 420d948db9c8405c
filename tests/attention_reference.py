"""Random varlen batches and the float64 attention reference shared by the attention tests."""

import torch

from splitkv._attention_reference import reference_attention_with_lse

TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}
LSE_TOLERANCE = {"atol": 1e-3, "rtol": 1e-4}


def cu_seqlens(lengths, device):
    return torch.tensor([0] + list(lengths), device=device).cumsum(0).to(torch.int32)


def random_tokens(total, heads, head_dim, dtype, device, generator):
    return torch.randn(total, heads, head_dim, generator=generator).to(device=device, dtype=dtype)


def reference64(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """Float64 attention with the flash-attn varlen conventions."""
    return reference_attention_with_lse(
        q.double(), k.double(), v.double(), cu_q, cu_k, max_q, max_k, causal, scale
    )


def assert_attention_close(out, lse, ref_out, ref_lse, dtype):
    torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[dtype])
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows with no visible key must have lse -inf exactly there"
    assert (lse[empty] == float("-inf")).all()
    torch.testing.assert_close(lse.double()[~empty], ref_lse[~empty], **LSE_TOLERANCE)
