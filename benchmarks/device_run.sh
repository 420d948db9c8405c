#!/usr/bin/env bash
# One call on the lent GPU machine: build the CUDA ops, run the whole test suite,
# then the benchmarks named as arguments (default: merge). Logs go under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/splitkv-device}
mkdir -p "$OUT/results"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
status=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
python -m splitkv build 2>&1 | tee "$OUT/build.log" || status=1
python -m pytest -q -ra --durations=15 -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -40
[ "${PIPESTATUS[0]}" = 0 ] || status=1
for bench in "${@:-merge}"; do
  python -m splitkv.bench "$bench" --out "$OUT/results" 2>&1 | tee "$OUT/bench_$bench.log" || status=1
done
exit $status
