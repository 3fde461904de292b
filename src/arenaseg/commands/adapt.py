"""`arenaseg adapt`: a foundation model adapted to one organ from k labelled scans."""

from __future__ import annotations

import argparse

from arenaseg.adapters import AdaptOptions
from arenaseg.commands import add_device, add_preprocess, add_training, preprocess_from, training_from
from arenaseg.pipeline import AdaptJob, run_adapt
from arenaseg.run_record import RunRecord
from arenaseg.utils.settings import add_arguments, from_arguments

JOB_FIELDS = ("data", "organ", "shots", "seed", "method", "track", "model", "test_cases", "out", "overwrite", "resume")
OPTION_FIELDS = ("rank", "decoder", "lam")


def add_parser(sub) -> None:
    p = sub.add_parser("adapt", help="adapt a foundation model to one organ from k labelled scans")
    add_arguments(p, AdaptJob, JOB_FIELDS)
    add_arguments(p, AdaptOptions, OPTION_FIELDS, decoder="auto")
    add_training(p)
    add_preprocess(p)
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    job = from_arguments(
        AdaptJob,
        args,
        (*JOB_FIELDS, "device", "cache_dir"),
        options=from_arguments(AdaptOptions, args, OPTION_FIELDS),
        train=training_from(args),
        preprocess=preprocess_from(args),
    )
    describe(run_adapt(job))
    print(f"wrote {args.out}")
    return 0


def describe(record: RunRecord) -> None:
    print(f"support cases: {', '.join(record.support_cases)}")
    print(f"trainable parameters: {record.trainable_params:,}; {record.seconds_per_step:.2f} s/step")
    if record.active_rank_total is not None:
        totals = record.rank_report["totals"]
        print(
            f"ARENA total active rank: {record.active_rank_total} of {totals['initial_rank']}, of which at most "
            f"{totals['usable_rank']} independent (a layer's update has at most min(in, out) components)"
        )
    if record.evaluated:
        print(
            f"mean Dice {record.mean_dice:.2f}%  mean HD95 {record.mean_hd95:.2f} mm  "
            f"mean NSD {record.mean_nsd:.2f}% on {len(record.test_cases)} test cases; largest component "
            f"only: Dice {record.mean_dice_lcc:.2f}%  HD95 {record.mean_hd95_lcc:.2f} mm  "
            f"NSD {record.mean_nsd_lcc:.2f}%"
        )
