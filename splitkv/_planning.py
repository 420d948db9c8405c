"""Planning: how many key chunks each pass gets, and when cascade attention pays off.

The one home of the library's heuristics and of its cost model's constants:
split-KV's split count (:func:`choose_num_splits`), the packed cascade's prefix and
suffix counts (:func:`cascade_splits`), the paged cascade's per-level counts
(:func:`shared_level_splits`) and the roofline that chooses between cascade and
plain attention (:func:`estimate_cascade`). Inputs are Python ints and a
``torch.device``; nothing here launches a kernel or reads a tensor, so a compiled
or captured step keeps the counts it was traced with.

The public names stay where users import them (``splitkv.split_kv.choose_num_splits``,
``splitkv.cascade.estimate_cascade``, ``splitkv.cascade.cascade_splits``): those
modules re-export from here.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ._checks import expect_count

# ---------------------------------------------------------------------------------
# Split counts
# ---------------------------------------------------------------------------------

# A split shorter than this spends more on its partial state than it saves.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 128
# A batch that fills the GPU is split toward this many programs per multiprocessor, in
# chunks of at least BALANCE_KEYS_PER_SPLIT keys (choose_num_splits; measured on the H200).
BALANCE_PROGRAMS_PER_SM = 8
BALANCE_KEYS_PER_SPLIT = 2048
# Query rows (query tokens x query heads of one KV head) one Triton program owns: the
# 4-warp tile, also a cascade's narrow prefix tile and a paged shared run's widest one.
ROWS_PER_PROGRAM = 64
# Query rows per KV head and sequence up to which attention_with_lse's auto takes
# splitkv's Triton split-KV kernel over flash attention: at 4 rows (one decode query,
# GQA 32:8, bf16, head_dim 128) it streamed 64 x 8704 keys in 526 against FA2's 927 us
# on the H200 (benchmarks/NOTES.md); 16 is the kernel's smallest row tile.
DECODE_ROWS = 16
# A shared level's chunk holds at least this many times a suffix program's keys (cascade_splits).
PREFIX_CHUNK_FACTOR = 4


@functools.cache
def multiprocessors(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (cached: the query costs a driver call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(device: torch.device) -> int:
    """``device``'s CUDA index; the current device for a bare ``torch.device("cuda")``."""
    return device.index if device.index is not None else torch.cuda.current_device()


def choose_num_splits(
    num_sequences: int, heads_kv: int, rows_per_sequence: int, max_seqlen_k: int, device: torch.device
) -> int:
    """Split count for split-KV attention on ``device``'s multiprocessors.

    ``rows_per_sequence`` is ``max_seqlen_q * heads_q // heads_kv`` (query rows per KV
    head). A batch of at most one program per multiprocessor is split into
    ``2 * multiprocessors // programs`` chunks (about two programs per multiprocessor)
    of at least 256 keys. Any larger batch is split toward eight programs per
    multiprocessor, but only into chunks of at least 2048 keys, which evens out the last
    wave: on the H200 (bf16 decode, 32 / 8 heads x 128) 64 sequences of 4096 keys took
    286 us in one chunk and 262-264 us in 2-4 (the paged kernel 336 against 276-284 us),
    while 32 of 2048 keys (kept whole by the 2048-key floor) took 77 us in one and 85-88
    us in 2-4 (benchmarks/NOTES.md). The two rules meet unevenly: 16 sequences of 16384
    keys get 2 chunks, 17 get 8; batches between one and two programs per
    multiprocessor with long keys were not in the sweep. One split on a CPU device and
    for at most 256 keys; never more than 128. Not differentiable (it returns an int).

    Args:
        num_sequences: sequences of the batch (an int >= 0).
        heads_kv: KV heads (>= 1).
        rows_per_sequence: query rows per KV head of the longest sequence.
        max_seqlen_k: keys of the longest sequence.
        device: where the attention runs.

    Returns:
        The split count, an int >= 1.

    Example:
        >>> import torch, splitkv
        >>> splitkv.split_kv.choose_num_splits(8, 8, 4, 4096, torch.device("cpu"))
        1
    """
    if max_seqlen_k <= MIN_KEYS_PER_SPLIT or device.type != "cuda":
        return 1
    sms = multiprocessors(device_index(device))
    programs = max(1, num_sequences * heads_kv * math.ceil(rows_per_sequence / ROWS_PER_PROGRAM))
    fill = 2 * sms // programs
    if fill >= 2:
        return min(fill, max_seqlen_k // MIN_KEYS_PER_SPLIT, MAX_SPLITS)
    balance = -(-BALANCE_PROGRAMS_PER_SM * sms // programs)
    return max(1, min(balance, max_seqlen_k // BALANCE_KEYS_PER_SPLIT, MAX_SPLITS))


# A user's num_splits is capped here: triton_attention_with_lse takes at most 65535 key
# chunks, and more chunks than keys would only add empty states.
MAX_USER_SPLITS = 65535


def user_num_splits(num_splits: int | None, max_seqlen_k: int) -> int | None:
    """A user's ``num_splits`` checked (an int >= 1, else the error names it) and capped
    at the keys of the longest sequence and :data:`MAX_USER_SPLITS`; None stays None
    (the caller chooses)."""
    if num_splits is None:
        return None
    return min(expect_count("num_splits", num_splits, minimum=1), max(1, max_seqlen_k), MAX_USER_SPLITS)


def varlen_num_splits(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int,
                      max_seqlen_k: int) -> int:  # fmt: skip
    """:func:`choose_num_splits` for a varlen batch: query rows per KV head are query tokens x GQA group."""
    group = q.shape[1] // k.shape[1]
    return choose_num_splits(cu_seqlens_q.shape[0] - 1, k.shape[1], max_seqlen_q * group, max_seqlen_k, q.device)


def fill_chunks(sms: int, other_programs: int, tiles: int) -> int:
    """Chunks per tile of a shared level so that its ``tiles`` and the ``other_programs`` of
    the same launch fill about two waves of ``sms`` multiprocessors together."""
    return -(-max(0, 2 * sms - other_programs) // max(tiles, 1))


def one_wave_chunks(sms: int, tiles: int) -> int:
    """Chunks per tile at which a shared level's ``tiles`` cover every one of ``sms``
    multiprocessors once (0 when they already fill more than one wave)."""
    return sms // max(tiles, 1)


def shared_level_splits(keys: int, rows: int, sms: int, tiles: int, other_programs: int, suffix_chunk: int,
                        heads_q: int, heads_kv: int, head_dim: int, element_size: int) -> int:  # fmt: skip
    """Key chunks of one level shared by several sequences (a cascade's prefix, a paged
    cascade's shared run) of ``keys`` keys read by ``rows`` query tokens, whose launch on
    ``sms`` multiprocessors holds ``tiles`` programs per chunk of the shared levels and
    ``other_programs`` of the sequences' own: at least :func:`fill_chunks`; beyond that,
    chunks of at least ``PREFIX_CHUNK_FACTOR`` times a suffix program's keys
    (``suffix_chunk``: a shared tile packs many queries' rows, so it streams its keys as
    fast as a suffix program streams fewer) but at most ``BALANCE_KEYS_PER_SPLIT`` per
    wave of the other programs, and only as many as keep the float32 partial states
    they write (and the merge reads back) within half the level's KV bytes, unless that
    leaves the level's own programs short of one wave (:func:`one_wave_chunks`). On the
    H100 this rule's count was the fastest of a sweep around it, or within 1% of it, in
    the headline decode cases (benchmarks/NOTES.md)."""
    # Longer chunks than BALANCE_KEYS_PER_SPLIT per wave of the other programs make the
    # level's programs the launch's long pole (H200, 16 x 32768 x 4096: 4 chunks of 8192
    # keys against 8 of 4096, benchmarks/NOTES.md).
    suffix_waves = -(-other_programs // sms)
    chunk_keys = min(PREFIX_CHUNK_FACTOR * suffix_chunk, BALANCE_KEYS_PER_SPLIT * max(1, suffix_waves))
    balance = -(-keys // chunk_keys)
    # Per chunk: one [rows, heads_q, head_dim + 1] float32 state written and read back;
    # half the level's KV is keys x heads_kv x head_dim elements.
    state_cap = (keys * heads_kv * head_dim * element_size) // (rows * heads_q * (head_dim + 1) * 4 * 2)
    # Under one wave the level's programs are the launch's long pole wherever the other
    # programs are short, and more chunks shorten it for a few more states (H200, 64 x
    # 4096 keys x 1: the cap's 3 chunks 37.8 us, 4 31.7, 6 29.7; benchmarks/NOTES.md).
    state_cap = max(state_cap, one_wave_chunks(sms, tiles))
    wanted = max(fill_chunks(sms, other_programs, tiles), min(balance, state_cap))
    return max(1, min(wanted, MAX_SPLITS, keys // MIN_KEYS_PER_SPLIT))


def suffix_chunk_keys(max_seqlen_k: int, suffix_splits: int) -> int:
    """Keys of one suffix program's chunk, as the shared levels' rule counts it."""
    return max(MIN_KEYS_PER_SPLIT, -(-max_seqlen_k // suffix_splits))


# ---------------------------------------------------------------------------------
# The cost model
# ---------------------------------------------------------------------------------

# Constants of the cost model, fitted on an H100 by earlier sessions: bandwidth (read +
# write), the attention kernels' achieved tensor-core rate, a kernel's fixed cost on the
# GPU timeline, and host time per call: a Triton launch and a torch op. A call costs the
# larger of its GPU time and its host time, since the two overlap. The Triton launch's
# host time predates its launch from C++ (splitkv/_triton_launch.py), which shortened
# it, and has not been refitted since (benchmarks/NOTES.md). Only the bandwidth is
# taken from the device the model runs for (device_bytes_per_us): the H200 has the
# H100's tensor cores and clocks, and host times belong to the host.
FITTED_BYTES_PER_US = 2.9e6
FLOPS_PER_US = 3.0e8
KERNEL_US = 3.0
TRITON_HOST_US = 40.0
TORCH_OP_HOST_US = 8.0
# Device-to-device copy bandwidth (read + write, bytes per µs) measured on the devices
# the project ran on; FITTED_BYTES_PER_US was fitted where the copy ran at the H100's.
_MEASURED_COPY_BYTES_PER_US = {"H200": 4.3e6, "H100": 3.0e6}
# That measured copy's share of the theoretical peak (2 x memory clock x bus width):
# 3.0 of 3.35 TB/s on the H100 SXM, 4.3 of 4.8 on the H200.
_COPY_SHARE_OF_PEAK = 0.9


@functools.cache
def _bytes_per_us_of(index: int) -> float:
    props = torch.cuda.get_device_properties(index)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz > 0 and bus_bits > 0:
        # Double data rate: two transfers of the bus's width per memory clock.
        copy = _COPY_SHARE_OF_PEAK * 2 * clock_khz * 1e3 * bus_bits / 8 / 1e6
    else:
        # A torch that does not expose the memory clock: the measured figure of a known
        # device, else the H100's (the model's own, uncorrected).
        names = [name for name in _MEASURED_COPY_BYTES_PER_US if name in props.name]
        copy = _MEASURED_COPY_BYTES_PER_US[names[0] if names else "H100"]
    return FITTED_BYTES_PER_US * copy / _MEASURED_COPY_BYTES_PER_US["H100"]


def device_bytes_per_us(device: torch.device | None) -> float:
    """The cost model's bandwidth (bytes per µs) on ``device``: the H100's fitted figure
    scaled by the device's copy bandwidth over the H100's, derived from its memory clock
    and bus width where torch reports them, else from a table of measured devices; the
    H100 figure on a CPU device or for ``None`` (an estimate with no device, as
    :func:`splitkv.use_cascade` gives). Cached per device index."""
    if device is None or device.type != "cuda":
        return FITTED_BYTES_PER_US
    return _bytes_per_us_of(device_index(device))


# The single-launch cascade (no prefix chunks, no merge) is taken for an eager call
# when its estimated GPU time fits in its host time (a Triton launch and two
# allocations): it then costs that host time, below the split cascade's (two more
# torch ops). Its GPU time, fitted to a sweep on the H100 (benchmarks/NOTES.md): each
# program streams its prefix + suffix KV at up to INLINE_PROGRAM_BYTES_PER_US, and a
# multiprocessor's programs share INLINE_SM_BYTES_PER_US (from L2: every sequence
# reads the same prefix) after a fixed INLINE_PROGRAM_US each.
INLINE_HOST_US = TRITON_HOST_US + 2 * TORCH_OP_HOST_US
INLINE_START_US = 5.0
INLINE_PROGRAM_US = 3.0
INLINE_PROGRAM_BYTES_PER_US = 3.3e4
INLINE_SM_BYTES_PER_US = 5.1e4
# Bytes a kept shared level of a paged cascade must save beyond its partial states: its
# programs' fixed cost and the merge's extra state per token, about 0.3 us of HBM time
# on an H200.
LEVEL_OVERHEAD_BYTES = 1 << 20


class CascadeEstimate(NamedTuple):
    """Predicted times (µs) of the ways to compute one shared-prefix batch."""

    cascade_us: float  # shared prefix pass + suffix pass + N-way merge
    plain_us: float  # one attention pass over per-sequence [prefix ; suffix_i] KV that already exists
    materialise_us: float  # building that per-sequence KV from the prefix and the suffixes


def estimate_cascade(num_sequences: int, prefix_len: int, total_suffix_len: int, total_query_len: int, heads_q: int,
                     heads_kv: int, head_dim: int, element_size: int = 2,
                     device: torch.device | None = None) -> CascadeEstimate:  # fmt: skip
    """Roofline estimate (bytes over ``device``'s bandwidth, flops over tensor-core rate, plus launches).

    The counts are those of :func:`splitkv.use_cascade`; ``device`` (where the attention
    runs) sets the bandwidth (:func:`device_bytes_per_us`): ``None`` or a CPU device
    gives the H100 figures the model was fitted with. Not differentiable (it returns
    floats).

    Returns:
        A :class:`CascadeEstimate` of µs.
    """
    bytes_per_us = device_bytes_per_us(device)
    kv_token = 2 * heads_kv * head_dim * element_size  # one token of K and V
    out_bytes = total_query_len * heads_q * head_dim * element_size
    # Both ways do the same attention arithmetic: 4 flops per query head, key and dim.
    mean_keys = prefix_len + total_suffix_len / max(num_sequences, 1)
    flops_us = 4.0 * total_query_len * heads_q * head_dim * mean_keys / FLOPS_PER_US
    # Cascade reads the prefix once and writes + reads float32 partial states (about
    # two per pass) for the merge.
    partial = 2 * 4 * total_query_len * heads_q * (head_dim + 1) * 4
    cascade_bytes = (prefix_len + total_suffix_len) * kv_token + partial + out_bytes
    cascade_gpu = max(cascade_bytes / bytes_per_us, flops_us) + 2 * KERNEL_US
    # One Triton launch runs both passes; then two allocations and the merge.
    cascade_us = max(cascade_gpu, TRITON_HOST_US + 3 * TORCH_OP_HOST_US)
    plain_bytes = (num_sequences * prefix_len + total_suffix_len) * kv_token + out_bytes
    plain_us = max(max(plain_bytes / bytes_per_us, flops_us) + KERNEL_US, 2 * TORCH_OP_HOST_US)
    built = (num_sequences * prefix_len + total_suffix_len) * kv_token
    materialise_us = max((prefix_len * kv_token + 2 * built) / bytes_per_us + 6 * KERNEL_US, 8 * TORCH_OP_HOST_US)
    return CascadeEstimate(cascade_us, plain_us, materialise_us)


def cascade_splits(num_sequences: int, heads_q: int, heads_kv: int, head_dim: int, total_q: int, max_seqlen_q: int,
                   max_seqlen_k: int, prefix_len: int, device: torch.device,
                   element_size: int = 2) -> tuple[int, int]:  # fmt: skip
    """``(prefix_splits, suffix_splits)``: key chunks of the shared prefix and of each suffix.

    ``(0, 1)`` is the single-launch cascade: when the suffixes need no split and the
    prefix is short enough that each sequence's programs can walk it themselves
    within the launch's host time (the shapes where an eager call is host-bound),
    they do, and write the final output; no partial states, no merge. Not while a
    CUDA graph is being captured: a replay has no host time to save. Not for one
    sequence either: its split launch merges its own states
    (:func:`splitkv.cascade.cascade_stages`), so the single launch would save it an
    allocation, and its few programs (one per KV head) walk the prefix slower than
    the split ones.

    Otherwise the suffix count is split-KV's (:func:`choose_num_splits`). The prefix
    pass runs in the same launch, so its programs share the GPU with the suffix
    programs: the prefix gets the count of :func:`shared_level_splits`, enough
    chunks that both passes together fill about two waves, within that rule's
    limits. Not differentiable (it returns ints).

    Args:
        num_sequences: sequences of the batch.
        heads_q: query heads.
        heads_kv: KV heads (a divisor of ``heads_q``).
        head_dim: dimension of a head.
        total_q: query tokens of all sequences.
        max_seqlen_q: query tokens of the longest sequence.
        max_seqlen_k: suffix keys of the longest sequence.
        prefix_len: keys of the shared prefix.
        device: where the attention runs (one chunk each on a CPU device).
        element_size: bytes per K/V element.

    Returns:
        ``(prefix_splits, suffix_splits)``, ints; ``prefix_splits`` 0 for the single launch.

    Example:
        >>> import torch, splitkv
        >>> splitkv.cascade.cascade_splits(4, 8, 2, 64, 4, 1, 512, 4096, torch.device("cpu"))
        (1, 1)
    """
    group = heads_q // heads_kv
    suffix_splits = choose_num_splits(num_sequences, heads_kv, max_seqlen_q * group, max_seqlen_k, device)
    if device.type != "cuda":
        return 1, suffix_splits
    sms = multiprocessors(device_index(device))
    suffix_programs = num_sequences * heads_kv * math.ceil(max_seqlen_q * group / ROWS_PER_PROGRAM) * suffix_splits
    # A graph replay has no host time to save, and on the GPU alone the split launch was
    # the faster in most shapes of the sweep the model was fitted to (benchmarks/NOTES.md).
    if (suffix_splits == 1 and num_sequences > 1
            and _inline_prefix_gpu_us(suffix_programs, prefix_len + max_seqlen_k, head_dim, element_size, sms)
            <= INLINE_HOST_US and not torch.cuda.is_current_stream_capturing()):  # fmt: skip
        return 0, 1
    # No query reads the prefix (the state cap below divides by the queries).
    if prefix_len <= MIN_KEYS_PER_SPLIT or total_q == 0:
        return 1, suffix_splits
    prefix_tiles = heads_kv * math.ceil(total_q * group / ROWS_PER_PROGRAM)
    prefix_splits = shared_level_splits(prefix_len, total_q, sms, prefix_tiles, suffix_programs,
                                        suffix_chunk_keys(max_seqlen_k, suffix_splits), heads_q, heads_kv, head_dim,
                                        element_size)  # fmt: skip
    return prefix_splits, suffix_splits


def _inline_prefix_gpu_us(programs: int, keys_per_program: int, head_dim: int, element_size: int, sms: int) -> float:
    """Estimated GPU time of the single-launch cascade (see INLINE_* above)."""
    program_bytes = keys_per_program * 2 * head_dim * element_size
    alone = program_bytes / INLINE_PROGRAM_BYTES_PER_US
    shared = programs / sms * (INLINE_PROGRAM_US + program_bytes / INLINE_SM_BYTES_PER_US)
    return INLINE_START_US + max(alone, shared)
