"""A run as a MONAI bundle (Model Zoo layout): ``configs/inference.json`` rebuilds `arenaseg predict --run` from MONAI
components alone, ``configs/metadata.json`` describes it, ``models/model.pt`` holds the merged weights as a plain
tensor dict (MONAI's CheckpointLoader reads it with ``weights_only=True``), ``docs/README.md`` says what it is.

Run it with ``python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT``
from the bundle folder (``--bundle_root`` from elsewhere): every NIfTI in IN gets a mask on its own grid in OUT.
"""

from __future__ import annotations

from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import torch

import arenaseg
from arenaseg.data.preprocess import PERCENTILE_BODY_THRESHOLD, PERCENTILES, RAS_LABELS, PreprocessSettings
from arenaseg.deploy.merge import MergedRun
from arenaseg.models.swin_unetr import ModelConfig
from arenaseg.run_record import METRICS
from arenaseg.utils.atomic import write_json, write_text
from arenaseg.utils.errors import UserError

WEIGHTS = "models/model.pt"
INFERENCE = "configs/inference.json"
METADATA = "configs/metadata.json"
README = "docs/README.md"
# The Model Zoo's metadata schema; `monai.bundle verify_metadata` downloads it, so our checks parse the configs instead.
META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
# `predict_volume`'s sliding window, which the bundle must match voxel for voxel.
SW_BATCH_SIZE, OVERLAP, BLEND = 2, 0.25, "gaussian"


def check_bundle_architecture(config: ModelConfig, run_dir: Path) -> None:
    """MONAI's SwinUNETR offers the fixed PatchMerging only (its issue 8284): a model trained with the legacy
    sub-grid order (public FSEFT / SuPreM / CLIP-Driven / MONAI BTCV checkpoints) cannot run in a plain bundle."""
    if config.legacy_merging:
        raise UserError(
            f"--run {run_dir}: its foundation model uses the legacy PatchMerging order (legacy_merging), which "
            f"MONAI {monai.__version__}'s SwinUNETR does not offer, so a bundle without arenaseg would compute "
            f"another function; export --format merged instead (arenaseg's own file, which keeps it)"
        )


def preprocessing_transforms(settings: PreprocessSettings) -> list[dict]:
    """`data.preprocess.deterministic_transforms` (image only) as bundle config: the same MONAI transforms with the
    same arguments. Its NaN check (arenaseg's own transform) is left out: a bundle runs MONAI's alone."""
    keys = ["image"]
    crop = {"_target_": "CropForegroundd", "keys": keys, "allow_smaller": True}
    threshold = settings.body_threshold if settings.intensity == "ct" else PERCENTILE_BODY_THRESHOLD
    select = f"$lambda x: x > {threshold!r}"
    percentiles = {"lower": PERCENTILES[0], "upper": PERCENTILES[1], "b_min": 0.0, "b_max": 1.0, "clip": True}
    if settings.intensity == "ct":
        lo, hi = settings.window
        intensity = [
            {"_target_": "ScaleIntensityRanged", "keys": keys, "a_min": lo, "a_max": hi, "b_min": 0.0, "b_max": 1.0,
             "clip": True},
            {**crop, "source_key": "image", "select_fn": select},
        ]  # fmt: skip
    elif settings.intensity == "percentile":
        intensity = [
            {"_target_": "ScaleIntensityRangePercentilesd", "keys": keys, **percentiles},
            {**crop, "source_key": "image", "select_fn": select},
        ]
    else:  # zscore: the crop looks at a percentile-scaled copy, the z-score comes after it
        intensity = [
            {"_target_": "CopyItemsd", "keys": keys, "names": ["body"]},
            {"_target_": "ScaleIntensityRangePercentilesd", "keys": ["body"], **percentiles},
            {**crop, "source_key": "body", "select_fn": select},
            {"_target_": "DeleteItemsd", "keys": ["body"]},
            {"_target_": "NormalizeIntensityd", "keys": keys, "nonzero": True},
        ]
    return [
        {"_target_": "LoadImaged", "keys": keys},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
        {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS", "labels": [list(p) for p in RAS_LABELS]},
        {"_target_": "Spacingd", "keys": keys, "pixdim": list(settings.spacing), "mode": ["bilinear"]},
        *intensity,
        {"_target_": "SpatialPadd", "keys": keys, "spatial_size": list(settings.patch_size)},
    ]


def network_def(config: ModelConfig) -> dict:
    """`models.swin_unetr.build_swin_unetr` as bundle config (legacy merging refused before)."""
    return {
        "_target_": "SwinUNETR",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "feature_size": config.feature_size,
        "depths": list(config.depths),
        "num_heads": list(config.num_heads),
        "window_size": config.window_size,
        "normalize": True,
        "downsample": "merging",
        "use_flash_attention": True,
    }


def inference_config(merged: MergedRun, keep_largest: bool) -> dict:
    """The Model Zoo inference workflow: Dataset -> SupervisedEvaluator (sliding window) -> logits to the CPU -> logit
    > 0 -> Invertd to the input's grid (nearest) -> largest component -> SaveImaged. Outputs are named as predict
    names them.

    The logits go to the CPU before anything else, as `predict_volume` takes them there: Invertd resamples on its
    input's device, and where the input's voxel centres fall exactly halfway between two resampled voxels (2.5 mm
    scans at 3 mm: every sixth slice of each axis) the nearest neighbour is decided by the last bits of the float64
    grid coordinates. Another device's affine_grid/grid_sample (CUDA fuses multiply-adds) may round them otherwise,
    and a last-bit change flips whole slices of the mask against predict's: on the test's flipped 2.5 mm phantom,
    moving the grid by 1e-14 mm changes 0.15 % of its voxels, by 1e-13 mm 0.5 %."""
    post = [
        {"_target_": "ToDeviced", "keys": "pred", "device": "cpu"},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.0},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": True, "to_tensor": True},
    ]  # fmt: skip
    if keep_largest:
        post.append({"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "connectivity": 3})
    post.append(
        {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_postfix": "",
            "separate_folder": False,
            "resample": False,
            "output_dtype": "$np.uint8",
            "output_name_formatter": "$lambda meta, saver: {'subject': os.path.basename(str(meta['filename_or_obj']))"
            ".replace('_0000.nii', '.nii'), 'idx': None}",
        }
    )
    return {
        "imports": ["$import glob", "$import os", "$import numpy as np"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "num_workers": 0,
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + "
        "glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(merged.config),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_transforms(merged.preprocess)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": "@num_workers",
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(merged.preprocess.patch_size),
            "sw_batch_size": SW_BATCH_SIZE,
            "overlap": OVERLAP,
            "mode": BLEND,
        },
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": f"$@bundle_root + '/{WEIGHTS}'",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
                "strict": True,
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', False)"],
        "run": ["$@evaluator.run()"],
    }


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "unknown"


def metadata(merged: MergedRun) -> dict:
    """Model Zoo metadata (schema 20220324 fields): versions, task, metrics, and the network's input/output format."""
    record, organ, pre = merged.record, merged.record.organ, merged.preprocess
    modality = "CT" if pre.intensity == "ct" else "MR/other (percentile or z-score intensities)"
    value_range = [0, 1] if pre.intensity in ("ct", "percentile") else ["-inf", "inf"]
    shape = ["32*n", "32*n", "32*n"]
    return {
        "schema": META_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by arenaseg {arenaseg.__version__} from run {merged.run_dir.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {
            "nibabel": nib.__version__,
            "fire": _version("fire"),
            "pytorch-ignite": _version("pytorch-ignite"),
            "scikit-image": _version("scikit-image"),
        },
        "name": f"{organ} segmentation ({record.method}, {record.shots} shots)",
        "task": f"binary {organ} segmentation of 3D {modality} volumes",
        "description": (
            f"Swin-UNETR foundation model {record.model} adapted to {organ} by arenaseg ({record.method}) from "
            f"{len(record.support_cases)} labelled scans; adapters merged into the weights (a plain MONAI SwinUNETR)."
        ),
        "authors": "arenaseg export",
        "copyright": f"the licence of the foundation model {record.model} and of the support scans",
        "data_source": record.data or "unknown",
        "data_type": "nibabel",
        "image_classes": f"single channel {modality} volume, any grid (resampled to {list(pre.spacing)} mm inside)",
        "label_classes": f"single channel, 1 = {organ}, 0 = everything else",
        "pred_classes": f"1 = {organ}, 0 = background, on the input's grid",
        "eval_metrics": {k: getattr(record, k) for k in METRICS if getattr(record, k) is not None},
        "intended_use": "research only; not for clinical use",
        "references": ["Hatamizadeh et al., Swin UNETR, arXiv:2201.01266"],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if pre.intensity == "ct" else "magnitude",
                    "modality": "CT" if pre.intensity == "ct" else "MR",
                    "num_channels": merged.config.in_channels,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "value_range": value_range,
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 1,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "value_range": ["-inf", "inf"],
                    "is_patch_data": True,
                    "channel_def": {"0": f"{organ} logit (> 0: {organ})"},
                }
            },
        },
    }


def readme(merged: MergedRun, keep_largest: bool) -> str:
    """docs/README.md: what the bundle is, how to run it, the run's support cases, metrics and learned ranks."""
    record, pre = merged.record, merged.preprocess
    window = pre.intensity == "ct"
    lines = [
        f"# {record.organ} segmentation: {record.model} adapted with {record.method}",
        "",
        f"Exported by arenaseg {arenaseg.__version__} from the run `{merged.run_dir.name}` (commit "
        f"{record.git_commit}). The adapters are merged into the weights: `{WEIGHTS}` is a plain state dict of "
        "MONAI's `SwinUNETR` (1 output channel, a logit), read with `weights_only=True`.",
        "",
        "## Run",
        "",
        "```bash",
        "cd <this folder>",
        "python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT",
        "```",
        "",
        "Every `.nii`/`.nii.gz` in IN gets `OUT/<name>.nii.gz` (`_0000` dropped, as nnU-Net names them): a uint8 "
        f"mask (1 = {record.organ}) on the input's own grid. Needs `monai`, `nibabel`, `fire`, `pytorch-ignite` and "
        "`scikit-image`; not arenaseg. `--num_workers N` loads scans in N processes.",
        "",
        "## Preprocessing (as `arenaseg predict --run` applies it)",
        "",
        f"- orientation RAS, spacing {list(pre.spacing)} mm (image bilinear)",
        f"- intensities: {pre.intensity}" + (f", window {list(pre.window)} HU -> [0, 1]" if window else ""),
        "- crop to the body, pad to the patch",
        f"- sliding window {list(pre.patch_size)}, overlap {OVERLAP}, {BLEND} blending, batches of {SW_BATCH_SIZE}",
        "- logit > 0, back to the input's grid (nearest, on the CPU)"
        + (", largest connected component kept" if keep_largest else ""),
        "- arenaseg also refuses images with NaN or infinite voxels; the bundle does not check",
        "",
        "## Support cases",
        "",
        f"{record.shots} shots (seed {record.seed}) from `{record.data}`: " + ", ".join(record.support_cases),
        "",
        "## Metrics",
        "",
    ]
    if record.evaluated:
        lines += [f"On {len(record.test_cases)} held-out cases ({', '.join(record.test_cases)}):", ""]
        lines += [f"- {k}: {getattr(record, k):.2f}" for k in METRICS if getattr(record, k) is not None]
    else:
        lines.append("The run evaluated no held-out cases.")
    lines += ["", "## Learned ranks", ""]
    if record.ranks:
        lines += ["| layer | initial | active |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {r['initial']} | {r['active']} |" for name, r in record.ranks.items()]
        lines += ["", f"Total active rank {record.active_rank_total}."]
    else:
        lines.append(f"{record.method} learns no ranks.")
    return "\n".join(lines) + "\n"


def write_bundle(folder: Path, merged: MergedRun, keep_largest: bool) -> None:
    """The bundle's files into ``folder`` (a fresh, hidden one: see `folder.export_folder`)."""
    check_bundle_architecture(merged.config, merged.run_dir)
    (folder / "models").mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in merged.network.state_dict().items()}
    torch.save(state, folder / WEIGHTS)
    write_json(folder / INFERENCE, inference_config(merged, keep_largest))
    write_json(folder / METADATA, metadata(merged))
    write_text(folder / README, readme(merged, keep_largest))
