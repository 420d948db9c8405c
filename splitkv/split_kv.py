"""Split-KV attention (flash-decoding): each sequence's KV is cut into chunks whose
partial states are computed in parallel and merged N-way in one pass.

Decoding has one query (times the query heads of a KV head's group) per sequence:
too few rows to fill a GPU's multiprocessors if each (sequence, KV head) pair
walks its whole KV alone. Splitting the KV multiplies the parallel work by the
split count; the price is writing and re-reading one float32 partial state per
split, so the count is chosen to fill the GPU about twice, no more.
"""

from __future__ import annotations

import torch

from ._checks import expect_bool
from ._planning import choose_num_splits, user_num_splits, varlen_num_splits
from .attention import (
    ATTENTION_BACKENDS,
    check_attention_inputs,
    check_sequence_values,
    fake_attention_results,
    register_attention_autograd,
    run_checked_attention,
    use_op,
)

__all__ = ["choose_num_splits", "split_kv_attention", "splits_pay_off"]


def triton_can_run(q: torch.Tensor) -> bool:
    """Whether the attention backend that writes split partial states (the in-project
    Triton kernel, the one that declares it) runs ``q``: its ``why_not`` reads only ``q``."""
    return ATTENTION_BACKENDS.first_with("writes_partial_states").why_not(q, q, q, False, None, 0, 0) is None


def splits_pay_off(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int,
                   max_seqlen_k: int) -> bool:  # fmt: skip
    """Whether :func:`split_kv_attention` would cut this batch's KV (more than one split on a GPU).

    True for decode-like shapes (few query rows per KV head, long KV), where an
    unsplit kernel leaves most multiprocessors idle; False for prefill-like ones,
    where the flash backends of :func:`splitkv.attention_with_lse` are faster, and
    for one query per sequence when a flash backend runs: there PyTorch's flash
    attention splits the keys itself, and measured as fast as the split Triton
    kernel over a long KV (docs/distributed.md has the figures).
    """
    if not q.is_cuda or not triton_can_run(q):
        return False
    num_sequences = cu_seqlens_q.shape[0] - 1
    auto = ATTENTION_BACKENDS.select("auto", q, k, k, False, None, num_sequences, max_seqlen_q)
    # The flash kernels write no partial states: they split a decode's keys themselves.
    if max_seqlen_q <= 1 and not auto.writes_partial_states:
        return False
    return varlen_num_splits(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k) > 1


def split_kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    num_splits: int | None = None,
    block_table: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over each sequence's KV cut into ``num_splits`` chunks, merged exactly.

    Arguments and results are those of :func:`splitkv.attention_with_lse`
    (varlen packed layout, GQA, bottom-right causal, ``lse [heads_q, total_q]``
    float32 natural log); the result equals full attention up to rounding.
    Differentiable with respect to q, k and v (output and LSE), with
    :func:`splitkv.attention_with_lse`'s backward (torch math, scores recomputed).
    A torch custom op (``torch.ops.splitkv.split_kv_attention``): traceable by
    ``torch.compile(fullgraph=True)``, and CUDA-graph capturable on the GPU.

    Splitting needs the in-project Triton kernel (``head_dim <= 256``): on CUDA
    tensors, or on CPU ones under ``TRITON_INTERPRET=1``. Elsewhere (CPU without
    the interpreter, head_dim over 256) this is :func:`splitkv.attention_with_lse`
    without splits, with its backend limits.

    Args:
        q: ``[total_q, heads_q, head_dim]`` float16, bfloat16 or float32.
        k: ``[total_k, heads_kv, head_dim]``, q's dtype and device.
        v: like ``k``.
        cu_seqlens_q: int32 ``[batch + 1]`` cumulative query counts.
        cu_seqlens_k: int32 ``[batch + 1]`` cumulative key counts.
        max_seqlen_q: Python int, at least the longest query count.
        max_seqlen_k: Python int, at least the longest key count.
        causal: bottom-right aligned causal mask.
        softmax_scale: multiplier of ``q @ k^T``; default ``head_dim ** -0.5``.
        num_splits: chunks per sequence (each ``ceil(Lk / num_splits)`` keys), a
            positive int; counts above ``max_seqlen_k`` are cut to it (a chunk of
            no key is only an empty state). ``None`` picks a count from the batch
            shape and the multiprocessor count (:func:`choose_num_splits`), on the
            host from Python ints: a compiled or captured step keeps its count. The
            partial states are float32 and merged by :func:`splitkv.merge_states`
            straight into q's dtype.
        block_table: the paged form, with ``seqused_k``: int32 ``[batch,
            max_pages_per_seq]``; ``k, v`` are then ``[num_pages, page_size,
            heads_kv, head_dim]`` caches and ``cu_seqlens_k`` must be None. Runs
            the paged kernel of :func:`splitkv.paged_attention_with_lse` in
            ``num_splits`` chunks per sequence.
        seqused_k: int32 ``[batch]`` keys of each sequence's pages (paged form only).

    Returns:
        ``(out [total_q, heads_q, head_dim] in q's dtype, lse [heads_q, total_q] float32)``.

    Example:
        >>> import torch, splitkv
        >>> q = torch.randn(2, 4, 16)  # 2 sequences of 1 query (decode), 4 heads
        >>> k, v = torch.randn(600, 2, 16), torch.randn(600, 2, 16)  # 100 and 500 cached keys
        >>> cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
        >>> cu_k = torch.tensor([0, 100, 600], dtype=torch.int32)
        >>> out, lse = splitkv.split_kv_attention(q, k, v, cu_q, cu_k, 1, 500, num_splits=4)
        >>> out.shape, lse.shape
        (torch.Size([2, 4, 16]), torch.Size([4, 2]))
    """
    if block_table is not None or seqused_k is not None:
        from .paged import split_kv_paged_attention

        if block_table is None or seqused_k is None or cu_seqlens_k is not None:
            raise ValueError("the paged form takes block_table and seqused_k together, and cu_seqlens_k=None")
        return split_kv_paged_attention(q, k, v, block_table, seqused_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                                        causal, softmax_scale, num_splits)  # fmt: skip
    scale = check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
    causal = expect_bool("causal", causal)
    num_splits = user_num_splits(num_splits, max_seqlen_k)
    if use_op(q, k, v):
        return torch.ops.splitkv.split_kv_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                    causal, scale, num_splits or 0)  # fmt: skip
    return _split_kv_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, num_splits)


def _split_kv_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, num_splits):
    """The eager body of :func:`split_kv_attention` for checked arguments (``num_splits`` None: the default count)."""
    if not triton_can_run(q):
        return run_checked_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
    # The backend that writes partial states (the Triton kernel) splits and merges them.
    split_backend = ATTENTION_BACKENDS.first_with("writes_partial_states")
    return split_backend.run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, None,
                             num_splits)  # fmt: skip


def _split_kv_op_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                      num_splits):  # fmt: skip
    check_sequence_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out, lse = _split_kv_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                              softmax_scale, num_splits or None)  # fmt: skip
    return out.contiguous(), lse.contiguous()


_split_kv_op = torch.library.custom_op(
    "splitkv::split_kv_attention", _split_kv_op_impl, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
           "SymInt max_seqlen_k, bool causal, float softmax_scale, int num_splits) -> (Tensor, Tensor)",
)  # fmt: skip
_split_kv_op.register_fake(lambda q, *args: fake_attention_results(q))
register_attention_autograd(_split_kv_op, seqused_k_index=None, num_inputs=10)
