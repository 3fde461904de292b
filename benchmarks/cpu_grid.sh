#!/usr/bin/env bash
# Protocol v2's grid (docs/benchmark.md) on the CPU, JOBS one-thread cells at a time: two 1-thread
# processes do more steps per second than one 2-thread process (benchmarks/results/threads.md).
# Every cell is its own `arenaseg bench --workers 1` call with its own folder under WORK, so a killed cell resumes
# from its checkpoint, and each finished cell is copied into DEST at once (commit it; then `arenaseg report DEST`).
# Cells committed in the preset's folder (COMMITTED) are adopted, not rerun, when everything that shapes their result
# matches. The script can be killed and started again at any point.
# Order: the decisive cells first, seed-major, so that a first seed of every decisive comparison lands before a
# second seed of any; within a seed the base organs, then the novel organ; within an organ the two ends of the rank
# range first. Then the next tier, also seed-major: AdaLoRA (the paper's comparator), then r16, on both tracks, LP
# and scratch on the novel one.
# Each running cell holds a lock file, so JOBS counts the cells running in every instance of the script, and an
# instance started while another runs (say, with a longer cell list) skips the cells already running.
# Usage: BENCH_ARGS="$(python benchmarks/probe_report.py --bench-arguments)" JOBS=2 bash benchmarks/cpu_grid.sh
# DATA: the btcv30 folder (default ../shared/data/btcv30); WORK (default runs/cpu-grid); DEST: the results folder
# the finished cells go to (default COMMITTED); ONLY: space-separated grid methods, the others are skipped
# (default: every method; e.g. ONLY="adalora-r16 lora-r16" while a choice ARENA's cells depend on is open); ORGANS:
# the same for organs (e.g. ARENA r64's λ path on two organs: ONLY=arena-r64 ORGANS="stomach pancreas", with
# "--lam 0.3" after the probe's choices in BENCH_ARGS and a WORK and DEST of its own); DEADLINE
# (epoch seconds): running cells are interrupted there (they resume later if WORK survives), and a cell does not start
# when the slowest cell of its track and method in DEST (else in COMMITTED) took longer than the time left (a half-run
# cell is lost where WORK does not outlive the session).
set -uo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
DATA=${DATA:-../shared/data/btcv30}
WORK=${WORK:-runs/cpu-grid}
COMMITTED=benchmarks/results/btcv-fs-v2-cpu  # the preset's committed CPU cells (arenaseg bench --results-from)
DEST=${DEST:-$COMMITTED}
ARENASEG=${ARENASEG:-.venv/bin/arenaseg}
PYTHON=${PYTHON:-.venv/bin/python}
BENCH_ARGS=${BENCH_ARGS:?set BENCH_ARGS to the probe choices: python benchmarks/probe_report.py --bench-arguments}
mkdir -p "$WORK/logs"

cells() {  # track organ method, one per line
  for seed in 0 1 2; do
    for organ in right_kidney aorta stomach; do
      for method in arena-r64 lora-r64 arena-r4 lora-r4 fft lp; do echo "base $organ $method $seed"; done
    done
    for method in arena-r64 lora-r64 arena-r4 lora-r4 fft; do echo "novel pancreas $method $seed"; done
  done
  for seed in 0 1 2; do
    for organ in right_kidney aorta stomach; do
      for method in adalora-r16 arena-r16 lora-r16; do echo "base $organ $method $seed"; done
    done
    for method in adalora-r16 arena-r16 lora-r16 lp scratch; do echo "novel pancreas $method $seed"; done
  done
}

slowest() {  # track method: the longest wall time in seconds of its cells in DEST (at these settings), else of its
  # cells in COMMITTED, 0 if none
  "$PYTHON" -c 'import sys
from pathlib import Path
from arenaseg.bench.results import read_results
for folder in sys.argv[1:3]:
    csv = Path(folder) / "results.csv"
    rows = read_results(csv) if csv.is_file() else []
    walls = [r.wall_s or 0 for r in rows if r.track == sys.argv[3] and r.name == sys.argv[4]]
    if walls:
        break
print(round(max(walls, default=0)))' "$DEST" "$COMMITTED" "$1" "$2"
}

running() {  # how many cells hold their lock, in any instance
  local n=0 lock
  for lock in "$WORK"/logs/*.lock; do
    [ -e "$lock" ] && ! flock -n "$lock" true && n=$((n + 1))
  done
  echo "$n"
}

start() {  # track organ method seed
  local left=0 name="$1-$2-$3-s$4"  # 0: timeout's "no limit"
  if [ -n "${DEADLINE:-}" ]; then
    left=$((DEADLINE - $(date +%s)))
    # a committed cell of a method without ARENA's gate options is adopted in seconds: no deadline applies to it
    adopted=$([[ $3 != arena-* && -e $COMMITTED/cells/$1/$3/$2/k5/seed$4/run.json ]] && echo 1)
    [ -n "$adopted" ] || [ "$left" -gt "$(slowest "$1" "$3")" ] || {
      echo "would not finish before the deadline, not started: $name"
      return
    }
  fi
  (
    flock -n 9 || { echo "running in another instance, skipped: $name"; exit; }
    echo "$(date -u +%H:%M) start: $name"
    # shellcheck disable=SC2086  # BENCH_ARGS holds several options on purpose
    OMP_NUM_THREADS=1 timeout --signal=INT "$left" "$ARENASEG" bench --preset btcv-fs --data "$DATA" \
      --out "$WORK/$name" --tracks "$1" --organs "$2" --methods "$3" --seeds "$4" --shots 5 --workers 1 \
      --threads 1 --export-to "$DEST" $BENCH_ARGS >"$WORK/logs/$name.log" 2>&1
  ) 9>"$WORK/logs/$name.lock" 8>&- &
}

exec 8>"$WORK/logs/slots.mutex"
cells | {
  while read -r track organ method seed; do
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $method "* ]] || continue
    [ -z "${ORGANS:-}" ] || [[ " $ORGANS " == *" $organ "* ]] || continue
    # count and start under one lock, so that two instances never both take the last free slot
    until flock 8 && [ "$(running)" -lt "$JOBS" ]; do flock -u 8; sleep 10; done
    start "$track" "$organ" "$method" "$seed"
    sleep 1  # let the cell take its lock before the next count
    flock -u 8
  done
  wait
}
