"""`arenaseg evaluate`: Dice, HD95 and NSD of predictions against references, on the references' grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from arenaseg.commands import plural
from arenaseg.pipeline import evaluate_files


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice, HD95 and NSD of predictions against references, on the references' grid")
    p.add_argument("--pred", required=True, help="predicted mask .nii.gz, or a folder of them")
    p.add_argument("--ref", required=True, help="reference label .nii.gz, or a folder with files of the same names")
    p.add_argument(
        "--organ",
        default=None,
        help="organ to pick from a multi-class reference (via the dataset.json next to it); required when a "
        "reference or prediction holds several labels (default: none)",
    )
    p.add_argument("--out", default=None, help="metrics.json to write (default: metrics.json beside --pred)")
    p.add_argument(
        "--run",
        default=None,
        help="the run folder that predicted: its support cases (trained on) are scored apart, out of the means "
        "(default: none)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ref, run_dir = Path(args.ref), Path(args.run) if args.run else None
    metrics, target = evaluate_files(Path(args.pred), ref, args.organ, Path(args.out) if args.out else None, run_dir)
    for cid, m in metrics["cases"].items():
        print(f"{cid}: Dice {m['dice']:.2f}%  HD95 {m['hd95']:.2f} mm  NSD {m['nsd']:.2f}%")
    for cid, m in metrics.get("support_cases", {}).items():
        print(f"{cid}: Dice {m['dice']:.2f}% (a support case of {run_dir}: trained on, not in the mean)")
    print(f"mean: Dice {metrics['mean_dice']:.2f}%  HD95 {metrics['mean_hd95']:.2f} mm  NSD {metrics['mean_nsd']:.2f}%")
    unmatched = metrics.get("unmatched_references", [])
    if unmatched:
        print(
            f"note: {plural(len(unmatched), 'reference')} in {ref} had no prediction and were not scored: "
            f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}"
        )
    print(f"wrote {target} ({plural(len(metrics['cases']), 'case')} in the mean)")
    return 0
