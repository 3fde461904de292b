"""`arenaseg export`: ship a finished run as a MONAI bundle or a merged foundation model."""

from __future__ import annotations

import argparse
from pathlib import Path

from arenaseg.commands import add_threads
from arenaseg.deploy.bundle import INFERENCE
from arenaseg.deploy.export import FORMATS, MERGED_FILE, export_run
from arenaseg.evaluate.inference import KEEP_LARGEST_COMPONENT
from arenaseg.pipeline import RUN_FILE
from arenaseg.run_record import RunRecord


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="ship a finished run: a MONAI bundle, or our own merged foundation file (adapters folded into W0)",
        description="monai-bundle: configs/inference.json, configs/metadata.json, models/model.pt (a plain state "
        "dict of MONAI's SwinUNETR) and docs/README.md; run it without arenaseg with `python -m monai.bundle run "
        "--config_file configs/inference.json --dataset_dir IN --output_dir OUT` from the bundle folder. merged: "
        "model.safetensors with its card (model.json), which --model reads back (predict zero-shot, or adapt again). "
        "Runs whose foundation model uses the legacy PatchMerging order are refused for monai-bundle (MONAI's "
        "SwinUNETR no longer offers it): export those as merged.",
    )
    p.add_argument("--run", required=True, help="finished run folder from `arenaseg adapt`")
    p.add_argument("--format", default=FORMATS[0], choices=FORMATS, help="what to write (default: %(default)s)")
    p.add_argument("--out", required=True, help="folder to create (must be new or empty, unless --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in --out, once the new one is complete (default: refuse a non-empty --out)",
    )
    p.add_argument(
        "--largest-component",
        action=argparse.BooleanOptionalAction,
        default=KEEP_LARGEST_COMPONENT,
        help="monai-bundle: keep only the largest connected component of each mask, as predict does "
        "(default: %(default)s)",
    )
    add_threads(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.format, args.out, args.overwrite, args.largest_component)
    organ = RunRecord.read(Path(args.run) / RUN_FILE).organ
    if args.format == "monai-bundle":
        print(f"export: MONAI bundle of {args.run} ({organ}) in {out}")
        print(f"  cd {out} && python -m monai.bundle run --config_file {INFERENCE} --dataset_dir IN --output_dir OUT")
    else:
        print(f"export: merged model of {args.run} in {Path(out) / MERGED_FILE} (card model.json)")
        print(f"  arenaseg predict --model {Path(out) / MERGED_FILE} --organ {organ} --input IN --output OUT")
    return 0
