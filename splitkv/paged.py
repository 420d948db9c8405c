"""Attention over a paged KV cache, and cascade attention over the prefixes its block
table shares.

Layout (vLLM's and flash-attn's):

* ``k_cache, v_cache [num_pages, page_size, heads_kv, head_dim]``, any strides but a
  contiguous ``head_dim`` (K and V may be two views of one ``[num_pages, 2, page_size,
  heads_kv, head_dim]`` buffer);
* ``block_table`` int32 ``[batch, max_pages_per_seq]``: row ``i`` lists sequence ``i``'s
  pages in order; entries past its last used page are padding, never read (they may
  hold any value);
* ``seqused_k`` int32 ``[batch]``: the keys of sequence ``i`` are the first
  ``seqused_k[i]`` slots of its pages;
* ``q [total_q, heads_q, head_dim]`` packed by int32 ``cu_seqlens_q [batch + 1]``;
  results and causal alignment (bottom-right) as in :func:`splitkv.attention_with_lse`.

Serving engines with prefix caching share a prefix by page id: the block tables of
many requests start with the same physical pages. :func:`plan_cascade` finds those
runs as a tree (a run shared by all, runs shared by sub-groups, each sequence's own
pages), keeps the levels where sharing pays by a byte-count cost model, and
:func:`paged_cascade_attention` reads each kept run once for all its sharers: its
queries attend to it without mask, the own pages causally, and one N-way merge
(:func:`splitkv.merge_states`) combines every level's states.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch

from . import _planning
from ._attention_reference import reference_attention_with_lse
from ._checks import (
    FLOAT_DTYPES,
    expect_bool,
    expect_contiguous_last,
    expect_count,
    expect_float_dtype,
    expect_rank,
    expect_scale,
    expect_tensor,
)
from ._registry import Backend, BackendRegistry
from .attention import (
    ATTENTION_BACKENDS,
    _expect_seqlens,
    _expect_seqused_k,
    _flash_why_not,
    _seqlen_values_ok,
    _varlen_api,
    _varlen_attn_kwargs,
    empty_attention_results,
    fake_attention_results,
    needs_grad,
)
from .merge import merge_states

__all__ = [
    "PAGED_BACKENDS",
    "CascadePlan",
    "explain_paged_attention",
    "paged_attention_with_lse",
    "paged_cascade_attention",
    "plan_cascade",
]

# flash-attn's paged KV takes pages of a multiple of this many tokens.
_FLASH_PAGE_MULTIPLE = 256
# An item's first empty state slot when it writes none (past any state count).
_NO_PADDING = 1 << 30


# ---------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------


def _expect_cache(q: torch.Tensor, k_cache, v_cache) -> None:
    layout = "[num_pages, page_size, heads_kv, head_dim]"
    expect_rank("k_cache", k_cache, 4, layout)
    expect_rank("v_cache", v_cache, 4, layout)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {cache.dtype}")
        if cache.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like q, got {cache.device}")
        expect_contiguous_last(name, cache)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must be {layout} like k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    num_pages, page_size, heads_kv, head_dim = k_cache.shape
    if page_size < 1:
        raise ValueError(f"k_cache's page_size (dim 1) must be >= 1, got {page_size}")
    if head_dim != q.shape[2]:
        raise ValueError(f"k_cache must have q's head_dim {q.shape[2]}, got shape {tuple(k_cache.shape)}")
    if heads_kv == 0 or q.shape[1] % heads_kv != 0:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of k_cache's heads ({heads_kv})")


def _expect_table(block_table, seqused_k, device: torch.device, batch: int) -> None:
    expect_rank("block_table", block_table, 2, "[batch, max_pages_per_seq]")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must have dtype torch.int32, got {block_table.dtype}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on {device} like q, got {block_table.device}")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have one row per sequence ({batch}), got shape {tuple(block_table.shape)}")
    expect_contiguous_last("block_table", block_table)
    _expect_seqused_k(seqused_k, batch, device, "q")


def _check_table_values(block_table: torch.Tensor, seqused_k: torch.Tensor, page_size: int, num_pages: int | None,
                        max_seqlen_k: int | None) -> None:  # fmt: skip
    """Host checks of the values (costs a device sync when the tensors are on a GPU)."""
    table = block_table.cpu().numpy()
    used = seqused_k.cpu().numpy().astype(np.int64)
    room = table.shape[1] * page_size
    if (used < 0).any() or (used > room).any():
        raise ValueError(
            f"seqused_k must lie in [0, max_pages_per_seq * page_size] = [0, {room}] (a row's pages), "
            f"got {used.tolist()}"
        )
    if max_seqlen_k is not None and used.size and int(used.max()) > max_seqlen_k:
        raise ValueError(f"max_seqlen_k = {max_seqlen_k} is below the longest used sequence ({int(used.max())})")
    if num_pages is not None and table.size:
        pages_used = -(-used // page_size)
        live = np.arange(table.shape[1])[None, :] < pages_used[:, None]
        bad = live & ((table < 0) | (table >= num_pages))
        if bad.any():
            row, col = (int(x) for x in np.argwhere(bad)[0])
            raise ValueError(
                f"block_table[{row}, {col}] = {int(table[row, col])} is not a page of k_cache "
                f"(num_pages = {num_pages})"
            )


def check_paged_inputs(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                       softmax_scale, check_values: bool = False, kept_runs: tuple = (),
                       planned_q_bounds: tuple | None = None) -> tuple[float, torch.Tensor]:  # fmt: skip
    """Validates the paged attention arguments; returns ``(softmax scale to use,
    seqused_k to read)``. Values (page ids, ``seqused_k``, ``cu_seqlens_q``, and where
    given, that a cascade plan's shared runs still hold (``kept_runs``, see
    :func:`_flat_kept_runs`) and its query counts are those it was planned for
    (``planned_q_bounds``)) are checked when on the CPU, or with ``check_values=True``
    (device syncs). Under ``torch.compile`` a traced call cannot read them: they are
    checked when the compiled call runs, by an op that returns the ``seqused_k`` the
    computation reads (so that the check runs first and is not dropped)."""
    expect_rank("q", q, 3, "[total_q, heads_q, head_dim]")
    expect_float_dtype("q", q)
    expect_contiguous_last("q", q)
    _expect_cache(q, k_cache, v_cache)
    _expect_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, max_seqlen_q, "max_seqlen_q")
    batch = cu_seqlens_q.shape[0] - 1
    _expect_table(block_table, seqused_k, q.device, batch)
    expect_count("max_seqlen_k", max_seqlen_k)
    softmax_scale = expect_scale("softmax_scale", softmax_scale)
    scale = q.shape[2] ** -0.5 if softmax_scale is None else softmax_scale
    if q.is_cpu or check_values:
        args = (block_table, seqused_k, cu_seqlens_q, q.shape[0], max_seqlen_q, max_seqlen_k, k_cache.shape[1],
                k_cache.shape[0], list(kept_runs), list(planned_q_bounds or ()))  # fmt: skip
        if torch.compiler.is_compiling():
            return scale, _checked_seqused_k_op(*args)
        _check_paged_values(*args)
    return scale, seqused_k


def _check_paged_values(block_table: torch.Tensor, seqused_k: torch.Tensor, cu_seqlens_q: torch.Tensor, total_q: int,
                        max_seqlen_q: int, max_seqlen_k: int, page_size: int, num_pages: int, kept_runs: list[int],
                        planned_q_bounds: list[int]) -> None:  # fmt: skip
    """check_paged_inputs' checks of the values (a device sync where they are on a GPU)."""
    _seqlen_values_ok("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q")
    bounds = cu_seqlens_q.tolist()
    if planned_q_bounds and bounds != planned_q_bounds:
        raise ValueError(f"plan: cu_seqlens_q is {bounds}, the plan placed its tokens by "
                         f"{planned_q_bounds}; other query counts need a new plan (plan_cascade)")  # fmt: skip
    _check_table_values(block_table, seqused_k, page_size, num_pages, max_seqlen_k)
    if kept_runs:
        _expect_plan_holds(block_table, seqused_k, cu_seqlens_q, page_size, kept_runs)


def _checked_seqused_k_impl(block_table: torch.Tensor, seqused_k: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            total_q: int, max_seqlen_q: int, max_seqlen_k: int, page_size: int, num_pages: int,
                            kept_runs: list[int], planned_q_bounds: list[int]) -> torch.Tensor:  # fmt: skip
    _check_paged_values(block_table, seqused_k, cu_seqlens_q, total_q, max_seqlen_q, max_seqlen_k, page_size,
                        num_pages, kept_runs, planned_q_bounds)  # fmt: skip
    return seqused_k.clone()


# The value checks of a compiled call (check_paged_inputs); a copy of seqused_k, which
# the computation reads in its place, orders the check before it.
_checked_seqused_k_op = torch.library.custom_op("splitkv_paged::checked_seqused_k", _checked_seqused_k_impl,
                                                mutates_args=())  # fmt: skip
_checked_seqused_k_op.register_fake(lambda block_table, seqused_k, *args: torch.empty_like(seqused_k))


# ---------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------


def reference_paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q,
                                       max_seqlen_k, causal, softmax_scale, num_splits=None):  # fmt: skip
    """The pages of every row gathered into a packed KV (padding entries clamped to a
    valid page: their keys are past ``seqused_k`` and never seen), then
    :func:`splitkv._attention_reference.reference_attention_with_lse`. For tests;
    differentiable with respect to q, k_cache and v_cache."""
    batch, max_pages = block_table.shape
    num_pages, page_size, heads_kv, head_dim = k_cache.shape
    room = max_pages * page_size
    if num_pages == 0:
        # No page to gather (every seqused_k is 0 then): keys that no row sees.
        k = v = k_cache.new_zeros((batch * room, heads_kv, head_dim))
    else:
        pages = block_table.long().clamp(0, num_pages - 1)
        k = k_cache[pages].reshape(batch * room, heads_kv, head_dim)
        v = v_cache[pages].reshape(batch * room, heads_kv, head_dim)
    cu_seqlens_k = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * room
    if torch.compiler.is_compiling():
        # The reference reads sequence bounds on the host, which a trace cannot; the
        # attention op (with its backward) runs it opaque to the compiler.
        return torch.ops.splitkv.attention_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, room, causal,
                                                    softmax_scale, seqused_k, "reference")  # fmt: skip
    return reference_attention_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, room, causal,
                                        softmax_scale, seqused_k=seqused_k)  # fmt: skip


# Every paged backend's why_not takes (q, k_cache, v_cache, causal, num_sequences, max_seqlen_q).
def _triton_why_not(q, k_cache, v_cache, causal, num_sequences, max_seqlen_q) -> str | None:
    # The paged kernel has the limits of the packed one (triton importable, head_dim <= 256, CUDA or interpreter).
    return ATTENTION_BACKENDS["triton"].why_not(q, k_cache, v_cache, causal, None, num_sequences, max_seqlen_q)


def _triton_lacks_gradient(q, k_cache, v_cache) -> bool:
    """A gradient is required and the Triton kernels (custom ops without a backward)
    would return a silently detached result."""
    return not PAGED_BACKENDS["triton"].differentiable and needs_grad(q, k_cache, v_cache)


def _expect_no_gradient_for_triton(op_name: str, q, k_cache, v_cache) -> None:
    if _triton_lacks_gradient(q, k_cache, v_cache):
        raise ValueError(f"{op_name}: backend='triton' has no backward: a gradient is required "
                         "(use backend='reference')")  # fmt: skip


def _triton_why_not_auto(q, k_cache, v_cache, causal, num_sequences, max_seqlen_q) -> str | None:
    if _triton_lacks_gradient(q, k_cache, v_cache):
        return "a gradient is required and the Triton kernel has no backward (the reference has)"
    return None if q.is_cuda else "auto runs Triton only on CUDA tensors (the interpreter is for tests)"


def _torch_why_not(q, k_cache, v_cache, causal, num_sequences, max_seqlen_q) -> str | None:
    if "block_table" not in _varlen_api()[2]:
        return f"torch {torch.__version__}'s varlen_attn takes no block_table"
    page_size = k_cache.shape[1]
    if page_size % _FLASH_PAGE_MULTIPLE:
        return f"flash attention's paged KV needs page_size a multiple of {_FLASH_PAGE_MULTIPLE}, got {page_size}"
    if _varlen_attn_kwargs(q.shape[1], k_cache.shape[2], causal, 1.0, k_cache) is None:
        return f"torch {torch.__version__}'s varlen_attn cannot express this call (GQA, causal or seqused_k)"
    return _flash_why_not(q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), num_sequences, max_seqlen_q)


def _run_torch(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal,
               softmax_scale, num_splits=None):  # fmt: skip
    # Only reached with a torch whose varlen_attn takes block_table on a GPU: 2.13 has
    # it, the device's 2.11 does not, so this path has not run. Its cu_seqlens_k is
    # unused with seqused_k.
    kwargs = _varlen_attn_kwargs(q.shape[1], k_cache.shape[2], causal, softmax_scale, seqused_k)
    cu_seqlens_k = torch.zeros_like(cu_seqlens_q)
    out, lse = _varlen_api()[0](q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           block_table=block_table, **kwargs)  # fmt: skip
    return out, lse.nan_to_num_(nan=math.nan, posinf=-math.inf, neginf=-math.inf)


def _run_triton(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal,
                softmax_scale, num_splits=None):  # fmt: skip
    if num_splits is None:
        group = q.shape[1] // k_cache.shape[2]
        num_splits = _planning.choose_num_splits(block_table.shape[0], k_cache.shape[2], max_seqlen_q * group,
                                                 max_seqlen_k, q.device)  # fmt: skip
    run = _paged_attention_op if torch.compiler.is_compiling() else _paged_attention_impl
    return run(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal,
               softmax_scale, num_splits)  # fmt: skip


#: The paged attention backends in order of preference.
PAGED_BACKENDS = BackendRegistry(
    "paged_attention_with_lse",
    [
        # flash attention's paged varlen_attn, in a torch that has it (not run yet: see
        # _run_torch, which turns its +inf LSE of empty rows into -inf itself).
        Backend("torch", _run_torch, _torch_why_not, dtypes=ATTENTION_BACKENDS["torch"].dtypes,
                max_head_dim=ATTENTION_BACKENDS["torch"].max_head_dim, takes_seqused_k=True, takes_block_table=True,
                empty_row_lse=-math.inf, differentiable=True),
        # The Triton kernel is a torch custom op without a backward (auto keeps away under grad).
        Backend("triton", _run_triton, _triton_why_not, _triton_why_not_auto,
                dtypes=ATTENTION_BACKENDS["triton"].dtypes, max_head_dim=ATTENTION_BACKENDS["triton"].max_head_dim,
                writes_partial_states=True,
                takes_seqused_k=True, takes_block_table=True, empty_row_lse=-math.inf),
        Backend("reference", reference_paged_attention_with_lse, lambda *args: None,
                dtypes=ATTENTION_BACKENDS["reference"].dtypes, takes_seqused_k=True, takes_block_table=True,
                empty_row_lse=-math.inf, differentiable=True),
    ],
)  # fmt: skip


def _paged_attention_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        seqused_k: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                        causal: bool, softmax_scale: float,
                        num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    from ._paged_triton import launch_config, launch_paged

    total_q, heads_q, head_dim = q.shape
    batch, heads_kv = block_table.shape[0], k_cache.shape[2]
    if total_q == 0 or max_seqlen_q == 0 or max_seqlen_k == 0 or batch == 0:
        return empty_attention_results(q)
    group = heads_q // heads_kv
    config = launch_config(head_dim, q.dtype, 1 << max(max_seqlen_q * group - 1, 0).bit_length())
    num_row_blocks = -(-max_seqlen_q * group // config[1])
    state_dtype = torch.float32 if num_splits > 1 else q.dtype
    states = torch.empty((num_splits, total_q, heads_q, head_dim), dtype=state_dtype, device=q.device)
    lses = torch.empty((num_splits, heads_q, total_q), dtype=torch.float32, device=q.device)
    launch_paged(q, k_cache, v_cache, states, lses, block_table, seqused_k, cu_seqlens_q, causal, softmax_scale,
                 config, batch * heads_kv * num_row_blocks * num_splits, num_row_blocks, num_splits)  # fmt: skip
    if num_splits == 1:
        return states[0], lses[0]
    return merge_states(states, lses, output_dtype=q.dtype)


# A torch custom op (for torch.compile); eager calls skip its dispatch, which costs
# more host time than a small decode step's kernel.
_paged_attention_op = torch.library.custom_op("splitkv_paged::paged_attention_with_lse", _paged_attention_impl,
                                              mutates_args=())  # fmt: skip


def _fake_result(q: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """Both ops' fake implementation (the other arguments are not needed for the shapes)."""
    return fake_attention_results(q)


_paged_attention_op.register_fake(_fake_result)


def paged_attention_with_lse(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seqused_k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    num_splits: int | None = None,
    check_values: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention over a paged KV cache that also returns the LSE of every query row.

    Args:
        q: ``[total_q, heads_q, head_dim]`` float16, bfloat16 or float32, contiguous ``head_dim``.
        k_cache, v_cache: ``[num_pages, page_size, heads_kv, head_dim]``, q's dtype and
            device, any strides but a contiguous ``head_dim`` (two views of one
            ``[num_pages, 2, page_size, heads_kv, head_dim]`` buffer work); any
            ``page_size >= 1``; ``heads_q % heads_kv == 0`` (GQA/MQA).
        block_table: int32 ``[batch, max_pages_per_seq]``: row ``i`` lists sequence
            ``i``'s pages in order (any order of page ids, a page in several rows);
            entries past its last used page are never read.
        seqused_k: int32 ``[batch]``: sequence ``i``'s keys are the first
            ``seqused_k[i]`` slots of its pages.
        cu_seqlens_q: int32 ``[batch + 1]`` cumulative query counts.
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest query count and
            ``seqused_k`` (they size the launch: no device sync).
        causal: bottom-right aligned mask over each sequence's used keys.
        softmax_scale: multiplier of ``q @ k^T``; default ``head_dim ** -0.5``.
        num_splits: key chunks per sequence on the Triton backend (split-KV; float32
            partial states merged by :func:`splitkv.merge_states`); ``None`` picks
            from the shape and the multiprocessor count.
        check_values: on a GPU, also check the values of ``block_table`` (used entries
            in ``[0, num_pages)``), ``seqused_k`` (within a row's pages) and
            ``cu_seqlens_q``: a few device syncs. On the CPU they are always checked.
        backend: ``"auto"`` (``torch`` on a GPU where the installed torch's
            ``varlen_attn`` takes ``block_table``, as 2.13's does, and ``page_size`` is
            a multiple of 256; then ``triton`` on CUDA tensors; else ``reference``),
            or one of ``"torch"``, ``"triton"``, ``"reference"``. See
            :func:`explain_paged_attention`.

    Returns:
        ``(out [total_q, heads_q, head_dim] in q's dtype, lse [heads_q, total_q] float32
        natural log)``; rows that see no key get output 0 and LSE ``-inf``.

    Differentiable with respect to q, k_cache and v_cache on the reference backend
    (which ``auto`` takes when a gradient is required); the Triton backend is a torch
    custom op (``torch.compile`` and CUDA graphs) without a backward, and refuses
    inputs that require a gradient. Triton takes ``head_dim <= 256``.

    Example:
        >>> import torch, splitkv
        >>> k_cache, v_cache = torch.randn(2, 6, 3, 2, 64).unbind(0)   # 6 pages of 3 slots
        >>> block_table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
        >>> seqused_k = torch.tensor([7, 9], dtype=torch.int32)
        >>> q = torch.randn(3, 8, 64)                                    # 1 + 2 queries
        >>> cu_q = torch.tensor([0, 1, 3], dtype=torch.int32)
        >>> out, lse = splitkv.paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_q, 2, 9,
        ...                                             causal=True)
        >>> out.shape, lse.shape
        (torch.Size([3, 8, 64]), torch.Size([8, 3]))
    """
    scale, seqused_k = check_paged_inputs(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q,
                                          max_seqlen_k, softmax_scale, expect_bool("check_values", check_values))  # fmt: skip
    causal = expect_bool("causal", causal)
    num_splits = _planning.user_num_splits(num_splits, max_seqlen_k)
    impl = PAGED_BACKENDS.select(backend, q, k_cache, v_cache, causal, block_table.shape[0], max_seqlen_q)
    if impl.name == "triton":
        _expect_no_gradient_for_triton("paged_attention_with_lse", q, k_cache, v_cache)
    if q.shape[0] == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return empty_attention_results(q)
    return impl.run(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal,
                    scale, num_splits)  # fmt: skip


def explain_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seqused_k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    backend: str = "auto",
) -> str:
    """Which backend :func:`paged_attention_with_lse` would take for these inputs, and why not the others.

    Args:
        q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q,
        max_seqlen_k, causal, backend: as in :func:`paged_attention_with_lse`.

    Returns:
        One line naming the chosen backend, then one line per backend with the reason
        it was not chosen, each followed by a ``declares:`` line with its declared
        facts (dtypes, head_dim limit, partial states, ``seqused_k``, block table,
        differentiable, the LSE of a row that saw no key). Not differentiable (a report).

    Example:
        >>> import torch, splitkv
        >>> k_cache = v_cache = torch.randn(4, 16, 2, 64)
        >>> bt, used = torch.tensor([[0, 3]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32)
        >>> q, cu_q = torch.randn(1, 2, 64), torch.tensor([0, 1], dtype=torch.int32)
        >>> print(splitkv.explain_paged_attention(q, k_cache, v_cache, bt, used, cu_q, 1, 20).splitlines()[0])
        paged_attention_with_lse(backend='auto') -> reference
    """
    check_paged_inputs(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, None)
    return PAGED_BACKENDS.explain(backend, q, k_cache, v_cache, causal, block_table.shape[0], max_seqlen_q)


def split_kv_paged_attention(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                             causal, softmax_scale, num_splits):  # fmt: skip
    """:func:`splitkv.split_kv_attention`'s paged form: the Triton paged kernel in
    ``num_splits`` key chunks per sequence (where Triton runs, the interpreter included,
    and no gradient is required), else what ``auto`` picks (a differentiable backend)."""
    triton_runs = _triton_why_not(q, k_cache, v_cache, causal, block_table.shape[0], max_seqlen_q) is None
    backend = "triton" if triton_runs and not _triton_lacks_gradient(q, k_cache, v_cache) else "auto"
    return paged_attention_with_lse(q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, max_seqlen_q,
                                    max_seqlen_k, causal=causal, softmax_scale=softmax_scale, num_splits=num_splits,
                                    backend=backend)  # fmt: skip


# ---------------------------------------------------------------------------------
# Cascade over shared pages
# ---------------------------------------------------------------------------------


# A plan's item table (read by the paged kernel, splitkv/_paged_triton.py) is int32
# [items, ITEM_FIELDS]: block-table row, offset and count of its tokens in the token
# list, key_lo, key_hi (or DYNAMIC_KEY_HI), first state, key chunks, first state to mark
# empty, and whether it takes the wide row tile.
ITEM_FIELDS = 9
# A key_hi of this value means "seqused_k[row]": the item's keys grow with the cache.
DYNAMIC_KEY_HI = -1


@dataclasses.dataclass(frozen=True)
class SharedRun:
    """One shared level: ``members`` (sequence indices) hold the same page ids at page
    positions ``[first_page, end_page)``; ``kept`` says whether the cost model (or the
    caller) shares it. ``saved_bytes`` / ``state_bytes``: the cost model's terms."""

    members: tuple[int, ...]
    first_page: int
    end_page: int
    kept: bool
    saved_bytes: int = 0
    state_bytes: int = 0


@dataclasses.dataclass
class CascadePlan:
    """What :func:`plan_cascade` found, and the device tables the launches read.

    Args:
        page_size, heads_q, heads_kv, head_dim, dtype: the shape it was planned for.
        block_table, seqused_k, cu_seqlens_q: the batch's tables (kept by reference).
        total_q, max_seqlen_q, max_seqlen_k: query count, longest query count and
            the longest ``seqused_k`` it may be replayed with.
        runs, own_start_page, shared, num_states, last_splits, max_page_id,
        launch_tables, launch_configs, needs_fill, kv_bytes_plain, kv_bytes_plan,
        host_us: filled by :func:`plan_cascade` (below); build plans with it, not by hand.

    Attributes:
        runs: the shared runs (:class:`SharedRun`), parents before children.
        own_start_page: per sequence, the first page position of its own (causal) level.
        shared: whether any run is kept; without one, :func:`paged_cascade_attention`
            is plain :func:`paged_attention_with_lse` (``causal=True``).
        num_states: partial states per query token (the merge's N).
        kv_bytes_plain, kv_bytes_plan: KV bytes one call reads without and with the plan.
        host_us: the host time the plan took to build.

    The block table and ``seqused_k`` are kept by reference: a CUDA graph captured
    with the plan reads them at replay. Between replays ``seqused_k`` may grow (and
    new pages be written into ``block_table`` past each row's shared pages, in place);
    a change of the shared pages, the query counts, the batch, or a sequence shrinking
    into its shared pages needs a new plan (and a new capture; with tables on the CPU,
    :func:`paged_cascade_attention` refuses a plan whose shared runs no longer hold or
    whose query counts changed, also under torch.compile; on a GPU that check would
    cost a sync and is not made), unless the plan was
    built with spare capacity (``plan_cascade(..., max_programs=..., max_states=...)``):
    then ``plan_cascade(..., into=plan)`` writes another tree of the same batch
    (same tensors, query counts and shape) into its tables in place, and the
    captured graph replays that tree.

    Not differentiable (a plan holds integer tables).

    Example:
        >>> import torch, splitkv
        >>> bt = torch.tensor([[0, 1, 2], [0, 1, 3]], dtype=torch.int32)
        >>> plan = splitkv.plan_cascade(bt, torch.tensor([40, 44], dtype=torch.int32),
        ...                             torch.tensor([0, 1, 2], dtype=torch.int32), page_size=16,
        ...                             heads_q=4, heads_kv=1, head_dim=64, dtype=torch.float32, share="always")
        >>> plan.shared, plan.own_start_page, plan.num_states
        (True, [2, 2], 2)
    """

    page_size: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype
    block_table: torch.Tensor
    seqused_k: torch.Tensor
    cu_seqlens_q: torch.Tensor
    total_q: int
    max_seqlen_q: int
    max_seqlen_k: int
    runs: list
    own_start_page: list
    shared: bool
    num_states: int
    last_splits: int
    max_page_id: int
    # Per launch: its item table, token list and program table, and (5 config ints, the
    # wide row tile, grid).
    launch_tables: list = dataclasses.field(default_factory=list)
    launch_configs: list = dataclasses.field(default_factory=list)
    needs_fill: bool = False
    # Work items the launch is sized for when built with spare capacity, else None.
    capacity_programs: int | None = None
    # cu_seqlens_q's values when planned (the launch tables place tokens by them) and the
    # kept runs as _flat_kept_runs gives them: built once, for the per-call checks.
    planned_q_bounds: tuple = ()
    kept_runs_flat: tuple = ()
    kv_bytes_plain: int = 0
    kv_bytes_plan: int = 0
    host_us: float = 0.0

    def describe(self) -> str:
        """The tree and the cost model's decisions, one line per shared run.

        Returns:
            A multi-line report. Not differentiable (a report).

        Example:
            >>> import torch, splitkv
            >>> bt = torch.tensor([[0, 1, 2], [0, 1, 3]], dtype=torch.int32)
            >>> plan = splitkv.plan_cascade(bt, torch.tensor([40, 40], dtype=torch.int32),
            ...                             torch.tensor([0, 1, 2], dtype=torch.int32), page_size=16,
            ...                             heads_q=4, heads_kv=1, head_dim=64, dtype=torch.float32)
            >>> print(plan.describe().splitlines()[1])
              run pages [0, 2) of sequences (0, 1): not shared (saves 16384 B, states cost 4160 B + 1048576 B)
        """
        lines = [f"cascade plan: {len(self.runs)} shared runs, {sum(r.kept for r in self.runs)} kept, "
                 f"{self.num_states} states per query; KV bytes {self.kv_bytes_plan} (plain {self.kv_bytes_plain})"]
        overhead = _planning.LEVEL_OVERHEAD_BYTES
        for run in self.runs:
            verdict = "shared" if run.kept else "not shared"
            lines.append(f"  run pages [{run.first_page}, {run.end_page}) of sequences {run.members}: {verdict} "
                         f"(saves {run.saved_bytes} B, states cost {run.state_bytes} B + {overhead} B)")
        return "\n".join(lines)


def _find_runs(table: np.ndarray, limits: np.ndarray, candidates) -> list[tuple[tuple[int, ...], int, int]]:
    """The tree of shared runs as ``(members, first_page, end_page)``, parents first:
    sequences that hold the same page id at each position ``< end_page``, each
    sequence's run limited to its first ``limits[i]`` pages. Insensitive to order."""
    # One tree depth at a time, every node of it at once. Per member: the run whose
    # children it may start (-1: the root) and the page position they start at.
    members = np.sort(np.asarray(candidates, dtype=np.int64))
    node = np.full(members.size, -1, dtype=np.int64)
    depth = np.zeros(members.size, dtype=np.int64)
    found, children = [], defaultdict(list)
    while members.size:
        alive = limits[members] > depth
        if not alive.all():
            members, node, depth = members[alive], node[alive], depth[alive]
        if members.size < 2:
            break
        # A child run: the members of one node holding the same page at its depth;
        # children in order of that page id, members ascending. Each node's members
        # are ascending, so a stable sort by (node, page) keeps them so (page ids are
        # int32: node * 2**32 + page orders by node first).
        key = (node << 32) + table[members, depth]
        order = np.argsort(key, kind="stable")
        members, node, depth, key = members[order], node[order], depth[order], key[order]
        # Members whose key a neighbour shares are in a run.
        same_next = key[1:] == key[:-1]
        in_run = np.zeros(members.size, dtype=bool)
        in_run[1:] = same_next
        in_run[:-1] |= same_next
        if not in_run.any():
            break
        if not in_run.all():
            members, node, depth, key = members[in_run], node[in_run], depth[in_run], key[in_run]
        starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
        sizes = np.diff(np.append(starts, members.size))
        offsets = np.cumsum(sizes) - sizes
        run_ids = np.arange(len(found), len(found) + sizes.size)
        # A run ends at the first page where two of its members differ, or at the
        # least limit of its members. A node's members agree on every page before its
        # depth, so one window from this level's least depth serves all its runs; the
        # members of a run are adjacent, so comparing neighbours finds where they differ.
        lo, hi = int(depth.min()), int(limits[members].max())
        window = table[members, lo:hi]
        differ = window[1:] != window[:-1]  # [members - 1, hi - lo]
        first_differ = differ.argmax(axis=1)
        pair_end = np.where(differ[np.arange(differ.shape[0]), first_differ], first_differ + lo, hi)
        # Neighbours from two runs (each run's last member and the next run's first) do not count.
        pair_end[offsets[1:] - 1] = hi
        ends = np.minimum(np.minimum.reduceat(pair_end, offsets), np.minimum.reduceat(limits[members], offsets))
        groups = np.split(members, offsets[1:])
        for run, parent, group, first, end in zip(run_ids.tolist(), node[offsets].tolist(), groups,
                                                  depth[offsets].tolist(), ends.tolist()):  # fmt: skip
            found.append((tuple(group.tolist()), first, end))
            children[parent].append(run)
        node, depth = np.repeat(run_ids, sizes), np.repeat(ends, sizes)
    # Parents first, in the order of a depth-first walk that lists a node's children
    # (by page id) when it reaches the node and then descends from the last of them.
    runs, stack = [], [-1]
    while stack:
        kids = children.get(stack.pop(), [])
        runs += [found[run] for run in kids]
        stack += kids
    return runs


def _live_page_range(table: np.ndarray, pages_used: np.ndarray) -> tuple[int, int]:
    """``(smallest, largest)`` page id among each row's first ``pages_used[i]`` entries
    (``(0, -1)`` for none)."""
    if not table.size:
        return 0, -1
    # Columns every row uses need no mask; only the ragged ends do.
    lo, hi = int(pages_used.min()), int(pages_used.max())
    ragged = np.arange(lo, hi)[None, :] < pages_used[:, None]
    full, ends = table[:, :lo], table[:, lo:hi]
    smallest = min(int(full.min(initial=0)), int(ends.min(where=ragged, initial=0)))
    largest = max(int(full.max(initial=-1)), int(ends.max(where=ragged, initial=-1)))
    return smallest, largest


def _token_ranges(bounds: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The query tokens of sequences ``rows`` in that order: ``bounds[i]`` up to ``bounds[i + 1]`` each."""
    counts = bounds[rows + 1] - bounds[rows]
    shift = bounds[rows] - (np.cumsum(counts) - counts)
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(shift, counts)


class _Items(NamedTuple):
    """A launch's work items, one entry per item in each field (int64 ``[items]``) but
    ``tokens``: every item's query tokens one after the other (``token_count`` each)."""

    block_m: np.ndarray
    row: np.ndarray  # a block-table row of its sequences (the kernel reads its pages)
    token_count: np.ndarray
    key_lo: np.ndarray
    key_hi: np.ndarray  # -1: up to the sequence's end, causally
    base: np.ndarray  # first state slot
    splits: np.ndarray
    pad: np.ndarray  # first state slot it marks empty (_NO_PADDING: none)
    tokens: np.ndarray


def _level_splits(tokens: int, rows_per_token: int, keys: int, heads_kv: int, device: torch.device) -> int:
    return _planning.choose_num_splits(1, heads_kv, tokens * rows_per_token, keys, device)


def _shared_splits(runs: list, last_programs: int, suffix_chunk: int, heads_q: int, heads_kv: int, head_dim: int,
                   element_size: int, device: torch.device, num_splits: int | None) -> list[int]:  # fmt: skip
    """Key chunks of each kept run, ``runs`` as ``(keys, tokens, row_blocks)``, by the rule
    of the packed cascade's prefix (``_planning.shared_level_splits``, swept on an H100):
    the runs share one launch with the sequences' own programs (``last_programs``), so
    together they fill the GPU about twice; ``suffix_chunk`` is an own-level program's keys."""
    if num_splits is not None or device.type != "cuda":
        return [num_splits or 1 for _ in runs]
    sms = _planning.multiprocessors(_planning.device_index(device))
    tiles = sum(row_blocks * heads_kv for _keys, _tokens, row_blocks in runs)
    return [_planning.shared_level_splits(keys, tokens, sms, tiles, last_programs, suffix_chunk, heads_q, heads_kv,
                                          head_dim, element_size) for keys, tokens, _row_blocks in runs]  # fmt: skip


def plan_cascade(
    block_table: torch.Tensor,
    seqused_k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    page_size: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    dtype: torch.dtype,
    max_seqlen_k: int | None = None,
    levels: list | None = None,
    num_splits: int | None = None,
    num_pages: int | None = None,
    share: str = "auto",
    max_programs: int | None = None,
    max_states: int | None = None,
    into: CascadePlan | None = None,
) -> CascadePlan:
    """Find the prefixes that a paged batch shares by page id, and plan a cascade over them.

    Host side, once per step (or once for many replayed steps): reads the tables to
    the host (a device sync when they are on a GPU). A run of leading pages is shared
    by the sequences that hold the same page ids at the same positions (sharers need
    not be adjacent; the batch order does not matter); runs nest as a tree. A run
    ends at the last page that every sharer uses completely and whose keys all of its
    queries see (a prefill chunk whose queries lie inside a run makes that part the
    sequence's own, causal). A run is kept when the KV bytes it saves exceed its
    float32 partial states and a fixed per-level cost; a plan that keeps none is plain
    paged attention (never slower than it).

    Args:
        block_table: int32 ``[batch, max_pages_per_seq]`` (see :mod:`splitkv.paged`).
        seqused_k: int32 ``[batch]``.
        cu_seqlens_q: int32 ``[batch + 1]``.
        page_size: the cache's page size (checked against ``k_cache`` when used).
        heads_q, heads_kv, head_dim, dtype: the attention's shape, for the cost model
            and the launch configuration.
        max_seqlen_k: the longest ``seqused_k`` the plan will be replayed with (sizes
            the split count of the own pages); default the current longest.
        levels: explicit runs instead of the search, ``[(members, first_page,
            end_page), ...]``; all are kept. Each sequence's runs must cover pages
            ``[0, e)`` one after the other; members must share those page ids.
        num_splits: key chunks of every level (default: chosen per level to fill the GPU; 1 on CPU).
        num_pages: pages in the cache, to check the used entries of ``block_table``.
        share: ``"auto"`` keeps the runs the cost model says pay; ``"always"`` keeps
            every run found (for tests and for callers who measured).
        max_programs, max_states: spare capacity (both or neither): the plan's
            launch is sized for ``max_programs`` work items of ``heads_kv`` programs
            and ``max_states`` states per query, whatever tree it holds, and always
            runs as a cascade launch (even when no run is kept), so that
            ``plan_cascade(..., into=plan)`` can later write another tree of the
            same batch into its tensors and a CUDA graph captured with it replays
            that tree.
        into: a plan built with capacity: the new tree is written into its device
            tables in place (same ``block_table``, ``seqused_k`` and
            ``cu_seqlens_q`` tensors, shape and tiles), which is returned. A tree
            that does not fit raises ValueError naming ``into``.

    Returns:
        A :class:`CascadePlan` for :func:`paged_cascade_attention`.

    Not differentiable (host-side planning). Raises ValueError naming the argument
    for ``seqused_k`` beyond a row's pages, page ids out of range (with ``num_pages``),
    bad ``levels``.

    Example:
        >>> import torch, splitkv
        >>> bt = torch.tensor([[0, 1, 2, 3], [0, 1, 4, 5], [6, 7, 8, 9]], dtype=torch.int32)
        >>> plan = splitkv.plan_cascade(bt, torch.tensor([60, 50, 60], dtype=torch.int32),
        ...                             torch.tensor([0, 1, 2, 3], dtype=torch.int32), page_size=16,
        ...                             heads_q=8, heads_kv=2, head_dim=64, dtype=torch.float16)
        >>> [(r.members, r.first_page, r.end_page) for r in plan.runs]
        [((0, 1), 0, 2)]
    """
    import time

    start = time.perf_counter()
    expect_count("page_size", page_size, 1)
    if share not in ("auto", "always"):
        raise ValueError(f"share must be 'auto' or 'always', got {share!r}")
    for name, value in (("heads_q", heads_q), ("heads_kv", heads_kv), ("head_dim", head_dim)):
        expect_count(name, value, 1)
    for name, value in (("max_seqlen_k", max_seqlen_k), ("num_pages", num_pages)):
        if value is not None:
            expect_count(name, value)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be q's: torch.float32, float16 or bfloat16, got {dtype!r}")
    if heads_q % heads_kv:
        raise ValueError(f"heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})")
    expect_tensor("cu_seqlens_q", cu_seqlens_q)
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens_q must be int32 [batch + 1], got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}"
        )
    device = cu_seqlens_q.device
    batch = cu_seqlens_q.shape[0] - 1
    _expect_table(block_table, seqused_k, device, batch)
    bounds = cu_seqlens_q.cpu().numpy().astype(np.int64)
    q_lens = np.diff(bounds)
    if bounds[0] != 0 or (q_lens < 0).any():
        raise ValueError(f"cu_seqlens_q must rise from 0, got {bounds.tolist()}")
    _check_table_values(block_table, seqused_k, page_size, num_pages, max_seqlen_k)
    table = block_table.cpu().numpy()
    used = seqused_k.cpu().numpy().astype(np.int64)
    total_q = int(bounds[-1])
    max_q = int(q_lens.max()) if batch else 0
    max_k = int(used.max()) if batch else 0
    max_seqlen_k = max_k if max_seqlen_k is None else max_seqlen_k
    num_splits = _planning.user_num_splits(num_splits, max_seqlen_k)
    group = heads_q // heads_kv
    limits = _shareable_pages(used, q_lens, page_size)
    with_queries = np.flatnonzero(q_lens > 0)
    element = dtype.itemsize
    kv_token = 2 * heads_kv * head_dim * element
    state_token = heads_q * (head_dim + 1) * 4 * 2  # a float32 state written and read back
    from ._paged_triton import launch_config

    if levels is None:
        found = _find_runs(table, limits, with_queries)
        user_runs = False
    else:
        found = _check_levels(levels, table, limits, batch)
        user_runs = True

    # Top-down decisions: a run that is not kept leaves its pages to its children (or
    # to its sequences' own level), which then start where it started.
    pending = np.zeros(batch, dtype=np.int64)  # first page not yet in a kept run
    offset = np.zeros(batch, dtype=np.int64)  # first state slot free for the sequence
    runs, kept_runs = [], []  # kept_runs: (members array, first key, end key, config, row blocks, tokens)
    # Every run's members one after the other, and each run's query tokens.
    run_sizes = [len(members) for members, _first, _end in found]
    run_offsets = np.cumsum(run_sizes) - run_sizes
    run_members = np.fromiter(itertools.chain.from_iterable(members for members, _first, _end in found),
                              dtype=np.int64, count=sum(run_sizes))  # fmt: skip
    run_tokens = np.add.reduceat(q_lens[run_members], run_offsets).tolist() if found else []
    for (members, _first, end), tokens, run_offset, size in zip(found, run_tokens, run_offsets.tolist(), run_sizes):
        idx = run_members[run_offset: run_offset + size]
        lo = int(pending[idx].max()) if user_runs else int(pending[members[0]])
        keys = (end - lo) * page_size
        config = launch_config(head_dim, dtype, 1 << max(tokens * group - 1, 0).bit_length())
        row_blocks = -(-tokens * group // min(config[1], _planning.ROWS_PER_PROGRAM))
        # Read once per row block instead of once per sharer; each of its key chunks
        # adds a float32 state per token, written and read back by the merge.
        saved = (len(members) - row_blocks) * keys * kv_token
        cost = tokens * state_token * (num_splits or _level_splits(tokens, group, keys, heads_kv, device))
        kept = user_runs or share == "always" or saved > cost + _planning.LEVEL_OVERHEAD_BYTES
        runs.append(SharedRun(tuple(members), lo, end, kept, int(saved), int(cost)))
        if kept and keys > 0:
            kept_runs.append((idx, lo * page_size, end * page_size, config, row_blocks, tokens))
            pending[idx] = end
    own_start = pending.copy()
    suffix_keys = int((max_seqlen_k - own_start[with_queries] * page_size).max()) if with_queries.size else 0
    shared = any(r.kept for r in runs)
    if num_splits is not None:
        last_splits = num_splits
    else:
        last_splits = _planning.choose_num_splits(len(with_queries), heads_kv, max_q * group, max(suffix_keys, 1),
                                                  device)  # fmt: skip
    # One launch: the sequences' own programs take the narrow row tile of their
    # queries; runs with more rows than it the wide tile of the largest run.
    narrow = launch_config(head_dim, dtype, 1 << max(max_q * group - 1, 0).bit_length())
    # The wide tile stops at 64 rows: its shape then keeps the narrow one's 4 warps, the
    # configuration the plain kernel streamed its KV with (benchmarks/NOTES.md).
    wide_m = min(max([run[3][1] for run in kept_runs] + [narrow[1]]), max(narrow[1], _planning.ROWS_PER_PROGRAM))
    tile_of = [wide_m if run[3][1] > narrow[1] else narrow[1] for run in kept_runs]
    run_shapes = [(key_hi - key_lo, tokens, -(-tokens * group // tile))
                  for (_idx, key_lo, key_hi, _c, _rb, tokens), tile in zip(kept_runs, tile_of)]  # fmt: skip
    last_programs = int((-(-q_lens[with_queries] * group // narrow[1])).sum()) * heads_kv * last_splits
    suffix_chunk = _planning.suffix_chunk_keys(suffix_keys, last_splits)
    splits_of = _shared_splits(run_shapes, last_programs, suffix_chunk, heads_q, heads_kv, head_dim, element, device,
                               num_splits)  # fmt: skip
    # Work items: the kept runs, then every sequence's own level (in batch order).
    run_fields = []  # (block_m, row, token count, key_lo, key_hi, base, splits, pad)
    for (idx, key_lo, key_hi, _c, _rb, tokens), splits, tile in zip(kept_runs, splits_of, tile_of):
        base = int(offset[idx].max())
        # No empty states to write: its sequences' own level does that.
        run_fields.append((tile, int(idx[0]), tokens, key_lo, key_hi, base, splits, _NO_PADDING))
        offset[idx] = base + splits
    kept_members = np.concatenate([run[0] for run in kept_runs]) if kept_runs else np.zeros(0, np.int64)
    num_states = (int(offset[with_queries].max()) if with_queries.size else 0) + last_splits
    own_base = offset[with_queries]
    own_fields = np.stack([np.full(with_queries.size, narrow[1]), with_queries, q_lens[with_queries],
                           own_start[with_queries] * page_size, np.full(with_queries.size, DYNAMIC_KEY_HI),
                           own_base, np.full(with_queries.size, last_splits), own_base + last_splits])  # fmt: skip
    fields = np.concatenate([np.array(run_fields, dtype=np.int64).reshape(-1, 8).T, own_fields], axis=1)
    # The own levels' tokens in batch order are all the tokens (a sequence without queries has none).
    items = _Items(*fields, tokens=np.concatenate([_token_ranges(bounds, kept_members),
                                                   np.arange(total_q, dtype=np.int64)]))  # fmt: skip
    # A token whose slots below its own level are not all written (explicit levels of
    # uneven depth) needs the states cleared first.
    needs_fill = user_runs and _has_gaps(items)

    pages_used = -(-used // page_size)
    min_page_id, max_page_id = _live_page_range(table, pages_used)
    if min_page_id < 0:
        # Never a page: the kernel would read before k_cache (the upper bound is checked per call).
        raise ValueError(f"block_table holds page id {min_page_id} where a sequence's keys are")
    kv_plain = int(used[with_queries].sum()) * kv_token
    saved_total = sum((len(r.members) - 1) * (r.end_page - r.first_page) * page_size * kv_token for r in runs if r.kept)
    plan = CascadePlan(
        page_size=page_size, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype,
        block_table=block_table, seqused_k=seqused_k, cu_seqlens_q=cu_seqlens_q, total_q=total_q,
        max_seqlen_q=max_q, max_seqlen_k=max_seqlen_k, runs=runs, own_start_page=own_start.tolist(), shared=shared,
        num_states=num_states, last_splits=last_splits, max_page_id=max_page_id, needs_fill=needs_fill,
        planned_q_bounds=tuple(bounds.tolist()), kv_bytes_plain=kv_plain, kv_bytes_plan=kv_plain - saved_total,
    )  # fmt: skip
    plan.kept_runs_flat = _flat_kept_runs(plan)
    if into is not None:
        plan = _write_into(into, plan, items, group)
    elif max_programs is not None or max_states is not None:
        if max_programs is None or max_states is None:
            raise ValueError("max_programs and max_states are given together (spare capacity), or neither")
        expect_count("max_programs", max_programs, 1)
        expect_count("max_states", max_states, 1)
        # A fixed pair of tiles, so that any later tree fits the same launch.
        wide_m = max(narrow[1], launch_config(head_dim, dtype, _planning.ROWS_PER_PROGRAM)[1])
        items = _retile(items, narrow[1], wide_m, group)
        _launch_into_plan(plan, items, narrow, launch_config(head_dim, dtype, wide_m), heads_kv, group, device,
                          max_programs, max_states)  # fmt: skip
        plan.capacity_programs = max_programs
    elif shared:
        _launch_into_plan(plan, items, narrow, launch_config(head_dim, dtype, wide_m), heads_kv, group, device)
    plan.host_us = (time.perf_counter() - start) * 1e6
    return plan


def _shareable_pages(used: np.ndarray, q_lens: np.ndarray, page_size: int) -> np.ndarray:
    """Per sequence, the leading pages it may share: a page is shareable for sequence i if
    full and every query of i sees all its keys (query 0 sees keys j <= used - q_len); none
    for a sequence without queries."""
    return np.where(q_lens > 0, (used - q_lens + 1) // page_size, 0).clip(0)


def _flat_kept_runs(plan: CascadePlan) -> tuple[int, ...]:
    """The plan's kept runs as one tuple of ints (an op argument): per run ``first_page,
    end_page, number of members, members...``."""
    return tuple(itertools.chain.from_iterable((run.first_page, run.end_page, len(run.members), *run.members)
                                               for run in plan.runs if run.kept))  # fmt: skip


def _expect_plan_holds(block_table: torch.Tensor, seqused_k: torch.Tensor, cu_seqlens_q: torch.Tensor, page_size: int,
                       kept_runs: list[int]) -> None:  # fmt: skip
    """That the tables still have the tree a plan was built for (``kept_runs`` as
    :func:`_flat_kept_runs` gives them): each kept run's page ids the same in all its
    sharers, and each sharer still using all those pages fully and seeing them from its
    first query (the changes plan_cascade's docstring says need a new plan; the Triton
    launch would read the old tree silently)."""
    table = block_table.cpu().numpy()
    used = seqused_k.cpu().numpy().astype(np.int64)
    q_lens = np.diff(cu_seqlens_q.cpu().numpy().astype(np.int64))
    limits = _shareable_pages(used, q_lens, page_size)
    at = 0
    while at < len(kept_runs):
        first_page, end_page, count = kept_runs[at: at + 3]
        members = list(kept_runs[at + 3: at + 3 + count])
        at += 3 + count
        segment = table[members, first_page: end_page]
        if not (segment == segment[0]).all() or (limits[members] < end_page).any():
            raise ValueError(
                f"plan: sequences {tuple(members)} no longer share full, visible pages [{first_page}, "
                f"{end_page}) in block_table / seqused_k; a change of the shared pages or a sequence "
                "shrinking into them needs a new plan (plan_cascade)"
            )


def _retile(items: _Items, narrow_m: int, wide_m: int, group: int) -> _Items:
    """Items with the tile they take in a launch of these two row tiles."""
    return items._replace(block_m=np.where(items.token_count * group <= narrow_m, narrow_m, wide_m))


def _launch_into_plan(plan: CascadePlan, items: list, narrow: tuple, wide: tuple, heads_kv: int, group: int,
                      device: torch.device, max_programs: int | None = None,
                      max_states: int | None = None) -> None:  # fmt: skip
    """Sets the plan's launch: tables, launch configuration and (with capacity) padding."""
    # One launch has one warp count and pipeline depth: enough warps for the wide
    # tile, and the shallower pipeline so both tiles fit in shared memory.
    config = (narrow[0], narrow[1], min(narrow[2], wide[2]), max(narrow[3], wide[3]), min(narrow[4], wide[4]))
    if max_states is not None:
        _fit_states(plan, max_states, "max_states")
    grid, *tables = _build_launch(items, narrow[1], heads_kv, group, device, max_programs)
    plan.launch_tables = tables
    plan.launch_configs = [*config, wide[1], grid]


def _fit_states(plan: CascadePlan, num_states: int, name: str) -> None:
    if plan.num_states > num_states:
        raise ValueError(f"{name}: the tree needs {plan.num_states} states per query, the capacity is {num_states}")
    # The sequences' own items mark every state past theirs empty, up to the capacity.
    plan.num_states = num_states


def _write_into(into: CascadePlan, plan: CascadePlan, items: list, group: int) -> CascadePlan:
    """Writes ``plan``'s launch into ``into``'s tensors (see :func:`plan_cascade`'s ``into``)."""
    if not isinstance(into, CascadePlan) or not into.launch_tables or into.capacity_programs is None:
        raise ValueError("into must be a CascadePlan built with max_programs and max_states")
    for name in ("block_table", "seqused_k", "cu_seqlens_q"):
        if getattr(into, name) is not getattr(plan, name):
            raise ValueError(f"into was planned over another {name} tensor: a captured graph reads that one")
    for name in ("page_size", "heads_q", "heads_kv", "head_dim", "dtype", "total_q"):
        if getattr(into, name) != getattr(plan, name):
            raise ValueError(f"into was planned for {name} = {getattr(into, name)}, got {getattr(plan, name)}")
    narrow_m, wide_m = into.launch_configs[1], into.launch_configs[5]
    items = _retile(items, narrow_m, wide_m, group)
    _fit_states(plan, into.num_states, "into")
    if plan.needs_fill and not into.needs_fill:
        raise ValueError("into: these explicit levels leave states unwritten, which its launch does not clear")
    _grid, *tables = _build_launch(items, narrow_m, into.heads_kv, group, into.block_table.device,
                                   into.capacity_programs)  # fmt: skip
    for old, new in zip(into.launch_tables, tables):
        if new.shape != old.shape:
            raise ValueError(f"into: the tree needs tables of {new.numel()} entries, its capacity is {old.numel()}")
        old.copy_(new)
    for field in dataclasses.fields(CascadePlan):
        if field.name not in ("launch_tables", "launch_configs", "capacity_programs", "num_states", "needs_fill"):
            setattr(into, field.name, getattr(plan, field.name))
    return into


def _has_gaps(items: _Items) -> bool:
    """Whether some token's states below its last written slot are left unwritten."""
    if not items.tokens.size:
        return False
    item_of = np.repeat(np.arange(items.row.size), items.token_count)
    written = np.zeros((int(items.tokens.max(initial=-1)) + 1, int((items.base + items.splits).max(initial=0))), bool)
    for item in range(items.row.size):
        written[items.tokens[item_of == item], items.base[item]: items.base[item] + items.splits[item]] = True
    touched = written.any(axis=1)
    # Written slots of a token must be 0, 1, ..., its highest.
    highest = written.shape[1] - 1 - np.argmax(written[:, ::-1], axis=1)
    return bool((written != (np.arange(written.shape[1])[None, :] <= highest[:, None]))[touched].any())


def _check_levels(levels, table: np.ndarray, limits: np.ndarray, batch: int) -> list:
    """Validates explicit runs; returns them as ``(members, first_page, end_page)`` sorted by first page."""
    checked = []
    for index, level in enumerate(levels):
        try:
            members, first, end = level
            members = tuple(members)
            # Whole numbers only: int() would truncate 0.9 to 0 and take True for 1.
            if any(isinstance(x, (bool, np.bool_)) or int(x) != x for x in (*members, first, end)):
                raise TypeError("not integers")
            members = tuple(sorted(int(m) for m in members))
            first, end = int(first), int(end)
        except (TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"levels[{index}] must be (members, first_page, end_page), got {level!r}") from error
        if not members or any(not 0 <= m < batch for m in members) or len(set(members)) != len(members):
            raise ValueError(
                f"levels[{index}]: members must be distinct sequence indices in [0, {batch}), got {members}"
            )
        if not 0 <= first < end:
            raise ValueError(f"levels[{index}]: need 0 <= first_page < end_page, got [{first}, {end})")
        if any(limits[m] < end for m in members):
            raise ValueError(f"levels[{index}]: pages [{first}, {end}) are not all full and seen by every query of "
                             f"sequences {members}")  # fmt: skip
        segment = table[list(members), first:end]
        if not (segment == segment[0]).all():
            raise ValueError(f"levels[{index}]: sequences {members} do not share page ids on [{first}, {end})")
        checked.append((members, first, end))
    checked.sort(key=lambda run: run[1])
    covered = np.zeros(batch, dtype=np.int64)
    for members, first, end in checked:
        if any(covered[m] != first for m in members):
            raise ValueError(f"levels: the runs of each sequence must follow one another from page 0; "
                             f"[{first}, {end}) of {members} does not")  # fmt: skip
        covered[list(members)] = end
    return checked


def _build_launch(items: _Items, narrow_m: int, heads_kv: int, group: int, device: torch.device,
                  max_programs: int | None = None) -> tuple:  # fmt: skip
    """``(grid, item table, token list, program table)`` of one plan launch. With
    ``max_programs`` the tables are padded to that many programs (and as many items,
    and tokens for full tiles of all of them): padding programs run an item of no
    tokens, which returns at once."""
    counts, num_items, num_tokens = items.token_count, items.row.size, items.tokens.size
    row_blocks = -(-counts * group // items.block_m)
    per_item = items.splits * row_blocks
    num_programs = int(per_item.sum())
    table_rows, program_rows, token_slots = num_items, num_programs, num_tokens
    if max_programs is not None:
        if num_programs > max_programs or num_items >= max_programs:
            raise ValueError(f"max_programs: the tree needs {num_programs} work items (and {num_items + 1} items), "
                             f"the capacity is {max_programs}")  # fmt: skip
        table_rows = program_rows = max_programs
        token_slots = max(num_tokens, max_programs * max(narrow_m, 64))
    # One host buffer (int32) and one copy to the device; each table starts 16-byte
    # aligned and holds at least one entry.
    sizes = [max(1, ITEM_FIELDS * table_rows), max(1, token_slots), max(1, 3 * program_rows)]
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // 4) * 4)
    buffer = np.zeros(starts[-1], dtype=np.int32)
    # Item table [items, ITEM_FIELDS]: row, first token, token count, key_lo, key_hi, base, splits, pad, wide.
    table = buffer[: ITEM_FIELDS * table_rows].reshape(table_rows, ITEM_FIELDS)
    for column, values in enumerate((items.row, np.cumsum(counts) - counts, counts, items.key_lo, items.key_hi,
                                     items.base, items.splits, items.pad, items.block_m != narrow_m)):  # fmt: skip
        table[:num_items, column] = values
    # Padding items have no tokens and write no state.
    table[num_items:, 6] = 1
    table[num_items:, 7] = _NO_PADDING
    buffer[starts[1]: starts[1] + num_tokens] = items.tokens
    # Program table [programs, 3]: item, row block, split; row blocks innermost, so that
    # those reading the same key chunk run side by side. Padding programs run the first
    # padding item.
    programs = buffer[starts[2]: starts[2] + 3 * program_rows].reshape(program_rows, 3)
    local = np.arange(num_programs) - np.repeat(np.cumsum(per_item) - per_item, per_item)
    item_blocks = np.repeat(row_blocks, per_item)
    programs[:num_programs, 0] = np.repeat(np.arange(num_items), per_item)
    programs[:num_programs, 1] = local % np.maximum(item_blocks, 1)
    programs[:num_programs, 2] = local // np.maximum(item_blocks, 1)
    programs[num_programs:, 0] = num_items
    uploaded = torch.from_numpy(buffer).to(device)
    views = [uploaded[begin: begin + size] for begin, size in zip(starts, sizes)]
    return program_rows * heads_kv, *views


def _paged_cascade_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      seqused_k: torch.Tensor, cu_seqlens_q: torch.Tensor, tables: list[torch.Tensor],
                      configs: list[int], num_states: int, needs_fill: bool,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    states, lses = plan_state_buffers(q, num_states, needs_fill)
    for launch in range(len(tables) // 3):
        run_plan_launch(launch, q, k_cache, v_cache, states, lses, block_table, seqused_k, cu_seqlens_q, tables,
                        configs, softmax_scale)  # fmt: skip
    return merge_states(states, lses, output_dtype=q.dtype)


def plan_state_buffers(q: torch.Tensor, num_states: int, needs_fill: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A plan's float32 partial states ``[num_states, total_q, heads_q, head_dim]`` and their
    lses ``[num_states, heads_q, total_q]``, the lses -inf where some state is written by no
    program (``needs_fill``)."""
    total_q, heads_q, head_dim = q.shape
    states = torch.empty((num_states, total_q, heads_q, head_dim), dtype=torch.float32, device=q.device)
    lse_shape = (num_states, heads_q, total_q)
    if needs_fill:
        return states, torch.full(lse_shape, -math.inf, dtype=torch.float32, device=q.device)
    return states, torch.empty(lse_shape, dtype=torch.float32, device=q.device)


def plan_launch_shape(configs: list[int], launch: int) -> tuple[tuple[int, ...], int, int]:
    """Launch ``launch``'s tile config, wide row tile and grid, from a plan's ``launch_configs``."""
    config = tuple(configs[7 * launch: 7 * launch + 5])
    wide_block_m, grid = configs[7 * launch + 5: 7 * launch + 7]
    return config, wide_block_m, grid


def run_plan_launch(launch: int, q, k_cache, v_cache, states, lses, block_table, seqused_k, cu_seqlens_q,
                    tables: list[torch.Tensor], configs: list[int], softmax_scale: float) -> None:  # fmt: skip
    """Runs launch ``launch`` of a plan (its tables and configs) into ``states`` / ``lses``."""
    from ._paged_triton import launch_paged

    config, wide_block_m, grid = plan_launch_shape(configs, launch)
    items, tokens, programs = tables[3 * launch: 3 * launch + 3]
    launch_paged(q, k_cache, v_cache, states, lses, block_table, seqused_k, cu_seqlens_q, True, softmax_scale,
                 config, grid, items=items, item_tokens=tokens, programs=programs,
                 wide_block_m=wide_block_m)  # fmt: skip


_paged_cascade_op = torch.library.custom_op("splitkv_paged::paged_cascade_attention", _paged_cascade_impl,
                                            mutates_args=())  # fmt: skip
_paged_cascade_op.register_fake(_fake_result)


def paged_cascade_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: CascadePlan,
    *,
    softmax_scale: float | None = None,
    return_lse: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal paged attention that reads each shared run of pages once for all its sharers.

    Equals ``paged_attention_with_lse(q, k_cache, v_cache, plan.block_table,
    plan.seqused_k, plan.cu_seqlens_q, ..., causal=True)`` up to rounding: every kept
    run's queries attend to it without mask (the plan guarantees they see all of it),
    each sequence's own pages causally, and one :func:`splitkv.merge_states` combines
    the float32 states of all levels. A plan without a kept run is exactly that plain
    call. Call it for every layer with the same plan.

    Args:
        q: ``[total_q, heads_q, head_dim]``, the plan's dtype, heads and head_dim.
        k_cache, v_cache: ``[num_pages, plan.page_size, heads_kv, head_dim]`` (see
            :func:`paged_attention_with_lse`).
        plan: from :func:`plan_cascade` for this batch.
        softmax_scale: multiplier of ``q @ k^T``; default ``head_dim ** -0.5``.
        return_lse: return the merged LSE (else ``None`` in its place).
        backend: ``"auto"`` (the Triton cascade where Triton runs on CUDA tensors, else
            the reference over whole block tables), ``"triton"`` or ``"reference"``.

    Returns:
        ``(out [total_q, heads_q, head_dim] in q's dtype, lse [heads_q, total_q] float32 or None)``.

    Differentiable only on the reference backend (``auto`` takes it when a gradient is
    required); the Triton path is a torch custom op (compiles with ``torch.compile``,
    captures in CUDA graphs) without a backward. Triton takes ``head_dim <= 256``.

    Example:
        >>> import torch, splitkv
        >>> k_cache, v_cache = torch.randn(2, 12, 16, 2, 64).unbind(0)
        >>> bt = torch.tensor([[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 6, 7]], dtype=torch.int32)
        >>> used = torch.tensor([60, 50, 40], dtype=torch.int32)
        >>> cu_q = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
        >>> plan = splitkv.plan_cascade(bt, used, cu_q, page_size=16, heads_q=8, heads_kv=2, head_dim=64,
        ...                             dtype=torch.float32, levels=[((0, 1, 2), 0, 2)])
        >>> q = torch.randn(3, 8, 64)
        >>> out, lse = splitkv.paged_cascade_attention(q, k_cache, v_cache, plan, backend="reference")
        >>> out.shape
        torch.Size([3, 8, 64])
    """
    if not isinstance(plan, CascadePlan):
        raise TypeError(f"plan must be a CascadePlan from splitkv.plan_cascade, got {type(plan).__name__}")
    expect_rank("q", q, 3, "[total_q, heads_q, head_dim]")
    expect_rank("k_cache", k_cache, 4, "[num_pages, page_size, heads_kv, head_dim]")
    if k_cache.shape[1] != plan.page_size:
        raise ValueError(f"page_size: k_cache's pages hold {k_cache.shape[1]} slots, the plan was made for "
                         f"page_size={plan.page_size}")  # fmt: skip
    shape = (plan.total_q, plan.heads_q, plan.head_dim)
    if tuple(q.shape) != shape or q.dtype != plan.dtype:
        raise ValueError(f"q must be {shape} {plan.dtype} as planned, got {tuple(q.shape)} {q.dtype}")
    if k_cache.shape[2] != plan.heads_kv:
        raise ValueError(f"k_cache must have the planned heads_kv = {plan.heads_kv}, got {k_cache.shape[2]}")
    if plan.max_page_id >= k_cache.shape[0]:
        raise ValueError(f"block_table holds page id {plan.max_page_id}, past k_cache's {k_cache.shape[0]} pages")
    # The tables' values, and that the plan's tree still holds, are checked where on the
    # host (no sync).
    scale, seqused_k = check_paged_inputs(q, k_cache, v_cache, plan.block_table, plan.seqused_k, plan.cu_seqlens_q,
                                          plan.max_seqlen_q, plan.max_seqlen_k, softmax_scale,
                                          kept_runs=plan.kept_runs_flat,
                                          planned_q_bounds=plan.planned_q_bounds if plan.launch_tables else None)  # fmt: skip
    return_lse = expect_bool("return_lse", return_lse)
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be one of ('auto', 'triton', 'reference'), got {backend!r}")
    triton_backend = PAGED_BACKENDS["triton"]
    triton_args = (q, k_cache, v_cache, True, plan.block_table.shape[0], plan.max_seqlen_q)
    if backend == "auto":
        backend = "triton" if triton_backend.auto_reason(*triton_args) is None else "reference"
    elif backend == "triton":
        reason = triton_backend.why_not(*triton_args)
        if reason is not None:
            raise ValueError(f"paged_cascade_attention: backend='triton' cannot run these inputs: {reason}")
        _expect_no_gradient_for_triton("paged_cascade_attention", q, k_cache, v_cache)
    if backend == "reference" or not plan.launch_tables or plan.total_q == 0:
        out, lse = paged_attention_with_lse(
            q, k_cache, v_cache, plan.block_table, seqused_k, plan.cu_seqlens_q, plan.max_seqlen_q,
            plan.max_seqlen_k, causal=True, softmax_scale=scale, num_splits=plan.last_splits, backend=backend,
        )  # fmt: skip
    else:
        run = _paged_cascade_op if torch.compiler.is_compiling() else _paged_cascade_impl
        out, lse = run(q, k_cache, v_cache, plan.block_table, seqused_k, plan.cu_seqlens_q, plan.launch_tables,
                       plan.launch_configs, plan.num_states, plan.needs_fill, scale)  # fmt: skip
    return out, (lse if return_lse else None)
