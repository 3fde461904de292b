#!/usr/bin/env bash
# The probe runs behind protocol v2's global choices (docs/benchmark.md, criteria 1-3), JOBS at a time.
# Each run is resumable and skipped once finished (or while another process runs it), so the script can be killed
# and started again at any point.
# Checkpoints are gitignored; at a session's end, commit a low-rank run's with `git add -f` (about 1 MB) to resume it.
# Usage: JOBS=2 DEVICE=cpu bash benchmarks/probe_plan.sh [phase ...]
#   phases, in the default order: budget novel lambda lambda-novel lambda-rest, the runs the choices need
#   (lambda-novel and lambda-rest run on the novel organ under the decoder policy that criterion 2 chose, so their
#   runs wait until that choice is made, while later runs go ahead); on request, lambda-path (criterion 6) and
#   ranks (no choice depends on it, and criterion 1 would count it), adalora (criterion 4 for AdaLoRA)
# On a lent GPU: benchmarks/gpu_v2.sh probe (JOBS=16 DEVICE=cuda). DATA: the btcv30 folder (default ../shared/data);
# DEADLINE (epoch seconds): no run starts after it, and running ones are interrupted there (they resume later).
# JOBS counts every probe run on the machine, this script's or not, so a restarted script does not overload it.
set -uo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
DEVICE=${DEVICE:-cpu}
DATA=${DATA:-../shared/data/btcv30}
PY=${PY:-.venv/bin/python}
LOGS=${LOGS:-benchmarks/results/probe/logs}
mkdir -p "$LOGS"

V1_LAM=0.3  # the library's λ before criterion 3 chose 0.1: the ARENA runs below without their own λ used it

runs() {
  for phase in "$@"; do
    case $phase in
      budget)  # criterion 1 (budget): every method family on the base organ
        for m in lora-r64 "arena-r64 --lam $V1_LAM" lp fft; do
          echo "--organ right_kidney --method $m"; done ;;
      novel)  # criterion 2: the decoder policy, LoRA and ARENA at r16 (low-rank first: their checkpoints commit)
        for d in frozen lowrank full; do for m in lora-r16 "arena-r16 --lam $V1_LAM"; do
          echo "--organ pancreas --method $m --decoder $d"; done; done ;;
      lambda)  # criterion 3 on the base organ (ARENA r64 at the default lambda is a budget run)
        echo "--organ right_kidney --method arena-r16 --lam $V1_LAM"
        for lam in 0 0.1; do for m in arena-r16 arena-r64; do
          echo "--organ right_kidney --method $m --lam $lam"; done; done ;;
      lambda-novel)  # criterion 3 on the novel organ; @decoder: the policy criterion 2 chose. λ 0.1 first: on the
        # pancreas, λ 0.3 is ruled out by its r16 loss (0.044 above λ 0's), so the λ 0.1 pair may decide alone
        for lam in 0.1 0; do for m in arena-r16 arena-r64; do
          echo "--organ pancreas --method $m --lam $lam --decoder @decoder"; done; done ;;
      lambda-rest)  # last: criterion 3 needs it only if no λ qualifies, as the λ 0.1 and 0 runs showed
        echo "--organ pancreas --method arena-r64 --lam $V1_LAM --decoder @decoder" ;;
      lambda-path)  # criterion 6: the λ path past where Dice falls (λ 0, 0.1, 0.3 are criterion 3's); λ 0.5 first:
        # λ 0.9 switched off all but a few components by step 5, so its runs bracket the path without deciding it
        for lam in 0.5 0.9 0.7; do for m in "right_kidney --method arena-r64" "right_kidney --method arena-r16" \
            "pancreas --method arena-r64 --decoder lowrank" "pancreas --method arena-r16 --decoder lowrank"; do
          echo "--organ $m --lam $lam"; done; done ;;
      adalora)  # criterion 4 for AdaLoRA, the one grid family that criterion 1's runs left out; PEFT's AdaLoRA
        # cannot wrap a Conv3d, so where the grid's policy is low-rank decoder adapters it trains the decoder in full
        echo "--organ right_kidney --method adalora-r16"
        echo "--organ pancreas --method adalora-r16 --decoder full" ;;
      ranks)  # LoRA and ARENA over the rank range on the base organ (no choice depends on these)
        for m in lora-r16 lora-r4 "arena-r4 --lam $V1_LAM"; do
          echo "--organ right_kidney --method $m"; done ;;
      *) echo "unknown phase $phase" >&2; exit 2 ;;
    esac
  done
}

running() {  # probe runs on this machine: this script's jobs, or any python running benchmarks/probe.py
  local mine theirs
  mine=$(jobs -rp | wc -l)
  theirs=$(pgrep -fc "^[^ ]*python[^ ]* benchmarks/probe.py" || true)
  echo $((mine > theirs ? mine : theirs))
}

start() {  # one probe run in the background; with DEADLINE, none past it
  local args=$1 left=0  # timeout's "no limit"
  if [ -n "${DEADLINE:-}" ]; then
    left=$((DEADLINE - $(date +%s)))
    [ "$left" -gt 0 ] || { echo "past the deadline, not started: $args"; return; }
  fi
  local log
  log="$LOGS/$(echo "$args" | tr ' ' '_' | tr -d '-').log"
  echo "start: $args"
  # timeout wraps python itself: a background job of a script ignores SIGINT, and timeout restores it
  # shellcheck disable=SC2086  # $args holds several options on purpose
  OMP_NUM_THREADS=1 timeout --signal=INT "$left" $PY benchmarks/probe.py $args --steps 300 --every 50 \
    --device "$DEVICE" --data "$DATA" >"$log" 2>&1 &
}

launch() {  # run the argument lines on stdin, JOBS at a time; @decoder lines once the decoder policy is chosen
  local args decoder deferred=()
  while read -r args; do
    while [ "$(running)" -ge "$JOBS" ]; do sleep 5; done
    if [[ $args == *@decoder* ]]; then
      decoder=$($PY benchmarks/probe_report.py --decoder 2>/dev/null) || { deferred+=("$args"); continue; }
      args=${args//@decoder/$decoder}
    fi
    start "$args"
  done
  for args in "${deferred[@]}"; do  # the decoder policy's runs were still going when these came up
    while [ "$(running)" -ge "$JOBS" ]; do sleep 5; done
    until decoder=$($PY benchmarks/probe_report.py --decoder 2>/dev/null); do
      [ "$(running)" -gt 0 ] || { echo "no decoder policy chosen, not started: $args"; continue 2; }
      sleep 30
    done
    start "${args//@decoder/$decoder}"
  done
  wait
}

phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(budget novel lambda lambda-novel lambda-rest)
runs "${phases[@]}" | launch
$PY benchmarks/probe_report.py
