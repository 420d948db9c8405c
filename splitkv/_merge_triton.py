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

from ._merge_torch import FP8_DTYPES
from ._triton_support import interpreter_enabled


@triton.jit
def _to_output(values, output_ptr, output_scale, output_scale_ptr, OUTPUT_SCALE: tl.constexpr,
               OUTPUT_MAX: tl.constexpr):
    """The merged float32 values in the output's dtype. OUTPUT_SCALE 1: divided by the
    float ``output_scale``, 2: by the float32 at ``output_scale_ptr``; then saturated to
    +-OUTPUT_MAX, the fp8 type's largest finite value, NaN kept (tl.clamp's default,
    PropagateNan.NONE, made a NaN -OUTPUT_MAX in the interpreter and promises nothing
    on a GPU)."""
    # One return and static ifs only: triton compiles the code after a return too.
    if OUTPUT_SCALE == 0:
        result = values.to(output_ptr.dtype.element_ty)
    else:
        if OUTPUT_SCALE == 1:
            scaled = values / output_scale
        else:
            scaled = values / tl.load(output_scale_ptr)
        saturated = tl.clamp(scaled, -OUTPUT_MAX, OUTPUT_MAX, propagate_nan=tl.PropagateNan.ALL)
        result = saturated.to(output_ptr.dtype.element_ty)
    return result


@triton.jit
def _program_tile(num_tokens, head_dim, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (head, tokens [BLOCK_T], dims [BLOCK_D], token mask, tile mask)."""
    head = tl.program_id(1)
    # int64: tokens * token stride passes 2^31 on large inputs.
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    token_mask = tokens < num_tokens
    return head, tokens, dims, token_mask, token_mask[:, None] & (dims[None, :] < head_dim)


@triton.jit
def _load_lse(lse_ptr, head, tokens, stride_head, stride_token, token_mask, lse_scale):
    """The tile's natural-log lse ([BLOCK_T]); -inf (empty) past the last token."""
    return tl.load(lse_ptr + head * stride_head + tokens * stride_token, mask=token_mask,
                   other=float("-inf")) * lse_scale


@triton.jit
def _two_state_weights(prefix_lse, suffix_lse):
    """(prefix_empty, suffix_empty, prefix_weight, suffix_weight, merged natural-log lse)
    of natural-log lses: +inf (flash-attn 2's empty row) and -inf both mean an empty
    state (weight 0); both empty give lse -inf; a NaN lse gives NaN weights and lse."""
    prefix_empty = (prefix_lse == float("inf")) | (prefix_lse == float("-inf"))
    suffix_empty = (suffix_lse == float("inf")) | (suffix_lse == float("-inf"))
    both_empty = prefix_empty & suffix_empty
    m = tl.where(prefix_empty, suffix_lse, tl.where(suffix_empty, prefix_lse, tl.maximum(prefix_lse, suffix_lse)))
    m = tl.where(both_empty, 0.0, m)
    prefix_scale = tl.where(prefix_empty, 0.0, tl.exp(prefix_lse - m))
    suffix_scale = tl.where(suffix_empty, 0.0, tl.exp(suffix_lse - m))
    total = prefix_scale + suffix_scale
    inv_total = tl.where(both_empty, 0.0, 1.0 / tl.where(both_empty, 1.0, total))
    merged_lse = tl.where(both_empty, float("-inf"), m + tl.log(tl.where(both_empty, 1.0, total)))
    # tl.maximum may drop a NaN operand; a NaN lse must stay visible (x != x is the NaN test).
    any_nan = (prefix_lse != prefix_lse) | (suffix_lse != suffix_lse)  # noqa: PLR0124
    prefix_weight = tl.where(any_nan, float("nan"), prefix_scale * inv_total)
    suffix_weight = tl.where(any_nan, float("nan"), suffix_scale * inv_total)
    merged_lse = tl.where(any_nan, float("nan"), merged_lse)
    return prefix_empty, suffix_empty, prefix_weight, suffix_weight, merged_lse


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
    lse_scale, output_scale, output_scale_ptr,
    WRITE_LSE: tl.constexpr, OUTPUT_SCALE: tl.constexpr, OUTPUT_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    head, tokens, dims, token_mask, tile_mask = _program_tile(num_tokens, head_dim, BLOCK_T, BLOCK_D)

    prefix_lse = _load_lse(prefix_lse_ptr, head, tokens, prefix_lse_stride_head, prefix_lse_stride_token, token_mask,
                           lse_scale)
    suffix_lse = _load_lse(suffix_lse_ptr, head, tokens, suffix_lse_stride_head, suffix_lse_stride_token, token_mask,
                           lse_scale)
    prefix = tl.load(prefix_ptr + tokens[:, None] * prefix_stride_token + head * prefix_stride_head + dims[None, :],
                     mask=tile_mask, other=0.0).to(tl.float32)
    suffix = tl.load(suffix_ptr + tokens[:, None] * suffix_stride_token + head * suffix_stride_head + dims[None, :],
                     mask=tile_mask, other=0.0).to(tl.float32)

    prefix_empty, suffix_empty, prefix_weight, suffix_weight, merged_lse = _two_state_weights(prefix_lse, suffix_lse)
    # An empty state contributes nothing, not 0 * (whatever its output holds).
    merged = (tl.where(prefix_empty[:, None], 0.0, prefix * prefix_weight[:, None])
              + tl.where(suffix_empty[:, None], 0.0, suffix * suffix_weight[:, None]))
    tl.store(output_ptr + tokens[:, None] * output_stride_token + head * output_stride_head + dims[None, :],
             _to_output(merged, output_ptr, output_scale, output_scale_ptr, OUTPUT_SCALE, OUTPUT_MAX), mask=tile_mask)
    if WRITE_LSE:
        merged_lse = merged_lse / lse_scale
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
    lse_scale, output_scale, output_scale_ptr,
    WRITE_LSE: tl.constexpr, OUTPUT_SCALE: tl.constexpr, OUTPUT_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    head, tokens, dims, token_mask, tile_mask = _program_tile(num_tokens, head_dim, BLOCK_T, BLOCK_D)
    lse_offsets = head * lses_stride_head + tokens * lses_stride_token
    state_offsets = tokens[:, None] * states_stride_token + head * states_stride_head + dims[None, :]

    # First pass over the lse values only: the max over non-empty states.
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    any_nan = tl.zeros([BLOCK_T], tl.int1)
    for s in range(num_states):
        lse = tl.load(lses_ptr + s * lses_stride_state + lse_offsets, mask=token_mask, other=float("-inf")) * lse_scale
        empty = (lse == float("inf")) | (lse == float("-inf"))
        m = tl.where(empty, m, tl.maximum(m, lse))
        any_nan = any_nan | (lse != lse)  # noqa: PLR0124 (x != x is the NaN test)
    all_empty = (m == float("-inf")) & (any_nan == 0)
    m = tl.where(all_empty, 0.0, m)

    # Second pass: one read of every state's output.
    total = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for s in range(num_states):
        lse = tl.load(lses_ptr + s * lses_stride_state + lse_offsets, mask=token_mask, other=float("-inf")) * lse_scale
        empty = (lse == float("inf")) | (lse == float("-inf"))
        scale = tl.where(empty, 0.0, tl.exp(lse - m))
        state = tl.load(states_ptr + s * states_stride_state + state_offsets, mask=tile_mask, other=0.0)
        acc += tl.where(empty[:, None], 0.0, state.to(tl.float32) * scale[:, None])
        total += scale
    inv_total = tl.where(all_empty, 0.0, 1.0 / tl.where(all_empty, 1.0, total))
    tl.store(output_ptr + tokens[:, None] * output_stride_token + head * output_stride_head + dims[None, :],
             _to_output(acc * inv_total[:, None], output_ptr, output_scale, output_scale_ptr, OUTPUT_SCALE,
                        OUTPUT_MAX),
             mask=tile_mask)
    if WRITE_LSE:
        merged_lse = tl.where(all_empty, float("-inf"), m + tl.log(tl.where(all_empty, 1.0, total)))
        merged_lse = tl.where(any_nan != 0, float("nan"), merged_lse) / lse_scale
        tl.store(output_lse_ptr + head * output_lse_stride_head + tokens * output_lse_stride_token,
                 merged_lse, mask=token_mask)


@triton.jit
def _merge_attn_states_backward_kernel(
    grad_prefix_ptr, grad_prefix_lse_ptr, grad_suffix_ptr, grad_suffix_lse_ptr,
    grad_output_ptr, grad_lse_ptr, prefix_ptr, prefix_lse_ptr, suffix_ptr, suffix_lse_ptr,
    num_tokens, head_dim,
    grad_prefix_stride_token, grad_prefix_stride_head,
    grad_suffix_stride_token, grad_suffix_stride_head,
    grad_output_stride_token, grad_output_stride_head,
    prefix_stride_token, prefix_stride_head,
    suffix_stride_token, suffix_stride_head,
    grad_prefix_lse_stride_head, grad_prefix_lse_stride_token,
    grad_suffix_lse_stride_head, grad_suffix_lse_stride_token,
    grad_lse_stride_head, grad_lse_stride_token,
    prefix_lse_stride_head, prefix_lse_stride_token,
    suffix_lse_stride_head, suffix_lse_stride_token,
    lse_scale,
    HAS_GRAD_LSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dO_i = w_i dO, dlse_i = w_i (lse_scale <dO, O_i - O> + dlse), with O and the
    weights recomputed from the inputs (exact); an empty state's gradients are 0."""
    head, tokens, dims, token_mask, tile_mask = _program_tile(num_tokens, head_dim, BLOCK_T, BLOCK_D)
    prefix_lse = _load_lse(prefix_lse_ptr, head, tokens, prefix_lse_stride_head, prefix_lse_stride_token, token_mask,
                           lse_scale)
    suffix_lse = _load_lse(suffix_lse_ptr, head, tokens, suffix_lse_stride_head, suffix_lse_stride_token, token_mask,
                           lse_scale)
    prefix_empty, suffix_empty, prefix_weight, suffix_weight, _ = _two_state_weights(prefix_lse, suffix_lse)

    prefix = tl.load(prefix_ptr + tokens[:, None] * prefix_stride_token + head * prefix_stride_head + dims[None, :],
                     mask=tile_mask, other=0.0).to(tl.float32)
    suffix = tl.load(suffix_ptr + tokens[:, None] * suffix_stride_token + head * suffix_stride_head + dims[None, :],
                     mask=tile_mask, other=0.0).to(tl.float32)
    grad_output = tl.load(grad_output_ptr + tokens[:, None] * grad_output_stride_token
                          + head * grad_output_stride_head + dims[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    # An empty state's output may hold anything (NaN): it must not reach the dot products.
    prefix = tl.where(prefix_empty[:, None], 0.0, prefix)
    suffix = tl.where(suffix_empty[:, None], 0.0, suffix)
    prefix_dot = tl.sum(prefix * grad_output, axis=1)
    suffix_dot = tl.sum(suffix * grad_output, axis=1)
    merged_dot = prefix_weight * prefix_dot + suffix_weight * suffix_dot  # <dO, O>
    grad_lse = tl.zeros([BLOCK_T], tl.float32)
    if HAS_GRAD_LSE:
        grad_lse = tl.load(grad_lse_ptr + head * grad_lse_stride_head + tokens * grad_lse_stride_token,
                           mask=token_mask, other=0.0)
    tl.store(grad_prefix_ptr + tokens[:, None] * grad_prefix_stride_token + head * grad_prefix_stride_head
             + dims[None, :], (prefix_weight[:, None] * grad_output).to(grad_prefix_ptr.dtype.element_ty),
             mask=tile_mask)
    tl.store(grad_suffix_ptr + tokens[:, None] * grad_suffix_stride_token + head * grad_suffix_stride_head
             + dims[None, :], (suffix_weight[:, None] * grad_output).to(grad_suffix_ptr.dtype.element_ty),
             mask=tile_mask)
    tl.store(grad_prefix_lse_ptr + head * grad_prefix_lse_stride_head + tokens * grad_prefix_lse_stride_token,
             prefix_weight * (lse_scale * (prefix_dot - merged_dot) + grad_lse), mask=token_mask)
    tl.store(grad_suffix_lse_ptr + head * grad_suffix_lse_stride_head + tokens * grad_suffix_lse_stride_token,
             suffix_weight * (lse_scale * (suffix_dot - merged_dot) + grad_lse), mask=token_mask)


@triton.jit
def _merge_states_backward_kernel(
    grad_states_ptr, grad_lses_ptr, grad_output_ptr, grad_lse_ptr, states_ptr, lses_ptr, output_ptr, output_lse_ptr,
    num_states, num_tokens, head_dim,
    grad_states_stride_state, grad_states_stride_token, grad_states_stride_head,
    grad_output_stride_token, grad_output_stride_head,
    states_stride_state, states_stride_token, states_stride_head,
    output_stride_token, output_stride_head,
    grad_lses_stride_state, grad_lses_stride_head, grad_lses_stride_token,
    grad_lse_stride_head, grad_lse_stride_token,
    lses_stride_state, lses_stride_head, lses_stride_token,
    output_lse_stride_head, output_lse_stride_token,
    lse_scale,
    HAS_GRAD_LSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """As the two-state backward, in one pass over the states: the weights come from the
    merged lse and <dO, O> from the merged output that the forward returned."""
    head, tokens, dims, token_mask, tile_mask = _program_tile(num_tokens, head_dim, BLOCK_T, BLOCK_D)
    merged_lse = _load_lse(output_lse_ptr, head, tokens, output_lse_stride_head, output_lse_stride_token, token_mask,
                           lse_scale)
    grad_output = tl.load(grad_output_ptr + tokens[:, None] * grad_output_stride_token
                          + head * grad_output_stride_head + dims[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    output = tl.load(output_ptr + tokens[:, None] * output_stride_token + head * output_stride_head + dims[None, :],
                     mask=tile_mask, other=0.0).to(tl.float32)
    merged_dot = tl.sum(output * grad_output, axis=1)
    grad_lse = tl.zeros([BLOCK_T], tl.float32)
    if HAS_GRAD_LSE:
        grad_lse = tl.load(grad_lse_ptr + head * grad_lse_stride_head + tokens * grad_lse_stride_token,
                           mask=token_mask, other=0.0)
    # Every state is empty where the merged lse is -inf; keeps -inf - -inf out of the exponent.
    merged_finite = tl.where(merged_lse == float("-inf"), 0.0, merged_lse)
    state_offsets = tokens[:, None] * states_stride_token + head * states_stride_head + dims[None, :]
    grad_offsets = tokens[:, None] * grad_states_stride_token + head * grad_states_stride_head + dims[None, :]
    for s in range(num_states):
        lse = tl.load(lses_ptr + s * lses_stride_state + head * lses_stride_head + tokens * lses_stride_token,
                      mask=token_mask, other=float("-inf")) * lse_scale
        empty = (lse == float("inf")) | (lse == float("-inf"))
        weight = tl.where(empty, 0.0, tl.exp(lse - merged_finite))
        state = tl.load(states_ptr + s * states_stride_state + state_offsets, mask=tile_mask, other=0.0)
        state = tl.where(empty[:, None], 0.0, state.to(tl.float32))
        dot = tl.sum(state * grad_output, axis=1)
        tl.store(grad_states_ptr + s * grad_states_stride_state + grad_offsets,
                 (weight[:, None] * grad_output).to(grad_states_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(grad_lses_ptr + s * grad_lses_stride_state + head * grad_lses_stride_head
                 + tokens * grad_lses_stride_token, weight * (lse_scale * (dot - merged_dot) + grad_lse),
                 mask=token_mask)


def _tile(num_tokens: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): about 4K elements per tile on a GPU; the interpreter pays per
    program, not per element, so it gets fewer, larger tiles."""
    block_d = triton.next_power_of_2(max(head_dim, 1))
    target = 16384 if interpreter_enabled() else 4096
    block_t = max(1, min(triton.next_power_of_2(max(num_tokens, 1)), target // block_d))
    return block_t, block_d


def _output_scale_args(output_scale, output: torch.Tensor):
    """(output_scale float, pointer, OUTPUT_SCALE mode, OUTPUT_MAX) for _to_output; without
    a scale tensor the kernel still takes a pointer argument (``output``, never read)."""
    if output.dtype not in FP8_DTYPES:
        return 1.0, output, 0, 0.0
    limit = torch.finfo(output.dtype).max
    if torch.is_tensor(output_scale):
        return 1.0, output_scale, 2, limit
    return (1.0 if output_scale is None else float(output_scale)), output, 1, limit


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
    lse_scale: float = 1.0,
    output_scale=None,
) -> None:
    num_tokens, num_heads, head_dim = prefix_output.shape
    if num_tokens == 0 or num_heads == 0:  # head_dim 0 still has lses to write
        return
    block_t, block_d = _tile(num_tokens, head_dim)
    lse_out, lse_out_stride_head, lse_out_stride_token = _lse_args(output_lse, prefix_lse)
    scale_value, scale_ptr, scale_mode, output_max = _output_scale_args(output_scale, output)
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
        lse_scale, scale_value, scale_ptr,
        WRITE_LSE=output_lse is not None, OUTPUT_SCALE=scale_mode, OUTPUT_MAX=output_max,
        BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip


def merge_states_triton(
    output: torch.Tensor,
    output_lse: torch.Tensor | None,
    states: torch.Tensor,
    lses: torch.Tensor,
    lse_scale: float = 1.0,
    output_scale=None,
) -> None:
    num_states, num_tokens, num_heads, head_dim = states.shape
    if num_tokens == 0 or num_heads == 0:  # head_dim 0 still has lses to write
        return
    block_t, block_d = _tile(num_tokens, head_dim)
    lse_out, lse_out_stride_head, lse_out_stride_token = _lse_args(output_lse, lses)
    scale_value, scale_ptr, scale_mode, output_max = _output_scale_args(output_scale, output)
    grid = (triton.cdiv(num_tokens, block_t), num_heads)
    _merge_states_kernel[grid](
        output, lse_out, states, lses,
        num_states, num_tokens, head_dim,
        output.stride(0), output.stride(1),
        states.stride(0), states.stride(1), states.stride(2),
        lse_out_stride_head, lse_out_stride_token,
        lses.stride(0), lses.stride(1), lses.stride(2),
        lse_scale, scale_value, scale_ptr,
        WRITE_LSE=output_lse is not None, OUTPUT_SCALE=scale_mode, OUTPUT_MAX=output_max,
        BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip


def _grad_lse_args(grad_lse: torch.Tensor | None, like: torch.Tensor):
    # Without a gradient of the merged lse, the kernel still needs a pointer argument.
    if grad_lse is None:
        return like, 0, 0, False
    return grad_lse, grad_lse.stride(0), grad_lse.stride(1), True


def merge_attn_states_backward_triton(
    grad_prefix_output, grad_prefix_lse, grad_suffix_output, grad_suffix_lse,
    grad_output, grad_lse, prefix_output, prefix_lse, suffix_output, suffix_lse, lse_scale: float = 1.0,
) -> None:  # fmt: skip
    num_tokens, num_heads, head_dim = prefix_output.shape
    if num_tokens == 0 or num_heads == 0:  # head_dim 0 still has lses to write
        return
    block_t, block_d = _tile(num_tokens, head_dim)
    grad_lse, grad_lse_stride_head, grad_lse_stride_token, has_grad_lse = _grad_lse_args(grad_lse, prefix_lse)
    grid = (triton.cdiv(num_tokens, block_t), num_heads)
    _merge_attn_states_backward_kernel[grid](
        grad_prefix_output, grad_prefix_lse, grad_suffix_output, grad_suffix_lse,
        grad_output, grad_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
        num_tokens, head_dim,
        grad_prefix_output.stride(0), grad_prefix_output.stride(1),
        grad_suffix_output.stride(0), grad_suffix_output.stride(1),
        grad_output.stride(0), grad_output.stride(1),
        prefix_output.stride(0), prefix_output.stride(1),
        suffix_output.stride(0), suffix_output.stride(1),
        grad_prefix_lse.stride(0), grad_prefix_lse.stride(1),
        grad_suffix_lse.stride(0), grad_suffix_lse.stride(1),
        grad_lse_stride_head, grad_lse_stride_token,
        prefix_lse.stride(0), prefix_lse.stride(1),
        suffix_lse.stride(0), suffix_lse.stride(1),
        lse_scale,
        HAS_GRAD_LSE=has_grad_lse, BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip


def merge_states_backward_triton(
    grad_states, grad_lses, grad_output, grad_lse, states, lses, output, output_lse, lse_scale: float = 1.0,
) -> None:  # fmt: skip
    num_states, num_tokens, num_heads, head_dim = states.shape
    if num_tokens == 0 or num_heads == 0:  # head_dim 0 still has lses to write
        return
    block_t, block_d = _tile(num_tokens, head_dim)
    grad_lse, grad_lse_stride_head, grad_lse_stride_token, has_grad_lse = _grad_lse_args(grad_lse, lses)
    grid = (triton.cdiv(num_tokens, block_t), num_heads)
    _merge_states_backward_kernel[grid](
        grad_states, grad_lses, grad_output, grad_lse, states, lses, output, output_lse,
        num_states, num_tokens, head_dim,
        grad_states.stride(0), grad_states.stride(1), grad_states.stride(2),
        grad_output.stride(0), grad_output.stride(1),
        states.stride(0), states.stride(1), states.stride(2),
        output.stride(0), output.stride(1),
        grad_lses.stride(0), grad_lses.stride(1), grad_lses.stride(2),
        grad_lse_stride_head, grad_lse_stride_token,
        lses.stride(0), lses.stride(1), lses.stride(2),
        output_lse.stride(0), output_lse.stride(1),
        lse_scale,
        HAS_GRAD_LSE=has_grad_lse, BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip
