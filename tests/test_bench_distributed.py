"""The context-parallel benchmark script end to end, as a gloo smoke run on CPU: it
spawns its ranks, times, checks rank 0 against single-process attention and writes
its tables (the NCCL run on GPUs uses the same code)."""

import json

from splitkv.bench import distributed


def test_distributed_bench_smoke(tmp_path, monkeypatch):
    # The ranks are fresh processes that inherit this environment. conftest's
    # TRITON_INTERPRET=1 would run their Triton kernels in the interpreter (about
    # 16 s a call for the one-process baseline); the script is under test here, not
    # the kernels (tests/test_attention_kernels.py runs those), so the ranks take the
    # backends a CPU machine picks without it.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    distributed.main(["--cpu", "--world-sizes", "1", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "distributed.json").read_text())
    assert {r["world"] for r in result["decode"]} == {1, 2}
    assert all(r["max_diff"] < 1e-4 for r in result["decode"] + result["prefill"])
    assert {r["layout"] for r in result["prefill"]} == {"zigzag", "contiguous"}
    # Two ranks receive one state (output + LSE) each to combine a decode step.
    two = next(r for r in result["decode"] if r["world"] == 2 and r["queries"] == 1)
    assert two["all_gather_bytes"] == 32 * (128 * 4 + 4)
    assert "| GPUs |" in (tmp_path / "distributed.md").read_text()
