"""Whole-volume prediction: preprocess, MONAI sliding window, then undo the preprocessing (MONAI Invertd) so that
the prediction lies on the input's original grid, and write it with the input's affine and header."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd
from torch import nn

from arenaseg.data.preprocess import PreprocessSettings, check_case_files, deterministic_transforms
from arenaseg.utils.atomic import atomic_path
from arenaseg.utils.precision import DEFAULT_PRECISION, autocast


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
    data = pre({"image": str(image_path)})
    image = data["image"]
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


def write_like(reference_image: str | Path, labels: np.ndarray, output: str | Path) -> Path:
    """Write ``labels`` with the reference image's affine and header geometry (atomic)."""
    ref = nib.load(str(reference_image))
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(labels.astype(np.uint8), ref.affine, header)
    output = Path(output)
    with atomic_path(output) as tmp:
        tmp_gz = tmp.with_name(tmp.name + ".nii.gz")
        nib.save(img, str(tmp_gz))
        tmp_gz.replace(tmp)
    return output
