#!/usr/bin/env bash
# The probe runs behind protocol v2's global choices (docs/benchmark.md, criteria 1-3), JOBS at a time.
# Each run is resumable and skipped once finished, so the script can be killed and started again at any point.
# Checkpoints are gitignored; at a session's end, commit a low-rank run's with `git add -f` (about 1 MB) to resume it.
# Usage: JOBS=2 DEVICE=cpu bash benchmarks/probe_plan.sh [phase ...]
#   phases, in the default order: budget novel ranks lambda lambda-novel (every family first, then the decoder
#   policy; lambda-novel runs on the novel organ under the decoder policy that criterion 2 chose, once it is chosen)
# On a lent GPU: benchmarks/gpu_v2.sh probe (JOBS=16 DEVICE=cuda). DATA: the btcv30 folder (default ../shared/data);
# DEADLINE (epoch seconds): no run starts after it, and running ones are interrupted there (they resume later).
set -uo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
DEVICE=${DEVICE:-cpu}
DATA=${DATA:-../shared/data/btcv30}
PY=${PY:-.venv/bin/python}
LOGS=${LOGS:-benchmarks/results/probe/logs}
mkdir -p "$LOGS"

runs() {
  for phase in "$@"; do
    case $phase in
      budget)  # criterion 1 (budget): every method family on the base organ
        for m in lora-r64 arena-r64 lp fft; do
          echo "--organ right_kidney --method $m"; done ;;
      ranks)  # the base half of criterion 3 at the current lambda, and the rank range
        for m in lora-r16 arena-r16 lora-r4 arena-r4; do
          echo "--organ right_kidney --method $m"; done ;;
      novel)  # criterion 2: the decoder policy, LoRA and ARENA at r16 (low-rank first: their checkpoints commit)
        for d in frozen lowrank full; do for m in lora-r16 arena-r16; do
          echo "--organ pancreas --method $m --decoder $d"; done; done ;;
      lambda)  # criterion 3: lambda on the base organ
        for lam in 0 0.1; do for m in arena-r16 arena-r64; do
          echo "--organ right_kidney --method $m --lam $lam"; done; done ;;
      lambda-novel)  # criterion 3 on the novel organ, under the chosen decoder policy
        decoder=$($PY benchmarks/probe_report.py --decoder) || { echo "lambda-novel skipped" >&2; continue; }
        echo "--organ pancreas --method arena-r64 --decoder $decoder"
        for lam in 0 0.1; do for m in arena-r16 arena-r64; do
          echo "--organ pancreas --method $m --lam $lam --decoder $decoder"; done; done ;;
      *) echo "unknown phase $phase" >&2; exit 2 ;;
    esac
  done
}

launch() {  # run the argument lines on stdin, JOBS at a time; with DEADLINE, none past it
  while read -r args; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
    left=0  # timeout's "no limit"
    if [ -n "${DEADLINE:-}" ]; then
      left=$((DEADLINE - $(date +%s)))
      [ "$left" -gt 0 ] || { echo "past the deadline, not started: $args"; continue; }
    fi
    log="$LOGS/$(echo "$args" | tr ' ' '_' | tr -d '-').log"
    echo "start: $args"
    # timeout wraps python itself: a background job of a script ignores SIGINT, and timeout restores it
    # shellcheck disable=SC2086  # $args holds several options on purpose
    OMP_NUM_THREADS=1 timeout --signal=INT "$left" $PY benchmarks/probe.py $args --steps 300 --every 50 \
      --device "$DEVICE" --data "$DATA" >"$log" 2>&1 &
  done
  wait
}

phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(budget novel ranks lambda lambda-novel)
first=()
for phase in "${phases[@]}"; do [ "$phase" = lambda-novel ] || first+=("$phase"); done
[ ${#first[@]} -eq 0 ] || runs "${first[@]}" | launch
# lambda-novel needs the decoder policy, so it starts once every run before it has ended
[ ${#first[@]} -eq ${#phases[@]} ] || runs lambda-novel | launch
$PY benchmarks/probe_report.py
