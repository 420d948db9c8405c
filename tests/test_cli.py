"""The command lines: ``python -m splitkv`` (build, info) and ``python -m splitkv.bench``
(one benchmark, results in a fresh folder unless --out says where)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from splitkv import __main__ as cli
from splitkv.bench import __main__ as bench_cli
from splitkv.bench import common


@pytest.fixture(autouse=True)
def _terminal_80_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps help to the terminal's width


def _listed(help_text: str) -> dict[str, str]:
    """Subcommand -> its help line; every line of the list must name one (no wrapped lines)."""
    start = help_text.index("positional arguments:")
    block = help_text[start:].split("\n\n")[0].splitlines()[2:]  # after the heading and the {a,b} line
    entries = [re.match(r"^    (\S+)\s+(\S.*)$", line) for line in block]
    assert all(entries), f"a subcommand's help takes more than one line:\n{help_text}"
    return {m.group(1): m.group(2) for m in entries}


def _exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    return stopped.value.code


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_commands(flag, capsys):
    assert _exit_code(cli.main, [flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m splitkv")
    assert set(_listed(out)) == {"build", "info"}


def test_unknown_command_exits_2_with_usage(capsys):
    assert _exit_code(cli.main, ["bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m splitkv") and "invalid choice: 'bogus'" in err


@pytest.mark.parametrize("argv", [["info"], []])
def test_info_and_the_default(argv, capsys):
    cli.main(argv)
    out = capsys.readouterr().out
    assert out.startswith("torch ") and "triton:" in out and "CUDA kernel sources:" in out


def test_build_needs_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU, build compiles the kernels (tests/test_merge_cuda.py covers it)")
    with pytest.raises(SystemExit, match="no CUDA device is visible"):
        cli.main(["build"])


def test_module_entry_point():
    # The real `python -m splitkv --help` (the in-process tests above call main()).
    done = subprocess.run([sys.executable, "-m", "splitkv", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "build" in done.stdout and "info" in done.stdout, done.stderr


def test_bench_help_lists_the_benchmarks(capsys):
    assert _exit_code(bench_cli.main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert set(_listed(out)) == set(bench_cli.BENCHMARKS) == {"merge", "cascade", "distributed", "paged", "hf"}


def test_bench_unknown_or_missing_name_exits_2(capsys):
    assert _exit_code(bench_cli.main, ["bogus"]) == 2
    assert _exit_code(bench_cli.main, []) == 2
    assert "usage: python -m splitkv.bench" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["merge", "cascade", "distributed"])
def test_bench_options_reach_the_benchmark(name, capsys):
    assert _exit_code(bench_cli.main, [name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m splitkv.bench {name}") and "--out DIR" in out


def test_bench_results_go_to_a_fresh_folder_by_default():
    import argparse

    parser = argparse.ArgumentParser()
    common.add_out_argument(parser, "merge")
    default = parser.parse_args([]).out
    assert default.parent == common.DEFAULT_OUT_ROOT and default.name.startswith("merge-")
    assert Path("benchmarks", "results") not in (default, *default.parents)
    assert parser.parse_args(["--out", "benchmarks/results"]).out == Path("benchmarks/results")


def test_bench_hf_reports_the_median_of_its_runs(tmp_path, capsys):
    """Both ways of `bench hf` take turns over --repeat timed runs; each reports the run
    with the lower median decode step, its range, and every run's step in the JSON."""
    import json

    pytest.importorskip("transformers")
    from splitkv.bench import hf

    hf.main(["--quick", "--repeat", "2", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "hf.json").read_text())
    assert payload["repeat"] == 2
    for run in payload["runs"].values():
        steps = run["decode_step_ms_runs"]
        assert len(steps) == 2 and run["decode_step_ms_range"] == [min(steps), max(steps)]
        assert run["decode_step_ms"] == min(steps)  # the lower of two medians
        assert len(run["ttft_s_runs"]) == 2 and run["ttft_s"] == min(run["ttft_s_runs"])
    assert "median of 2 runs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        hf.main(["--quick", "--repeat", "0", "--out", str(tmp_path)])
