"""How large is the Dice-loss gradient that reaches ARENA's gates v at the start of an adaptation?

This measurement is why the proximal step on v uses Adam's normalised direction by default: with a plain gradient
step, v would have to travel ~0.1 on gradients of this size. Uses the BTCV-FS *pretrain* cases only (never the
support pool or the test cases) and every novel organ; one batch of 2 patches per organ at initialisation.
Not a test.  Usage: python benchmarks/v_gradient_scale.py [--data ../shared/data/btcv30] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
from monai.losses import DiceLoss

from arenaseg.adapters import AdaptOptions
from arenaseg.adapters.arena import arena_layers
from arenaseg.data.datasets import open_dataset
from arenaseg.data.preprocess import PreprocessSettings, load_cases
from arenaseg.data.sampling import PatchSampler
from arenaseg.data.splits import BTCV_FS, NOVEL_ORGANS
from arenaseg.pipeline import build_adapted
from arenaseg.utils.provenance import git_commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data/btcv30", help="btcv30 folder (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/v_gradient_scale.md", help="(default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, settings = open_dataset(args.data), PreprocessSettings()
    rows = []
    for organ in NOVEL_ORGANS:
        _, adapted, _, _ = build_adapted("btcv-fs", organ, "arena", AdaptOptions(total_steps=100), 0)
        cases = [c for c in BTCV_FS.pretrain if data.has_organ(c, organ)][:5]
        volumes = load_cases(data, cases, {organ: 1}, settings)
        images, labels = PatchSampler(volumes, settings, 2, 0).batch(0)
        adapted.training_loss(images, labels, DiceLoss(sigmoid=True)).backward()
        grads = torch.cat([layer.arena_v.grad.abs() for layer in arena_layers(adapted.network).values()])
        rows.append((organ, grads.median().item(), grads.quantile(0.9).item(), grads.max().item()))
        print(rows[-1], flush=True)
    commit = git_commit()
    lines = [
        "# |dL/dv| at initialisation (ARENA r=16, new binary head, Dice loss, 2 patches of 64^3)",
        "",
        f"- command: `python benchmarks/v_gradient_scale.py --data {args.data}`",
        f"- git commit: {commit}; model btcv-fs; device cpu (1 thread); {datetime.datetime.now():%Y-%m-%d %H:%M}",
        "- cases: BTCV-FS pretrain split only (first 5 containing the organ), seed 0",
        "",
        "| organ | median | 90th percentile | max |",
        "|---|---|---|---|",
        *[f"| {o} | {a:.1e} | {b:.1e} | {c:.1e} |" for o, a, b, c in rows],
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
