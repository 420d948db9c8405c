"""Sharding layouts of a context-parallel prefill: which tokens of each sequence a rank
holds (contiguous or zig-zag), and moving tensors into and out of them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .._checks import expect_count, expect_rank, expect_tensor
from .checks import _expect_choice, _expect_rank_of

#: Values of ``layout`` in :func:`context_parallel_prefill` and the shard helpers.
LAYOUTS = ("zigzag", "contiguous")


def _expect_cu_seqlens(name: str, cu_seqlens) -> list[int]:
    expect_rank(name, cu_seqlens, 1, "[batch + 1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must be an int32 or int64 [batch + 1] tensor, got {cu_seqlens.dtype} "
                         f"of shape {tuple(cu_seqlens.shape)}")  # fmt: skip
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"{name} must rise from 0, got {bounds}")
    return bounds


def _chunks(length: int, parts: int) -> list[int]:
    """Boundaries of ``parts`` near-equal chunks of ``length`` tokens (sizes differ by at most 1)."""
    return [(c * length) // parts for c in range(parts + 1)]


def _pieces(length: int, rank: int, world: int, layout: str) -> list[tuple[int, int]]:
    """``(start, size)`` of the pieces of a ``length``-token sequence that ``rank`` holds, in shard order."""
    if layout == "contiguous":
        bounds = _chunks(length, world)
        return [(bounds[rank], bounds[rank + 1] - bounds[rank])]
    bounds = _chunks(length, 2 * world)
    late = 2 * world - 1 - rank
    return [(bounds[rank], bounds[rank + 1] - bounds[rank]), (bounds[late], bounds[late + 1] - bounds[late])]


def shard_indices(cu_seqlens: torch.Tensor, rank: int, world_size: int, *, layout: str = "zigzag"):
    """Which tokens of a packed batch ``rank`` holds: ``(index, cu_seqlens_shard)``.

    Every sequence (``L`` tokens) is cut into near-equal chunks, chunk ``c`` being
    tokens ``[c*L // n, (c+1)*L // n)``:

    * ``"zigzag"``: ``n = 2R`` chunks; rank ``r`` holds chunks ``r`` and
      ``2R-1-r``, in that order. Under a causal mask early chunks are cheap and late
      ones dear, so pairing them gives every rank the same work (ring attention's
      load-balanced layout);
    * ``"contiguous"``: ``n = R`` chunks; rank ``r`` holds chunk ``r``.

    Args:
        cu_seqlens: int32 or int64 ``[batch + 1]`` cumulative lengths of the whole
            batch (rising from 0), on any device.
        rank: which shard, ``0 <= rank < world_size``.
        world_size: how many shards (``R >= 1``).
        layout: ``"zigzag"`` or ``"contiguous"``.

    Returns:
        ``index``: int64 ``[total_shard]`` positions in the packed batch of the
        tokens of this rank's shard, sequence by sequence (on ``cu_seqlens``'s
        device); ``cu_seqlens_shard``: int32 ``[batch + 1]`` of the shard.
        Reads ``cu_seqlens`` on the host (a device sync for a CUDA tensor).

    Not differentiable: it returns integer indices. Needs no process group.

    Example:
        >>> import torch, splitkv
        >>> cu = torch.tensor([0, 8, 12], dtype=torch.int32)  # sequences of 8 and 4 tokens
        >>> index, cu_shard = splitkv.distributed.shard_indices(cu, 0, 2)
        >>> index, cu_shard
        (tensor([ 0,  1,  6,  7,  8, 11]), tensor([0, 4, 6], dtype=torch.int32))
        >>> splitkv.distributed.shard_indices(cu, 0, 2, layout="contiguous")[0]
        tensor([0, 1, 2, 3, 8, 9])
    """
    bounds = _expect_cu_seqlens("cu_seqlens", cu_seqlens)
    rank, world_size = _expect_rank_of(rank, world_size)
    _expect_choice("layout", layout, LAYOUTS)
    parts, lengths = [], [0]
    for start, end in itertools.pairwise(bounds):
        pieces = _pieces(end - start, rank, world_size, layout)
        parts.extend(torch.arange(start + a, start + a + n) for a, n in pieces)
        lengths.append(sum(n for _, n in pieces))
    index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    cu_shard = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return index.to(cu_seqlens.device), cu_shard.to(cu_seqlens.device)


def _expect_tokens(name: str, x, dim: int, total: int) -> int:
    expect_tensor(name, x)
    dim = expect_count("dim", dim, -x.dim())
    if dim >= x.dim():
        raise ValueError(f"dim = {dim} is out of range for {name} of {x.dim()} dims")
    dim %= x.dim()
    if x.shape[dim] != total:
        raise ValueError(f"{name} must have {total} tokens (cu_seqlens[-1]) along dim {dim}, got shape "
                         f"{tuple(x.shape)}")  # fmt: skip
    return dim


def shard_sequences(x: torch.Tensor, cu_seqlens: torch.Tensor, rank: int, world_size: int, *,
                    layout: str = "zigzag", dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """This rank's shard of a packed batch: ``(x_shard, cu_seqlens_shard)``.

    Args:
        x: any tensor with the packed tokens along ``dim`` (``[tokens, heads,
            head_dim]`` q/k/v with ``dim=0``; an LSE ``[heads, tokens]`` with ``dim=1``).
        cu_seqlens: ``[batch + 1]`` int32/int64 cumulative lengths of the whole batch.
        rank, world_size: which of how many shards (``0 <= rank < world_size``).
        layout: ``"zigzag"`` or ``"contiguous"``, see :func:`shard_indices`.
        dim: the dimension of ``x`` that holds the tokens (negative counts from the end).

    Returns:
        ``(x_shard, cu_seqlens_shard)``: ``x``'s tokens of this rank along ``dim``
        (a copy, in :func:`shard_indices` order), and int32 ``[batch + 1]`` lengths
        of the shard, the ``cu_seqlens_shard`` of :func:`context_parallel_prefill`.

    Differentiable with respect to ``x`` (an ``index_select``). Needs no process
    group: every rank can cut its own shard from the whole batch.

    Example:
        >>> import torch, splitkv
        >>> cu = torch.tensor([0, 8, 12], dtype=torch.int32)
        >>> x = torch.arange(12).view(12, 1)                  # [tokens, 1]
        >>> x_shard, cu_shard = splitkv.shard_sequences(x, cu, 1, 2)
        >>> x_shard.flatten(), cu_shard
        (tensor([ 2,  3,  4,  5,  9, 10]), tensor([0, 4, 6], dtype=torch.int32))
    """
    bounds = _expect_cu_seqlens("cu_seqlens", cu_seqlens)
    dim = _expect_tokens("x", x, dim, bounds[-1])
    index, cu_shard = shard_indices(cu_seqlens, rank, world_size, layout=layout)
    return x.index_select(dim, index.to(x.device)), cu_shard


def unshard_sequences(shards: Sequence[torch.Tensor], cu_seqlens: torch.Tensor, *, layout: str = "zigzag",
                      dim: int = 0) -> torch.Tensor:  # fmt: skip
    """Reassembles the packed batch from every rank's shard (the inverse of :func:`shard_sequences`).

    Args:
        shards: the ``world_size`` shards in rank order (e.g. gathered with
            ``torch.distributed.all_gather_object`` or from each process's output).
        cu_seqlens: ``[batch + 1]`` cumulative lengths of the whole batch.
        layout, dim: as in :func:`shard_sequences`.

    Returns:
        The whole packed batch, ``cu_seqlens[-1]`` tokens along ``dim``, other
        dimensions, dtype and device those of ``shards[0]``.

    Differentiable with respect to the shards (an ``index_copy_`` of their
    concatenation). Needs no process group.

    Example:
        >>> import torch, splitkv
        >>> cu = torch.tensor([0, 8, 12], dtype=torch.int32)
        >>> x = torch.randn(12, 2, 4)                         # [tokens, heads, head_dim]
        >>> shards = [splitkv.shard_sequences(x, cu, rank, 2)[0] for rank in range(2)]
        >>> torch.equal(splitkv.unshard_sequences(shards, cu), x)
        True
        >>> lse = torch.randn(2, 12)                          # [heads, tokens]: tokens on dim 1
        >>> parts = [splitkv.shard_sequences(lse, cu, rank, 2, dim=1)[0] for rank in range(2)]
        >>> torch.equal(splitkv.unshard_sequences(parts, cu, dim=1), lse)
        True
    """
    if isinstance(shards, torch.Tensor) or not isinstance(shards, (list, tuple)) or not shards:
        raise TypeError("shards must be a non-empty list or tuple of tensors, one per rank")
    bounds = _expect_cu_seqlens("cu_seqlens", cu_seqlens)
    world = len(shards)
    indices = []
    for r, shard in enumerate(shards):
        index, _ = shard_indices(cu_seqlens, r, world, layout=layout)
        d = _expect_tokens(f"shards[{r}]", shard, dim, index.numel())
        indices.append(index)
    first = shards[0]
    shape = list(first.shape)
    shape[d] = bounds[-1]
    full = first.new_empty(shape)
    index = torch.cat(indices).to(first.device)
    return full.index_copy_(d, index, torch.cat(list(shards), dim=d))
