"""Greedy generation for a batch of requests that share a prompt, with and without cascade attention.

A small Llama-architecture decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU
MLP) with random weights from a fixed seed (nothing is downloaded) generates
``--new-tokens`` tokens greedily for ``--batch`` requests. Every request is the same
shared prompt of ``--prefix`` random token ids followed by its own random suffix
(lengths ``--suffix-min`` .. ``--suffix``; request 0's suffix is empty unless
``--no-empty``). It generates two ways:

(a) the usual way: each request prefills its whole prompt, prefix included, into its
    own KV cache, and every step runs plain causal attention
    (:func:`splitkv.attention_with_lse`) over each request's own cache;
(b) shared prefix: the prompt is prefilled once (a batch of one), its KV is kept once
    in a :class:`splitkv.nn.SharedPrefixKVCache`, and the suffix prefill and every
    decode step run :func:`splitkv.cascade_attention` over that prefix plus each
    request's suffix cache.

and reports per phase where the time goes (prefill; decode step time; on a GPU, the
decode step's attention and the rest of the model each alone from a CUDA graph),
tokens per second, the KV-cache bytes each way holds, which attention backend each
way's decode ran and why, what ``splitkv.use_cascade`` means for ``--mode``, and
whether the generated token ids are identical. ``--compile`` (``torch.compile`` of
the decode step) and ``--cuda-graph`` (one captured decode step, replayed) apply to
both ways alike, so the comparison stays fair. RoPE positions are absolute positions in
``[prefix ; suffix_i]``, so the prefix sits at 0..P-1 for every request and its KV
is the same for all of them: that is what makes sharing it exact.

Run::

    python examples/shared_prefix_batching.py                       # tiny, CPU, < 1 min
    python examples/shared_prefix_batching.py --device cuda --dtype bfloat16 --batch 64 --prefix 8192 \\
        --suffix 256 --new-tokens 64 --layers 4 --hidden 2048 --heads 16 --kv-heads 4 --head-dim 128 --vocab 32000 \
        --compile --cuda-graph

In float32 the two ways give the same tokens (the attention differs only by
rounding, far below the gaps between logits); in bfloat16 a near-tie between the
two best logits can flip a token, after which that request's continuation differs.

The model pieces (:class:`LlamaConfig`, :class:`LlamaDecoder`, :func:`build_model`,
:class:`PerRequestKVCache`, :func:`generate_usual`, :func:`generate_shared`,
:func:`make_requests`) are importable: the tests use them.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import splitkv
from splitkv.bench.common import capture_graph, graph_replay_us
from splitkv.nn import CacheMemory, SharedPrefixKVCache

# attend(layer, q [tokens, heads_q, head_dim], k, v [tokens, heads_kv, head_dim]) -> [tokens, heads_q, head_dim]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# on_attention(phase, layer, attention output) for looking inside the model
OnAttention = Callable[[str, int, torch.Tensor], None]


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 2
    heads_q: int = 8
    heads_kv: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean square in float32: bf16 would lose the small components' contribution.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[tokens, head_dim // 2]`` float32 for int64 ``positions [tokens]``."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the two halves of each head of ``x [tokens, heads, head_dim]`` (the Llama layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        c = config
        self.q_proj = nn.Linear(c.hidden_size, c.heads_q * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.heads_kv * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.heads_kv * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads_q * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope, attend: Attend, layer: int) -> torch.Tensor:
        c, tokens = self.config, x.shape[0]
        q = apply_rope(self.q_proj(x).view(tokens, c.heads_q, c.head_dim), *rope)
        k = apply_rope(self.k_proj(x).view(tokens, c.heads_kv, c.head_dim), *rope)
        v = self.v_proj(x).view(tokens, c.heads_kv, c.head_dim)
        out = attend(layer, q, k, v)
        return self.o_proj(out.reshape(tokens, c.heads_q * c.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.attention = Attention(config)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope, attend: Attend, layer: int) -> torch.Tensor:
        x = x + self.attention(self.input_norm(x), rope, attend, layer)
        return x + self.mlp(self.post_attention_norm(x))


class LlamaDecoder(nn.Module):
    """Llama decoder over packed tokens: the KV cache lives outside, behind ``attend``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: Attend,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits float32 ``[rows, vocab]`` of the packed tokens ``input_ids [tokens]`` (int64)
        at ``positions [tokens]``; only at ``logits_rows`` when given (a prefill needs the last
        token of each sequence, and the LM head is the largest matmul of a small model)."""
        c = self.config
        x = self.embed(input_ids)
        rope = rope_tables(positions, c.head_dim, c.rope_theta)
        for layer, block in enumerate(self.layers):
            x = block(x, rope, attend, layer)
        if logits_rows is not None:
            x = x[logits_rows]
        x = self.norm(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight).float()


def build_model(config: LlamaConfig, seed: int = 0, device="cpu", dtype=torch.float32) -> LlamaDecoder:
    """Random weights drawn on the CPU from ``seed`` (the same model on every device), in ``dtype``.

    Linear weights are N(0, 1/fan_in), so that a head's scores have unit spread and
    attention is neither uniform nor one-hot; embeddings are N(0, 1) (N(0, 1/hidden)
    when tied, so that the LM head's logits have the same unit spread)."""
    generator = torch.Generator().manual_seed(seed)
    model = LlamaDecoder(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            if name == "embed.weight":
                std = config.hidden_size**-0.5 if config.tie_embeddings else 1.0
            else:
                std = param.shape[1] ** -0.5
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------------------
# The usual way: one KV cache per request, prefix included
# --------------------------------------------------------------------------------------


def _rows(starts: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
    return torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)] + [torch.zeros(0, dtype=torch.long)])


class PerRequestKVCache:
    """Each request's whole KV (``[capacity, heads_kv, head_dim]`` per layer, K and V), prefix included.

    Request ``i`` owns slots ``i * capacity ..``; attention reads them in place
    (``cu_seqlens_k`` steps by ``capacity``, ``seqused_k`` says how many are filled), as a
    serving system's cache does, so this baseline pays no gather into a packed copy.
    Decode steps (one token per request) reuse one step whose tensors are refreshed in
    place and whose ``max_k`` is the capacity: static shapes, for torch.compile and
    CUDA graphs, as :class:`splitkv.nn.SharedPrefixKVCache` does."""

    def __init__(self, config: LlamaConfig, num_requests: int, capacity: int, device, dtype):
        shape = (num_requests * capacity, config.heads_kv, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.capacity, self.device = capacity, device
        self.lengths = [0] * num_requests
        self.token_bytes = 2 * config.num_layers * config.heads_kv * config.head_dim * self.k[0].element_size()
        self._decode_step: _PerRequestStep | None = None
        self._decode_is_latest = False  # the last step was the decode step (as SharedPrefixKVCache keeps it)

    def begin_step(self, new_tokens: Sequence[int]) -> _PerRequestStep:
        old = self.lengths
        self.lengths = [a + n for a, n in zip(old, new_tokens)]
        if max(self.lengths) > self.capacity:
            raise ValueError(f"a request needs {max(self.lengths)} tokens, the cache holds {self.capacity}")
        decode, follows_decode = all(n == 1 for n in new_tokens), self._decode_is_latest
        self._decode_is_latest = decode
        if not decode:
            return _PerRequestStep(self, old, list(new_tokens))
        if self._decode_step is None:
            self._decode_step = _PerRequestStep(self, old, list(new_tokens), max_k=self.capacity)
        elif follows_decode:
            self._decode_step.advance()
        else:
            self._decode_step.refresh(old)
        return self._decode_step

    def memory(self) -> CacheMemory:
        allocated = sum(t.numel() * t.element_size() for t in self.k + self.v)
        return CacheMemory(allocated, self.token_bytes * sum(self.lengths))


class _PerRequestStep:
    def __init__(self, cache: PerRequestKVCache, old: list[int], new: list[int], max_k: int | None = None):
        device, cap = cache.device, cache.capacity
        self.cache = cache
        self.positions = _rows(old, new).to(device)
        self.write_rows = _rows([i * cap + a for i, a in enumerate(old)], new).to(device)
        lengths = cache.lengths
        self.cu_q = torch.tensor([0] + new, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        self.cu_k = (torch.arange(len(old) + 1, dtype=torch.int32) * cap).to(device)
        self.seqused_k = torch.tensor(lengths, dtype=torch.int32).to(device)
        self.max_q, self.max_k = max(new), max(lengths) if max_k is None else max_k
        self.last_rows = (self.cu_q[1:] - 1).long()

    def advance(self) -> None:
        """The next decode step's tensors right after a decode step: every entry one further,
        on the device (no host copy, which would wait for the GPU), as
        :class:`splitkv.nn.SharedPrefixKVCache` does."""
        for t in (self.positions, self.write_rows, self.seqused_k):
            t.add_(1)

    def refresh(self, old: list[int]) -> None:
        """A decode step's tensors for the next token of every request, in place."""
        cap = self.cache.capacity
        old_t = torch.tensor(old)
        self.positions.copy_(old_t)
        self.write_rows.copy_(torch.arange(len(old)) * cap + old_t)
        self.seqused_k.copy_(old_t + 1)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        cache.k[layer].index_copy_(0, self.write_rows, k)
        cache.v[layer].index_copy_(0, self.write_rows, v)
        out, _ = splitkv.attention_with_lse(q, cache.k[layer], cache.v[layer], self.cu_q, self.cu_k, self.max_q,
                                            self.max_k, causal=True, seqused_k=self.seqused_k)  # fmt: skip
        return out


# --------------------------------------------------------------------------------------
# Greedy generation both ways
# --------------------------------------------------------------------------------------


@dataclass
class Generation:
    tokens: torch.Tensor  # [requests, new_tokens] int64, on the CPU
    logits: torch.Tensor | None  # [new_tokens, requests, vocab] float32 logits that chose each token (keep_logits)
    prefill_s: float  # until every request's first token is chosen
    decode_s: float  # the timed decode steps (all but the first with --compile / --cuda-graph)
    memory: CacheMemory  # KV bytes held at the end
    uses_cascade: bool
    decode_steps: int = 0  # how many steps decode_s covers
    setup_s: float = 0.0  # the first decode step with its compilation / graph capture (not in decode_s)
    attention_s: float | None = None  # stream time of the decode attention calls, with a timer
    decode_step: object = None  # the cache's decode step (static, reused by every step), for gpu_phase_ms


class DecodeRunner:
    """Runs decode steps ``model(ids, step.positions, step.attention)``: eagerly, compiled
    by ``torch.compile(fullgraph=True)``, captured once in a CUDA graph and replayed, or
    compiled and captured. A decode step of either cache is one static-shape object
    refreshed in place, so the compiled function and the graph serve every step."""

    def __init__(self, model: LlamaDecoder, compile: bool = False, cuda_graph: bool = False,
                 backend: str = "inductor"):  # fmt: skip
        self.model, self.cuda_graph = model, cuda_graph
        self.fn = torch.compile(self._step, fullgraph=True, backend=backend) if compile else self._step
        self.graph = None
        self.uses_setup = compile or cuda_graph

    def _step(self, step, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, step.positions, step.attention)

    def __call__(self, step, ids: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graph:
            return self.fn(step, ids)
        if self.graph is None:
            self.step, self.ids = step, ids.clone()
            self.graph, self.logits = capture_graph(lambda: self.fn(step, self.ids))
        if step is not self.step:
            raise RuntimeError("the decode step changed (the cache grew?): the captured graph no longer applies")
        self.ids.copy_(ids)
        self.graph.replay()  # re-running a step rewrites the same KV rows: harmless
        return self.logits.clone()


def make_requests(config: LlamaConfig, prefix_len: int, suffix_lens: Sequence[int], seed: int = 1):
    """Random shared prompt ``[prefix_len]`` and suffixes ``[suffix_lens[i]]`` (int64 ids, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(config.vocab_size, (prefix_len,), generator=generator)
    suffixes = [torch.randint(config.vocab_size, (n,), generator=generator) for n in suffix_lens]
    return prompt, suffixes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AttentionTimer:
    """CUDA events around every decode-step attention call: the stream time attention
    takes, launches included, next to the whole decode's time."""

    def __init__(self):
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def wrap(self, attend: Attend) -> Attend:
        def timed(layer, q, k, v):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = attend(layer, q, k, v)
            end.record()
            self.events.append((start, end))
            return out

        return timed

    def seconds(self) -> float:
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.events) / 1e3


def _recording(step_attention: Attend, phase: str, on_attention: OnAttention | None) -> Attend:
    if on_attention is None:
        return step_attention

    def attend(layer, q, k, v):
        out = step_attention(layer, q, k, v)
        on_attention(phase, layer, out)
        return out

    return attend


def _pick(logits: torch.Tensor, forced: torch.Tensor | None, index: int) -> torch.Tensor:
    # argmax returns the first of equal maxima: the same rule both ways.
    return logits.argmax(-1) if forced is None else forced[:, index].to(logits.device)


def _decode(model, cache, first, first_logits, new_tokens, forced, keep_logits, on_attention, start, uses_cascade,
            timer: AttentionTimer | None = None, runner: DecodeRunner | None = None):  # fmt: skip
    """Shared tail of both ways: the decode loop from ``first`` on (one token per request per
    step), then the timings and the result. ``start`` is when the prefill began; ``timer``
    times the decode steps' attention calls (eager steps only); ``runner`` runs the steps
    (default: eagerly). With a compiling or capturing runner the first decode step (its
    compilation, its capture) is timed apart as ``setup_s``."""
    device = first_logits.device
    _sync(device)
    prefill_done = time.perf_counter()
    decode_start, setup_s = prefill_done, 0.0
    tokens, kept = [first], [first_logits] if keep_logits else []
    num_requests = first.shape[0]
    for t in range(1, new_tokens):
        step = cache.begin_step([1] * num_requests)
        if runner is None:
            attend = _recording(step.attention, f"decode{t}", on_attention)
            logits = model(tokens[-1], step.positions, attend if timer is None else timer.wrap(attend))
        else:
            logits = runner(step, tokens[-1])
        tokens.append(_pick(logits, forced, t))
        if keep_logits:
            kept.append(logits)
        if t == 1 and runner is not None and runner.uses_setup:
            _sync(device)
            decode_start = time.perf_counter()
            setup_s = decode_start - prefill_done
    out = torch.stack(tokens, 1).cpu()
    _sync(device)
    end = time.perf_counter()
    steps = max(0, new_tokens - 1 - (1 if decode_start != prefill_done else 0))
    return Generation(out, torch.stack(kept).cpu() if keep_logits else None, prefill_done - start,
                      end - decode_start, cache.memory(), uses_cascade, steps, setup_s,
                      timer.seconds() if timer is not None and timer.events else None,
                      cache._decode_step)  # fmt: skip


@torch.no_grad()
def generate_usual(
    model: LlamaDecoder,
    prompt: torch.Tensor,
    suffixes: Sequence[torch.Tensor],
    new_tokens: int,
    *,
    forced: torch.Tensor | None = None,
    keep_logits: bool = False,
    on_attention: OnAttention | None = None,
    timer: AttentionTimer | None = None,
    prefill_tokens: int = 65536,
    runner: DecodeRunner | None = None,
) -> Generation:
    """(a) Each request prefills ``[prompt ; suffix_i]`` into its own cache; plain causal attention.

    ``forced [requests, new_tokens]`` feeds those tokens instead of the argmax (to
    compare logits along the same path); ``on_attention`` sees every attention output;
    ``timer`` times the decode steps' attention; ``runner`` runs the decode steps
    (compiled / graph-replayed, :class:`DecodeRunner`). The prefill runs a group of requests
    at a time, about ``prefill_tokens`` tokens per forward, to bound activation memory.
    """
    device, dtype, config = model.embed.weight.device, model.embed.weight.dtype, model.config
    lengths = [prompt.shape[0] + s.shape[0] for s in suffixes]
    cache = PerRequestKVCache(config, len(suffixes), max(lengths) + new_tokens, device, dtype)
    groups, tokens = [[]], 0
    for i, n in enumerate(lengths):
        if groups[-1] and tokens + n > prefill_tokens:
            groups.append([])
            tokens = 0
        groups[-1].append(i)
        tokens += n
    _sync(device)
    start = time.perf_counter()
    group_logits = []
    for group in groups:
        step = cache.begin_step([lengths[i] if i in group else 0 for i in range(len(lengths))])
        ids = torch.cat([torch.cat([prompt, suffixes[i]]) for i in group]).to(device)
        attend = _recording(step.attention, "prefill", on_attention)
        group_logits.append(model(ids, step.positions, attend, step.last_rows[group[0] : group[-1] + 1]))
    logits = torch.cat(group_logits)
    first = _pick(logits, forced, 0)
    return _decode(model, cache, first, logits, new_tokens, forced, keep_logits, on_attention, start, False, timer,
                   runner)  # fmt: skip


@torch.no_grad()
def generate_shared(
    model: LlamaDecoder,
    prompt: torch.Tensor,
    suffixes: Sequence[torch.Tensor],
    new_tokens: int,
    *,
    mode: str = "cascade",
    capacity: int | None = None,
    forced: torch.Tensor | None = None,
    keep_logits: bool = False,
    on_attention: OnAttention | None = None,
    timer: AttentionTimer | None = None,
    runner: DecodeRunner | None = None,
) -> Generation:
    """(b) The prompt is prefilled once into a :class:`SharedPrefixKVCache`; then the suffixes
    and every decode step run cascade attention (``mode`` as in the cache; ``"cascade"`` forces it).
    ``capacity`` (suffix tokens preallocated per request) defaults to what the run needs;
    a smaller one makes the cache grow. Other arguments as :func:`generate_usual`."""
    device, dtype, c = model.embed.weight.device, model.embed.weight.dtype, model.config
    prefix_len = prompt.shape[0]
    suffix_lens = [s.shape[0] for s in suffixes]
    cache = SharedPrefixKVCache(c.num_layers, len(suffixes), c.heads_q, c.heads_kv, c.head_dim,
                                capacity=max(suffix_lens) + new_tokens if capacity is None else capacity,
                                mode=mode, dtype=dtype, device=device)  # fmt: skip
    _sync(device)
    start = time.perf_counter()
    step = cache.prefill_prefix(prefix_len)
    last = torch.tensor([prefix_len - 1], device=device)
    prompt_logits = model(prompt.to(device), step.positions, _recording(step.attention, "prefix", on_attention), last)
    step = cache.begin_step(suffix_lens)
    logits = prompt_logits.expand(len(suffixes), -1)
    if sum(suffix_lens):
        attend = _recording(step.attention, "prefill", on_attention)
        suffix_logits = model(torch.cat(suffixes).to(device), step.positions, attend, step.last_rows.clamp(min=0))
        # A request with no suffix continues the prompt itself: its first token comes from the prompt's logits.
        logits = torch.where(step.last_rows[:, None] >= 0, suffix_logits, prompt_logits)
    first = _pick(logits, forced, 0)
    return _decode(model, cache, first, logits, new_tokens, forced, keep_logits, on_attention, start,
                   cache.uses_cascade, timer, runner)  # fmt: skip


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


_MODE_HELP = """\
--mode is the layout of the shared-prefix cache, way (b):
  cascade  (default) the prefix KV is kept once; every step of (b) runs
           splitkv.cascade_attention, whatever splitkv.use_cascade says (its verdict
           is printed for reference).
  auto     splitkv.use_cascade decides once, for the decode shape: cascade as above,
           or per-request copies of the prefix with plain attention_with_lse.
  plain    per-request copies of the prefix, plain attention (like (a), but
           through splitkv.nn.SharedPrefixKVCache).
--compile / --cuda-graph apply to the decode steps of both ways: torch.compile
(fullgraph) of the whole decode step, and/or one CUDA graph captured at the first
decode step and replayed for the others (the caches' decode steps have static
shapes). Their first decode step (compilation, capture) is reported as setup."""


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=_MODE_HELP,
                                formatter_class=_HelpFormatter)  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model and KV dtype")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (None: about 8/3 hidden)")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads (GQA)")
    p.add_argument("--head-dim", type=int, default=32, help="dimension of a head")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size")
    p.add_argument("--tie-embeddings", action="store_true", help="LM head shares the embedding")
    p.add_argument("--prefix", type=int, default=64, help="shared prompt tokens")
    p.add_argument("--batch", type=int, default=4, help="requests")
    p.add_argument("--suffix", type=int, default=16, help="longest suffix")
    p.add_argument("--suffix-min", type=int, default=None, help="shortest suffix (None: half of --suffix)")
    p.add_argument("--no-empty", action="store_true", help="give request 0 a suffix too (by default it has none)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per request")
    p.add_argument("--mode", default="cascade", choices=["cascade", "auto", "plain"],
                   help="layout of the shared-prefix cache (b), see below")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step of both ways")
    p.add_argument("--cuda-graph", action="store_true", help="replay the decode step of both ways from a CUDA graph")
    p.add_argument("--seed", type=int, default=0, help="weights and requests")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of the same sizes first (kernel compilation, tracing)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each way; the fastest is reported")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--prefill-tokens", type=int, default=65536, help="(a)'s prefill: tokens per forward, at most")
    args = p.parse_args(argv)
    if args.cuda_graph and not (args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())):
        p.error("--cuda-graph needs a CUDA device")
    return args


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the mode explanation's line breaks."""


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _attention_report(args, config, device, dtype, capacity: int, uses_cascade: bool) -> list[str]:
    """Which attention backend each way's decode step runs, and why (splitkv.explain_attention)."""
    batch, heads_q, heads_kv, head_dim = args.batch, config.heads_q, config.heads_kv, config.head_dim
    q = torch.empty(batch, heads_q, head_dim, device=device, dtype=dtype)
    cache = torch.empty(batch * capacity, heads_kv, head_dim, device=device, dtype=dtype)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    cu_k = cu_q * capacity
    used = torch.ones(batch, dtype=torch.int32, device=device)
    usual = splitkv.explain_attention(q, cache, cache, cu_q, cu_k, 1, capacity, causal=True, seqused_k=used)
    lines = ["(a) decode attention: " + usual.replace("\n", "\n    ")]
    if "-> reference" in usual:
        lines.append("    (reference: PyTorch math, one sequence at a time, slow on purpose: no faster backend "
                     "runs these tensors here; on a GPU the flash or Triton kernels do)")
    if not uses_cascade:
        lines.append("(b) decode attention: attention_with_lse over per-request copies, as (a)")
    elif splitkv.split_kv.triton_can_run(q):
        lines.append("(b) decode attention: cascade_attention's Triton kernel (prefix and suffix passes in one "
                     f"launch), since the tensors are {device.type}" + (" under TRITON_INTERPRET=1"
                                                                         if device.type == "cpu" else ""))  # fmt: skip
    else:
        lines.append("(b) decode attention: cascade_attention as two attention_with_lse passes and a merge, "
                     "attention by: " + usual.splitlines()[0].split("-> ")[-1]
                     + " (the Triton kernel runs CUDA tensors only)")  # fmt: skip
    return lines


def _use_cascade_report(mode: str, verdict: bool, uses_cascade: bool) -> str:
    said = f"splitkv.use_cascade at this decode shape: {verdict} (its roofline is calibrated on an H100)"
    if mode == "cascade":
        return f"(b) --mode cascade: cascade_attention runs whatever use_cascade says; {said}"
    if mode == "auto":
        return f"(b) --mode auto: use_cascade decided, so (b) {'cascades' if uses_cascade else 'runs plain'}; {said}"
    return f"(b) --mode plain: per-request prefix copies, use_cascade not consulted; {said}"


def gpu_phase_ms(model: LlamaDecoder, step, ids: torch.Tensor) -> tuple[float, float]:
    """``(attention, rest)``: GPU ms of one decode step's attention calls (all layers) and
    of the rest of the model (attention replaced by zeros), each replayed from a CUDA
    graph. ``step`` is a cache's decode step; its KV rows are rewritten (harmless once
    the generation is over)."""
    inputs = []

    def record(layer, q, k, v):
        inputs.append((layer, q.clone(), k.clone(), v.clone()))
        return step.attention(layer, q, k, v)

    with torch.no_grad():
        model(ids, step.positions, record)
        # GPU time per replay of a CUDA graph (host time hidden), median of 20.
        attention_ms = graph_replay_us(lambda: [step.attention(*args) for args in inputs], 1, 20) / 1e3
        rest_ms = graph_replay_us(lambda: model(ids, step.positions, lambda layer, q, k, v: torch.zeros_like(q)),
                                  1, 20) / 1e3  # fmt: skip
    return attention_ms, rest_ms


def main(argv=None) -> None:
    args = _parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and args.threads > 0:
        # The default model's matmuls are too small to gain from threads, and threads that wait at
        # barriers slow down by orders of magnitude when another process shares the cores.
        torch.set_num_threads(args.threads)
    intermediate = args.intermediate or 64 * ((8 * args.hidden // 3 + 63) // 64)
    config = LlamaConfig(args.vocab, args.hidden, intermediate, args.layers, args.heads, args.kv_heads,
                         args.head_dim, tie_embeddings=args.tie_embeddings)  # fmt: skip
    model = build_model(config, args.seed, device, dtype)
    rng = random.Random(args.seed)
    low = args.suffix // 2 if args.suffix_min is None else args.suffix_min
    suffix_lens = [rng.randint(low, args.suffix) for _ in range(args.batch)]
    if not args.no_empty:
        suffix_lens[0] = 0
    prompt, suffixes = make_requests(config, args.prefix, suffix_lens, args.seed + 1)
    # One runner per way for the whole run: the compiled step is reused by every generation.
    runners = [DecodeRunner(model, args.compile, args.cuda_graph) if args.compile or args.cuda_graph else None
               for _ in range(2)]  # fmt: skip
    if args.compile:
        # Each generation makes new caches, hence new step objects: each way traces once
        # (its first warm-up step); a run with other sizes would trace again.
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))

    def usual_run(new_tokens, **kwargs):
        if runners[0] is not None:
            runners[0].graph = None  # a new cache: capture again
        return generate_usual(model, prompt, suffixes, new_tokens, prefill_tokens=args.prefill_tokens,
                              runner=runners[0], **kwargs)  # fmt: skip

    def shared_run(new_tokens, **kwargs):
        if runners[1] is not None:
            runners[1].graph = None
        return generate_shared(model, prompt, suffixes, new_tokens, mode=args.mode, runner=runners[1], **kwargs)

    # Warm-up runs of the timed runs' sizes: their caches have the same shapes, so a compiled
    # step traced in the warm-up serves the timed runs as it is (a smaller warm-up would leave
    # them a dynamic-shape retrace).
    for _ in range(args.warmup):
        usual_run(args.new_tokens)
        shared_run(args.new_tokens)
    # Both ways in turn, best of --repeat: a shared or busy machine slows single runs at random.
    runs = [(usual_run(args.new_tokens), shared_run(args.new_tokens)) for _ in range(max(1, args.repeat))]
    usual, shared = (min((r[i] for r in runs), key=lambda g: g.prefill_s + g.decode_s) for i in (0, 1))

    element_size = torch.empty((), dtype=dtype).element_size()
    verdict = splitkv.use_cascade(args.batch, args.prefix, sum(suffix_lens) + args.batch * args.new_tokens,
                                  args.batch, config.heads_q, config.heads_kv, config.head_dim, element_size)  # fmt: skip
    generated = args.batch * args.new_tokens
    agree = int((usual.tokens == shared.tokens).sum())
    how = " + ".join(name for name, on in (("compiled", args.compile), ("CUDA graph", args.cuda_graph)) if on)
    print(
        f"model: {config.num_layers} layers, hidden {config.hidden_size}, {config.heads_q} query / "
        f"{config.heads_kv} KV heads x {config.head_dim}, vocab {config.vocab_size}, {args.dtype} on {device}"
        + (f", {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else "")
        + f"; decode steps: {how or 'eager'}"
    )
    print(
        f"batch: prompt of {args.prefix} tokens shared by {args.batch} requests, suffixes of "
        f"{min(suffix_lens)}..{max(suffix_lens)} tokens, {args.new_tokens} new tokens each (greedy)"
    )
    print(f"{'':24}{'prefill s':>10}{'setup s':>9}{'step ms':>9}{'decode tok/s':>14}{'total tok/s':>13}"
          f"{'KV allocated':>14}{'KV used':>12}")  # fmt: skip
    for name, g in (("(a) per-request caches", usual), ("(b) shared prefix", shared)):
        steps = max(g.decode_steps, 1)
        decode_rate = args.batch * g.decode_steps / g.decode_s if g.decode_s > 0 else float("nan")
        # End to end: prefill and every decode step, the setup step counted at the timed steps' pace.
        total_s = g.prefill_s + g.decode_s * (args.new_tokens - 1) / steps if g.decode_steps else g.prefill_s
        print(f"{name:24}{g.prefill_s:10.3f}{g.setup_s:9.2f}{g.decode_s * 1e3 / steps:9.2f}{decode_rate:14.1f}"
              f"{generated / total_s:13.1f}{_megabytes(g.memory.allocated):>14}"
              f"{_megabytes(g.memory.used):>12}")  # fmt: skip
    for line in _attention_report(args, config, device, dtype, max(suffix_lens) + args.prefix + args.new_tokens,
                                  shared.uses_cascade):  # fmt: skip
        print(line)
    print(_use_cascade_report(args.mode, verdict, shared.uses_cascade))
    print(f"generated token ids identical: {'yes' if agree == generated else 'no'} "
          f"({agree}/{generated} agree, {100.0 * agree / generated:.1f}%)")  # fmt: skip
    if device.type == "cuda" and args.new_tokens > 2:
        # Where a decode step's time goes: its attention calls and the rest of the model, each
        # alone on the GPU (from a CUDA graph), next to the step time of this run's mode.
        for name, generate, g in (("(a)", usual_run, usual), ("(b)", shared_run, shared)):
            runner_index = 0 if name == "(a)" else 1
            saved, runners[runner_index] = runners[runner_index], None
            timer = AttentionTimer()
            timed = generate(args.new_tokens, timer=timer)  # eager, with events around each attention call
            runners[runner_index] = saved
            step_ms = g.decode_s * 1e3 / max(g.decode_steps, 1)
            cache_step = timed.decode_step
            attention_ms, rest_ms = gpu_phase_ms(model, cache_step, timed.tokens[:, -1].to(device))
            eager_attention = timed.attention_s * 1e3 / max(timed.decode_steps, 1)
            print(f"{name} decode step ({how or 'eager'}): {step_ms:.2f} ms; on the GPU alone attention "
                  f"{attention_ms:.2f} + rest of the model {rest_ms:.2f} = {attention_ms + rest_ms:.2f} ms "
                  f"(step / GPU = {step_ms / (attention_ms + rest_ms):.2f}x); eager attention calls "
                  f"{eager_attention:.2f} ms of an eager step of {timed.decode_s * 1e3 / max(timed.decode_steps, 1):.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
