"""`arenaseg phantoms`: a synthetic cohort for demos and tests."""

from __future__ import annotations

import argparse

from arenaseg.data.phantom import make_phantom_dataset
from arenaseg.utils.errors import UserError
from arenaseg.utils.settings import comma_list


def add_parser(sub) -> None:
    p = sub.add_parser(
        "phantoms", help="write a synthetic CT or MRI-like phantom cohort (nnU-Net layout) for demos and tests"
    )
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--n-cases", type=int, default=12, help="number of cases (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default: %(default)s)")
    p.add_argument("--shape", default="96,96,64", help="volume shape in voxels at 3 mm (default: %(default)s)")
    p.add_argument(
        "--modality",
        default="ct",
        choices=("ct", "mri"),
        help="ct: Hounsfield units; mri: T1-like scanner units (0-900, fat bright, fluid dark) on the same "
        "anatomy, for trying --intensity percentile (default: %(default)s)",
    )
    p.set_defaults(func=run_phantoms)


def run_phantoms(args: argparse.Namespace) -> int:
    try:
        shape = tuple(int(v) for v in comma_list(args.shape))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise UserError(f"--shape needs three comma-separated integer sizes, got {args.shape!r}")
    path = make_phantom_dataset(args.out, n_cases=args.n_cases, seed=args.seed, shape=shape, modality=args.modality)
    print(f"wrote {args.n_cases} phantom cases to {path}")
    return 0
