"""Whole-volume prediction: preprocess, MONAI sliding window, then undo the preprocessing (MONAI Invertd) so that
the prediction lies on the input's original grid, and write it with the input's affine and header."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd, KeepLargestConnectedComponent
from torch import nn

from arenaseg.data.preprocess import (
    CaseError,
    PreprocessSettings,
    check_case_files,
    check_label_values,
    deterministic_transforms,
    explain_transform_error,
)
from arenaseg.utils.atomic import atomic_path
from arenaseg.utils.precision import DEFAULT_PRECISION, autocast

# `arenaseg predict`'s default for keeping only the largest connected component of a binary mask, chosen on
# pretrain-split evidence only (docs/benchmark.md criterion 5; benchmarks/results/probe/README.md: on every probe
# run it raised held-in volume Dice and lowered HD95), never on test cases. Run evaluations score both ways.
KEEP_LARGEST_COMPONENT = True
# The header description of every mask we write: what lets a later predict replace it, and nothing else.
MASK_DESCRIPTION = b"arenaseg predict"


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image_path: str | Path,
    settings: PreprocessSettings,
    head: str = "sigmoid",
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    precision: str = DEFAULT_PRECISION,
) -> np.ndarray:
    """Label map (uint8) on the image file's own voxel grid. ``head``: "sigmoid" (binary, logit > 0) or "softmax";
    ``precision``: the forward's autocast (`arenaseg.utils.precision`); windows are blended in float32."""
    check_case_files(Path(image_path))
    pre = Compose(deterministic_transforms(settings, None))
    try:
        data = pre({"image": str(image_path)})
    except Exception as err:
        explained = explain_transform_error(err, [image_path])
        if explained is None:
            raise
        raise explained from None
    image = data["image"]
    if float(image.max()) == float(image.min()):
        raise CaseError(
            f"{image_path}: nothing to segment: after the intensity scaling every voxel has one value (an image of "
            f"air only, or a constant one)"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast(precision, device):
            logits = sliding_window_inference(
                image.as_tensor()[None].to(device),
                settings.patch_size,
                sw_batch_size,
                model,
                overlap=overlap,
                mode="gaussian",
            )[0].cpu()
    finally:
        model.train(was_training)
    labels = (logits > 0).to(torch.uint8) if head == "sigmoid" else logits.argmax(0, keepdim=True).to(torch.uint8)
    data["pred"] = MetaTensor(labels.float(), meta=image.meta, applied_operations=image.applied_operations)
    inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
    out = np.asarray(inverted.as_tensor()[0]).round().astype(np.uint8)
    original_shape = nib.load(str(image_path)).shape
    if out.shape != tuple(original_shape):
        raise RuntimeError(
            f"inverted prediction has shape {out.shape}, input {original_shape}: preprocessing not invertible"
        )
    return out


def read_label(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A reference label volume on its own grid and its voxel spacing (mm): what every score is computed on."""
    check_case_files(Path(path))
    img = nib.load(str(path))
    try:
        voxels = np.asarray(img.dataobj)
    except Exception as err:  # nibabel, gzip and zlib raise many types for damaged files
        raise CaseError(f"{path}: cannot read its voxels (truncated or damaged?): {err}") from None
    check_label_values(voxels, path)
    return voxels, tuple(float(z) for z in img.header.get_zooms()[:3])


def write_like(reference_image: str | Path, labels: np.ndarray, output: str | Path) -> Path:
    """Write ``labels`` with the reference image's affine and header geometry (atomic), marked as ours in the
    header's description, so that a later predict may replace it and nothing else (`is_our_mask`)."""
    ref = nib.load(str(reference_image))
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    header["descrip"] = MASK_DESCRIPTION
    img = nib.Nifti1Image(labels.astype(np.uint8), ref.affine, header)
    output = Path(output)
    with atomic_path(output) as tmp:
        tmp_nifti = tmp.with_name(tmp.name + (".nii.gz" if output.name.endswith(".gz") else ".nii"))
        nib.save(img, str(tmp_nifti))
        tmp_nifti.replace(tmp)
    return output


def is_our_mask(path: Path) -> bool:
    """Whether ``path`` is a mask that `write_like` wrote (its header's description says so)."""
    try:
        return bytes(nib.load(str(path)).header["descrip"]).startswith(MASK_DESCRIPTION)
    except Exception:  # any unreadable file is not ours
        return False


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a binary mask (MONAI's KeepLargestConnectedComponent): an organ is
    one piece, so stray blobs far from it, which dominate HD95, are dropped. ``mask`` is left as it is (the
    transform works in place, so it gets a copy)."""
    kept = KeepLargestConnectedComponent(connectivity=mask.ndim)(torch.from_numpy(np.array(mask, bool))[None])
    return np.asarray(kept[0]).astype(mask.dtype)
