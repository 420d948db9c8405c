"""Partial attention that returns its LSE: the producer of the states the merge combines.

Layout and conventions (flash-attn's varlen ones):

* ``q [total_q, heads_q, head_dim]``, ``k, v [total_k, heads_kv, head_dim]``:
  sequences packed along the token axis, delimited by int32 ``cu_seqlens_q`` /
  ``cu_seqlens_k`` of ``[batch + 1]`` cumulative lengths; GQA/MQA when
  ``heads_q`` is a multiple of ``heads_kv`` (query head ``h`` reads KV head
  ``h // (heads_q // heads_kv)``);
* ``causal`` is aligned bottom-right: in a sequence of ``Lq`` queries and ``Lk``
  keys, query ``i`` sees key ``j`` iff ``j <= i + Lk - Lq`` (the queries are the
  last ``Lq`` positions; note that ``F.scaled_dot_product_attention(is_causal=True)``
  aligns top-left instead);
* results: ``out [total_q, heads_q, head_dim]`` in q's dtype and ``lse [heads_q,
  total_q]`` float32, natural log: exactly what :func:`splitkv.merge_attn_states`
  takes. A query row that sees no key gets output 0 and LSE ``-inf`` (flash
  kernels report ``+inf`` there; it is normalised).

The values in ``cu_seqlens_*`` are checked when they are on the CPU; on a GPU that
would cost a device sync per call, so there they are trusted, as flash-attn does.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import math

import torch

from . import _cuda
from ._attention_reference import reference_attention_with_lse
from ._checks import expect_contiguous_last, expect_float_dtype, expect_like, expect_rank, expect_tensor
from ._registry import Backend, BackendRegistry
from ._triton_support import TRITON_IMPORT_ERROR, interpreter_enabled

__all__ = ["ATTENTION_BACKENDS", "attention_with_lse", "explain_attention"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None
_TRITON_MAX_HEAD_DIM = 256
_TORCH_HAS_FLASH = hasattr(torch.ops.aten, "_flash_attention_forward")


@functools.cache
def _varlen_api():
    """``(varlen_attn, AuxRequest, its parameter names)``, or ``(None, None, frozenset())`` on a torch
    older than the public varlen API. Imported on first use: the module imports torch._dynamo (2 s)."""
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn
    except ImportError:
        return None, None, frozenset()
    return varlen_attn, AuxRequest, frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    # Cached: torch's query costs microseconds, a visible share of a decode step's host time.
    return torch.cuda.get_device_capability(device_index)


def _flash_why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Limits shared by flash-attn 2 and the copy of it bundled with PyTorch."""
    if not q.is_cuda:
        return f"tensors are on {q.device.type}, flash attention needs CUDA tensors"
    if q.dtype not in _HALF_DTYPES:
        return f"flash attention takes float16/bfloat16, got {q.dtype}"
    head_dim = q.shape[-1]
    if head_dim > 256 or head_dim % 8 != 0:
        return f"flash attention needs head_dim a multiple of 8 and <= 256, got {head_dim}"
    # Its kernels load rows 16 bytes at a time and fault on a misaligned view.
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.data_ptr() % 16 or t.stride(0) % 8 or t.stride(1) % 8:
            return f"flash attention needs 16-byte aligned rows; {name} starts or strides off that"
    if _capability(q.device.index) < (8, 0):
        return "flash attention needs compute capability 8.0 or newer"
    return None


def _flash_attn_why_not(q, k, v, causal, seqused_k) -> str | None:
    if not _FLASH_ATTN_INSTALLED:
        return "the flash-attn package is not installed (pip install 'splitkv[flash]')"
    if seqused_k is not None:
        return "flash-attn 2's flash_attn_varlen_func takes no seqused_k"
    return _flash_why_not(q, k, v)


def _torch_flash_why_not(q, k, v, causal, seqused_k) -> str | None:
    if not _TORCH_HAS_FLASH:
        return f"torch {torch.__version__} has no bundled varlen flash attention"
    return _flash_why_not(q, k, v)


def _triton_why_not(q, k, v, causal, seqused_k) -> str | None:
    if TRITON_IMPORT_ERROR:
        return f"triton is not importable ({TRITON_IMPORT_ERROR})"
    if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
        return f"the Triton kernel takes head_dim <= {_TRITON_MAX_HEAD_DIM}, got {q.shape[-1]}"
    if q.is_cuda or (q.device.type == "cpu" and interpreter_enabled()):
        return None
    return f"tensors are on {q.device.type}; Triton runs CUDA tensors (CPU ones under TRITON_INTERPRET=1)"


def _triton_why_not_auto(q, k, v, causal, seqused_k) -> str | None:
    return None if q.is_cuda else "auto runs Triton only on CUDA tensors (the interpreter is for tests)"


def _no_reason(q, k, v, causal, seqused_k) -> str | None:
    return None


def _empty_rows_to_neg_inf(lse: torch.Tensor) -> torch.Tensor:
    # One elementwise kernel (a NaN stays NaN): the fix-up is a visible share of a
    # decode step's host time.
    return lse.nan_to_num_(nan=math.nan, posinf=-math.inf, neginf=-math.inf)


def _unpad_lse(lse: torch.Tensor, cu_seqlens_q: torch.Tensor, total_q: int) -> torch.Tensor:
    """flash-attn < 2.6 returns LSE padded as [batch, heads, max_seqlen_q]; make it [heads, total_q]."""
    tokens = torch.arange(total_q, device=lse.device, dtype=torch.int32)
    batch = torch.searchsorted(cu_seqlens_q[1:], tokens, right=True)
    return lse[batch, :, tokens - cu_seqlens_q[batch]].t().contiguous()


def _run_flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                    seqused_k):  # fmt: skip
    from flash_attn import flash_attn_varlen_func

    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale=softmax_scale, causal=causal, return_attn_probs=True,
    )  # fmt: skip
    if lse.dim() == 3:
        lse = _unpad_lse(lse, cu_seqlens_q, q.shape[0])
    return out, lse


def _varlen_attn_kwargs(heads_q: int, heads_kv: int, causal: bool, softmax_scale: float, seqused_k) -> dict | None:
    """Keyword arguments for this torch's ``varlen_attn``, or None if it cannot express the call."""
    varlen_attn, AuxRequest, _VARLEN_PARAMS = _varlen_api()  # noqa: N806 (the names they had at module level)
    if varlen_attn is None or not {"return_aux", "scale"} <= _VARLEN_PARAMS:
        return None
    kwargs = {"return_aux": AuxRequest(lse=True), "scale": softmax_scale}
    if seqused_k is not None:
        if "seqused_k" not in _VARLEN_PARAMS:
            return None
        kwargs["seqused_k"] = seqused_k
    if heads_q != heads_kv:
        if "enable_gqa" not in _VARLEN_PARAMS:
            return None
        kwargs["enable_gqa"] = True
    if causal:
        if "window_size" in _VARLEN_PARAMS:
            kwargs["window_size"] = (-1, 0)  # flash's bottom-right causal mask
        elif "is_causal" in _VARLEN_PARAMS:
            kwargs["is_causal"] = True
        else:
            return None
    return kwargs


def _run_torch_flash(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                     seqused_k):  # fmt: skip
    kwargs = _varlen_attn_kwargs(q.shape[1], k.shape[1], causal, softmax_scale, seqused_k)
    if kwargs is not None:
        out, lse = _varlen_api()[0](q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)
    else:
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, causal, False,
            scale=softmax_scale, seqused_k=seqused_k,
        )  # fmt: skip
    return out, lse


def _run_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                seqused_k):  # fmt: skip
    from ._attention_triton import triton_attention_with_lse

    return triton_attention_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                     softmax_scale, seqused_k=seqused_k)  # fmt: skip


# Backends whose kernels give a row that saw no key LSE +inf (flash-attn's convention).
_POS_INF_EMPTY_ROWS = frozenset(("flash_attn", "torch"))

#: The partial-attention backends in order of preference.
ATTENTION_BACKENDS = BackendRegistry(
    "attention_with_lse",
    [
        Backend("flash_attn", _run_flash_attn, _flash_attn_why_not),
        Backend("torch", _run_torch_flash, _torch_flash_why_not),
        Backend("triton", _run_triton, _triton_why_not, _triton_why_not_auto),
        Backend("reference", reference_attention_with_lse, _no_reason),
    ],
)


def _expect_seqlens(name: str, cu_seqlens, device: torch.device, total: int, max_seqlen: int, max_name: str,
                    check_max: bool = True):  # fmt: skip
    expect_tensor(name, cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must be [batch + 1] (1 dim, at least one entry), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if cu_seqlens.is_cpu:
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in itertools.pairwise(bounds)]
        if bounds[0] != 0 or bounds[-1] != total or any(n < 0 for n in lengths):
            raise ValueError(f"{name} must rise from 0 to {total} (the packed token count), got {bounds}")
        if check_max and lengths and max(lengths) > max_seqlen:
            raise ValueError(f"{max_name} = {max_seqlen} is below the longest sequence ({max(lengths)})")


def _expect_seqused_k(seqused_k, cu_seqlens_k: torch.Tensor, max_seqlen_k: int) -> None:
    expect_tensor("seqused_k", seqused_k)
    batch = cu_seqlens_k.shape[0] - 1
    if tuple(seqused_k.shape) != (batch,):
        raise ValueError(f"seqused_k must be [batch] = [{batch}], got shape {tuple(seqused_k.shape)}")
    if seqused_k.dtype != torch.int32:
        raise TypeError(f"seqused_k must have dtype torch.int32, got {seqused_k.dtype}")
    if seqused_k.device != cu_seqlens_k.device:
        raise ValueError(f"seqused_k must be on {cu_seqlens_k.device} like cu_seqlens_k, got {seqused_k.device}")
    if seqused_k.is_cpu:
        used = seqused_k.tolist()
        room = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        if any(not 0 <= u <= r for u, r in zip(used, room)):
            raise ValueError(f"seqused_k must lie in [0, cu_seqlens_k[i + 1] - cu_seqlens_k[i]] = {room}, got {used}")
        if used and max(used) > max_seqlen_k:
            raise ValueError(f"max_seqlen_k = {max_seqlen_k} is below the longest used sequence ({max(used)})")


def check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                           seqused_k=None, prefix_k=None, prefix_v=None) -> float:  # fmt: skip
    """Validates the varlen attention arguments (and, when given, cascade's shared prefix
    KV ``prefix_k``, ``prefix_v [prefix_len, heads_kv, head_dim]``); returns the softmax
    scale to use. Once the CUDA extension is loaded, one C++ call (``attention_inputs_ok``
    in csrc/ops.cu) runs the same checks on CUDA inputs for a fraction of their Python
    host time; where it is not sure, these checks run and name the argument."""
    eager = _cuda.eager_ops
    if (eager is None or seqused_k is not None
            or not eager.attention_inputs_ok(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             softmax_scale, prefix_k, prefix_v)):  # fmt: skip
        _check_in_python(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, seqused_k,
                         prefix_k, prefix_v)  # fmt: skip
    return q.shape[2] ** -0.5 if softmax_scale is None else float(softmax_scale)


def _check_in_python(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, seqused_k,
                     prefix_k, prefix_v) -> None:  # fmt: skip
    expect_rank("q", q, 3, "[total_q, heads_q, head_dim]")
    expect_float_dtype("q", q)
    expect_contiguous_last("q", q)
    expect_rank("k", k, 3, "[total_k, heads_kv, head_dim]")
    total_k, heads_kv, head_dim = k.shape
    if head_dim != q.shape[2]:
        raise ValueError(f"k must have q's head_dim {q.shape[2]}, got shape {tuple(k.shape)}")
    if heads_kv == 0 or q.shape[1] % heads_kv != 0:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of k's heads ({heads_kv})")
    dtype, device = q.dtype, q.device
    expect_like("k", k, k.shape, dtype, device, "[total_k, heads_kv, head_dim]", contiguous_last=True)
    expect_like("v", v, k.shape, dtype, device, "[total_k, heads_kv, head_dim] like k", contiguous_last=True)
    _expect_seqlens("cu_seqlens_q", cu_seqlens_q, device, q.shape[0], max_seqlen_q, "max_seqlen_q")
    _expect_seqlens("cu_seqlens_k", cu_seqlens_k, device, total_k, max_seqlen_k, "max_seqlen_k",
                    check_max=seqused_k is None)  # fmt: skip
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"cu_seqlens_k must have one entry per cu_seqlens_q entry ({cu_seqlens_q.shape[0]}), "
            f"got {cu_seqlens_k.shape[0]}"
        )
    if seqused_k is not None:
        _expect_seqused_k(seqused_k, cu_seqlens_k, max_seqlen_k)
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))):
        raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
    if prefix_k is not None or prefix_v is not None:
        layout = "[prefix_len, heads_kv, head_dim]"
        expect_rank("prefix_k", prefix_k, 3, layout)
        shape = (prefix_k.shape[0], heads_kv, head_dim)
        expect_like("prefix_k", prefix_k, shape, dtype, device, layout, contiguous_last=True)
        expect_like("prefix_v", prefix_v, shape, dtype, device, layout, contiguous_last=True)


def attention_with_lse(
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
    seqused_k: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention forward that also returns the LSE of every query row.

    Args:
        q: ``[total_q, heads_q, head_dim]`` float16, bfloat16 or float32; any token
            and head strides, contiguous ``head_dim``.
        k, v: ``[total_k, heads_kv, head_dim]``, q's dtype and device;
            ``heads_q % heads_kv == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[batch + 1]`` cumulative lengths, on q's device.
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest sequence
            (with ``seqused_k``: the longest used key count).
        causal: bottom-right aligned causal mask (see the module docstring).
        softmax_scale: multiplier of ``q @ k^T``; default ``head_dim ** -0.5``.
        seqused_k: optional int32 ``[batch]`` on q's device: sequence ``i`` uses only
            the first ``seqused_k[i]`` keys of its ``cu_seqlens_k`` segment, as
            flash-attn's argument of that name. A KV cache with room to grow (each
            request owns ``capacity`` slots, ``cu_seqlens_k = arange(batch + 1) *
            capacity``) is then read in place, with no gather into a packed copy.
            Causal alignment is to the used keys. Not taken by the flash-attn 2 package.
        backend: ``"auto"`` (first that can run: ``flash_attn``, ``torch``, then
            Triton on CUDA tensors, else ``reference``), or one of those names. See
            :func:`explain_attention`.

    Returns:
        ``(out [total_q, heads_q, head_dim] in q's dtype, lse [heads_q, total_q]
        float32 natural log)``; rows that see no key: output 0, LSE ``-inf``.

    Example::

        >>> out, lse = splitkv.attention_with_lse(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
        >>> out2, lse2 = splitkv.attention_with_lse(q, k2, v2, cu_q, cu_k2, max_q, max_k2)
        >>> merged, merged_lse = splitkv.merge_attn_states(out, lse, out2, lse2)
    """
    scale = check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                   seqused_k)  # fmt: skip
    return run_checked_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                 seqused_k, backend)  # fmt: skip


def run_checked_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                          seqused_k=None, backend="auto", normalise_lse=True):  # fmt: skip
    """:func:`attention_with_lse` for arguments that :func:`check_attention_inputs` already
    passed (``scale`` is its result): callers that checked a superset of them skip
    the second pass of Python checks, which costs more host time than a decode
    step's kernel on small shapes. ``normalise_lse=False`` leaves a flash kernel's
    ``+inf`` LSE of rows that saw no key (one kernel launch fewer), for callers that
    drop the LSE."""
    impl = ATTENTION_BACKENDS.select(backend, q, k, v, causal, seqused_k)
    if q.shape[0] == 0 or k.shape[0] == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        # No query or no key anywhere: the answer needs no kernel. On the H100 a
        # context-parallel prefill rank holding no queries stalled its group inside
        # this call before this early return existed (the flash launch on an empty
        # grid is the likely cause; its own error was never seen).
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        return out, lse
    out, lse = impl.run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, seqused_k)
    if normalise_lse and impl.name in _POS_INF_EMPTY_ROWS:
        lse = _empty_rows_to_neg_inf(lse)
    return out, lse


def explain_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    seqused_k: torch.Tensor | None = None,
    backend: str = "auto",
) -> str:
    """Which backend :func:`attention_with_lse` would take for these inputs, and why not the others."""
    check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, seqused_k)
    return ATTENTION_BACKENDS.explain(backend, q, k, v, causal, seqused_k)
