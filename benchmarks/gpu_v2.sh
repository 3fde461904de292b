#!/usr/bin/env bash
# Protocol v2 on a lent GPU, as two prepared runs of the device tool (benchmarks/gpu_payload.sh first, here):
#   probe  every probe run still missing (benchmarks/probe_plan.sh, JOBS=16 on the GPU, resuming the committed
#          checkpoints), then probe_report.py, whose Choices section applies docs/benchmark.md's written criteria.
#          Brings back $OUT/probe.tar.gz (the JSONs, README.md, probe.png) and $OUT/bench_args.txt: the choices as
#          `arenaseg bench` options, or nothing while some choice is not decidable.
#   grid   the decisive cells under BENCH_ARGS (what probe chose; commit the probe evidence before this) through
#          benchmarks/gpu_grid.sh until SECONDS_BUDGET: the base organs and pancreas at k = 5, then k = 1.
#          Brings back $OUT/gpu_results.tar.gz (run.json/metrics.json/error.txt of every finished cell, the logs).
# Environment: ARENASEG_COMMIT (required: `git rev-parse --short HEAD` here), SECONDS_BUDGET (default 420),
# JOBS (default 16), BENCH_ARGS (grid).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: gpu_v2.sh probe|grid}
BUDGET=${SECONDS_BUDGET:-420}
PY=${PY:-python3}
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit
: "${ARENASEG_COMMIT:?set ARENASEG_COMMIT to the commit sent (the copy of .git there may be stale)}"
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1 ARENASEG_COMMIT
export PY DEVICE=${DEVICE:-cuda} OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case $STAGE in
  probe)
    rm -f benchmarks/results/probe/logs/*.log
    JOBS=${JOBS:-16} DATA=.gpu/probe/btcv30 DEADLINE=$(($(date +%s) + BUDGET)) bash benchmarks/probe_plan.sh
    "$PY" benchmarks/probe_report.py
    "$PY" benchmarks/probe_report.py --bench-arguments | tee "$OUT/bench_args.txt"
    tar czf "$OUT/probe.tar.gz" --exclude '*.checkpoint.pt' -C benchmarks/results probe
    ;;
  grid)
    : "${BENCH_ARGS:?set BENCH_ARGS to the choices in bench_args.txt}"
    # one process per (organ, seed), the base organs and pancreas together; then k = 1 while time is left
    DATA=.gpu/grid/btcv30 SECONDS_BUDGET=$BUDGET ORGANS_A="right_kidney aorta stomach pancreas" SHOTS_A=5 THREADS_A=1 \
        ORGANS_B="" SHOTS_B=1 WORK=/tmp/arenaseg_gpu BENCH_ARGS=$BENCH_ARGS \
        METHODS=zero-shot,lp,fft,lora-r4,lora-r64,arena-r4,arena-r64 bash benchmarks/gpu_grid.sh
    ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
