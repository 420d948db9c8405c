#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA ops, then run the steps named as
# arguments, in order, each logged under $OUT (default: tests, then bench merge):
#   tests                 the whole test suite, slow grids included (-m ""; extra pytest
#                         options in $PYTEST_ARGS, e.g. "-n 8" or "-m slow" or test paths)
#   "bench NAME [ARGS]"   python -m splitkv.bench NAME --out $OUT/results ARGS
#   "example [ARGS]"      examples/shared_prefix_batching.py ARGS
#   sweep                 benchmarks/merge_sweep.cu: the CUDA merge's launch shapes
#   decode-sweep          benchmarks/decode_sweep.py: the attention kernel's tiles on decode shapes
#   "split-sweep [SECTIONS]" benchmarks/split_sweep.py: split counts on decode shapes (dense, paged, cascade)
#   prefix-tile           benchmarks/prefix_tile_sweep.py: the cascade launch's prefix tile on decode shapes
#   plan-sweep            benchmarks/paged_plan_sweep.py: the paged plan's launch by kind of program and tile config
#   "paged-ab VARIANT.py [PAGE]" benchmarks/paged_ab.py: the paged kernel against a variant copy of it, in one process
#   ncu-plan              ncu of that launch's parts (shared runs, own programs, all) and of the packed cascade's passes
#   ncu-merge             ncu (hardware counters) of merge_sweep.cu's two-state launches at 4096 and 1024
#                         x 32 x 128 and its N-way launch of 8 states
#   memcheck              compute-sanitizer memcheck over pytest (the tests named in $PYTEST_ARGS)
#   profile-compiled      benchmarks/profile_compiled_step.py: host time of the example's compiled decode steps
# The exit status is non-zero if any step failed; later steps run regardless.
# STEP_TIMEOUT=S stops any one step after S seconds, so that the later steps still
# run; BUDGET=S bounds all the steps together (counted from the end of the build): a
# step gets at most what is left, and none starts once it is spent. PACK=1 leaves one file, $OUT/all.tgz, holding everything the steps wrote (the
# device tool returns at most 8 files); with STEP_TIMEOUT set it happens even when a
# step overruns, as long as the whole call stays inside the tool's limit.
set -uo pipefail
OUT=${OUT:-/tmp/splitkv-device}
mkdir -p "$OUT/results"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
status=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  env | grep -E '^(NCCL|TORCH_SYMM|NVSHMEM)' || true
} > "$OUT/env.txt" 2>&1
python -m splitkv build 2>&1 | tee "$OUT/build.log" || status=1
[ $# -gt 0 ] || set -- tests "bench merge"
steps_start=$SECONDS
step=0
for spec in "$@"; do
  step=$((step + 1))
  read -r kind name args <<< "$spec"
  log="$OUT/${step}_${kind}.log"
  echo "=== $spec" | tee "$log"
  limit=()
  seconds=${STEP_TIMEOUT:-}
  if [ -n "${BUDGET:-}" ]; then
    left=$((BUDGET - (SECONDS - steps_start)))
    if [ "$left" -le 5 ]; then echo "=== skipped: BUDGET=$BUDGET s spent" | tee -a "$log"; status=1; continue; fi
    [ -n "$seconds" ] && [ "$seconds" -le "$left" ] || seconds=$left
  fi
  [ -z "$seconds" ] || limit=(timeout "$seconds")
  start=$SECONDS
  case "$kind" in
    tests) "${limit[@]}" python -m pytest -q -ra --durations=15 -p no:cacheprovider -m "" ${PYTEST_ARGS:-} 2>&1 | tee -a "$log" | tail -25 ;;
    bench) "${limit[@]}" python -m splitkv.bench "$name" --out "$OUT/results" $args 2>&1 | tee -a "$log" ;;
    example) "${limit[@]}" python examples/shared_prefix_batching.py $name $args 2>&1 | tee -a "$log" ;;
    sweep) { nvcc -std=c++17 -O3 -arch=sm_90 -I csrc benchmarks/merge_sweep.cu -o /tmp/merge_sweep &&
             "${limit[@]}" /tmp/merge_sweep; } 2>&1 | tee -a "$log" ;;
    decode-sweep) "${limit[@]}" python benchmarks/decode_sweep.py --out "$OUT/results" 2>&1 | tee -a "$log" ;;
    split-sweep) "${limit[@]}" python benchmarks/split_sweep.py $name $args 2>&1 | tee -a "$log" ;;
    prefix-tile) "${limit[@]}" python benchmarks/prefix_tile_sweep.py 2>&1 | tee -a "$log" ;;
    plan-sweep) "${limit[@]}" python benchmarks/paged_plan_sweep.py 2>&1 | tee -a "$log" ;;
    paged-ab) "${limit[@]}" python benchmarks/paged_ab.py $name $args 2>&1 | tee -a "$log" ;;
    ncu-plan) "${limit[@]}" ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
                  --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
                  --section MemoryWorkloadAnalysis -k regex:"_paged_fwd_kernel|attention_fwd_kernel" \
                  python benchmarks/paged_plan_sweep.py ncu 2>&1 | tee -a "$log" ;;
    ncu-merge) { nvcc -std=c++17 -O3 -arch=sm_90 -lineinfo -I csrc benchmarks/merge_sweep.cu -o /tmp/merge_sweep &&
                "${limit[@]}" ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
                    --section MemoryWorkloadAnalysis --section WarpStateStats -k regex:merge_ \
                    /tmp/merge_sweep ncu; } 2>&1 | tee -a "$log" ;;
    memcheck) "${limit[@]}" compute-sanitizer --tool memcheck --error-exitcode 1 \
                  python -m pytest -q -p no:cacheprovider -m "" ${PYTEST_ARGS:-} 2>&1 | tee -a "$log" | tail -25 ;;
    profile-compiled) "${limit[@]}" python benchmarks/profile_compiled_step.py $name $args 2>&1 | tee -a "$log" ;;
    *) echo "unknown step: $spec" | tee -a "$log"; false ;;
  esac
  [ "${PIPESTATUS[0]}" = 0 ] || { status=1; echo "=== step failed: $spec" | tee -a "$log"; }
  echo "=== $spec: $((SECONDS - start)) s" | tee -a "$log"
done
if [ "${PACK:-0}" = 1 ]; then
  tar czf /tmp/splitkv-device-all.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/splitkv-device-all.tgz "$OUT/all.tgz"
fi
exit $status
