"""Why does a finished bench cell segment nothing? Its logits on its own support patches.

A cell can have learned to rank the organ's voxels above the rest (high AUC) while no logit has yet crossed 0, the
decision threshold: then its Dice is 0 on every test case although training did something. This script reads
finished cells (run.json + adapter), draws 6 patches from each cell's *support* cases (its training data; never a
test case), and reports the foreground share, the AUC of the logits for foreground against background voxels, and
the mean logit of each. Not a test.
Usage: python benchmarks/cell_logits.py BENCH_OUT [--data ../shared/data/btcv30] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from arenaseg.bench.grid import finished_cells
from arenaseg.data.datasets import open_dataset
from arenaseg.data.preprocess import PreprocessSettings, load_cases
from arenaseg.data.sampling import PatchSampler
from arenaseg.pipeline import load_run
from arenaseg.utils.provenance import git_commit


def auc(is_fg: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC: the chance that a foreground voxel scores above a background one."""
    ranks = rankdata(scores)
    n_fg, n_bg = is_fg.sum(), (~is_fg).sum()
    return float((ranks[is_fg].sum() - n_fg * (n_fg + 1) / 2) / (n_fg * n_bg))


def cell_logits(run_dir: Path, data) -> dict:
    adapted, record = load_run(run_dir)
    organ, settings = record.organ, PreprocessSettings.from_dict(record.preprocess)
    volumes = load_cases(data, record.support_cases, {organ: 1}, settings)
    sampler = PatchSampler(volumes, settings, 2, seed=0)
    adapted.model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for step in range(10_000, 10_003):  # steps no training run draws
            images, masks = sampler.batch(step)
            logits.append(adapted.model(images).flatten())
            labels.append(masks.flatten() > 0)
    z, fg = torch.cat(logits).numpy(), torch.cat(labels).numpy()
    return {
        "fg_share": float(fg.mean()),
        "auc": auc(fg, z),
        "logit_fg": float(z[fg].mean()),
        "logit_bg": float(z[~fg].mean()),
        "logit_max": float(z.max()),
        "dice": record.mean_dice,
        "final_loss": record.final_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bench", help="a bench output folder (cells/... with adapters)")
    parser.add_argument("--data", default="../shared/data/btcv30", help="btcv30 folder (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/cell_logits.md", help="(default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = open_dataset(args.data)
    rows = []
    for folder, _ in finished_cells(args.bench):
        name = "/".join(folder.parts[-4:])
        rows.append((name, cell_logits(folder, data)))
        print(name, rows[-1][1], flush=True)
    commit = git_commit()
    lines = [
        "# Logits of finished bench cells on their own support patches (6 patches of 64^3 each)",
        "",
        f"- command: `python benchmarks/cell_logits.py BENCH_OUT --data {args.data}`; git commit {commit}; "
        f"device cpu (1 thread); {datetime.datetime.now():%Y-%m-%d %H:%M}",
        "- test Dice is the cell's own result; every other column comes from its support cases only",
        "",
        "| cell | test Dice % | final loss | fg share | AUC fg vs bg | mean logit fg | mean logit bg | max logit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['dice']:.1f} | {r['final_loss']:.3f} | {r['fg_share']:.4f} | {r['auc']:.3f} "
            f"| {r['logit_fg']:.2f} | {r['logit_bg']:.2f} | {r['logit_max']:.2f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
