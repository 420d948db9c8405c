"""Byte-level collectives: all-gathers that move raw bytes (no backend has to support the dtype)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)


# Backends on which the single-tensor all-gather raised "unsupported" once; they
# take the list form from then on. (gloo only gained the single-tensor form in
# recent PyTorch releases; NCCL always had it.)
_NO_SINGLE_TENSOR_GATHER: set = set()


def _all_gather_bytes(flat: torch.Tensor, group, world: int) -> torch.Tensor:
    """All-gathers a 1-D uint8 tensor of the same length on every rank into ``[world, n]``.

    Moving bytes rather than typed elements means no backend has to support the
    dtype (gloo's bfloat16 support varies by version) and several tensors of
    different dtypes can travel in one collective.
    """
    out = flat.new_empty(world * flat.numel())
    # all_gather_single is the newer name of all_gather_into_tensor (which warns on torch >= 2.13).
    gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
    backend = str(dist.get_backend(group))
    if gather_single is not None and backend not in _NO_SINGLE_TENSOR_GATHER:
        try:
            gather_single(out, flat, group=group)
            return out.view(world, -1)
        except (RuntimeError, NotImplementedError) as error:
            # An unsupported op is refused locally, before anything is sent, on
            # every rank alike, so falling back to the list form is safe. A backend
            # error (a timeout, a peer gone, a size mismatch) is not that refusal: it
            # is raised as it is, and the next call tries the single-tensor form again.
            if backend == "nccl" or isinstance(error, dist.DistBackendError):
                raise
            _NO_SINGLE_TENSOR_GATHER.add(backend)
    rows = out.view(world, -1)
    dist.all_gather(list(rows.unbind(0)), flat, group=group)
    return rows


def _all_gather_tensor(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """``[world, *t.shape]`` in ``t``'s dtype, rank order (the same shape on every rank)."""
    got = _all_gather_bytes(t.contiguous().view(-1).view(torch.uint8), group, world)
    return got.view(t.dtype).view((world,) + tuple(t.shape))


def _gather_lengths(cu_seqlens: torch.Tensor, group, world: int) -> list[list[int]]:
    """Every rank's per-sequence token counts, ``[world][batch]`` on the host (one device sync)."""
    lengths = _lengths(cu_seqlens)
    if world == 1:
        return [lengths.tolist()]
    if lengths.numel() == 0:  # an empty batch (the same on every rank): nothing to exchange
        return [[] for _ in range(world)]
    return _all_gather_tensor(lengths, group, world).tolist()
