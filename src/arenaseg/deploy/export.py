"""`arenaseg export`: a finished run as a MONAI bundle or as our own merged foundation file, written aside and
renamed into place (`folder.export_folder`)."""

from __future__ import annotations

import time
from pathlib import Path

import arenaseg
from arenaseg.deploy.bundle import check_bundle_architecture, write_bundle
from arenaseg.deploy.folder import EXPORT_FILE, export_folder
from arenaseg.deploy.merge import MergedRun, check_finished, merge_run
from arenaseg.models.foundation import save_foundation
from arenaseg.models.registry import load_model
from arenaseg.pipeline import RUN_FILE
from arenaseg.run_record import METRICS, RunRecord
from arenaseg.utils.atomic import write_json
from arenaseg.utils.errors import UserError
from arenaseg.utils.provenance import git_commit

FORMATS = ("monai-bundle", "merged")
MERGED_FILE = "model.safetensors"  # with model.json (card) and model.md beside it: what `load_model` reads


def merged_card(merged: MergedRun) -> dict:
    """The card `load_model` / `predict --model` read back: the architecture, and the run's preprocessing, which
    `predict --model FILE --organ ORGAN` then applies as `predict --run` does."""
    record = merged.record
    return {
        "name": f"{record.organ}-{record.method}-merged",
        "architecture": merged.config.to_dict(),
        "preprocessing": merged.preprocess.to_dict(),
        "organ": record.organ,
        "adapted_from": {"model": record.model, "model_sha256": record.model_sha256, "method": record.method},
        "run": str(merged.run_dir.resolve()),
        "data": record.data,
        "support_cases": list(record.support_cases),
        "test_cases": list(record.test_cases),
        "metrics": {k: getattr(record, k) for k in METRICS if getattr(record, k) is not None},
        "ranks": record.ranks,
        "git_commit": git_commit(),
    }


def export_run(run_dir: str | Path, fmt: str, out: str | Path, overwrite: bool = False, keep_largest: bool = True):
    """Write ``run_dir`` as ``fmt`` (see FORMATS) into the folder ``out``; returns ``out``. Every refusal comes
    before the model is loaded; nothing is left under ``out`` unless the export is complete."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_finished(run_dir)
    if fmt == "monai-bundle":
        record = RunRecord.read(run_dir / RUN_FILE)
        check_bundle_architecture(load_model(record.model).config, run_dir)
    with export_folder(out, overwrite, protected=[run_dir]) as work:
        merged = merge_run(run_dir)
        if fmt == "monai-bundle":
            write_bundle(work, merged, keep_largest)
        else:
            save_foundation(work / MERGED_FILE, merged.network, merged.config, card=merged_card(merged))
        write_json(
            work / EXPORT_FILE,
            {
                "format": fmt,
                "run": str(run_dir.resolve()),
                "organ": merged.record.organ,
                "largest_component": keep_largest if fmt == "monai-bundle" else None,
                "arenaseg": arenaseg.__version__,
                "git_commit": git_commit(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
    return out
