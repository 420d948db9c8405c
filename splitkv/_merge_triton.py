"""Triton merge of partial attention states, for any head size.

One program owns a tile of [BLOCK_T tokens, one head, BLOCK_D dims], BLOCK_D the
head size padded to a power of two and masked. Runs on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (the interpreter: for tests).
Semantics as in ``csrc/merge_attn_states.cuh``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_support import interpreter_enabled


@triton.jit
def _merge_attn_states_kernel(
    output_ptr, output_lse_ptr, prefix_ptr, prefix_lse_ptr, suffix_ptr, suffix_lse_ptr,
    num_tokens, head_dim,
    output_stride_token, output_stride_head,
    prefix_stride_token, prefix_stride_head,
    suffix_stride_token, suffix_stride_head,
    output_lse_stride_head, output_lse_stride_token,
    prefix_lse_stride_head, prefix_lse_stride_token,
    suffix_lse_stride_head, suffix_lse_stride_token,
    WRITE_LSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(1)
    # int64: tokens * token stride passes 2^31 on large inputs.
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    token_mask = tokens < num_tokens
    tile_mask = token_mask[:, None] & (dims[None, :] < head_dim)

    prefix_lse = tl.load(prefix_lse_ptr + head * prefix_lse_stride_head + tokens * prefix_lse_stride_token,
                         mask=token_mask, other=float("-inf"))
    suffix_lse = tl.load(suffix_lse_ptr + head * suffix_lse_stride_head + tokens * suffix_lse_stride_token,
                         mask=token_mask, other=float("-inf"))
    prefix = tl.load(prefix_ptr + tokens[:, None] * prefix_stride_token + head * prefix_stride_head + dims[None, :],
                     mask=tile_mask, other=0.0).to(tl.float32)
    suffix = tl.load(suffix_ptr + tokens[:, None] * suffix_stride_token + head * suffix_stride_head + dims[None, :],
                     mask=tile_mask, other=0.0).to(tl.float32)

    # +inf (flash-attn 2's empty row) and -inf both mean an empty state.
    prefix_empty = (prefix_lse == float("inf")) | (prefix_lse == float("-inf"))
    suffix_empty = (suffix_lse == float("inf")) | (suffix_lse == float("-inf"))
    both_empty = prefix_empty & suffix_empty
    m = tl.where(prefix_empty, suffix_lse, tl.where(suffix_empty, prefix_lse, tl.maximum(prefix_lse, suffix_lse)))
    m = tl.where(both_empty, 0.0, m)
    prefix_scale = tl.where(prefix_empty, 0.0, tl.exp(prefix_lse - m))
    suffix_scale = tl.where(suffix_empty, 0.0, tl.exp(suffix_lse - m))
    total = prefix_scale + suffix_scale
    inv_total = tl.where(both_empty, 0.0, 1.0 / tl.where(both_empty, 1.0, total))
    # An empty state contributes nothing, not 0 * (whatever its output holds).
    merged = (tl.where(prefix_empty[:, None], 0.0, prefix * (prefix_scale * inv_total)[:, None])
              + tl.where(suffix_empty[:, None], 0.0, suffix * (suffix_scale * inv_total)[:, None]))
    tl.store(output_ptr + tokens[:, None] * output_stride_token + head * output_stride_head + dims[None, :],
             merged.to(output_ptr.dtype.element_ty), mask=tile_mask)
    if WRITE_LSE:
        merged_lse = tl.where(both_empty, float("-inf"), m + tl.log(tl.where(both_empty, 1.0, total)))
        # tl.maximum may drop a NaN operand; a NaN lse must stay visible (x != x is the NaN test).
        any_nan = (prefix_lse != prefix_lse) | (suffix_lse != suffix_lse)  # noqa: PLR0124
        merged_lse = tl.where(any_nan, float("nan"), merged_lse)
        tl.store(output_lse_ptr + head * output_lse_stride_head + tokens * output_lse_stride_token,
                 merged_lse, mask=token_mask)


@triton.jit
def _merge_states_kernel(
    output_ptr, output_lse_ptr, states_ptr, lses_ptr,
    num_states, num_tokens, head_dim,
    output_stride_token, output_stride_head,
    states_stride_state, states_stride_token, states_stride_head,
    output_lse_stride_head, output_lse_stride_token,
    lses_stride_state, lses_stride_head, lses_stride_token,
    WRITE_LSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(1)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    token_mask = tokens < num_tokens
    tile_mask = token_mask[:, None] & (dims[None, :] < head_dim)
    lse_offsets = head * lses_stride_head + tokens * lses_stride_token
    state_offsets = tokens[:, None] * states_stride_token + head * states_stride_head + dims[None, :]

    # First pass over the lse values only: the max over non-empty states.
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    any_nan = tl.zeros([BLOCK_T], tl.int1)
    for s in range(num_states):
        lse = tl.load(lses_ptr + s * lses_stride_state + lse_offsets, mask=token_mask, other=float("-inf"))
        empty = (lse == float("inf")) | (lse == float("-inf"))
        m = tl.where(empty, m, tl.maximum(m, lse))
        any_nan = any_nan | (lse != lse)  # noqa: PLR0124 (x != x is the NaN test)
    all_empty = (m == float("-inf")) & (any_nan == 0)
    m = tl.where(all_empty, 0.0, m)

    # Second pass: one read of every state's output.
    total = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for s in range(num_states):
        lse = tl.load(lses_ptr + s * lses_stride_state + lse_offsets, mask=token_mask, other=float("-inf"))
        empty = (lse == float("inf")) | (lse == float("-inf"))
        scale = tl.where(empty, 0.0, tl.exp(lse - m))
        state = tl.load(states_ptr + s * states_stride_state + state_offsets, mask=tile_mask, other=0.0)
        acc += tl.where(empty[:, None], 0.0, state.to(tl.float32) * scale[:, None])
        total += scale
    inv_total = tl.where(all_empty, 0.0, 1.0 / tl.where(all_empty, 1.0, total))
    tl.store(output_ptr + tokens[:, None] * output_stride_token + head * output_stride_head + dims[None, :],
             (acc * inv_total[:, None]).to(output_ptr.dtype.element_ty), mask=tile_mask)
    if WRITE_LSE:
        merged_lse = tl.where(all_empty, float("-inf"), m + tl.log(tl.where(all_empty, 1.0, total)))
        merged_lse = tl.where(any_nan != 0, float("nan"), merged_lse)
        tl.store(output_lse_ptr + head * output_lse_stride_head + tokens * output_lse_stride_token,
                 merged_lse, mask=token_mask)


def _tile(num_tokens: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): about 4K elements per tile on a GPU; the interpreter pays per
    program, not per element, so it gets fewer, larger tiles."""
    block_d = triton.next_power_of_2(max(head_dim, 1))
    target = 16384 if interpreter_enabled() else 4096
    block_t = max(1, min(triton.next_power_of_2(max(num_tokens, 1)), target // block_d))
    return block_t, block_d


def _lse_args(output_lse: torch.Tensor | None, like: torch.Tensor):
    # Without an lse to write, the kernel still needs a pointer argument.
    if output_lse is None:
        return like, 0, 0
    return output_lse, output_lse.stride(0), output_lse.stride(1)


def merge_attn_states_triton(
    output: torch.Tensor,
    output_lse: torch.Tensor | None,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
) -> None:
    num_tokens, num_heads, head_dim = prefix_output.shape
    if num_tokens == 0 or num_heads == 0 or head_dim == 0:
        return
    block_t, block_d = _tile(num_tokens, head_dim)
    lse_out, lse_out_stride_head, lse_out_stride_token = _lse_args(output_lse, prefix_lse)
    grid = (triton.cdiv(num_tokens, block_t), num_heads)
    _merge_attn_states_kernel[grid](
        output, lse_out, prefix_output, prefix_lse, suffix_output, suffix_lse,
        num_tokens, head_dim,
        output.stride(0), output.stride(1),
        prefix_output.stride(0), prefix_output.stride(1),
        suffix_output.stride(0), suffix_output.stride(1),
        lse_out_stride_head, lse_out_stride_token,
        prefix_lse.stride(0), prefix_lse.stride(1),
        suffix_lse.stride(0), suffix_lse.stride(1),
        WRITE_LSE=output_lse is not None, BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip


def merge_states_triton(
    output: torch.Tensor,
    output_lse: torch.Tensor | None,
    states: torch.Tensor,
    lses: torch.Tensor,
) -> None:
    num_states, num_tokens, num_heads, head_dim = states.shape
    if num_tokens == 0 or num_heads == 0 or head_dim == 0:
        return
    block_t, block_d = _tile(num_tokens, head_dim)
    lse_out, lse_out_stride_head, lse_out_stride_token = _lse_args(output_lse, lses)
    grid = (triton.cdiv(num_tokens, block_t), num_heads)
    _merge_states_kernel[grid](
        output, lse_out, states, lses,
        num_states, num_tokens, head_dim,
        output.stride(0), output.stride(1),
        states.stride(0), states.stride(1), states.stride(2),
        lse_out_stride_head, lse_out_stride_token,
        lses.stride(0), lses.stride(1), lses.stride(2),
        WRITE_LSE=output_lse is not None, BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip
