#!/usr/bin/env bash
# Here, before a lent GPU's run: what the device machine lacks, in the git-ignored folder .gpu/ (the device tool
# sends tracked files plus the paths named in `carry`, 64 MiB in all; the repository alone is about 33 MB):
#   .gpu/whl           MONAI, nibabel and PEFT wheels for its Python 3.12 (its image has torch but not these)
#   .gpu/probe/btcv30  the pretrain-split cases the probe uses (btcv_0001-0008), about 15 MB
#   .gpu/grid/btcv30   BTCV-FS's support pool and test cases (btcv_0026-0040), about 22 MB
# A copy for the transfer only, never committed; `rm -rf .gpu` afterwards. Then, on the device (see gpu_v2.sh):
#   run(carry=[".gpu/whl", ".gpu/probe"], command="bash benchmarks/gpu_v2.sh probe")
#   run(carry=[".gpu/whl", ".gpu/grid"], command="BENCH_ARGS='<what the probe chose>' bash benchmarks/gpu_v2.sh grid")
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${DATA:-../shared/data/btcv30}
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
    "monai==$("$PY" -c 'import monai; print(monai.__version__)')" \
    "nibabel==$("$PY" -c 'import nibabel; print(nibabel.__version__)')" \
    "peft==$("$PY" -c 'import peft; print(peft.__version__)')"
subset() {  # name first last
    local dst=.gpu/$1/btcv30
    mkdir -p "$dst/imagesTr" "$dst/labelsTr"
    cp "$SRC/dataset.json" "$dst/"
    for i in $(seq "$2" "$3"); do
        id=$(printf 'btcv_%04d' "$i")
        cp "$SRC/imagesTr/${id}_0000.nii.gz" "$dst/imagesTr/"
        cp "$SRC/labelsTr/$id.nii.gz" "$dst/labelsTr/"
    done
}
subset probe 1 8
subset grid 26 40
du -sh .gpu/* "$(git rev-parse --show-toplevel)"/src/arenaseg/models/builtin
