"""How many adaptation steps before a new organ's head predicts anything? A learning curve on held-in patches.

The first BTCV-FS cells (100 steps) predicted nothing on the test cases although their logits already ranked the
organ's voxels highest (benchmarks/cell_logits.py): no logit had crossed 0 yet. This script follows one longer run
on the BTCV-FS *pretrain* split only (never the support pool or the test cases), so that a global step budget can
be chosen without looking at test data: adapt on 5 pretrain cases containing the organ, and every --every steps
report the Dice and the logits on 6 fixed patches of 3 other pretrain cases. Not a test.
Usage: python benchmarks/step_budget.py [--method arena] [--rank 16] [--lam 0.3] [--organ pancreas] [--steps 300]
       [--every 50]
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
from arenaseg.models.registry import model_file
from arenaseg.pipeline import build_adapted
from arenaseg.train.loop import TrainSettings, train_adapter
from arenaseg.utils.provenance import git_commit


def probe(model: torch.nn.Module, sampler: PatchSampler) -> dict:
    was_training = model.training
    model.eval()
    inter = total = 0.0
    fg_logits, bg_logits = [], []
    with torch.no_grad():
        for step in range(10_000, 10_003):
            images, labels = sampler.batch(step)
            logits = model(images)
            fg = labels > 0
            pred = logits > 0
            inter += (pred & fg).sum().item()
            total += pred.sum().item() + fg.sum().item()
            fg_logits.append(logits[fg])
            bg_logits.append(logits[~fg])
    model.train(was_training)
    return {
        "dice": 200 * inter / max(total, 1.0),
        "logit_fg": torch.cat(fg_logits).mean().item(),
        "logit_bg": torch.cat(bg_logits).mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data/btcv30", help="btcv30 folder (default: %(default)s)")
    parser.add_argument("--method", default="arena", help="(default: %(default)s)")
    parser.add_argument("--rank", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--organ", default="pancreas", help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="(default: %(default)s)")
    parser.add_argument("--every", type=int, default=50, help="probe interval in steps (default: %(default)s)")
    defaults = TrainSettings()
    parser.add_argument("--lr", type=float, default=defaults.lr, help="(default: %(default)s)")
    parser.add_argument("--head-lr-scale", type=float, default=defaults.head_lr_scale, help="(default: %(default)s)")
    parser.add_argument("--rho", type=float, default=None, help="ARENA rho (default: ArenaConfig's)")
    parser.add_argument("--lam", type=float, default=None, help="ARENA lambda (default: ArenaConfig's)")
    parser.add_argument(
        "--cross-entropy",
        action=argparse.BooleanOptionalAction,
        default=defaults.cross_entropy,
        help="(default: %(default)s)",
    )
    parser.add_argument("--out", default="benchmarks/results/step_budget.md", help="(default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, preprocess = open_dataset(args.data), PreprocessSettings()
    cases = [c for c in BTCV_FS.pretrain if data.has_organ(c, args.organ)]
    train_cases, probe_cases = cases[:5], cases[5:8]

    def volumes(ids):
        return load_cases(data, ids, {args.organ: 1}, preprocess)

    settings = replace(
        defaults, steps=args.steps, lr=args.lr, head_lr_scale=args.head_lr_scale, cross_entropy=args.cross_entropy
    )
    extra = {k: v for k, v in (("rho", args.rho), ("lam", args.lam)) if v is not None}
    _, adapted, options, _ = build_adapted(
        "btcv-fs", args.organ, args.method, AdaptOptions(rank=args.rank, total_steps=settings.steps, **extra), 0
    )
    sampler = PatchSampler(volumes(train_cases), preprocess, settings.patches_per_step, settings.seed)
    probe_sampler = PatchSampler(volumes(probe_cases), preprocess, 2, seed=1)
    curve = [(0, probe(adapted.model, probe_sampler))]
    print(curve[-1], flush=True)
    done = [0]

    def probe_when_due() -> dict:
        """Called by the training loop after every step (its progress-bar hook): probe every --every steps."""
        done[0] += 1
        if done[0] % args.every == 0:
            curve.append((done[0], probe(adapted.model, probe_sampler)))
            print(curve[-1], flush=True)
        return {}

    with tempfile.TemporaryDirectory() as tmp:
        train_adapter(adapted, sampler, settings, Path(tmp) / "checkpoint.pt", status=probe_when_due)
    model_sha = file_digest(model_file("btcv-fs"))
    commit = git_commit()
    lines = [
        f"# {args.method} r={args.rank} on the {args.organ}: held-in patch Dice and logits against training steps",
        "",
        f"- command: `python benchmarks/step_budget.py --method {args.method} --rank {args.rank} --organ {args.organ} "
        f"--steps {args.steps} --every {args.every} --lr {args.lr} --head-lr-scale {args.head_lr_scale}"
        + (f" --rho {args.rho}" if args.rho is not None else "")
        + (f" --lam {args.lam}" if args.lam is not None else "")
        + ("" if args.cross_entropy else " --no-cross-entropy")
        + f"` (rho in effect: {options.rho}, lambda in effect: {options.lam})",
        f"- git commit {commit}; model btcv-fs {model_sha[:12]}; device cpu (1 thread); "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
        f"- adapted on {', '.join(train_cases)}; probed on 6 fixed patches of {', '.join(probe_cases)} (all from "
        f"the BTCV-FS pretrain split); one run, its warm-up + cosine schedule spanning {args.steps} steps",
        "",
        "| step | patch Dice % | mean logit fg | mean logit bg |",
        "|---|---|---|---|",
        *(f"| {s} | {r['dice']:.1f} | {r['logit_fg']:.2f} | {r['logit_bg']:.2f} |" for s, r in curve),
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
