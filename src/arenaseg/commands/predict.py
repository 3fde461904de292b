"""`arenaseg predict`: segment new scans with a finished run, several runs' organs into one label map, or zero-shot
with a foundation model."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from arenaseg.commands import add_device, add_threads, plural
from arenaseg.deploy.organs import LABELS_FILE, check_labels_file, check_runs, label_map, predict_organs
from arenaseg.evaluate.inference import KEEP_LARGEST_COMPONENT
from arenaseg.pipeline import check_outputs, predict_inputs, run_predict
from arenaseg.run_record import RunRecord
from arenaseg.train.loop import TrainSettings
from arenaseg.utils.errors import UserError
from arenaseg.utils.outputs import hold_folder
from arenaseg.utils.settings import add_arguments


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="segment new scans with an adapted run, or zero-shot with a foundation model")
    p.add_argument(
        "--run",
        action="append",
        default=None,
        help="finished run folder from `arenaseg adapt`; its preprocessing (e.g. --intensity) is applied. Repeat "
        "it for several organs (runs with the same preprocessing, one per organ): one multi-label mask per input "
        "plus a label map (labels.json in the output folder, NAME.json beside one output file); where two organs "
        "claim a voxel, the higher probability wins (default: none, then --model and --organ are required)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="zero-shot instead of --run: a built-in model name or checkpoint path, whose class --organ is "
        "predicted with the preprocessing of its card (default: none)",
    )
    p.add_argument("--organ", default=None, help="with --model: one of the model's classes (default: none)")
    p.add_argument("--input", required=True, help="image .nii.gz, or a folder of them")
    p.add_argument("--output", required=True, help="output .nii.gz (or folder when --input is a folder)")
    p.add_argument(
        "--largest-component",
        action=argparse.BooleanOptionalAction,
        default=KEEP_LARGEST_COMPONENT,
        help="keep only the largest connected component of each mask (drops stray blobs) (default: %(default)s)",
    )
    add_threads(p)
    add_device(p)
    add_arguments(p, TrainSettings, ["precision"])
    p.set_defaults(func=run)


def input_output_pairs(src: Path, dst: Path) -> tuple[list[Path], list[Path]]:
    """A scan and its mask file, or a folder's scans (nnU-Net's naming) and their masks in the output folder."""
    if not src.exists():
        raise FileNotFoundError(f"input not found: {src}")
    if not src.is_dir():
        return [src], [dst]
    inputs = predict_inputs(src)
    if not inputs:
        raise UserError(f"no .nii/.nii.gz files in {src}")
    if dst.resolve() == src.resolve() or dst.is_file():
        raise UserError(f"--output {dst} must be a folder other than the input folder {src}")
    return inputs, [dst / p.name.replace("_0000.nii", ".nii") for p in inputs]


def run(args: argparse.Namespace) -> int:
    if args.run and len(args.run) > 1:
        return _several_organs(args)
    run_dir = args.run[0] if args.run else None
    if (run_dir is None) == (args.model is None) or (args.model is None) != (args.organ is None):
        raise UserError("predict needs either --run RUN, or --model MODEL with --organ ORGAN (zero-shot)")
    src, dst = Path(args.input), Path(args.output)
    inputs, outputs = input_output_pairs(src, dst)
    run_files = [Path(run_dir), *Path(run_dir).iterdir()] if run_dir and Path(run_dir).is_dir() else []
    check_outputs(inputs, outputs, [*run_files, *([src] if src.is_dir() else [])])
    with hold_folder(dst) if src.is_dir() else contextlib.nullcontext():  # one predict at a time into a folder
        written = run_predict(
            run_dir,
            inputs,
            outputs,
            args.device,
            args.largest_component,
            (args.model, args.organ) if args.model else None,
            precision=args.precision,
            report=lambda path: print(f"wrote {path}", flush=True),  # as they come: a later file may fail
        )
    if args.model:
        organ = f"{args.organ} (zero-shot, {args.model})"
    else:
        organ = f"{RunRecord.read(Path(run_dir) / 'run.json').organ} (run {run_dir})"
    print(f"predict: {plural(len(written), 'mask')} of {organ} in {written[0].parent}")
    return 0


def _several_organs(args: argparse.Namespace) -> int:
    """Several --run: the inputs and outputs as for one run, plus the label-map JSON."""
    if args.model is not None or args.organ is not None:
        raise UserError("predict with several --run takes no --model or --organ: each run names its organ")
    run_dirs = [Path(r) for r in args.run]
    src, dst = Path(args.input), Path(args.output)
    inputs, outputs = input_output_pairs(src, dst)
    if not src.is_dir() and not dst.name.endswith((".nii.gz", ".nii")):
        raise UserError(f"--output {dst}: give a .nii.gz file name for one input file")
    labels_file = dst / LABELS_FILE if src.is_dir() else dst.with_name(dst.name.split(".nii")[0] + ".json")
    check_runs(run_dirs)
    protected = [p for d in run_dirs if d.is_dir() for p in (d, *d.iterdir())]
    check_outputs(inputs, outputs, [*protected, *([src] if src.is_dir() else [])])
    check_labels_file(labels_file, [*inputs, *protected])
    written = predict_organs(
        run_dirs,
        inputs,
        outputs,
        labels_file,
        args.device,
        args.largest_component,
        args.precision,
        report=lambda path: print(f"wrote {path}", flush=True),
    )
    organs = ", ".join(k for k in label_map(check_runs(run_dirs)[0]) if k != "background")
    print(f"predict: {len(written)} label maps of {organs} in {written[0].parent}; label values in {labels_file}")
    return 0
