"""Split-KV attention across processes (context parallelism) with ``torch.distributed``.

A sequence's KV cache too long for one GPU is cut into contiguous shards, one per
rank. Attention over the whole sequence is then the exact merge of the ranks'
partial states (see :mod:`splitkv.merge`): each rank runs
:func:`splitkv.attention_with_lse` over its shard, and the states are combined
across the process group so that every rank returns the full result.

* :func:`context_parallel_attention`: every rank holds the same queries (decode,
  or the last chunk of a prefill) and one KV shard per sequence.
* :func:`context_parallel_prefill`: every rank holds a shard of the query tokens
  *and* the matching KV of one or more sequences (causal self-attention), in the
  contiguous or the zig-zag (load-balanced) layout; :func:`shard_sequences`,
  :func:`unshard_sequences` and :func:`shard_indices` move tensors into and out
  of those layouts.

Conventions are those of :func:`splitkv.attention_with_lse`: varlen packed
tensors ``[tokens, heads, head_dim]`` delimited by int32 ``cu_seqlens``, GQA,
bottom-right aligned causal mask, and LSE ``[heads, tokens]`` float32 natural
log; a query row that sees no key gets output 0 and LSE ``-inf`` (never NaN).

The same code runs on NCCL (CUDA tensors) and gloo (CPU tensors): only
``all_gather`` (single-tensor form where the backend has it) and ``all_reduce``
are used, all-gathers move raw bytes (so no backend has to support the dtype)
and reductions run in float32 (gloo lacks bfloat16 sums in some versions, and a
float32 sum is what the merge needs anyway). Every rank of the group must call
these functions with the same arguments except the shards themselves (the same
dtypes, heads, head_dim, batch, ``cu_seqlens_q``, ``max_seqlen_q``, flags, combine
and layout); the collectives carry raw bytes, so arguments that differ across
ranks are not detected: they make the collectives fail or hang, or return wrong
results on some ranks without an error. ``context_parallel_attention`` is
differentiable (its backward runs its own collectives); the other functions are
forward only.
docs/distributed.md counts the bytes each call moves.

The package by job: :mod:`~splitkv.distributed.checks` (argument checks that name
the caller's arguments), :mod:`~splitkv.distributed.collectives` (byte-level
all-gathers), :mod:`~splitkv.distributed.decode` (:func:`context_parallel_attention`
and its two combines), :mod:`~splitkv.distributed.layouts` (the sharding layouts)
and :mod:`~splitkv.distributed.prefill` (:func:`context_parallel_prefill`). The
public API is the names re-exported here.
"""

from __future__ import annotations

# Internals the test suite and the benchmark reach (the same objects: the set is shared state).
from .collectives import _NO_SINGLE_TENSOR_GATHER  # noqa: F401
from .decode import COMBINES, _shard_state, choose_combine, combine_bytes, context_parallel_attention  # noqa: F401
from .layouts import LAYOUTS, shard_indices, shard_sequences, unshard_sequences
from .prefill import context_parallel_prefill

__all__ = [
    "COMBINES",
    "LAYOUTS",
    "choose_combine",
    "combine_bytes",
    "context_parallel_attention",
    "context_parallel_prefill",
    "shard_indices",
    "shard_sequences",
    "unshard_sequences",
]

# The public functions are documented, and referred to, as splitkv.distributed.<name>.
for _name in __all__:
    if callable(globals()[_name]):
        globals()[_name].__module__ = __name__
del _name
