#!/usr/bin/env bash
# The BTCV-FS grid on one GPU within a fixed time budget, as one prepared script (a device lease is short).
#
# One `arenaseg bench --workers 1` process per (organ, seed), all sharing the GPU; each keeps its own bench folder
# under $WORK so that the processes never write the same results.csv. Phase A runs the decisive cells first (the
# base track's organs, k = 5); phase B adds the novel track's first organs and k = 1, 10 until the deadline.
# Run it only once docs/benchmark.md's global choices are made: a cell records the settings it ran under.
# Unfinished cells are simply absent (a bench resumes them on a later run). Finished cells, logs and a timing
# line per phase are packed into $OUT/gpu_results.tar.gz (or ./gpu_results.tar.gz without $OUT).
#
# Environment: DATA (btcv30 folder), SECONDS_BUDGET (default 480), STEPS (default: the global default),
# BENCH_ARGS (more `arenaseg bench` options for every process, e.g. the probe's choices: gpu_v2.sh),
# DEVICE (default cuda), METHODS (comma-separated; default: every method of each track), ORGANS_A (default: the
# base track's organs), ORGANS_B (default: the novel track's first two; empty for none), SHOTS_A, SHOTS_B, SEEDS,
# THREADS_A, THREADS_B, WORK,
# RESULTS_FROM (default none; preset adopts the committed benchmarks/results/btcv-fs-v2-gpu cells), and
# ARENASEG_COMMIT (the commit of the copied code; the copy's .git may be stale).
set -uo pipefail

DATA=${DATA:?set DATA to the btcv30 folder}
BUDGET=${SECONDS_BUDGET:-480}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
preset_organs() {  # track [n]: the first n (default all) organs of that btcv-fs preset track (arenaseg.bench.grid)
    "$PY" -c 'import sys; from arenaseg.bench.grid import PRESETS
print(*PRESETS["btcv-fs"].track(sys.argv[1]).organs[: int(sys.argv[2]) if sys.argv[2:] else None])' "$@"
}
[ -n "${ORGANS_A:-}" ] || ORGANS_A=$(preset_organs base) || exit
[ -n "${ORGANS_B+set}" ] || ORGANS_B=$(preset_organs novel 2) || exit
SEEDS=${SEEDS:-0 1 2}
SHOTS_A=${SHOTS_A:-5}
SHOTS_B=${SHOTS_B:-5,1,10}
RESULTS_FROM=${RESULTS_FROM:-none}
WORK=${WORK:-/tmp/arenaseg_gpu}
DEST=${OUT:-$PWD}
STEPS_ARG=${STEPS:+--steps $STEPS}
METHODS_ARG=${METHODS:+--methods $METHODS}
export ARENASEG_CACHE=$WORK/cache TQDM_DISABLE=1 PYTHONUNBUFFERED=1
mkdir -p "$WORK/logs"
END=$((SECONDS + BUDGET))

bench() {  # organ seed shots threads
    local name=$1_s$2
    timeout --signal=INT $((END - SECONDS > 0 ? END - SECONDS : 1)) \
        "$PY" -m arenaseg.cli bench --preset btcv-fs --data "$DATA" --out "$WORK/bench/$name" \
        --organs "$1" --seeds "$2" --shots "$3" --workers 1 --results-from "$RESULTS_FROM" \
        --device "$DEVICE" --threads "$4" $METHODS_ARG $STEPS_ARG ${BENCH_ARGS:-} >>"$WORK/logs/$name.log" 2>&1
}

phase() {  # label organs shots threads
    local t0=$SECONDS
    for organ in $2; do
        for seed in $SEEDS; do
            bench "$organ" "$seed" "$3" "$4" &
        done
    done
    wait
    echo "phase $1 ($2; k $3) ended after $((SECONDS - t0)) s; $((END - SECONDS)) s left" | tee -a "$WORK/logs/phases.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$WORK/logs/gpu.txt"
phase A "$ORGANS_A" "$SHOTS_A" "${THREADS_A:-2}"
if ((END - SECONDS > 30)); then
    phase B "$ORGANS_A $ORGANS_B" "$SHOTS_B" "${THREADS_B:-1}"
fi

# run.json, metrics.json and error.txt of every cell (no adapters), plus the logs
(cd "$WORK" && find bench -name run.json -o -name metrics.json -o -name error.txt | tar czf "$DEST/gpu_results.tar.gz" -T - logs)
echo "finished cells: $(find "$WORK/bench" -name run.json | wc -l)"
