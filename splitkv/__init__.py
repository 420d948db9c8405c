"""splitkv: split-KV and cascade attention on NVIDIA GPUs, built on PyTorch.

The composable stage is the exact merge of partial attention states
(:func:`merge_attn_states`, :func:`merge_states`); see :mod:`splitkv.merge` for
the layouts and the LSE convention (float32 ``[heads, tokens]``, natural log).
"""

from . import distributed, nn
from .attention import attention_with_lse, explain_attention
from .cascade import cascade_attention, use_cascade
from .distributed import context_parallel_attention, context_parallel_prefill, shard_sequences, unshard_sequences
from .merge import explain_merge, merge_attn_states, merge_states
from .paged import CascadePlan, explain_paged_attention, paged_attention_with_lse, paged_cascade_attention, plan_cascade
from .split_kv import split_kv_attention

__version__ = "0.1.0"

__all__ = [
    "CascadePlan",
    "__version__",
    "attention_with_lse",
    "cascade_attention",
    "context_parallel_attention",
    "context_parallel_prefill",
    "distributed",
    "explain_attention",
    "explain_merge",
    "explain_paged_attention",
    "merge_attn_states",
    "merge_states",
    "nn",
    "paged_attention_with_lse",
    "paged_cascade_attention",
    "plan_cascade",
    "shard_sequences",
    "split_kv_attention",
    "unshard_sequences",
    "use_cascade",
]
