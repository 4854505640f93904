#!/usr/bin/env bash
# One GPU session's checks, in order: environment, the test suite on the GPU, then
# the benchmarks named as arguments. Full logs go to $OUT (or ./gpu_out).
#   bash benchmarks/gpu_run.sh tests cache schedule decode:llama3-8b decode:qwen3-235b ...
# WORKLOAD (default ../shared/bench/workload.json) points at the shared grid.
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
workload="${WORKLOAD:-../shared/bench/workload.json}"
status=0

echo "== $(date -u +%FT%TZ) commit ${GIT_COMMIT:-unknown}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

for step in "$@"; do
  case "$step" in
    tests)
      python3 -m pytest -q -p no:cacheprovider -rs 2>&1 | tee "$out/pytest.log" | tail -25 || status=1 ;;
    sanitize:*)
      # memcheck over a test subset (pytest -k expression after the colon); driver API probing
      # by torch and cuda-python (cuGetProcAddress) is not a memory error, so it is not reported
      compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider -k "${step#sanitize:}" \
        2>&1 | tee "$out/memcheck.log" | tail -15 || status=1 ;;
    schedule)
      python3 benchmarks/bench_split_schedule.py --workload "$workload" --json "$out/split_schedule.json" 2>&1 \
        | tee "$out/split_schedule.log" | tail -50 || status=1 ;;
    cache)
      python3 benchmarks/bench_cache_write.py --json "$out/cache_write.json" 2>&1 | tee "$out/cache_write.log" | tail -20 || status=1 ;;
    decode:*)
      python3 -m pa_hybrid.bench --workload "$workload" --out "$out" ${step#decode:} 2>&1 \
        | tee -a "$out/decode.log" | grep -vE "^\s*$" | tail -60 || status=1 ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
exit $status
