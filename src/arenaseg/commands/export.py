"""The `arenaseg export` command (its parser and its job), kept beside the code it runs so that cli.py only adds it."""

from __future__ import annotations

import argparse
from pathlib import Path

from arenaseg.evaluate.inference import KEEP_LARGEST_COMPONENT


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_export_parser(sub) -> None:
    from arenaseg.deploy.export import FORMATS

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
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from arenaseg.deploy.bundle import INFERENCE
    from arenaseg.deploy.export import MERGED_FILE, export_run
    from arenaseg.pipeline import RUN_FILE
    from arenaseg.run_record import RunRecord

    out = export_run(args.run, args.format, args.out, args.overwrite, args.largest_component)
    organ = RunRecord.read(Path(args.run) / RUN_FILE).organ
    if args.format == "monai-bundle":
        print(f"export: MONAI bundle of {args.run} ({organ}) in {out}")
        print(f"  cd {out} && python -m monai.bundle run --config_file {INFERENCE} --dataset_dir IN --output_dir OUT")
    else:
        print(f"export: merged model of {args.run} in {Path(out) / MERGED_FILE} (card model.json)")
        print(f"  arenaseg predict --model {Path(out) / MERGED_FILE} --organ {organ} --input IN --output OUT")
    return 0
