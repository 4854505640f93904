#!/usr/bin/env bash
# One GPU session's checks, in order: environment, the test suite on the GPU, then
# the benchmarks named as arguments. Full logs go to $OUT (or ./gpu_out).
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_run.sh tests tune cache schedule tiles decode:--backends\ hip\ asm\ triton\ auto qwen3:dense \
#        profile:llama3-8b,128,8192,fp8,asm ...
# WORKLOAD (default ../shared/bench/workload.json) points at the shared grid. GIT_COMMIT names the
# commit in the logs and result files: set it where the tree is copied from (a copy's .git may be stale).
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
    schedule|schedule:*)
      # extra arguments after the colon, e.g. schedule:--backends\ hip\ triton\ --schedules\ static\ static-512\ static-2048
      extra="${step#schedule}"
      python3 benchmarks/bench_split_schedule.py --workload "$workload" --json "$out/split_schedule.json" ${extra#:} 2>&1 \
        | tee "$out/split_schedule.log" | tail -50 || status=1 ;;
    tiles|tiles:*)
      # Triton's stage-1 tiles, e.g. tiles:--tiles\ own\ 128x4x2\ 64x4x2 --models\ llama3-8b
      extra="${step#tiles}"
      python3 benchmarks/bench_triton_tiles.py --workload "$workload" --json "$out/triton_tiles.json" ${extra#:} 2>&1 \
        | tee "$out/triton_tiles.log" | tail -50 || status=1 ;;
    cache)
      python3 benchmarks/bench_cache_write.py --json "$out/cache_write.json" 2>&1 | tee "$out/cache_write.log" | tail -20 || status=1 ;;
    tune)
      # the dispatch table of this GPU (the shipped one is pa_hybrid/tables/<name>.json); the
      # steps after this one dispatch by the new table
      python3 -m pa_hybrid.tune --workload "$workload" --shapes 64:8 --out "$out/table.json" 2>&1 \
        | tee "$out/tune.log" | tail -20 && export PA_HYBRID_DISPATCH_TABLE="$out/table.json" || status=1 ;;
    qwen3:*)
      # the end-to-end example: tokens against transformers (and transformers against itself), tokens/s
      python3 examples/qwen3_decode.py --config "${step#qwen3:}" 2>&1 | tee "$out/qwen3-${step#qwen3:}.log" \
        | grep -v -i warn | tail -30 || status=1 ;;
    profile:*)
      # Nsight Compute on one grid call (MODEL,NUM_SEQS,CTX,KV,BACKEND): the summary sections, then
      # warp-stall samples per SASS instruction (where a kernel waits, e.g. which MIO instruction)
      IFS=, read -r model seqs ctx kv backend <<< "${step#profile:}"
      rep="$out/profile-$model-$seqs-$ctx-$kv-$backend"
      ncu --clock-control none --kernel-name regex:'pa_decode|paged_decode' --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
        --section Occupancy --section SourceCounters --import-source no -f -o "$rep" \
        python3 benchmarks/profile_one_call.py --workload "$workload" "$model" "$seqs" "$ctx" "$kv" "$backend" > "$rep.log" 2>&1 || status=1
      ncu --import "$rep.ncu-rep" --page details > "$rep.txt" 2>&1 && grep -E "Duration|DRAM Throughput|Issue Slots Busy|Achieved Occupancy|Stall" "$rep.txt" | head -20
      ncu --import "$rep.ncu-rep" --page source --print-source sass --csv > "$rep-sass.csv" 2>&1 \
        && python3 benchmarks/stall_hotspots.py "$rep-sass.csv" | tee "$rep-hotspots.txt" || status=1 ;;
    decode:*)
      python3 -m pa_hybrid.bench --workload "$workload" --out "$out" ${step#decode:} 2>&1 \
        | tee -a "$out/decode.log" | grep -vE "^\s*$" | tail -60 || status=1 ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
exit $status
