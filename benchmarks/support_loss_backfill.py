"""Give finished bench cells recorded before ``support_loss`` existed their support loss, from their saved adapters.

A cell's run.json records the loss of its last step (``final_loss``): one batch of two patches, which moves by up to
0.5 from batch to batch. ``support_loss`` (arenaseg.train.loop.support_loss) is the final model's mean loss on the
batches of its last steps; batches depend only on (seed, step), so the adapter a cell saved gives the number the run
would have recorded (tests/test_pipeline.py checks this). For every finished cell under each bench folder given that
lacks it, this measures it, writes it into the cell's run.json (with a ``git_commit_note`` saying so) and, with
--export-to, copies the cell into a committed results folder as the bench does. Resumable: a killed run leaves every
cell either done or untouched. Measures on support cases only, never on a test case.
Usage: OMP_NUM_THREADS=1 python benchmarks/support_loss_backfill.py runs/cpu-grid/* \
           --export-to benchmarks/results/btcv-fs-v2-cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from arenaseg.bench.grid import export_results, finished_cells
from arenaseg.pipeline import RUN_FILE, remeasure_support_loss
from arenaseg.utils.provenance import git_commit


def backfill(bench_out: Path, data: str | None) -> int:
    """Measure every finished trained cell of one bench folder that lacks the support loss; returns how many."""
    missing = [(folder, r) for folder, r in finished_cells(bench_out) if r.support_loss is None and r.support_cases]
    for folder, record in tqdm(missing, desc=str(bench_out), disable=not missing):
        record.support_loss = remeasure_support_loss(folder, data)
        note = f"support_loss measured afterwards from the saved adapter by {Path(__file__).name} at {git_commit()}"
        record.git_commit_note = f"{record.git_commit_note}; {note}" if record.git_commit_note else note
        record.write(folder / RUN_FILE)
    return len(missing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench_out", nargs="+", type=Path, help="bench --out folders (their cells keep adapters)")
    parser.add_argument("--data", help="the dataset folder, if it moved since the runs (default: run.json's)")
    parser.add_argument("--export-to", type=Path, help="a committed results folder to copy the cells into")
    args = parser.parse_args()
    for out in args.bench_out:
        done = backfill(out, args.data)
        if done and args.export_to:
            export_results(out, args.export_to)
        print(f"{out}: {done} cells measured")


if __name__ == "__main__":
    main()
