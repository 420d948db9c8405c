"""splitkv: split-KV and cascade attention on NVIDIA GPUs, built on PyTorch.

The composable stage is the exact merge of partial attention states
(:func:`merge_attn_states`, :func:`merge_states`); see :mod:`splitkv.merge` for
the layouts and the LSE convention (float32 ``[heads, tokens]``, natural log).
"""

from .attention import attention_with_lse, explain_attention
from .cascade import cascade_attention, use_cascade
from .merge import explain_merge, merge_attn_states, merge_states
from .split_kv import split_kv_attention

__version__ = "0.1.0"

__all__ = [
    "merge_attn_states",
    "merge_states",
    "explain_merge",
    "attention_with_lse",
    "explain_attention",
    "split_kv_attention",
    "cascade_attention",
    "use_cascade",
    "__version__",
]
