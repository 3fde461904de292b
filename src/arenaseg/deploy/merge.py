"""One adapted run as a plain network: every adapter folded into the base weights (W0 + delta), so that MONAI's own
SwinUNETR runs it at the base cost, without arenaseg or PEFT."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from arenaseg.adapters.arena import merge_arena
from arenaseg.data.preprocess import PreprocessSettings
from arenaseg.models.foundation import load_state_strict
from arenaseg.models.registry import load_model
from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr
from arenaseg.pipeline import CHECKPOINT_FILE, RUN_FILE, load_run
from arenaseg.run_record import RunRecord
from arenaseg.utils.errors import UserError

# Relative to the logits' scale: merging changes float32 rounding only, far below a flip of any confident voxel.
MERGE_TOLERANCE = 1e-3


@dataclass
class MergedRun:
    """A finished run's network with its adapters merged, the architecture that rebuilds it, and its record."""

    network: nn.Module
    config: ModelConfig
    record: RunRecord
    preprocess: PreprocessSettings
    run_dir: Path


def check_finished(run_dir: Path) -> None:
    """An export needs the run's final adapter: an unfinished or missing run is the user's mistake, said once."""
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir} is not a folder (give the --out of a finished `arenaseg adapt`)")
    if not (run_dir / RUN_FILE).is_file():
        if (run_dir / CHECKPOINT_FILE).is_file():
            raise UserError(
                f"--run {run_dir} is an unfinished run ({CHECKPOINT_FILE}, no {RUN_FILE}): finish it with "
                f"`arenaseg adapt ... --resume` before exporting"
            )
        raise UserError(f"--run {run_dir} is not a finished run folder (no {RUN_FILE})")


def merged_network(adapted) -> nn.Module:
    """The adapted network with its adapters folded in, in place: PEFT's own merge for its methods, ``merge_arena``
    for ARENA; the plain methods (fft, lp, bitfit, affine-ln) changed the base parameters themselves."""
    if isinstance(adapted.model, PeftModel):
        return adapted.model.merge_and_unload()
    return merge_arena(adapted.network)


def merge_run(run_dir: str | Path) -> MergedRun:
    """Load a finished run, merge it, and load the merged weights strictly into a fresh MONAI SwinUNETR of the
    base's architecture with the run's 1-channel head; the fresh network must give the adapted one's logits."""
    run_dir = Path(run_dir)
    check_finished(run_dir)
    adapted, record = load_run(run_dir, "cpu")
    base = load_model(record.model).config
    config = dataclasses.replace(base, out_channels=1, class_names=(record.organ,))
    preprocess = PreprocessSettings.from_dict(record.preprocess)
    probe = torch.Generator().manual_seed(0)
    x = torch.rand(1, config.in_channels, *preprocess.patch_size, generator=probe)
    with torch.no_grad():
        expected = adapted.model.eval()(x)
        merged = merged_network(adapted)
        plain = build_swin_unetr(config)
        state = {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}
        load_state_strict(plain, state, source=f"the merged weights of {run_dir}")
        got = plain.eval()(x)
    error = float((got - expected).abs().max())
    if error > MERGE_TOLERANCE * (1.0 + float(expected.abs().max())):
        raise RuntimeError(f"merging {run_dir} changed its logits by up to {error:.3g}: the merge is wrong")
    return MergedRun(plain, config, record, preprocess, run_dir)
