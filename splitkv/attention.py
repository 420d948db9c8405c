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
from ._attention_reference import reference_attention_backward, reference_attention_with_lse
from ._checks import (
    expect_bool,
    expect_contiguous_last,
    expect_float_dtype,
    expect_like,
    expect_rank,
    expect_scale,
    expect_tensor,
)
from ._lse import LOG2E, expect_lse_convention
from ._planning import DECODE_ROWS, varlen_num_splits
from ._registry import Backend, BackendRegistry
from ._triton_support import TRITON_IMPORT_ERROR, TRITON_MAX_HEAD_DIM, interpreter_enabled

__all__ = ["ATTENTION_BACKENDS", "attention_with_lse", "explain_attention"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None
# flash-attn 2's largest head_dim, and the one of the copy bundled with PyTorch.
_FLASH_MAX_HEAD_DIM = 256
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


def _flash_why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_sequences: int,
                   max_seqlen_q: int) -> str | None:  # fmt: skip
    """Limits shared by flash-attn 2 and the copy of it bundled with PyTorch."""
    if not q.is_cuda:
        return f"tensors are on {q.device.type}, flash attention needs CUDA tensors"
    if q.dtype not in _HALF_DTYPES:
        return f"flash attention takes float16/bfloat16, got {q.dtype}"
    head_dim = q.shape[-1]
    if head_dim > _FLASH_MAX_HEAD_DIM or head_dim % 8 != 0:
        return f"flash attention needs head_dim a multiple of 8 and <= {_FLASH_MAX_HEAD_DIM}, got {head_dim}"
    # Its kernels load rows 16 bytes at a time and fault on a misaligned view.
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.data_ptr() % 16 or t.stride(0) % 8 or t.stride(1) % 8:
            return f"flash attention needs 16-byte aligned rows; {name} starts or strides off that"
    if max_seqlen_q == 1 and q.shape[1] != k.shape[1] and q.shape[0] != num_sequences:
        # Its decode path (max_seqlen_q == 1 under GQA) moves the query heads of a group
        # into the sequence axis, which assumes one query per sequence: a batch where
        # some sequence holds none fails inside it with a reshape error.
        return (f"flash attention's GQA decode path (max_seqlen_q == 1) needs one query per sequence, "
                f"got {q.shape[0]} queries for {num_sequences} sequences")
    if _capability(q.device.index) < (8, 0):
        return "flash attention needs compute capability 8.0 or newer"
    return None


def _flash_attn_why_not(q, k, v, causal, seqused_k, num_sequences, max_seqlen_q) -> str | None:
    if not _FLASH_ATTN_INSTALLED:
        return "the flash-attn package is not installed (pip install 'splitkv[flash]')"
    if seqused_k is not None and not ATTENTION_BACKENDS["flash_attn"].takes_seqused_k:
        return "flash-attn 2's flash_attn_varlen_func takes no seqused_k"
    return _flash_why_not(q, k, v, num_sequences, max_seqlen_q)


def _torch_flash_why_not(q, k, v, causal, seqused_k, num_sequences, max_seqlen_q) -> str | None:
    if not _TORCH_HAS_FLASH:
        return f"torch {torch.__version__} has no bundled varlen flash attention"
    return _flash_why_not(q, k, v, num_sequences, max_seqlen_q)


def _triton_why_not(q, k, v, causal, seqused_k, num_sequences, max_seqlen_q) -> str | None:
    if TRITON_IMPORT_ERROR:
        return f"triton is not importable ({TRITON_IMPORT_ERROR})"
    max_head_dim = ATTENTION_BACKENDS["triton"].max_head_dim
    if q.shape[-1] > max_head_dim:
        return f"the Triton kernel takes head_dim <= {max_head_dim}, got {q.shape[-1]}"
    if q.is_cuda or (q.device.type == "cpu" and interpreter_enabled()):
        return None
    return f"tensors are on {q.device.type}; Triton runs CUDA tensors (CPU ones under TRITON_INTERPRET=1)"


def _flash_why_not_auto(q, k, v, causal, seqused_k, num_sequences, max_seqlen_q) -> str | None:
    """auto leaves decode shapes to splitkv's Triton split-KV kernel wherever it runs them."""
    rows = max_seqlen_q * (q.shape[1] // k.shape[1])
    if rows <= DECODE_ROWS and _triton_why_not(q, k, v, causal, seqused_k, num_sequences, max_seqlen_q) is None:
        return (f"a decode shape ({rows} query rows per KV head and sequence, at most {DECODE_ROWS}): splitkv's "
                "Triton split-KV kernel streams its KV faster (1.8x FA2 on the H200, benchmarks/NOTES.md)")
    return None


def _triton_why_not_auto(q, k, v, causal, seqused_k, num_sequences, max_seqlen_q) -> str | None:
    return None if q.is_cuda else "auto runs Triton only on CUDA tensors (the interpreter is for tests)"


def _no_reason(q, k, v, causal, seqused_k, num_sequences, max_seqlen_q) -> str | None:
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
                seqused_k, num_splits=None):  # fmt: skip
    """The Triton kernel in ``num_splits`` key chunks merged N-way (split-KV; None: the
    default count, which is 1 but for long sequences with few query rows, i.e. decode).
    :func:`splitkv.split_kv_attention` runs this too."""
    from ._attention_triton import triton_attention_with_lse
    from .merge import merge_states

    if num_splits is None:
        num_splits = varlen_num_splits(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out, lse = triton_attention_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                         softmax_scale, num_splits=num_splits, seqused_k=seqused_k)  # fmt: skip
    return (out, lse) if num_splits == 1 else merge_states(out, lse, output_dtype=q.dtype)


_ALL_DTYPES = (*_HALF_DTYPES, torch.float32)

#: The partial-attention backends in order of preference. Each is differentiable
#: through attention_with_lse's custom op, whose backward recomputes the scores in
#: torch math whichever backend ran the forward (register_attention_autograd).
ATTENTION_BACKENDS = BackendRegistry(
    "attention_with_lse",
    [
        Backend("flash_attn", _run_flash_attn, _flash_attn_why_not, _flash_why_not_auto, dtypes=_HALF_DTYPES,
                max_head_dim=_FLASH_MAX_HEAD_DIM, empty_row_lse=math.inf, differentiable=True),
        Backend("torch", _run_torch_flash, _torch_flash_why_not, _flash_why_not_auto, dtypes=_HALF_DTYPES,
                max_head_dim=_FLASH_MAX_HEAD_DIM,
                takes_seqused_k=True, empty_row_lse=math.inf, differentiable=True),
        Backend("triton", _run_triton, _triton_why_not, _triton_why_not_auto, dtypes=_ALL_DTYPES,
                max_head_dim=TRITON_MAX_HEAD_DIM, writes_partial_states=True, takes_seqused_k=True,
                empty_row_lse=-math.inf, differentiable=True),
        Backend("reference", reference_attention_with_lse, _no_reason, dtypes=_ALL_DTYPES, takes_seqused_k=True,
                empty_row_lse=-math.inf, differentiable=True),
    ],
)  # fmt: skip


def _expect_seqlens(name: str, cu_seqlens, device: torch.device, max_seqlen: int, max_name: str) -> None:
    """The metadata of a ``cu_seqlens_*`` tensor and its ``max_seqlen_*`` (no device sync: traceable)."""
    expect_tensor(name, cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must be [batch + 1] (1 dim, at least one entry), got shape {tuple(cu_seqlens.shape)}")
    # The kernels read it as a packed array.
    expect_contiguous_last(name, cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")


def _seqlen_values_ok(name: str, cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None,
                      max_name: str) -> list[int]:  # fmt: skip
    """The values of a CPU ``cu_seqlens_*``: rising from 0 to ``total``, no sequence over
    ``max_seqlen`` (unless None); returns the lengths."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    if bounds[0] != 0 or bounds[-1] != total or any(n < 0 for n in lengths):
        raise ValueError(f"{name} must rise from 0 to {total} (the packed token count), got {bounds}")
    if max_seqlen is not None and lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is below the longest sequence ({max(lengths)})")
    return lengths


def check_sequence_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k=None) -> None:
    """The checks that read the values of ``cu_seqlens_*`` / ``seqused_k``: run where they
    are on the CPU (on a GPU they would cost a device sync per call, and are trusted,
    as flash-attn does), outside a traced region (under ``torch.compile`` the ops run
    them in their eager implementation)."""
    if not cu_seqlens_q.is_cpu or torch.compiler.is_compiling():
        return
    _seqlen_values_ok("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    room = _seqlen_values_ok("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k if seqused_k is None else None,
                             "max_seqlen_k")  # fmt: skip
    if seqused_k is not None:
        used = seqused_k.tolist()
        if any(not 0 <= u <= r for u, r in zip(used, room)):
            raise ValueError(f"seqused_k must lie in [0, cu_seqlens_k[i + 1] - cu_seqlens_k[i]] = {room}, got {used}")
        if used and max(used) > max_seqlen_k:
            raise ValueError(f"max_seqlen_k = {max_seqlen_k} is below the longest used sequence ({max(used)})")


def _expect_seqused_k(seqused_k, batch: int, device: torch.device, like: str) -> None:
    """The metadata of ``seqused_k [batch]`` int32 on ``device`` (``like`` names the tensor it follows)."""
    expect_tensor("seqused_k", seqused_k)
    if tuple(seqused_k.shape) != (batch,):
        raise ValueError(f"seqused_k must be [batch] = [{batch}], got shape {tuple(seqused_k.shape)}")
    # The kernels read it as a packed array.
    expect_contiguous_last("seqused_k", seqused_k)
    if seqused_k.dtype != torch.int32:
        raise TypeError(f"seqused_k must have dtype torch.int32, got {seqused_k.dtype}")
    if seqused_k.device != device:
        raise ValueError(f"seqused_k must be on {device} like {like}, got {seqused_k.device}")


def check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                           seqused_k=None, prefix_k=None, prefix_v=None) -> float:  # fmt: skip
    """Validates the varlen attention arguments (and, when given, cascade's shared prefix
    KV ``prefix_k``, ``prefix_v [prefix_len, heads_kv, head_dim]``); returns the softmax
    scale to use. Once the CUDA extension is loaded, one C++ call (``attention_inputs_ok``
    in csrc/attention_checks.cpp) runs the same checks on CUDA inputs for a fraction of their Python
    host time; where it is not sure, these checks run and name the argument. Under
    ``torch.compile`` only the Python checks of shapes, dtypes and devices run (the
    C++ call is not traceable); :func:`check_sequence_values` covers the values."""
    # is_compiling() first: a traced read of the module global eager_ops would become a
    # guard on it, and a recompile once the extension loads.
    eager = None if torch.compiler.is_compiling() else _cuda.eager_ops
    if (eager is None or seqused_k is not None
            or not eager.attention_inputs_ok(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             softmax_scale, prefix_k, prefix_v)):  # fmt: skip
        _check_in_python(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, seqused_k,
                         prefix_k, prefix_v)  # fmt: skip
        check_sequence_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k)
    return q.shape[2] ** -0.5 if softmax_scale is None else float(softmax_scale)


def _check_in_python(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, seqused_k,
                     prefix_k, prefix_v) -> None:  # fmt: skip
    expect_rank("q", q, 3, "[total_q, heads_q, head_dim]")
    expect_float_dtype("q", q)
    expect_contiguous_last("q", q)
    if q.device.type == "meta":
        raise ValueError("q is on the meta device, which holds no data: attention needs CPU or CUDA tensors")
    expect_rank("k", k, 3, "[total_k, heads_kv, head_dim]")
    total_k, heads_kv, head_dim = k.shape
    if head_dim != q.shape[2]:
        raise ValueError(f"k must have q's head_dim {q.shape[2]}, got shape {tuple(k.shape)}")
    if head_dim == 0:
        raise ValueError(f"head_dim must be positive, got q of shape {tuple(q.shape)}")
    if heads_kv == 0 or q.shape[1] % heads_kv != 0:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of k's heads ({heads_kv})")
    dtype, device = q.dtype, q.device
    expect_like("k", k, k.shape, dtype, device, "[total_k, heads_kv, head_dim]", contiguous_last=True)
    expect_like("v", v, k.shape, dtype, device, "[total_k, heads_kv, head_dim] like k", contiguous_last=True)
    _expect_seqlens("cu_seqlens_q", cu_seqlens_q, device, max_seqlen_q, "max_seqlen_q")
    _expect_seqlens("cu_seqlens_k", cu_seqlens_k, device, max_seqlen_k, "max_seqlen_k")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"cu_seqlens_k must have one entry per cu_seqlens_q entry ({cu_seqlens_q.shape[0]}), "
            f"got {cu_seqlens_k.shape[0]}"
        )
    if seqused_k is not None:
        _expect_seqused_k(seqused_k, cu_seqlens_k.shape[0] - 1, cu_seqlens_k.device, "cu_seqlens_k")
    expect_scale("softmax_scale", softmax_scale)
    if prefix_k is not None or prefix_v is not None:
        layout = "[prefix_len, heads_kv, head_dim]"
        expect_rank("prefix_k", prefix_k, 3, layout)
        shape = (prefix_k.shape[0], heads_kv, head_dim)
        expect_like("prefix_k", prefix_k, shape, dtype, device, layout, contiguous_last=True)
        expect_like("prefix_v", prefix_v, shape, dtype, device, layout, contiguous_last=True)


def expect_backend_name(backend, registry: BackendRegistry = None) -> str:
    """``backend`` names one of ``registry``'s backends (default: attention's) or ``"auto"``."""
    registry = ATTENTION_BACKENDS if registry is None else registry
    if not isinstance(backend, str) or backend not in registry.choices:
        raise ValueError(f"{registry.op_name}: backend must be one of {registry.choices}, got {backend!r}")
    return backend


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on ``tensors`` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_op(*tensors: torch.Tensor) -> bool:
    """Whether a public function goes through its torch custom op: under ``torch.compile``
    (the op is opaque to the compiler, which neither traces its host logic nor
    recompiles its Triton kernel) and when autograd records it (the op's backward);
    otherwise the eager implementation is called directly, without the dispatcher's
    host time."""
    return torch.compiler.is_compiling() or needs_grad(*tensors)


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
    lse_base: str = "e",
    lse_layout: str = "ht",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention forward that also returns the LSE of every query row.

    Differentiable with respect to q, k and v, through the output and the LSE alike,
    on every backend: the backward recomputes the scores in torch math (one
    ``[heads, Lq, Lk]`` score matrix per sequence at a time, float32), so it is exact
    but meant for moderate sequence lengths. A torch custom op
    (``torch.ops.splitkv.attention_with_lse``): ``torch.compile(fullgraph=True)``
    traces through it without a graph break, and it is CUDA-graph capturable on the
    GPU backends when the lengths are tensors and ``max_seqlen_*`` are capacities.

    Backend limits: ``flash_attn`` and ``torch`` (flash attention) take CUDA
    float16/bfloat16 with ``head_dim`` a multiple of 8 and at most 256, compute
    capability 8.0+; ``triton`` takes ``head_dim <= 256`` (CUDA, or CPU under
    ``TRITON_INTERPRET=1``); ``reference`` runs anything, slowly (a Python loop over
    the sequences, for tests).

    Args:
        q: ``[total_q, heads_q, head_dim]`` float16, bfloat16 or float32; any token
            and head strides, contiguous ``head_dim``.
        k: ``[total_k, heads_kv, head_dim]``, q's dtype and device;
            ``heads_q % heads_kv == 0`` (GQA: query head ``h`` reads KV head
            ``h // (heads_q // heads_kv)``).
        v: like ``k``.
        cu_seqlens_q: int32 ``[batch + 1]`` cumulative query counts, on q's device.
        cu_seqlens_k: int32 ``[batch + 1]`` cumulative key counts, on q's device.
        max_seqlen_q: Python int, at least the longest query count (a capacity is fine).
        max_seqlen_k: Python int, at least the longest key count (with ``seqused_k``:
            the longest used key count; a capacity is fine).
        causal: bottom-right aligned causal mask (see the module docstring).
        softmax_scale: multiplier of ``q @ k^T``, finite and positive; default
            ``head_dim ** -0.5``.
        seqused_k: optional int32 ``[batch]`` on q's device: sequence ``i`` uses only
            the first ``seqused_k[i]`` keys of its ``cu_seqlens_k`` segment, as
            flash-attn's argument of that name. A KV cache with room to grow (each
            request owns ``capacity`` slots, ``cu_seqlens_k = arange(batch + 1) *
            capacity``) is then read in place, with no gather into a packed copy.
            Causal alignment is to the used keys. Not taken by the flash-attn 2 package.
        backend: ``"auto"`` (first that can run: ``flash_attn``, ``torch``, then
            Triton on CUDA tensors, else ``reference``), or one of those names. See
            :func:`explain_attention`.
        lse_base: ``"e"`` (natural log, default) or ``"2"`` (log2, FlashInfer's) for
            the returned LSE.
        lse_layout: ``"ht"`` (``[heads_q, total_q]``, default) or ``"th"``
            (``[total_q, heads_q]``, a transposed view: no copy).

    Returns:
        ``(out, lse)``: ``out [total_q, heads_q, head_dim]`` in q's dtype and the
        float32 LSE in ``lse_base`` and ``lse_layout``. Rows that see no key:
        output 0, LSE ``-inf``.

    Example:
        >>> import torch, splitkv
        >>> q = torch.randn(5, 4, 16)  # 2 sequences of 2 and 3 queries, 4 heads
        >>> k, v = torch.randn(7, 2, 16), torch.randn(7, 2, 16)  # 3 and 4 keys, 2 KV heads
        >>> cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
        >>> cu_k = torch.tensor([0, 3, 7], dtype=torch.int32)
        >>> out, lse = splitkv.attention_with_lse(q, k, v, cu_q, cu_k, 3, 4, causal=True)
        >>> out.shape, lse.shape
        (torch.Size([5, 4, 16]), torch.Size([4, 5]))
    """
    scale = check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                   seqused_k)  # fmt: skip
    causal = expect_bool("causal", causal)
    expect_backend_name(backend)
    expect_lse_convention(lse_base, lse_layout)
    if use_op(q, k, v):
        out, lse = torch.ops.splitkv.attention_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                        max_seqlen_k, causal, scale, seqused_k, backend)  # fmt: skip
    else:
        out, lse = run_checked_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                         scale, seqused_k, backend)  # fmt: skip
    if lse_base == "2":
        lse = lse * LOG2E
    return out, (lse.t() if lse_layout == "th" else lse)


def run_checked_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                          seqused_k=None, backend="auto", normalise_lse=True):  # fmt: skip
    """:func:`attention_with_lse` for arguments that :func:`check_attention_inputs` already
    passed (``scale`` is its result): callers that checked a superset of them skip
    the second pass of Python checks, which costs more host time than a decode
    step's kernel on small shapes. ``normalise_lse=False`` leaves a flash kernel's
    ``+inf`` LSE of rows that saw no key (one kernel launch fewer), for callers that
    drop the LSE. The backend is chosen here, at run time (never while tracing)."""
    impl = ATTENTION_BACKENDS.select(backend, q, k, v, causal, seqused_k, cu_seqlens_q.shape[0] - 1, max_seqlen_q)
    if q.shape[0] == 0 or k.shape[0] == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        # No query or no key anywhere: the answer needs no kernel. On the H100 a
        # context-parallel prefill rank holding no queries stalled its group inside
        # this call before this early return existed (the flash launch on an empty
        # grid is the likely cause; its own error was never seen).
        return empty_attention_results(q)
    out, lse = impl.run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, seqused_k)
    if normalise_lse and impl.empty_row_lse == math.inf:
        lse = _empty_rows_to_neg_inf(lse)
    return out, lse


# --------------------------------------------------------------------------- the custom ops

_ATTENTION_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
                     "SymInt max_seqlen_k, bool causal, float softmax_scale, Tensor? seqused_k, str backend) "
                     "-> (Tensor, Tensor)")  # fmt: skip


def _attention_op_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                       seqused_k, backend):  # fmt: skip
    check_sequence_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k)
    out, lse = run_checked_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                     softmax_scale, seqused_k, backend)  # fmt: skip
    # The fake implementation promises fresh contiguous results (a no-op for every backend's).
    return out.contiguous(), lse.contiguous()


def empty_attention_results(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What attention answers where no query row saw a key: ``out`` zeros, ``lse`` -inf."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    return out, torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)


def fake_attention_results(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [total_q, heads_q, head_dim] in q's dtype, lse [heads_q, total_q] float32)``, uninitialised."""
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


_attention_op = torch.library.custom_op("splitkv::attention_with_lse", _attention_op_impl, mutates_args=(),
                                        schema=_ATTENTION_SCHEMA)  # fmt: skip
_attention_op.register_fake(lambda q, *args: fake_attention_results(q))


def _attention_backward_impl(grad_out, grad_lse, q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale,
                             seqused_k):  # fmt: skip
    return reference_attention_backward(grad_out, grad_lse, q, k, v, cu_seqlens_q, cu_seqlens_k, causal,
                                        softmax_scale, seqused_k)  # fmt: skip


_attention_backward_op = torch.library.custom_op(
    "splitkv::attention_with_lse_backward", _attention_backward_impl, mutates_args=(),
    schema="(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
           "Tensor cu_seqlens_k, bool causal, float softmax_scale, Tensor? seqused_k) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip
_attention_backward_op.register_fake(
    lambda grad_out, grad_lse, q, k, v, *args: (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))
)


def register_attention_autograd(op, seqused_k_index: int | None, num_inputs: int) -> None:
    """Gives ``op`` (inputs ``q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k, causal, softmax_scale, ...``; results ``(out, lse)`` of attention)
    the backward of attention; ``seqused_k_index``: where ``seqused_k`` is among its
    inputs (None: it takes none)."""

    def setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens_q, cu_seqlens_k = inputs[:5]
        seqused_k = inputs[seqused_k_index] if seqused_k_index is not None else None
        ctx.causal, ctx.softmax_scale = inputs[7], inputs[8]
        ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        if grad_lse is None:
            grad_lse = torch.zeros((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
        dq, dk, dv = torch.ops.splitkv.attention_with_lse_backward(grad_out, grad_lse, q, k, v, cu_seqlens_q,
                                                                   cu_seqlens_k, ctx.causal, ctx.softmax_scale,
                                                                   seqused_k)  # fmt: skip
        return (dq, dk, dv) + (None,) * (num_inputs - 3)

    op.register_autograd(backward, setup_context=setup_context)


register_attention_autograd(_attention_op, seqused_k_index=9, num_inputs=11)


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
    """Which backend :func:`attention_with_lse` would take for these inputs, and why not the others.

    Not differentiable (it returns text). It runs the same argument checks as
    :func:`attention_with_lse`.

    Args:
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            seqused_k, backend: as in :func:`attention_with_lse`.

    Returns:
        One line naming the chosen backend, then one line per backend saying
        ``chosen`` or why not, each followed by a ``declares:`` line with the facts
        the backend declares (dtypes, head_dim limit, whether it writes split partial
        states, takes ``seqused_k`` or a block table, is differentiable, and the LSE
        its kernel gives a row that saw no key).

    Example:
        >>> import torch, splitkv
        >>> q, k = torch.randn(3, 2, 8), torch.randn(4, 2, 8)
        >>> cu_q = torch.tensor([0, 3], dtype=torch.int32)
        >>> cu_k = torch.tensor([0, 4], dtype=torch.int32)
        >>> print(splitkv.explain_attention(q, k, k, cu_q, cu_k, 3, 4).splitlines()[0])
        attention_with_lse(backend='auto') -> reference
    """
    check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, seqused_k)
    causal = expect_bool("causal", causal)
    expect_backend_name(backend)
    return ATTENTION_BACKENDS.explain(backend, q, k, v, causal, seqused_k, cu_seqlens_q.shape[0] - 1, max_seqlen_q)
