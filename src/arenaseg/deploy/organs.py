"""Several organs in one label map: `arenaseg predict --run A --run B ...` runs each finished run's model on one
preprocessed scan and writes one multi-label NIfTI per input, plus a label-map JSON (nnU-Net's ``labels`` form).

Where two organs claim a voxel (both logits > 0), the higher probability wins: each run's sigmoid logit is a
channel after a constant 0 for the background, and the argmax picks the highest logit, sigmoid being monotone.
Runs share one preprocessing (spacing, patch, intensities): runs with different preprocessing are refused, so
that every organ is predicted on the same voxels. Two runs of one organ are refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent
from torch import nn

from arenaseg.data.preprocess import PreprocessSettings
from arenaseg.deploy.merge import check_finished
from arenaseg.evaluate.inference import predict_volume, write_like
from arenaseg.models.registry import organ_key
from arenaseg.pipeline import RUN_FILE, load_run
from arenaseg.run_record import RunRecord
from arenaseg.utils.atomic import write_json
from arenaseg.utils.errors import UserError
from arenaseg.utils.precision import DEFAULT_PRECISION

LABELS_FILE = "labels.json"  # in the output folder; for a single output file, NAME.json beside NAME.nii.gz
OVERLAP_RULE = "where two organs claim a voxel (both logits > 0), the organ with the higher probability wins"


class OrganStack(nn.Module):
    """The runs' models as one network whose channel 0 is a constant logit 0 (background) and channel i the i-th
    run's organ logit: `predict_volume`'s argmax head then gives label i where organ i has the highest
    probability above 0.5, else 0. Sliding-window blending is linear, so each channel is what its run alone gives."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [model(x) for model in self.models]
        return torch.cat([torch.zeros_like(logits[0]), *logits], dim=1)


def check_runs(run_dirs: Sequence[Path]) -> tuple[list[RunRecord], PreprocessSettings]:
    """The runs' records, refused before any model loads: unfinished runs, two runs of one organ (names compared as
    `class_row` does: kidney_left == "Left kidney"), and runs whose preprocessing differs."""
    records = []
    for run_dir in run_dirs:
        check_finished(run_dir)
        records.append(RunRecord.read(run_dir / RUN_FILE))
    seen: dict[str, Path] = {}
    for run_dir, record in zip(run_dirs, records, strict=True):
        key = organ_key(record.organ)
        if key in seen:
            raise UserError(
                f"--run {seen[key]} and --run {run_dir} both segment {record.organ}: give one run per organ"
            )
        seen[key] = run_dir
    settings = [PreprocessSettings.from_dict(r.preprocess) for r in records]
    for run_dir, s in zip(run_dirs[1:], settings[1:], strict=True):
        if s != settings[0]:
            diff = ", ".join(
                f"{name} {getattr(settings[0], name)} vs {getattr(s, name)}"
                for name in s.to_dict()
                if getattr(s, name) != getattr(settings[0], name)
            )
            raise UserError(
                f"--run {run_dirs[0]} and --run {run_dir} were adapted with different preprocessing ({diff}): one "
                f"label map needs one preprocessing; predict them separately or adapt them with the same settings"
            )
    return records, settings[0]


def check_labels_file(path: Path, reads: Sequence[Path]) -> None:
    """The label-map JSON replaces only an earlier one of ours, never an input, a folder or another file."""
    if path.resolve() in {p.resolve() for p in reads}:
        raise UserError(f"label map {path} is one of the files predict reads; choose another --output")
    if path.is_dir():
        raise UserError(f"label map {path} is an existing folder; remove it or choose another --output")
    if path.exists():
        try:
            earlier = json.loads(path.read_text()) if path.stat().st_size < 2**20 else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not (isinstance(earlier, dict) and earlier.get("overlap") == OVERLAP_RULE):
            raise UserError(f"{path} exists and is not a label map of arenaseg predict; not overwriting it")


def label_map(records: Sequence[RunRecord]) -> dict[str, int]:
    return {"background": 0, **{r.organ: i for i, r in enumerate(records, start=1)}}


def keep_largest_per_label(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Each organ's largest 26-connected component (MONAI's transform, one label at a time)."""
    keep = KeepLargestConnectedComponent(applied_labels=list(range(1, n_labels + 1)), independent=True, connectivity=3)
    return np.asarray(keep(torch.from_numpy(labels.astype(np.int64))[None])[0]).astype(np.uint8)


def predict_organs(
    run_dirs: Sequence[Path],
    inputs: Sequence[Path],
    outputs: Sequence[Path],
    labels_file: Path,
    device: str = "auto",
    keep_largest: bool = True,
    precision: str = DEFAULT_PRECISION,
    report: Callable[[Path], None] | None = None,
) -> list[Path]:
    """One label map per input from several runs (see the module docstring); the label-map JSON is written first, so
    a mask is never without it. ``keep_largest`` keeps each organ's largest component after the overlap is settled."""
    records, preprocess = check_runs(run_dirs)
    models = [load_run(run_dir, device)[0].model for run_dir in run_dirs]
    stack = OrganStack(models)
    labels = label_map(records)
    write_json(
        labels_file,
        {
            "labels": labels,
            "runs": {r.organ: str(d.resolve()) for r, d in zip(records, run_dirs, strict=True)},
            "overlap": OVERLAP_RULE,
            "largest_component": keep_largest,
            "preprocess": preprocess.to_dict(),
        },
    )
    written = []
    for src, dst in zip(inputs, outputs, strict=True):
        volume = predict_volume(stack, src, preprocess, head="softmax", precision=precision)
        if keep_largest:
            volume = keep_largest_per_label(volume, len(records))
        written.append(write_like(src, volume, dst))
        if report is not None:
            report(written[-1])
    return written
