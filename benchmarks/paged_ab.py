"""The paged kernel against a variant of it, in one process: an A/B that the machines cannot skew.

Two device calls of one session, on two lent machines, read the plain paged kernel 4-7%
apart on the sharing cases with one kernel change between them, the size of the change
being measured (benchmarks/NOTES.md, eleventh session). So::

    python benchmarks/paged_ab.py VARIANT.py [PAGE_SIZE]   # device_run.sh step "paged-ab VARIANT.py [PAGE_SIZE]"

loads VARIANT.py, a copy of ``splitkv/_paged_triton.py`` with a change (it imports the
package's other modules relatively, as the original does), as a second module of the
package, and times ``bench paged``'s cases (page 16 unless given) under both versions: the plain call
and the plan's call, the plan built under each version's ``launch_config``, each call
captured in a CUDA graph under its version's ``launch_paged`` and the replay timed with
L2 flushed (``median_ms``), the versions taking turns over 5 rounds. Each variant output
is checked against the project's (after the timing, from the replays). A variant file travels to the device with the
working tree when it is untracked and not ignored; it is not meant to be committed.
A variant tried and not kept stays in the history: NOTES names its commit, and
``git show COMMIT:splitkv/_paged_triton.py > variant.py`` brings it back.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from unittest import mock

import torch

import splitkv
from splitkv import _paged_triton
from splitkv.bench.common import graph_replay_timer, interleaved
from splitkv.bench.paged import DTYPE, HEAD_DIM, HEADS_KV, HEADS_Q, build, tree_cases


def load_variant(path: str):
    """``path`` as the module ``splitkv._paged_triton_variant`` (so its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location("splitkv._paged_triton_variant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernels_of(module):
    """The library's paged calls run ``module``'s launch_config and launch_paged (they
    import both from splitkv._paged_triton at call time)."""
    return mock.patch.multiple(_paged_triton, launch_config=module.launch_config, launch_paged=module.launch_paged)


def main() -> None:
    versions = {"project": _paged_triton, "variant": load_variant(sys.argv[1])}
    page = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    print(f"variant {sys.argv[1]}, page {page}; {torch.cuda.get_device_name()}", flush=True)
    for label, case in tree_cases(quick=False).items():
        q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q = build(case, page)
        max_k = int(seqused_k.max())
        timers, outputs = {}, {}
        for version, module in versions.items():
            with kernels_of(module):
                plan = splitkv.plan_cascade(block_table, seqused_k, cu_seqlens_q, page_size=page, heads_q=HEADS_Q,
                                            heads_kv=HEADS_KV, head_dim=HEAD_DIM, dtype=DTYPE)  # fmt: skip
                calls = {
                    "plain": functools.partial(splitkv.paged_attention_with_lse, q, k_cache, v_cache, block_table,
                                               seqused_k, cu_seqlens_q, 1, max_k, causal=True, backend="triton"),
                    "plan": functools.partial(splitkv.paged_cascade_attention, q, k_cache, v_cache, plan),
                }  # fmt: skip
                for call, fn in calls.items():
                    timers[(call, version)], outputs[(call, version)] = graph_replay_timer(fn)
        times = interleaved(lambda timer: timer() * 1e3, timers, rounds=5)
        # Each graph's output, refreshed by its replays (every graph has its own memory pool).
        for call in ("plain", "plan"):
            diff = (outputs[(call, "variant")][0].float() - outputs[(call, "project")][0].float()).abs().max().item()
            if not diff <= 1e-2:  # NaN fails too
                raise SystemExit(f"{label}, {call}: the variant's output differs from the project's by {diff}")
        cells = "  ".join(f"{call} {times[(call, 'project')]:6.1f} -> {times[(call, 'variant')]:6.1f} us "
                          f"({times[(call, 'project')] / times[(call, 'variant')]:.3f}x)"
                          for call in ("plain", "plan"))  # fmt: skip
        print(f"{label}: {cells}", flush=True)


if __name__ == "__main__":
    main()
