"""Shared prompts in Hugging Face transformers: the prompt's KV stored once, read once per step.

``model.generate(..., num_return_sequences=n)`` repeats the prompt ``n`` times before
prefill, so its KV is computed, stored and read ``n`` times; a batch of questions
about one document does the same. This module runs transformers' own model code
(Llama, Qwen2, Mistral, ...) with splitkv's cascade attention instead:

- ``attn_implementation="splitkv"`` (registered with transformers'
  ``AttentionInterface`` and ``AttentionMaskInterface`` when this module is imported):
  attention over a shared prefix KV (non-causal for the queries after it) plus each
  sequence's own KV (causal), merged exactly by :func:`splitkv.cascade_attention` on
  CUDA tensors. On CPU tensors the two passes run through
  :func:`splitkv.attention_with_lse` (its reference backend) and
  :func:`splitkv.merge_attn_states`: the cascade's Triton kernel would run in the slow
  Triton interpreter there when ``TRITON_INTERPRET=1``. With transformers' own caches
  (or none) the same function runs plain causal attention, so a model loaded this way
  also works without sharing. Left padding (each row's valid tokens a contiguous run
  that ends at the last column) is honoured; any other padding mask, a 4-D mask, a
  sliding window, soft-capping, attention sinks, ALiBi and dropout are refused with a
  ValueError, never ignored.
- :class:`SharedPrefixCache`: a transformers ``Cache`` holding the shared prefix's KV
  once (batch 1) and each sequence's KV after it, in token-major rows with room to grow.
  Each layer writes only its new (attended) tokens' K/V into those rows, and the
  attention reads the prefix and the rows in place (``seqused_k``: the rows as
  ``[batch * capacity, heads_kv, head_dim]`` slots, the capacity as ``max_seqlen_k``,
  so a decode step's kernel shapes stay the same while the sequences grow); the rows
  are copied only when they regrow. The step's layout is computed once per forward,
  at its first layer (host syncs only there, to check a padding mask). The queries
  are packed (a copy of the new tokens'); with transformers' own caches their
  ``[batch, heads_kv, keys, head_dim]`` KV is packed token-major per layer (a copy).
- :func:`generate_shared`: prefill the shared prompt once, then the suffixes, then
  ``generate()``.

Not differentiable in practice: the cache writes K/V in place and generation runs
under ``torch.no_grad()``; use a stock attention implementation for training.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from transformers import AttentionInterface, GenerationConfig
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

from ..attention import attention_with_lse
from ..cascade import cascade_attention
from ..merge import merge_attn_states

__all__ = ["SharedPrefixCache", "generate_shared", "splitkv_attention", "splitkv_attention_mask"]

#: The name to pass as ``attn_implementation``.
ATTN_IMPLEMENTATION = "splitkv"

# Attention-function keyword arguments that change the attention itself; cascade
# attention implements none of them, so a non-None value is refused.
_UNSUPPORTED_KWARGS = {
    "sliding_window": "a sliding window",
    "softcap": "attention-logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "alibi": "ALiBi",
    "position_bias": "an additive position bias",
}


def _refuse_config(config) -> None:
    """ValueError for model configs whose attention cascade attention does not compute."""
    window = getattr(config, "sliding_window", None) or None  # Qwen2-MoE's 0 means none
    # A config with layer_types says which layers use its window (Qwen2 keeps
    # sliding_window set with every layer full); the per-call sliding_window check in
    # splitkv_attention backs this up.
    layer_types = set(getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(
            f"attn_implementation='splitkv' computes full causal attention, but the model config has "
            f"sliding_window={window!r} and layer_types {getattr(config, 'layer_types', None)!r}; a sliding window is not "
            "supported (set config.sliding_window = None if the window is longer than every sequence)"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("attn_implementation='splitkv' does not support attention-logit soft-capping "
                         f"(config.attn_logit_softcapping={config.attn_logit_softcapping!r})")  # fmt: skip
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", None) == "alibi":
        raise ValueError("attn_implementation='splitkv' does not support ALiBi position biases")


class _StepPlan(NamedTuple):
    """One forward's attention layout: computed by its first layer, shared by all the others."""

    query_rows: torch.Tensor | None  # [attended_q] row of each attended query; None: every query attended
    query_cols: torch.Tensor | None  # [attended_q] its column among the new tokens
    cu_seqlens_q: torch.Tensor  # int32 [batch + 1] bounds of each row's attended queries
    max_seqlen_q: int  # the new-token count (a bound, static in decode)
    key_rows: torch.Tensor | None  # transformers' caches, padded: [total_k] row of each attended key (a gather)
    key_cols: torch.Tensor | None  # [total_k] its column; None: the keys are read as they lie
    write_rows: torch.Tensor | None  # SharedPrefixCache, padded: [attended_q] storage row of each new token
    cu_seqlens_k: torch.Tensor  # int32 [batch + 1]; a SharedPrefixCache's: arange(batch + 1) * capacity
    seqused_k: torch.Tensor | None  # int32 [batch] keys each row uses (SharedPrefixCache), None for a packed KV
    max_seqlen_k: int  # a SharedPrefixCache's capacity (static between regrowths), else the key count
    prefix_bounds: tuple[torch.Tensor, torch.Tensor] | None  # CPU prefix pass: [0, total_q] and [0, prefix_len]


def _left_padding_starts(padding_mask, prefix_len: int, columns: int, batch: int,
                         device: torch.device) -> torch.Tensor | None:  # fmt: skip
    """``[batch]`` int64 column (among the ``columns`` after the prefix) where each row's attended
    tokens begin, from a 2-D padding mask ``[batch, prefix_len + columns]``; None for no mask.
    Refuses any padding other than left padding after the shared prefix (host syncs: once per step)."""
    if padding_mask is None:
        return None
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.dim() != 2:
        shape = tuple(getattr(padding_mask, "shape", ()))
        raise ValueError("attn_implementation='splitkv' takes a 2-D padding mask [batch, keys], got "
                         f"{type(padding_mask).__name__} of shape {shape}")  # fmt: skip
    if tuple(padding_mask.shape) != (batch, prefix_len + columns):
        raise ValueError(f"attention_mask has shape {tuple(padding_mask.shape)}, but the cache holds "
                         f"{batch} sequences of {prefix_len} shared + {columns} own columns")  # fmt: skip
    padding_mask = padding_mask.to(device=device, dtype=torch.bool)
    if prefix_len and not bool(padding_mask[:, :prefix_len].all()):
        raise ValueError("attention_mask masks tokens of the shared prefix: the prefix is shared by every "
                         "sequence and cannot be padded")  # fmt: skip
    own = padding_mask[:, prefix_len:]
    starts = columns - own.sum(1)
    if not torch.equal(own, torch.arange(columns, device=device)[None, :] >= starts[:, None]):
        raise ValueError(
            "attn_implementation='splitkv' honours left padding only (each row's attended tokens one "
            "contiguous run ending at the last column); this attention_mask has right padding or holes"
        )
    return starts


def _query_layout(valid_keys: torch.Tensor, query_len: int, batch: int, device: torch.device):
    """The attended queries (each row's last ``min(valid_keys, query_len)`` new tokens): their rows
    and columns (None, None when all are attended) and int32 ``cu_seqlens_q``."""
    valid_queries = valid_keys.clamp(min=0, max=query_len)
    attended = torch.arange(query_len, device=device)[None, :] >= (query_len - valid_queries)[:, None]
    query_rows, query_cols = attended.nonzero(as_tuple=True)
    cu_seqlens_q = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu_seqlens_q[1:] = valid_queries.cumsum(0)
    if query_rows.shape[0] == batch * query_len:
        query_rows = query_cols = None
    return query_rows, query_cols, cu_seqlens_q


def _runs_cascade(device: torch.device) -> bool:
    """Whether attention on ``device`` runs :func:`splitkv.cascade_attention` (CUDA), else two
    :func:`splitkv.attention_with_lse` passes and the merge (CPU: the cascade's Triton kernel
    would run in the slow interpreter)."""
    return device.type == "cuda"


def _prefix_bounds(prefix_len: int, total_q: int, device: torch.device):
    """``[0, total_q]`` and ``[0, prefix_len]``: the CPU prefix pass as one non-causal sequence."""
    if _runs_cascade(device) or not prefix_len:
        return None
    return (torch.tensor([0, total_q], dtype=torch.int32, device=device),
            torch.tensor([0, prefix_len], dtype=torch.int32, device=device))  # fmt: skip


def _plan_packed(padding_mask, columns: int, query_len: int, batch: int, device: torch.device) -> _StepPlan:
    """The plan for transformers' own caches (or none): their ``[batch, heads_kv, keys, head_dim]``
    KV is packed token-major (a copy per layer), the padded keys left out."""
    starts = _left_padding_starts(padding_mask, 0, columns, batch, device)
    bounds = torch.arange(batch + 1, dtype=torch.int32, device=device)
    if starts is None and query_len <= columns:
        # Nothing padded: bounds built without a host sync.
        return _StepPlan(None, None, bounds * query_len, query_len, None, None, None, bounds * columns, None, columns,
                         None)  # fmt: skip
    if starts is None:
        starts = torch.zeros(batch, dtype=torch.long, device=device)
    valid_keys = columns - starts
    query_rows, query_cols, cu_seqlens_q = _query_layout(valid_keys, query_len, batch, device)
    cols = torch.arange(columns, device=device)
    key_rows, key_cols = (cols[None, :] >= starts[:, None]).nonzero(as_tuple=True)
    cu_seqlens_k = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu_seqlens_k[1:] = valid_keys.cumsum(0)
    return _StepPlan(query_rows, query_cols, cu_seqlens_q, query_len, key_rows, key_cols, None, cu_seqlens_k, None,
                     columns, None)  # fmt: skip


def _plan_shared(owner: SharedPrefixCache, padding_mask, prefix_len: int, columns: int, query_len: int,
                 capacity: int, batch: int, device: torch.device) -> _StepPlan:  # fmt: skip
    """The plan for a :class:`SharedPrefixCache` step: each row's tokens lie compact at the start
    of its ``capacity`` slots of the layer's ``[batch * capacity, heads_kv, head_dim]`` storage
    (the padded ones never stored), read in place through ``seqused_k``. Updates the cache's
    per-row counts (once per step: this runs at the step's first layer)."""
    starts = _left_padding_starts(padding_mask, prefix_len, columns, batch, device)
    slots = torch.arange(batch + 1, dtype=torch.int32, device=device)
    cu_seqlens_k = slots * capacity
    if starts is None:
        if owner.row_used is not None:
            raise ValueError("this SharedPrefixCache holds left-padded rows: pass the attention_mask (with their "
                             "padding) at every step")  # fmt: skip
        seqused_k = torch.full((batch,), columns, dtype=torch.int32, device=device)
        return _StepPlan(None, None, slots * query_len, query_len, None, None, None, cu_seqlens_k, seqused_k, capacity,
                         _prefix_bounds(prefix_len, batch * query_len, device))  # fmt: skip
    valid_keys = (columns - starts).clamp(min=0)
    stored = owner.row_used
    if stored is None:
        stored = torch.full((batch,), columns - query_len, dtype=torch.long, device=device)
    if not torch.equal((columns - query_len - starts).clamp(min=0), stored):
        raise ValueError("attention_mask changes the padding of tokens the SharedPrefixCache already holds "
                         "(a token padded before is attended now, or the reverse)")  # fmt: skip
    owner.row_used = valid_keys
    query_rows, query_cols, cu_seqlens_q = _query_layout(valid_keys, query_len, batch, device)
    # Each attended new token goes after its row's stored ones: slot (used after the step) - new + column.
    if query_rows is None:
        rows = torch.arange(batch, device=device)[:, None]
        write_rows = (rows * capacity + (valid_keys[:, None] - query_len)
                      + torch.arange(query_len, device=device)[None, :]).flatten()  # fmt: skip
    else:
        write_rows = query_rows * capacity + (valid_keys - query_len)[query_rows] + query_cols
    total_q = batch * query_len if query_rows is None else query_rows.shape[0]
    return _StepPlan(query_rows, query_cols, cu_seqlens_q, query_len, None, None, write_rows, cu_seqlens_k,
                     valid_keys.to(torch.int32), capacity, _prefix_bounds(prefix_len, total_q, device))  # fmt: skip


class _PlanMemo:
    """Holds the last plan: computed once per forward (at the first layer), reused by the others."""

    def __init__(self):
        self.key = None
        self.plan = None

    def get(self, padding_mask, sizes: tuple, build) -> _StepPlan:
        # The mask object itself is part of the key (held here, so its id is not reused).
        if self.key is None or self.key[0] is not padding_mask or self.key[1] != sizes:
            self.plan = build()
            self.key = (padding_mask, sizes)
        return self.plan


# For transformers' own caches (and no cache): plain causal attention over their KV.
_STOCK_CACHE_MEMO = _PlanMemo()


_UNSTORED_UPDATE = (
    "SharedPrefixCache: the keys and values its last update returned did not reach splitkv's attention "
    "function as they were: the model transforms K/V after cache.update (as JetMoe does; not supported), "
    "or an earlier call failed part-way through and left this cache inconsistent (make a new one)"
)


class _SharedPrefixLayer(CacheLayerMixin):
    """One layer of :class:`SharedPrefixCache`: ``prefix_keys/values [prefix_len, heads_kv, head_dim]``
    (stored once) and ``row_keys/values [batch, capacity, heads_kv, head_dim]`` (contiguous, so
    also ``[batch * capacity, heads_kv, head_dim]`` slots for :func:`splitkv.cascade_attention`'s
    ``seqused_k``): row ``i`` holds its attended own tokens compact from column 0 (the padded
    ones are not stored). ``columns`` counts the row's columns, padded ones included, as
    transformers' positions and masks do."""

    is_sliding = False

    def __init__(self, owner: SharedPrefixCache):
        super().__init__()
        self.owner = owner
        self.prefix_keys = self.prefix_values = None
        self.row_keys = self.row_values = None
        self.columns = 0
        # An update whose tokens splitkv_attention has not stored yet (see update).
        self.unstored = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads_kv, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.prefix_keys = key_states.new_empty((0, heads_kv, head_dim))
        self.prefix_values = value_states.new_empty((0, heads_kv, head_dim))
        self.row_keys = key_states.new_empty((batch, self.owner.reserved_columns, heads_kv, head_dim))
        self.row_values = value_states.new_empty((batch, self.owner.reserved_columns, heads_kv, head_dim))
        self.is_initialized = True

    def _grow(self, needed: int) -> None:
        capacity = self.row_keys.shape[1]
        if needed <= capacity:
            return
        # Doubling keeps the copies amortised; reserve() sizes the rows up front.
        capacity = max(needed, 2 * capacity, self.owner.reserved_columns)
        for name in ("row_keys", "row_values"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], capacity) + tuple(old.shape[2:]))
            new[:, : self.columns] = old[:, : self.columns]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Makes room for ``key/value_states [batch, heads_kv, new, head_dim]`` and returns them, marked
        for :func:`splitkv_attention`, which stores them (:meth:`store`: only it knows from the
        padding mask which are attended) and reads this layer's whole KV in place."""
        if self.owner.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                "SharedPrefixCache works only with attn_implementation='splitkv' (other attention functions "
                f"would see only the new tokens); the model uses {self.owner.config._attn_implementation!r}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.unstored:
            # The last update's tokens never reached splitkv_attention with their mark: the
            # model passed it other tensors (JetMoe repeats K/V after the update), so it
            # attended to them alone and the cache holds a gap.
            raise ValueError(_UNSTORED_UPDATE)
        batch, _, new, _ = key_states.shape
        if batch != self.row_keys.shape[0]:
            raise ValueError(f"the cache holds {self.row_keys.shape[0]} sequences, the model was called with {batch}")
        self._grow(self.columns + new)
        self.columns += new
        key_states._splitkv_layer = self
        self.unstored = True
        return key_states, value_states

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor, plan: _StepPlan) -> None:
        """Writes the attended new tokens of ``key/value_states [batch, heads_kv, new, head_dim]`` after
        each row's stored ones (the only copy of this layer's KV a step makes)."""
        self.unstored = False
        new = key_states.shape[2]
        new_keys, new_values = key_states.transpose(1, 2), value_states.transpose(1, 2)  # [batch, new, heads_kv, dim]
        if plan.write_rows is None:  # nothing padded: every row's next `new` columns
            self.row_keys[:, self.columns - new : self.columns] = new_keys
            self.row_values[:, self.columns - new : self.columns] = new_values
            return
        if plan.query_rows is not None:
            new_keys = new_keys[plan.query_rows, plan.query_cols]
            new_values = new_values[plan.query_rows, plan.query_cols]
        slots = (-1,) + tuple(self.row_keys.shape[2:])  # [batch * capacity, heads_kv, head_dim]
        self.row_keys.view(slots).index_copy_(0, plan.write_rows, new_keys.reshape(slots))
        self.row_values.view(slots).index_copy_(0, plan.write_rows, new_values.reshape(slots))

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # transformers < 5 passes cache_position (a tensor of the new positions) instead.
        new = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.get_seq_length() + new, 0

    def get_seq_length(self) -> int:
        prefix = self.prefix_keys.shape[0] if self.prefix_keys is not None else 0
        return prefix + self.columns

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.prefix_keys = self.prefix_values = self.row_keys = self.row_values = None
        self.columns = 0
        self.unstored = False
        self.is_initialized = False
        self.owner.row_used, self.owner.plan_memo = None, _PlanMemo()

    def share_rows(self, batch_size: int) -> None:
        """Moves row 0 (the only one) onto the shared prefix; leaves ``batch_size`` empty rows."""
        if self.row_keys.shape[0] != 1:
            raise ValueError(f"only a batch of one sequence can become the shared prefix, got {self.row_keys.shape[0]}")
        if self.owner.row_used is not None:
            raise ValueError("the shared prefix cannot be padded: prefill it without padding (attention_mask all ones)")
        used_keys, used_values = self.row_keys[0, : self.columns], self.row_values[0, : self.columns]
        self.prefix_keys = torch.cat([self.prefix_keys, used_keys]) if self.prefix_keys.shape[0] else used_keys.clone()
        self.prefix_values = (torch.cat([self.prefix_values, used_values]) if self.prefix_values.shape[0]
                              else used_values.clone())  # fmt: skip
        shape = (batch_size, self.owner.reserved_columns) + tuple(self.row_keys.shape[2:])
        self.row_keys, self.row_values = self.row_keys.new_empty(shape), self.row_values.new_empty(shape)
        self.columns = 0


class SharedPrefixCache(Cache):
    """A transformers ``Cache`` that stores a shared prompt's KV once and each sequence's KV after it.

    Prefill the shared prompt with a batch of one sequence, call
    :meth:`share_prefix` with the batch size to decode, then run the model (or
    ``generate()``) on that batch: every sequence attends to the one stored prefix
    through ``attn_implementation="splitkv"``. The attention mask the model is given
    covers ``prefix_len + columns`` columns; the prefix columns must be all ones, and a
    row may be left-padded after them (its own tokens a contiguous run ending at the
    last column); once a row is padded, the mask must come with every later call,
    its padding unchanged (else a ValueError). Padded tokens are not stored: each
    layer keeps a row's attended tokens compact in its preallocated slots, which the
    attention reads in place (see the module docstring). Beam search
    (``reorder_cache``), cropping and batch reshuffles are refused with a
    ValueError; so is sharing a padded prompt. Eager mode only (it marks the tensors it returns for
    the attention function; not for torch.compile). The cache checks on every update
    that the model runs ``attn_implementation="splitkv"``: another attention function
    would see only the new tokens.

    Args:
        config: the model's config (``model.config``, the same object, so that a later
            ``set_attn_implementation`` is seen); configs with a sliding window,
            soft-capping or ALiBi are refused with a ValueError.

    Attention over it runs on the backends of :func:`splitkv_attention`. Not
    differentiable: the KV is written in place.

    Example:
        >>> import torch, splitkv
        >>> from transformers import AutoModelForCausalLM, LlamaConfig
        >>> from splitkv.integrations.transformers import SharedPrefixCache
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> model = AutoModelForCausalLM.from_config(config, attn_implementation="splitkv")
        >>> cache = SharedPrefixCache(model.config)
        >>> _ = model(torch.arange(10)[None], past_key_values=cache)  # the shared prompt, once
        >>> cache.share_prefix(batch_size=3)
        >>> out = model(torch.tensor([[5], [6], [7]]), past_key_values=cache, position_ids=torch.full((3, 1), 10))
        >>> out.logits.shape, cache.prefix_length, cache.get_seq_length()
        (torch.Size([3, 1, 64]), 10, 11)
    """

    def __init__(self, config):
        text_config = config.get_text_config(decoder=True)
        _refuse_config(text_config)
        self.config = text_config
        self.reserved_columns = 0
        self.plan_memo = _PlanMemo()
        # int64 [batch] tokens each row has stored (its attended ones), on the device; None while
        # no row was padded (every row then stores all its columns).
        self.row_used = None
        super().__init__(layers=[_SharedPrefixLayer(self) for _ in range(text_config.num_hidden_layers)])

    @property
    def prefix_length(self) -> int:
        """Number of shared prefix tokens stored (once)."""
        layer = self.layers[0]
        return layer.prefix_keys.shape[0] if layer.prefix_keys is not None else 0

    def reserve(self, columns: int) -> None:
        """Sizes each sequence's rows for ``columns`` own tokens up front (no regrowth before that)."""
        self.reserved_columns = int(columns)

    def share_prefix(self, batch_size: int) -> None:
        """Turns the tokens cached so far (a batch of one sequence) into the shared prefix and
        starts ``batch_size`` sequences after it, each with no tokens of its own yet.

        Args:
            batch_size: number of sequences that will decode after the prefix.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not all(layer.is_initialized for layer in self.layers):
            raise ValueError("share_prefix needs the shared prompt prefilled first "
                             "(run the model on it with this cache)")  # fmt: skip
        for layer in self.layers:
            layer.share_rows(batch_size)
        self.plan_memo = _PlanMemo()

    def _refuse(self, what: str):
        raise ValueError(f"SharedPrefixCache does not support {what}")

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._refuse("beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        self._refuse("crop (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int):
        self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor):
        self._refuse("batch_select_indices")


def splitkv_attention_mask(*, batch_size: int, kv_length: int, kv_offset: int = 0, mask_function=None,
                           attention_mask: torch.Tensor | None = None, config=None, **kwargs):  # fmt: skip
    """The mask function registered for ``attn_implementation="splitkv"`` (transformers calls it).

    Args:
        batch_size, kv_length, kv_offset: from transformers' mask creation.
        mask_function: the mask pattern; only plain causal is accepted (sliding
            windows, chunked attention, packed sequences and overlays are refused).
        attention_mask: the 2-D padding mask ``[batch, keys]`` or None.
        config: the model config (checked for sliding window, soft-capping, ALiBi).

    Returns:
        None when nothing is padded, else the 2-D boolean padding mask of the last
        ``kv_length`` columns, which :func:`splitkv_attention` turns into per-sequence
        lengths (refusing any padding other than left padding).

    Not differentiable (a mask).

    Example:
        >>> import torch, splitkv
        >>> from transformers.masking_utils import causal_mask_function
        >>> from splitkv.integrations.transformers import splitkv_attention_mask
        >>> mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
        >>> splitkv_attention_mask(batch_size=2, kv_length=3, mask_function=causal_mask_function,
        ...                        attention_mask=mask).tolist()
        [[False, True, True], [True, True, True]]
    """
    if config is not None:
        _refuse_config(config)
    if mask_function is not None and mask_function is not causal_mask_function:
        raise ValueError(
            "attn_implementation='splitkv' computes plain causal attention; this model asked for another mask "
            f"pattern ({getattr(mask_function, '__qualname__', mask_function)}: a sliding window, chunked "
            "attention, packed sequences or a mask overlay), which it does not support"
        )
    if kv_offset:
        raise ValueError(f"attn_implementation='splitkv' does not support a key offset (kv_offset={kv_offset})")
    q_offset, q_length = kwargs.get("q_offset"), kwargs.get("q_length")
    # The attention reads every key column it is given; a preallocated (static) cache
    # gives its unfilled slots too (more columns than tokens so far), which would be
    # attended silently. An offset given as a tensor (static caches; a sync on a GPU,
    # once per forward) is read. transformers versions that pass no q_offset / q_length
    # are not checked here.
    if q_offset is not None and q_length is not None and int(q_offset) + int(q_length) != kv_length:
        raise ValueError(
            "attn_implementation='splitkv' attends every key column it is given; this cache has "
            f"{kv_length} columns for {int(q_offset)} + {int(q_length)} tokens (a static / preallocated cache, "
            "e.g. cache_implementation='static'), which it does not support: use the default dynamic cache "
            "or generate_shared"
        )
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    if attention_mask.shape[1] != kv_length:
        raise ValueError(f"attention_mask covers {attention_mask.shape[1]} keys, the attention sees {kv_length}")
    return None if bool(attention_mask.all()) else attention_mask


def _refuse_call(module, dropout, attention_mask, kwargs) -> None:
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='splitkv' does not support {what} ({name}={kwargs[name]!r})")
    if dropout:
        raise ValueError(f"attn_implementation='splitkv' does not support attention dropout (dropout={dropout}); "
                         "call model.eval() or use another attention implementation for training")  # fmt: skip
    if getattr(module, "is_causal", True) is False:
        raise ValueError("attn_implementation='splitkv' computes causal attention; this module is not causal")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        raise ValueError("attn_implementation='splitkv' takes only the 2-D padding mask its mask function makes, "
                         f"got a {getattr(attention_mask, 'dim', lambda: '?')()}-D mask")  # fmt: skip


def _attend(query, prefix_keys, prefix_values, keys, values, plan: _StepPlan, scale):
    """Cascade attention of ``query [batch, heads_q, new, head_dim]`` over the prefix KV
    ``[prefix_len, heads_kv, head_dim]`` and each row's KV in ``keys`` / ``values [slots,
    heads_kv, head_dim]`` as ``plan`` lays it out (read as they lie, no copy); returns ``[batch,
    new, heads_q, head_dim]`` (zeros for padded queries)."""
    batch, heads_q, query_len, head_dim = query.shape
    query_tokens = query.transpose(1, 2)  # [batch, new, heads_q, head_dim]
    if plan.query_rows is None:
        q = query_tokens.reshape(batch * query_len, heads_q, head_dim)
    else:
        q = query_tokens[plan.query_rows, plan.query_cols]
    if _runs_cascade(q.device):
        out = cascade_attention(q, plan.cu_seqlens_q, prefix_keys, prefix_values, keys, values, plan.cu_seqlens_k,
                                softmax_scale=scale, max_seqlen_q=plan.max_seqlen_q, max_seqlen_k=plan.max_seqlen_k,
                                seqused_k=plan.seqused_k)  # fmt: skip
    else:
        out, lse = attention_with_lse(q, keys, values, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q,
                                      plan.max_seqlen_k, causal=True, softmax_scale=scale,
                                      seqused_k=plan.seqused_k)  # fmt: skip
        if plan.prefix_bounds is not None:
            # Every query sees the whole prefix: one sequence of all queries, non-causal.
            bounds_q, bounds_k = plan.prefix_bounds
            prefix_out, prefix_lse = attention_with_lse(q, prefix_keys, prefix_values, bounds_q, bounds_k, q.shape[0],
                                                        prefix_keys.shape[0], softmax_scale=scale)  # fmt: skip
            out, _ = merge_attn_states(prefix_out, prefix_lse, out, lse, return_lse=False)
    if plan.query_rows is None:
        return out.view(batch, query_len, heads_q, head_dim)
    full = out.new_zeros((batch, query_len, heads_q, head_dim))
    full[plan.query_rows, plan.query_cols] = out
    return full


def splitkv_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs):  # fmt: skip
    """The attention function registered as ``attn_implementation="splitkv"`` (transformers calls it).

    With a :class:`SharedPrefixCache`, ``key``/``value`` are the new tokens its update
    returned and the whole KV (shared prefix + each sequence's own) is read from the
    cache; with any other cache (or none) they are the whole ``[batch, heads_kv, keys,
    head_dim]`` KV. Either way the result is causal attention over each sequence's
    attended tokens, the padded ones (left padding, from ``attention_mask``) left out.

    Args:
        module: the attention module (its ``is_causal`` must not be False).
        query: ``[batch, heads_q, new, head_dim]``.
        key, value: ``[batch, heads_kv, keys, head_dim]``.
        attention_mask: None or the 2-D padding mask from :func:`splitkv_attention_mask`.
        scaling: softmax scale (default ``head_dim ** -0.5``).
        dropout: must be 0.
        kwargs: ``sliding_window``, ``softcap``, ``s_aux``/``sinks``, ``alibi`` or
            ``position_bias`` that are not None are refused with a ValueError; others
            are ignored.

    Returns:
        ``(out [batch, new, heads_q, head_dim], None)``, as transformers' sdpa function;
        padded query positions get zeros.

    Backends: :func:`splitkv.cascade_attention` on CUDA tensors; on CPU tensors the
    reference backend of :func:`splitkv.attention_with_lse` and the torch merge.
    Not differentiable through a :class:`SharedPrefixCache` (written in place);
    through transformers' caches it is differentiable on CPU (reference backend)
    only where splitkv's attention backends are.

    Example:
        >>> import torch, splitkv
        >>> from splitkv.integrations.transformers import splitkv_attention
        >>> module = torch.nn.Module()
        >>> q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
        >>> out, _ = splitkv_attention(module, q, k, v, None)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        >>> torch.allclose(out.transpose(1, 2), ref, atol=1e-5)
        True
    """
    _refuse_call(module, dropout, attention_mask, kwargs)
    layer = getattr(key, "_splitkv_layer", None)
    batch, _, query_len, _ = query.shape
    device = query.device
    if layer is not None:
        # The cache's storage, read in place: [batch * capacity, heads_kv, head_dim] slots.
        prefix_keys, prefix_values, owner = layer.prefix_keys, layer.prefix_values, layer.owner
        prefix_len, columns, capacity = prefix_keys.shape[0], layer.columns, layer.row_keys.shape[1]
        plan = owner.plan_memo.get(attention_mask, (prefix_len, columns, capacity, query_len, batch, device),
                                   lambda: _plan_shared(owner, attention_mask, prefix_len, columns, query_len,
                                                        capacity, batch, device))  # fmt: skip
        layer.store(key, value, plan)
        heads_kv, head_dim = layer.row_keys.shape[2:]
        keys = layer.row_keys.view(-1, heads_kv, head_dim)
        values = layer.row_values.view(-1, heads_kv, head_dim)
    else:
        _, heads_kv, columns, head_dim = key.shape
        prefix_keys = prefix_values = key.new_empty((0, heads_kv, head_dim))
        plan = _STOCK_CACHE_MEMO.get(attention_mask, (columns, query_len, batch, device),
                                     lambda: _plan_packed(attention_mask, columns, query_len, batch,
                                                          device))  # fmt: skip
        # transformers' caches hold [batch, heads_kv, keys, head_dim]: packed token-major (a copy).
        keys, values = key.transpose(1, 2), value.transpose(1, 2)
        if plan.key_rows is None:
            keys, values = keys.reshape(-1, heads_kv, head_dim), values.reshape(-1, heads_kv, head_dim)
        else:
            keys, values = keys[plan.key_rows, plan.key_cols], values[plan.key_rows, plan.key_cols]
    out = _attend(query, prefix_keys, prefix_values, keys, values, plan, scaling)
    return out, None


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(t) for t in value.flatten().tolist()]
    return [int(t) for t in value] if isinstance(value, (list, tuple)) else [int(value)]


def _pad_and_eos(model, generate_kwargs) -> tuple[int, list[int]]:
    """The pad token (pad, else the first EOS, else 0) and the EOS tokens generate() stops at."""
    config = _generation_config(model, generate_kwargs)
    eos = _token_ids(generate_kwargs.get("eos_token_id", config.eos_token_id))
    pad = _token_ids(generate_kwargs.get("pad_token_id", config.pad_token_id))
    return (pad or eos or [0])[0], eos


def _generation_config(model, generate_kwargs) -> GenerationConfig:
    return generate_kwargs.get("generation_config") or model.generation_config or GenerationConfig()


# Logits processors that read the prompt's token ids: generate_shared's input_ids hold
# pad tokens between the shared prompt and a shorter suffix, which they would read as
# prompt tokens (a pad equal to EOS penalised or banned), so they are refused when the
# suffixes differ in length. Values that switch each one off.
_PROMPT_READING_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                              "sequence_bias": None}  # fmt: skip


def _expect_no_prompt_readers(model, generate_kwargs) -> None:
    config = _generation_config(model, generate_kwargs)
    for name, off in _PROMPT_READING_PROCESSORS.items():
        value = generate_kwargs.get(name, getattr(config, name, off))
        if value is not None and value != off:
            raise ValueError(
                f"generate_shared pads suffixes of different lengths with pad tokens, which {name}={value!r} "
                "would read as prompt tokens; give suffixes of one length or leave it unset"
            )


def _check_generate_kwargs(model, generate_kwargs) -> int:
    """Refusals of generate_shared; returns max_new_tokens."""
    for name in ("input_ids", "inputs", "attention_mask", "past_key_values", "inputs_embeds", "position_ids"):
        if name in generate_kwargs:
            raise TypeError(f"generate_shared builds {name} itself; pass shared_ids and suffix_ids instead")
    config = _generation_config(model, generate_kwargs)
    num_beams = generate_kwargs.get("num_beams", config.num_beams) or 1
    if num_beams > 1:
        raise ValueError(f"generate_shared does not support beam search (num_beams={num_beams}); "
                         "use greedy decoding or sampling")  # fmt: skip
    for name in ("assistant_model", "prompt_lookup_num_tokens", "penalty_alpha"):
        if generate_kwargs.get(name) is not None:
            raise ValueError(f"generate_shared does not support {name} (assisted / contrastive decoding)")
    if generate_kwargs.get("max_length") is not None or generate_kwargs.get("min_length", config.min_length):
        raise ValueError("generate_shared counts lengths in new tokens: pass max_new_tokens / min_new_tokens, "
                         "not max_length / min_length")  # fmt: skip
    if generate_kwargs.get("use_cache", config.use_cache) is False:
        raise ValueError("generate_shared decodes from the shared prompt's cache: use_cache=False is not supported")
    max_new_tokens = generate_kwargs.get("max_new_tokens", config.max_new_tokens)
    if max_new_tokens is None:
        raise ValueError("generate_shared needs max_new_tokens (in generate_kwargs or the generation config)")
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(
            "generate_shared needs the model to run attn_implementation='splitkv' (load it with "
            "attn_implementation='splitkv' or call model.set_attn_implementation('splitkv')); it runs "
            f"{model.config._attn_implementation!r}"
        )
    return int(max_new_tokens)


def _cache_argument(model) -> str:
    """The name the model's forward takes its cache under: ``"cache"`` (newer transformers) or
    ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _as_ids(name: str, ids, device) -> torch.Tensor:
    if ids is None:
        return torch.empty(0, dtype=torch.long, device=device)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise TypeError(f"{name} must be a 1-D LongTensor of token ids, got {type(ids).__name__} "
                        f"of shape {tuple(getattr(ids, 'shape', ()))}")  # fmt: skip
    if ids.dtype != torch.long:
        raise TypeError(f"{name} must have dtype torch.long, got {ids.dtype}")
    return ids.to(device)


@torch.no_grad()
def generate_shared(model, shared_ids: torch.Tensor, suffix_ids: list[torch.Tensor] | None = None, *,
                    num_return_sequences: int | None = None, **generate_kwargs):  # fmt: skip
    """``generate()`` for prompts ``[shared ; suffix_i]`` with the shared prompt's KV computed and stored once.

    Prefills all but the last token of ``shared_ids`` once (batch 1) into a
    :class:`SharedPrefixCache`, then runs ``model.generate`` on the sequences
    ``[shared[-1] ; suffix_i]`` after that prefix (left-padded among themselves, the
    padding masked), each repeated ``num_return_sequences`` times. The last shared
    token is kept with every sequence so that each one ends on a real token (it costs
    one token of per-sequence KV).

    Args:
        model: a transformers causal LM loaded with ``attn_implementation="splitkv"``
            (or switched with ``model.set_attn_implementation("splitkv")``).
        shared_ids: ``[shared_len]`` LongTensor, the common prompt (may be empty when
            every suffix is non-empty).
        suffix_ids: list of ``[len_i]`` LongTensors (or None entries), each request's
            own tokens after the shared prompt; None or ``[]`` means one request with
            no suffix.
        num_return_sequences: sequences generated per request; None takes the
            generation config's (``generation_config`` if given, else the model's), as
            ``generate()`` does.
        generate_kwargs: passed to ``generate()`` (``max_new_tokens`` required;
            ``max_length``/``min_length``, beam search, assisted and contrastive
            decoding, ``use_cache=False`` and, where the suffixes differ in length,
            the logits processors that read the prompt's ids (``repetition_penalty``,
            ``no_repeat_ngram_size``, ``bad_words_ids``, ``sequence_bias``) are
            refused with a ValueError; ``input_ids``, ``attention_mask``,
            ``past_key_values``, ``inputs_embeds``, ``position_ids`` with a TypeError).

    Returns:
        What ``generate()`` would return for the inputs ``[shared ; suffix_i]``, each
        repeated ``num_return_sequences`` times, in that order: a LongTensor
        ``[len(suffix_ids) * num_return_sequences, longest]`` whose row is
        ``[shared ; suffix_i ; generated]`` (up to its first EOS), rows of different
        length right-padded with the pad token (``pad_token_id``, else the EOS token,
        else 0) to the longest; with
        ``return_dict_in_generate=True``, generate's output object with that tensor
        as ``sequences`` (its scores/logits are per step, as generate gives them).

    Backends: as :func:`splitkv_attention` (cascade attention on CUDA tensors, the
    reference backend on CPU tensors). Not differentiable (runs under ``torch.no_grad()``).

    Example:
        >>> import torch, splitkv
        >>> from transformers import AutoModelForCausalLM, LlamaConfig
        >>> from splitkv.integrations.transformers import generate_shared
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=None, pad_token_id=0)
        >>> model = AutoModelForCausalLM.from_config(config, attn_implementation="splitkv")
        >>> shared = torch.randint(1, 64, (12,))
        >>> out = generate_shared(model, shared, [torch.tensor([3, 4]), torch.tensor([], dtype=torch.long)],
        ...                       num_return_sequences=2, max_new_tokens=5, do_sample=True, top_k=1)
        >>> out.shape  # 2 requests x 2 sequences; 12 + 2 + 5 tokens at most
        torch.Size([4, 19])
    """
    max_new_tokens = _check_generate_kwargs(model, generate_kwargs)
    if num_return_sequences is None:
        num_return_sequences = _generation_config(model, generate_kwargs).num_return_sequences or 1
    if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be a positive int, got {num_return_sequences!r}")
    device = model.device
    shared = _as_ids("shared_ids", shared_ids, device)
    if suffix_ids is None or len(suffix_ids) == 0:
        suffix_ids = [None]
    suffixes = [_as_ids(f"suffix_ids[{i}]", s, device) for i, s in enumerate(suffix_ids)]
    if shared.shape[0] == 0 and any(s.shape[0] == 0 for s in suffixes):
        raise ValueError("with an empty shared_ids every suffix must hold at least one token")
    pad, eos = _pad_and_eos(model, generate_kwargs)
    prefix, last = shared[:-1], shared[-1:]
    own = [torch.cat([last, s]) for s in suffixes]  # each ends on a real token
    longest = max(s.shape[0] for s in own)
    if any(s.shape[0] != longest for s in own):
        _expect_no_prompt_readers(model, generate_kwargs)
    requests = len(own)

    cache = SharedPrefixCache(model.config)
    if prefix.shape[0]:
        cache.reserve(prefix.shape[0])
        extra = {"logits_to_keep": 1} if model._supports_logits_to_keep() else {}
        model(input_ids=prefix[None], use_cache=True, **{_cache_argument(model): cache}, **extra)
        cache.reserve(longest + max_new_tokens)
        cache.share_prefix(requests * num_return_sequences)
    else:
        cache.reserve(longest + max_new_tokens)

    # [prefix ; padding ; shared[-1] ; suffix_i]: the padding sits after the shared prefix.
    input_ids = torch.full((requests, prefix.shape[0] + longest), pad, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    input_ids[:, : prefix.shape[0]] = prefix
    attention_mask[:, : prefix.shape[0]] = 1
    for i, s in enumerate(own):
        input_ids[i, input_ids.shape[1] - s.shape[0] :] = s
        attention_mask[i, input_ids.shape[1] - s.shape[0] :] = 1
    result = model.generate(input_ids=input_ids, attention_mask=attention_mask, **{_cache_argument(model): cache},
                            num_return_sequences=num_return_sequences, **generate_kwargs)  # fmt: skip
    if any(layer.unstored for layer in cache.layers):
        raise ValueError(_UNSTORED_UPDATE)  # the last step's update, which no later update checked
    sequences = result if isinstance(result, torch.Tensor) else result.sequences
    generated = sequences[:, input_ids.shape[1] :]
    # A sequence ends at its first EOS (generate pads it after that while others go on).
    steps = torch.arange(generated.shape[1], device=device)
    ended = (torch.isin(generated, torch.tensor(eos, device=device)) if eos
             else torch.zeros_like(generated, dtype=torch.bool))  # fmt: skip
    lengths = torch.where(ended, steps + 1, generated.shape[1]).min(1).values.tolist()
    rows = [torch.cat([shared, suffixes[r // num_return_sequences], generated[r, : lengths[r]]])
            for r in range(generated.shape[0])]  # fmt: skip
    out = torch.full((len(rows), max(r.shape[0] for r in rows)), pad, dtype=torch.long, device=device)
    for r, row in enumerate(rows):
        out[r, : row.shape[0]] = row
    if isinstance(result, torch.Tensor):
        return out
    result.sequences = out
    return result


AttentionInterface.register(ATTN_IMPLEMENTATION, splitkv_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, splitkv_attention_mask)
