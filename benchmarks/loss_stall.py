"""Does the adaptation loss learn a small organ at all? Dice alone vs Dice + cross-entropy, linear probe.

The first BTCV-FS cells (Dice loss) ended at a training loss of 0.991 and every method gave the same test Dice:
the new head predicted foreground over the whole body. This script shows why on *training* data only: the
BTCV-FS pretrain cases (never the support pool or the test cases), pancreas, a linear probe on btcv-fs, the
default step budget. It reports the training loss and, on 8 fixed patches, the predicted foreground fraction
against the true one. Not a test.
Usage: python benchmarks/loss_stall.py [--data ../shared/data/btcv30] [--steps 100] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from arenaseg.adapters import AdaptOptions
from arenaseg.data.datasets import open_dataset
from arenaseg.data.preprocess import PreprocessSettings, file_digest, load_cases
from arenaseg.data.sampling import PatchSampler
from arenaseg.data.splits import BTCV_FS
from arenaseg.pipeline import build_adapted
from arenaseg.train.loop import TrainSettings, train_adapter
from arenaseg.utils.provenance import git_commit

ORGAN = "pancreas"


def probe(adapted, sampler: PatchSampler) -> dict:
    """Foreground fractions and Dice on 8 fixed patches (sampler steps the training never draws)."""
    adapted.model.eval()
    pred_fg, true_fg, inter, total = 0.0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for step in range(10_000, 10_004):
            images, labels = sampler.batch(step)
            pred = (adapted.model(images) > 0).float()
            pred_fg += pred.mean().item() / 4
            true_fg += labels.mean().item() / 4
            inter += (pred * labels).sum().item()
            total += pred.sum().item() + labels.sum().item()
    return {"pred_fg": pred_fg, "true_fg": true_fg, "dice": 200 * inter / max(total, 1.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data/btcv30", help="btcv30 folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=TrainSettings().steps, help="(default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/loss_stall.md", help="(default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, preprocess = open_dataset(args.data), PreprocessSettings()
    cases = [c for c in BTCV_FS.pretrain if data.has_organ(c, ORGAN)][:5]
    volumes = load_cases(data, cases, {ORGAN: 1}, preprocess)
    rows = []
    loaded = None
    for cross_entropy in (False, True):
        settings = replace(TrainSettings(), steps=args.steps, cross_entropy=cross_entropy)
        loaded, adapted, _, _ = build_adapted("btcv-fs", ORGAN, "lp", AdaptOptions(total_steps=settings.steps), 0)
        sampler = PatchSampler(volumes, preprocess, settings.patches_per_step, 0)
        before = probe(adapted, sampler)
        with tempfile.TemporaryDirectory() as tmp:
            result = train_adapter(adapted, sampler, settings, Path(tmp) / "checkpoint.pt")
        after = probe(adapted, sampler)
        rows.append(("Dice + CE" if cross_entropy else "Dice", result.final_loss, before, after))
        print(rows[-1], flush=True)
    commit = git_commit()
    lines = [
        f"# Linear probe on {ORGAN}: Dice loss alone vs Dice + cross-entropy",
        "",
        f"- command: `python benchmarks/loss_stall.py --data {args.data} --steps {args.steps}`",
        f"- git commit: {commit}; model btcv-fs (sha256 {file_digest(loaded.source)[:12]})",
        f"- cases {', '.join(cases)} (BTCV-FS pretrain split: no support-pool or test case)",
        f"- device cpu (1 thread); {datetime.datetime.now():%Y-%m-%d %H:%M}",
        f"- {args.steps} steps of 2 patches 64^3, other settings the TrainSettings defaults; probe: 8 fixed patches",
        "",
        "| loss | final training loss | predicted fg before | after | true fg | patch Dice before (%) | after (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, loss, before, after in rows:
        lines.append(
            f"| {name} | {loss:.3f} | {before['pred_fg']:.3f} | {after['pred_fg']:.3f} | {after['true_fg']:.4f} "
            f"| {before['dice']:.1f} | {after['dice']:.1f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
