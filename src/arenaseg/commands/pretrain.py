"""`arenaseg pretrain`: supervised multi-organ pretraining of a foundation model (torchrun-ready)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from arenaseg.commands import add_preprocess, preprocess_from
from arenaseg.data.datasets import open_dataset
from arenaseg.data.splits import BASE_ORGANS, BTCV_FS
from arenaseg.train.pretrain import PretrainSettings, pretrain
from arenaseg.utils.settings import add_arguments, comma_list, from_arguments

SETTINGS_FIELDS = tuple(f.name for f in dataclasses.fields(PretrainSettings))


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="supervised multi-organ pretraining of a foundation model (torchrun-ready)")
    p.add_argument("--data", required=True, help="nnU-Net v2 raw folder or TotalSegmentator folder")
    p.add_argument("--out", required=True, help="output path stem: writes OUT.safetensors, OUT.json, OUT.md")
    p.add_argument(
        "--cases",
        default="btcv-fs",
        help="comma-separated training case ids, all, or btcv-fs for its 15 pretrain cases (default: %(default)s)",
    )
    p.add_argument(
        "--organs",
        default="btcv-fs",
        help="comma-separated organ names (other labels become background), or btcv-fs for its 7 base organs "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--eval-cases",
        default="none",
        help="held-out case ids to evaluate into the card, btcv-fs for its test cases, or none (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.state.pt (default: off)")
    add_arguments(p, PretrainSettings, SETTINGS_FIELDS)
    add_preprocess(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = open_dataset(args.data)
    cases = _named(args.cases, {"all": data.case_ids, "btcv-fs": BTCV_FS.pretrain})
    eval_cases = _named(args.eval_cases, {"none": (), "btcv-fs": BTCV_FS.test})
    for cid in [*cases, *eval_cases]:
        data.case(cid)
    organs = _named(args.organs, {"btcv-fs": BASE_ORGANS})
    result = pretrain(
        data,
        cases,
        organs,
        args.out,
        from_arguments(PretrainSettings, args, SETTINGS_FIELDS),
        preprocess_from(args),
        eval_cases,
        args.cache_dir,
        args.resume,
        command="arenaseg " + shlex.join(sys.argv[1:]),
    )
    if result.path is not None:
        print(f"wrote {result.path} (card: {result.path.with_suffix('.md')})")
    return 0


def _named(text: str, names: dict):
    """A named list (e.g. btcv-fs) or comma-separated values."""
    return names[text] if text in names else comma_list(text)
