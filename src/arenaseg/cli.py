"""Command-line interface: `arenaseg <command> --help` explains every option and its default."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

import torch

from arenaseg.data.preprocess import PreprocessSettings


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_preprocess_args(p: argparse.ArgumentParser) -> None:
    d = PreprocessSettings()
    p.add_argument(
        "--spacing",
        type=float,
        default=d.spacing[0],
        help="isotropic resampling spacing in mm (default: %(default)s)",
    )
    p.add_argument(
        "--patch",
        type=int,
        default=d.patch_size[0],
        help="cubic patch side in voxels, multiple of 32 (default: %(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="preprocessing cache folder (default: $ARENASEG_CACHE or ~/.cache/arenaseg/preprocessed)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def _preprocess(args: argparse.Namespace) -> PreprocessSettings:
    if args.patch <= 0 or args.patch % 32:
        raise ValueError(f"--patch must be a positive multiple of 32 (Swin-UNETR downsamples 32x), got {args.patch}")
    if args.spacing <= 0:
        raise ValueError(f"--spacing must be positive, got {args.spacing}")
    return PreprocessSettings(spacing=(args.spacing,) * 3, patch_size=(args.patch,) * 3)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from arenaseg.data.datasets import open_dataset
    from arenaseg.train.pretrain import PretrainSettings, pretrain

    data = open_dataset(args.data)
    if "btcv-fs" in (args.cases, args.organs, args.eval_cases):
        from arenaseg.data.splits import BASE_ORGANS, BTCV_FS
    cases = BTCV_FS.pretrain if args.cases == "btcv-fs" else _csv(args.cases)
    eval_cases = (
        () if args.eval_cases == "none" else BTCV_FS.test if args.eval_cases == "btcv-fs" else _csv(args.eval_cases)
    )
    for cid in [*cases, *eval_cases]:
        data.case(cid)
    organs = BASE_ORGANS if args.organs == "btcv-fs" else _csv(args.organs)
    settings = PretrainSettings(
        steps=args.steps,
        patches_per_step=args.patches_per_step,
        lr=args.lr,
        warmup_steps=args.warmup,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        feature_size=args.feature_size,
    )
    path = pretrain(
        data,
        cases,
        organs,
        args.out,
        settings,
        _preprocess(args),
        eval_cases,
        args.cache_dir,
        args.resume,
        command="arenaseg " + shlex.join(sys.argv[1:]),
    )
    if path is not None:
        print(f"wrote {path} (card: {path.with_suffix('.md')})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arenaseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="supervised multi-organ pretraining of a foundation model (torchrun-ready)")
    p.add_argument("--data", required=True, help="nnU-Net v2 raw folder or TotalSegmentator folder")
    p.add_argument("--out", required=True, help="output path stem: writes OUT.safetensors, OUT.json, OUT.md")
    p.add_argument(
        "--cases",
        default="btcv-fs",
        help="comma-separated training case ids, or btcv-fs for its 15 pretrain cases (default: %(default)s)",
    )
    p.add_argument(
        "--organs",
        default="btcv-fs",
        help="comma-separated organ names (other labels become background), or btcv-fs for its 7 base organs (default: %(default)s)",
    )
    p.add_argument(
        "--eval-cases",
        default="none",
        help="held-out case ids to evaluate into the card, btcv-fs for its test cases, or none (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: %(default)s)")
    p.add_argument(
        "--patches-per-step", type=int, default=2, help="patches per step per process (default: %(default)s)"
    )
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW peak learning rate (default: %(default)s)")
    p.add_argument(
        "--warmup",
        type=int,
        default=50,
        help="linear warm-up steps before cosine decay (default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        help="steps between atomic resume checkpoints (default: %(default)s)",
    )
    p.add_argument(
        "--feature-size",
        type=int,
        default=12,
        help="Swin-UNETR feature size (default: %(default)s, the CPU preset)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for initialisation and patch sampling (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.state.pt (default: off)")
    _add_preprocess_args(p)
    p.set_defaults(func=cmd_pretrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, PermissionError) as err:
        print(f"arenaseg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
