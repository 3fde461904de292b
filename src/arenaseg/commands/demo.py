"""`arenaseg demo`: ARENA adapts the shipped phantom model to a new organ, offline."""

from __future__ import annotations

import argparse

from arenaseg.commands import add_threads
from arenaseg.demo import SETTINGS, run_demo


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: ARENA adapts the shipped phantom model to a new organ")
    p.add_argument(
        "--out", default="demo_out", help="folder for the phantoms, run, NIfTI and overlay (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=SETTINGS.steps, help="adaptation steps (default: %(default)s)")
    add_threads(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_demo(args.out, steps=args.steps)
    return 0
