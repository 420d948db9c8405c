"""Argument checks shared by the context-parallel functions (errors name the caller's arguments)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .._checks import expect_count
from ..attention import check_attention_inputs


def _renamed_check(names: dict, *args) -> float:
    """``check_attention_inputs`` with its messages naming *our* arguments.

    The shared checker speaks of ``q``, ``k``, ``cu_seqlens_k``...; the functions
    here take ``k_shard``, ``cu_seqlens_k_shard``..., and an error must name the
    argument the caller actually passed.
    """
    try:
        return check_attention_inputs(*args)
    except (TypeError, ValueError) as error:
        pattern = r"\b(" + "|".join(re.escape(n) for n in names) + r")\b"
        message = re.sub(pattern, lambda m: names[m.group(1)], str(error))
        raise type(error)(message) from None


def _expect_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def _expect_rank_of(rank, world_size) -> tuple[int, int]:
    """``(rank, world_size)`` as ints, ``0 <= rank < world_size``."""
    world_size = expect_count("world_size", world_size, 1)
    rank = expect_count("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank}")
    return rank, world_size


def _expect_forward_only(name: str, **tensors) -> None:
    """The collectives move raw bytes, so no gradient could flow back through them: a
    tensor that requires one is refused instead of being silently detached."""
    if torch.is_grad_enabled():
        wants = [arg for arg, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
        if wants:
            raise ValueError(f"{name} is not differentiable, but {', '.join(wants)} requires grad: call it under "
                             "torch.no_grad() or pass detached tensors")  # fmt: skip


def _resolve_group(group) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group`` (the default group for None), rank within the group."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group() first")
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns on the ranks outside it
        raise ValueError("group: this process is not a member of the given process group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return dist.get_world_size(group), rank
