"""A KV cache for batches that share a prompt prefix, and the attention call a model makes with it.

A model that serves ``B`` requests starting with the same prompt (a system prompt,
few-shot examples, a document) computes the prompt's KV once, keeps it once, and
keeps only each request's own tokens per request. Every layer of the model then
calls one function per forward pass::

    out = step.attention(layer, q, k, v)

which stores the new tokens' ``k``/``v`` and returns their attention over
``[prefix ; suffix_i]``: :func:`splitkv.cascade_attention` for the suffix prefill and
for every decode step. The tokens are the ones plain causal attention over each
request's own ``[prefix ; suffix_i]`` would give, up to floating-point rounding.

Shapes follow the rest of the package: tokens of all sequences packed along the
first axis, ``q [tokens, heads_q, head_dim]``, ``k, v [tokens, heads_kv, head_dim]``,
sequence-major (all new tokens of sequence 0, then of sequence 1, ...).

The cache is for inference: nothing in it is differentiated (``attention`` detaches the
``k``/``v`` it stores, and the cascade layout's attention refuses a gradient).

Decode steps are static in shape: every decode step (one new token per sequence)
reuses one :class:`CacheStep` whose tensors are refreshed in place, reads the
caches in place (``seqused_k``, no gather) and passes capacities as
``max_seqlen_*``, so a decode step built on it compiles once under
``torch.compile`` and can be captured in a CUDA graph and replayed step after step
(as long as the capacity does not grow after the capture).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .attention import attention_with_lse
from .cascade import cascade_attention, use_cascade

__all__ = ["CacheMemory", "CacheStep", "SharedPrefixKVCache"]

_MODES = ("auto", "cascade", "plain")


@dataclass(frozen=True)
class CacheMemory:
    """Bytes of KV a cache holds, over all layers, K and V (what :meth:`SharedPrefixKVCache.memory` returns).

    Not differentiable (two ints).

    Args:
        allocated: bytes of its tensors, spare capacity included.
        used: bytes of the tokens written so far.

    Example:
        >>> import torch, splitkv
        >>> cache = splitkv.nn.SharedPrefixKVCache(1, 2, 4, 2, 8, capacity=4, mode="cascade", dtype=torch.float32)
        >>> cache.memory()
        CacheMemory(allocated=0, used=0)
    """

    allocated: int
    used: int


def _packed_rows(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, counts)])`` without a Python loop."""
    total = int(counts.sum())
    offsets = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts - offsets, counts, output_size=total) + torch.arange(total)


def _cu_seqlens(lengths: torch.Tensor, device) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(device=device, dtype=torch.int32)


class SharedPrefixKVCache:
    """KV cache of ``num_sequences`` sequences that start with one shared prefix.

    Use it in two phases, each a :class:`CacheStep` whose ``attention`` every layer
    calls once per forward pass:

    1. ``cache.prefill_prefix(prefix_len)``: the forward pass over the shared prompt,
       once (a batch of one sequence); its K/V become the prefix of every sequence.
    2. ``cache.begin_step(new_tokens)``: a forward pass over ``new_tokens[i]`` new
       tokens of each sequence ``i`` (0 allowed): the suffix prefill, then one token
       per sequence per decode step. Their K/V are appended to the sequences' suffixes.

    Layout (``mode``):

    * ``"cascade"``: the prefix KV ``[prefix_len, heads_kv, head_dim]`` is held once
      per layer; each step runs :func:`splitkv.cascade_attention` (prefix read once
      for the whole batch, suffixes causally, states merged). Within this layout
      every step cascades, suffix prefill included: plain attention would first
      have to copy the prefix into every sequence
      (:func:`splitkv.cascade.estimate_cascade`'s ``materialise_us``), which costs
      more than the gap between the two ways even where plain attention over
      existing per-sequence KV is predicted marginally faster (long prefills).
    * ``"plain"``: every sequence holds its own copy of the prefix followed by its
      suffix (``num_sequences`` copies, as without sharing); each step runs
      :func:`splitkv.attention_with_lse` with ``causal=True`` over each sequence's
      ``[prefix ; suffix_i]``.
    * ``"auto"`` (default): ``"cascade"`` if :func:`splitkv.use_cascade` says so for
      the decode shape (one query per sequence, suffixes at ``capacity``), else
      ``"plain"``; :attr:`uses_cascade` tells which. The decode shape decides
      because decode steps are most of a generation's attention time, while a
      prefill costs about the same either way (arithmetic-bound). It is decided
      once, when the prefix is set, not per step: switching layouts means copying
      the prefix into every sequence (or dropping the copies). The cost model is
      calibrated on an H100: on a CPU, or where launches dominate (tiny shapes, one
      sequence, a prefix of a few tokens), it says plain.

    Storage: each layer's K and V live in one preallocated
    ``[num_sequences * rows, heads_kv, head_dim]`` tensor each, ``rows`` = ``capacity``
    suffix tokens (plus the prefix copy in the plain layout); ``capacity`` grows by
    doubling when a step needs more. A step writes its new rows in place (one
    ``index_copy_`` per tensor) and the kernels read the storage in place: sequence
    ``i`` owns rows ``i * rows ..`` (``cu_seqlens_k`` steps by ``rows``) and uses the
    first ``seqused_k[i]`` of them. No copy of a cache is made per layer or per step.

    Args:
        num_layers: layers of the model, each with its own KV.
        num_sequences: requests in the batch (fixed for the cache's lifetime).
        heads_q, heads_kv: query and KV heads of a layer (``heads_q % heads_kv == 0``, GQA).
        head_dim: dimension of a head.
        capacity: suffix tokens per sequence to preallocate (grows if exceeded).
        mode: ``"auto"``, ``"cascade"`` or ``"plain"``, see above.
        dtype: of q, k, v and the cache: float16, bfloat16 or float32.
        device: where the cache lives (q, k, v must be there too).
        softmax_scale: default ``head_dim ** -0.5``.

    Not differentiable: the cache is for inference (``attention`` detaches what it
    stores). Backends: as :func:`splitkv.cascade_attention` (cascade layout) and
    :func:`splitkv.attention_with_lse` (plain layout; the flash backends need
    CUDA float16/bfloat16 and ``head_dim <= 256``).

    Example:
        >>> import torch, splitkv
        >>> cache = splitkv.nn.SharedPrefixKVCache(1, 2, 4, 2, 8, capacity=4, mode="cascade",
        ...                                        dtype=torch.float32)
        >>> def qkv(tokens):  # what a layer would compute for its new tokens
        ...     return torch.randn(tokens, 4, 8), torch.randn(tokens, 2, 8), torch.randn(tokens, 2, 8)
        >>> step = cache.prefill_prefix(5)  # the shared prompt, 5 tokens
        >>> _ = step.attention(0, *qkv(5))
        >>> step = cache.begin_step([2, 3])  # the suffixes of the 2 requests
        >>> _ = step.attention(0, *qkv(5))
        >>> step = cache.begin_step([1, 1])  # one decode step
        >>> step.attention(0, *qkv(2)).shape
        torch.Size([2, 4, 8])
        >>> cache.suffix_lengths
        [3, 4]
    """

    def __init__(
        self,
        num_layers: int,
        num_sequences: int,
        heads_q: int,
        heads_kv: int,
        head_dim: int,
        *,
        capacity: int = 256,
        mode: str = "auto",
        dtype: torch.dtype | None = None,
        device=None,
        softmax_scale: float | None = None,
    ):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if min(num_layers, num_sequences, heads_q, heads_kv, head_dim) < 1 or capacity < 0:
            raise ValueError("num_layers, num_sequences, heads_q, heads_kv, head_dim must be positive, capacity >= 0")
        if heads_q % heads_kv:
            raise ValueError(f"heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})")
        self.num_layers, self.num_sequences = num_layers, num_sequences
        self.heads_q, self.heads_kv, self.head_dim = heads_q, heads_kv, head_dim
        self.mode = mode
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        # Resolved as tensors report it ("cuda" -> "cuda:0"), so the device check compares like with like.
        self.device = torch.empty(0, device=device if device is not None else "cpu").device
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        self.capacity = capacity
        #: Tokens of the shared prefix (``None`` until the prefix is set).
        self.prefix_len: int | None = None
        #: Whether steps run cascade attention (``None`` until the prefix is set).
        self.uses_cascade: bool | None = None
        #: Suffix tokens stored per sequence (host ints: the step plans are built on the host).
        self.suffix_lengths = [0] * num_sequences
        self._prefix_k: list[torch.Tensor | None] = [None] * num_layers
        self._prefix_v: list[torch.Tensor | None] = [None] * num_layers
        # Per layer [num_sequences * rows, heads_kv, head_dim]: flat, so that a step's index_copy_
        # mutates the tensor itself, never a view of it (under torch.compile a view's mutation
        # became a copy of the whole cache per layer per step).
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._rows = 0  # rows per sequence in _k / _v: capacity, plus the prefix copy in the plain layout
        self._step_id = 0
        self._decode_step: CacheStep | None = None  # reused by every decode step (static shapes)
        # Whether the latest step is that decode step: any other step makes it stale until
        # the next decode step refreshes it (a bool, not a step count: no recompile per step).
        self._decode_is_latest = False
        self._decode_plan: torch.Tensor | None = None

    # -- layout --------------------------------------------------------------------

    def _settle(self, prefix_len: int) -> None:
        """Fixes the prefix length and the layout, and allocates the suffix storage."""
        if self.prefix_len is not None:
            raise RuntimeError("the prefix is already set: a cache holds one prefix; make a new cache for another")
        self.prefix_len = prefix_len
        if self.mode == "auto":
            self.uses_cascade = use_cascade(
                self.num_sequences, prefix_len, self.num_sequences * self.capacity, self.num_sequences,
                self.heads_q, self.heads_kv, self.head_dim, torch.empty((), dtype=self.dtype).element_size(),
            )  # fmt: skip
        else:
            self.uses_cascade = self.mode == "cascade"
        self._rows = self.capacity if self.uses_cascade else prefix_len + self.capacity
        shape = (self.num_sequences * self._rows, self.heads_kv, self.head_dim)
        self._k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self._v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    def _per_sequence(self, store: torch.Tensor) -> torch.Tensor:
        """A view of a layer's flat storage as ``[num_sequences, rows, heads_kv, head_dim]``."""
        return store.view(self.num_sequences, -1, *store.shape[1:])

    @property
    def _base(self) -> int:
        # Rows of a sequence's storage before its suffix: the plain layout keeps its prefix copy there.
        return 0 if self.uses_cascade else self.prefix_len

    def _reserve(self, rows: int) -> None:
        if rows <= self._rows:
            return
        new_rows = max(rows, 2 * self._rows)
        for store in (self._k, self._v):
            for layer, old in enumerate(store):
                grown = old.new_empty((self.num_sequences * new_rows,) + tuple(old.shape[1:]))
                grown.view(self.num_sequences, new_rows, *old.shape[1:])[:, : self._rows] = self._per_sequence(old)
                store[layer] = grown
        self.capacity += new_rows - self._rows
        self._rows = new_rows
        self._decode_step = None  # its bounds name the old rows; a graph captured over it is stale now

    # -- steps ---------------------------------------------------------------------

    def prefill_prefix(self, prefix_len: int) -> CacheStep:
        """The step of the forward pass over the shared prompt (``prefix_len`` tokens, one sequence).

        Its ``attention`` stores each layer's ``k``/``v`` as the prefix and returns
        causal attention of the prompt over itself. Call it once, before any
        :meth:`begin_step`.

        Args:
            prefix_len: tokens of the shared prompt, at least 1.

        Returns:
            The :class:`CacheStep` whose ``attention`` the layers call.
        """
        if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 1:
            raise ValueError(f"prefix_len must be a positive int, got {prefix_len!r} "
                             "(for no prefix call begin_step directly)")  # fmt: skip
        self._settle(prefix_len)
        self._step_id += 1
        self._decode_is_latest = False
        bounds = _cu_seqlens(torch.tensor([prefix_len]), self.device)
        return CacheStep(self, self._step_id, True, [prefix_len], torch.arange(prefix_len, device=self.device),
                         bounds, prefix_len, None, bounds, None, prefix_len)  # fmt: skip

    def begin_step(self, new_tokens: Sequence[int]) -> CacheStep:
        """The step of a forward pass over ``new_tokens[i]`` new tokens of each sequence ``i``.

        Reserves their rows (the suffix lengths advance now) and plans the step for
        all layers. Without a prior :meth:`prefill_prefix` the prefix is empty.
        Earlier steps become stale: call each layer's ``attention`` before the next step.
        A decode step (one new token for every sequence) returns the same
        :class:`CacheStep` object every time, its tensors updated in place (advanced
        on the device right after a decode step, else one host-to-device copy), with
        ``max_seqlen_k`` the storage's rows: its shapes
        never change, so a compiled or CUDA-graph-captured decode step replays it.

        Args:
            new_tokens: ``num_sequences`` non-negative ints.

        Returns:
            The :class:`CacheStep` whose ``attention`` the layers call.
        """
        new = [int(n) for n in new_tokens]
        if len(new) != self.num_sequences or min(new) < 0:
            raise ValueError(f"new_tokens must hold {self.num_sequences} non-negative counts, got {list(new_tokens)}")
        if self.prefix_len is None:
            self._settle(0)
        old_t = torch.tensor(self.suffix_lengths, dtype=torch.long)
        new_t = torch.tensor(new, dtype=torch.long)
        lengths = old_t + new_t
        self._reserve(self._base + int(lengths.max()))
        decode = all(n == 1 for n in new)
        if decode and self._decode_is_latest and self._decode_step is not None:
            # One token more for every sequence right after a decode step: each entry of
            # the plan (position, write row, used keys) is one past the last, so it is
            # advanced on the device. A copy from the host would wait for the GPU to finish
            # the last step, and keep the host from planning ahead of it.
            self.suffix_lengths = lengths.tolist()
            self._step_id += 1
            self._decode_plan.add_(1)
            self._decode_step.seqused_k.add_(1)
            return self._decode_step
        sequence_start = torch.arange(self.num_sequences) * self._rows
        # Rows of the flattened [num_sequences * rows, heads_kv, head_dim] storage where this
        # step's tokens go, the keys each sequence uses (suffix, or prefix copy + suffix),
        # and the positions of the new tokens.
        write_rows = _packed_rows(sequence_start + self._base + old_t, new_t)
        used = lengths + self._base
        positions = _packed_rows(self.prefix_len + old_t, new_t)
        self.suffix_lengths = lengths.tolist()
        self._step_id += 1
        self._decode_is_latest = decode
        if decode:
            return self._refresh_decode_step(torch.stack([positions, write_rows, used]))
        cu_seqlens_k = (torch.arange(self.num_sequences + 1, dtype=torch.int32) * self._rows).to(self.device)
        return CacheStep(
            self, self._step_id, False, new, positions.to(self.device), _cu_seqlens(new_t, self.device), max(new),
            write_rows.to(self.device), cu_seqlens_k, used.to(device=self.device, dtype=torch.int32), int(used.max()),
        )  # fmt: skip

    def _refresh_decode_step(self, plan: torch.Tensor) -> CacheStep:
        """The decode step, its ``[3, num_sequences]`` int64 plan (positions, write rows,
        used keys) copied into its tensors in place."""
        step = self._decode_step
        if step is None:
            batch = self.num_sequences
            self._decode_plan = torch.empty((3, batch), dtype=torch.long, device=self.device)
            sequences = torch.arange(batch + 1, dtype=torch.int32)
            step = CacheStep(
                self, None, False, [1] * batch, self._decode_plan[0], sequences.to(self.device), 1,
                self._decode_plan[1], (sequences * self._rows).to(self.device),
                torch.empty(batch, dtype=torch.int32, device=self.device), self._rows,
            )  # fmt: skip
            self._decode_step = step
        self._decode_plan.copy_(plan)
        step.seqused_k.copy_(self._decode_plan[2])
        return step

    # -- bookkeeping ---------------------------------------------------------------

    def memory(self) -> CacheMemory:
        """KV bytes held: allocated tensors, and the part holding written tokens."""
        tensors = [t for t in self._k + self._v + self._prefix_k + self._prefix_v if t is not None]
        allocated = sum(t.numel() * t.element_size() for t in tensors)
        element_size = torch.empty((), dtype=self.dtype).element_size()
        token_bytes = 2 * self.num_layers * self.heads_kv * self.head_dim * element_size
        prefix_copies = 1 if self.uses_cascade else self.num_sequences
        used = token_bytes * ((self.prefix_len or 0) * prefix_copies + sum(self.suffix_lengths))
        return CacheMemory(allocated, used)

    def prefix_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's prefix ``(k, v)``, each ``[prefix_len, heads_kv, head_dim]`` (a view, or a copy's view)."""
        if self.uses_cascade:
            return self._prefix_k[layer], self._prefix_v[layer]
        return self._k[layer][: self.prefix_len], self._v[layer][: self.prefix_len]

    def suffix_kv(self, layer: int, sequence: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one sequence's suffix ``(k, v)``, each ``[suffix_len, heads_kv, head_dim]``."""
        rows = slice(self._base, self._base + self.suffix_lengths[sequence])
        return self._per_sequence(self._k[layer])[sequence, rows], self._per_sequence(self._v[layer])[sequence, rows]


class CacheStep:
    """One forward pass's use of a :class:`SharedPrefixKVCache`, planned for all layers.

    Made by :meth:`SharedPrefixKVCache.prefill_prefix` / :meth:`~SharedPrefixKVCache.begin_step`,
    not by hand. Not differentiable (see :meth:`attention`).

    Args:
        cache, step_id, is_prefix, new_tokens, positions, cu_seqlens_q, max_seqlen_q,
            write_rows, cu_seqlens_k, seqused_k, max_seqlen_k: the plan the cache made.

    Example:
        >>> import torch, splitkv
        >>> cache = splitkv.nn.SharedPrefixKVCache(1, 2, 4, 2, 8, capacity=4, dtype=torch.float32)
        >>> step = cache.begin_step([1, 2])
        >>> step.positions.tolist(), step.last_rows.tolist()
        ([0, 0, 1], [0, 2])

    Attributes:
        new_tokens: new tokens per sequence (host ints); ``[prefix_len]`` for the prefix step.
        positions: int64 ``[tokens]`` absolute position of each new token in its
            ``[prefix ; suffix_i]`` (the prefix is at 0..prefix_len-1 for every
            sequence): the positions for RoPE.
        cu_seqlens_q: int32 ``[sequences + 1]`` bounds of each sequence's new tokens.
        cu_seqlens_k: int32 ``[sequences + 1]`` bounds of each sequence's rows in the
            flattened storage (a multiple of its rows per sequence).
        seqused_k: int32 ``[sequences]`` keys each sequence uses after this step's
            tokens are stored (None for the prefix step).
        last_rows: int64 ``[sequences]`` row of each sequence's last new token in the
            packed batch, -1 where a sequence has none this step (for the LM head).
    """

    def __init__(self, cache, step_id, is_prefix, new_tokens, positions, cu_seqlens_q, max_seqlen_q,
                 write_rows, cu_seqlens_k, seqused_k, max_seqlen_k):  # fmt: skip
        # step_id None: the cache's decode step, refreshed in place, never stale.
        self.cache, self._id, self.is_prefix = cache, step_id, is_prefix
        self.new_tokens = new_tokens
        self._tokens = sum(new_tokens)
        self.positions = positions
        self.cu_seqlens_q, self.max_seqlen_q = cu_seqlens_q, max_seqlen_q
        self._write_rows = write_rows
        self.cu_seqlens_k, self.seqused_k, self.max_seqlen_k = cu_seqlens_k, seqused_k, max_seqlen_k
        ends = torch.tensor(new_tokens).cumsum(0) - 1
        self.last_rows = torch.where(torch.tensor(new_tokens) > 0, ends, -1).to(cache.device)

    def _check(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        cache = self.cache
        if self._id is not None and self._id != cache._step_id:
            raise RuntimeError("this step is stale: a later begin_step() replaced it (its rows may have moved)")
        if self._id is None and cache._decode_step is not self:
            raise RuntimeError("this decode step is stale: the cache grew, and its storage moved")
        if self._id is None and not cache._decode_is_latest:
            raise RuntimeError("this decode step is stale: a later begin_step() planned another step "
                               "(the next decode step refreshes it)")
        if not 0 <= layer < cache.num_layers:
            raise ValueError(f"layer must be in [0, {cache.num_layers}), got {layer}")
        for name, t, heads in (("q", q, cache.heads_q), ("k", k, cache.heads_kv), ("v", v, cache.heads_kv)):
            if tuple(t.shape) != (self._tokens, heads, cache.head_dim):
                raise ValueError(f"{name} must be [tokens, heads, head_dim] = {(self._tokens, heads, cache.head_dim)} "
                                 f"for this step, got {tuple(t.shape)}")  # fmt: skip
            if t.dtype != cache.dtype or t.device != cache.device:
                raise TypeError(f"{name} must be {cache.dtype} on {cache.device} like the cache, "
                                f"got {t.dtype} on {t.device}")  # fmt: skip

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Stores this step's ``k``/``v`` for ``layer`` and returns the new tokens' attention.

        Not differentiable (the cache is for inference: the stored ``k``/``v`` are
        detached). Traceable by ``torch.compile(fullgraph=True)`` and CUDA-graph
        capturable for the decode step (see :meth:`SharedPrefixKVCache.begin_step`).

        Args:
            layer: index of the calling layer (each layer once per step).
            q: ``[tokens, heads_q, head_dim]``, the new tokens of all sequences packed
                sequence-major (``cu_seqlens_q``), RoPE applied; the cache's dtype and device.
            k: ``[tokens, heads_kv, head_dim]``, the same tokens' keys (RoPE applied).
            v: ``[tokens, heads_kv, head_dim]``, their values.

        Returns:
            ``[tokens, heads_q, head_dim]`` in the cache's dtype: causal attention of
            each new token over its sequence's ``[prefix ; suffix_i]`` up to itself.
        """
        self._check(layer, q, k, v)
        cache = self.cache
        k, v = k.detach(), v.detach()
        if self.is_prefix:
            if cache.uses_cascade:
                # A copy, so the cache does not keep alive a larger buffer k may be a view of.
                contiguous = torch.contiguous_format
                cache._prefix_k[layer] = k.clone(memory_format=contiguous)
                cache._prefix_v[layer] = v.clone(memory_format=contiguous)
            else:
                cache._per_sequence(cache._k[layer])[:, : cache.prefix_len] = k
                cache._per_sequence(cache._v[layer])[:, : cache.prefix_len] = v
            return self._plain(q, k, v, self.cu_seqlens_k, None)
        store_k, store_v = cache._k[layer], cache._v[layer]
        store_k.index_copy_(0, self._write_rows, k)
        store_v.index_copy_(0, self._write_rows, v)
        if not cache.uses_cascade:
            return self._plain(q, store_k, store_v, self.cu_seqlens_k, self.seqused_k)
        if cache._prefix_k[layer] is None:  # no prefill_prefix: an empty prefix
            empty = store_k.new_empty((0,) + tuple(store_k.shape[1:]))
            cache._prefix_k[layer], cache._prefix_v[layer] = empty, empty
        return cascade_attention(
            q, self.cu_seqlens_q, cache._prefix_k[layer], cache._prefix_v[layer], store_k, store_v,
            self.cu_seqlens_k, softmax_scale=cache.softmax_scale, max_seqlen_q=self.max_seqlen_q,
            max_seqlen_k=self.max_seqlen_k, cascade=True, seqused_k=self.seqused_k,
        )  # fmt: skip

    def _plain(self, q, k, v, cu_seqlens_k, seqused_k):
        out, _ = attention_with_lse(q, k, v, self.cu_seqlens_q, cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k,
                                    causal=True, softmax_scale=self.cache.softmax_scale,
                                    seqused_k=seqused_k)  # fmt: skip
        return out
