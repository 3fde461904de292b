"""Dice (%), 95% Hausdorff distance (mm) and normalised surface distance (%) by MONAI, defined for empty masks
so means stay finite."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from arenaseg.utils.errors import UserError

# NSD tolerance: one voxel of the 3 mm grid the models predict on. Resampling a prediction back to the scan's grid
# moves a boundary by up to half a voxel, so a boundary within one working voxel is as right as the model can
# place it; anything further is an error of the model.
NSD_TOLERANCE_MM = 3.0


def _binary_mask(name: str, array: np.ndarray) -> np.ndarray:
    if array.dtype != bool and not ((array == 0) | (array == 1)).all():
        raise UserError(f"{name} must be a binary mask (values 0/1 or bool), found values {np.unique(array)[:8]}")
    return array.astype(bool, copy=False)


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice (%), symmetric 95th-percentile Hausdorff distance (mm) and normalised surface distance (%: the share
    of both surfaces within ``NSD_TOLERANCE_MM`` of the other) of two binary masks on one voxel grid.

    All come from MONAI (``compute_dice``; ``compute_hausdorff_distance`` and ``compute_surface_dice`` on the
    mask edges, ``spacing`` in mm per array axis). MONAI gives NaN/inf when a mask is empty, which would poison a
    mean over test cases, so: both empty (organ absent and correctly not predicted) -> dice 100, hd95 0, nsd 100;
    exactly one empty -> dice 0, nsd 0, hd95 = the volume's diagonal in mm (sqrt(sum((shape * spacing)^2))), a
    finite penalty that no distance between two voxels of the volume exceeds.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise UserError(f"pred and ref must share one grid, got shapes {pred.shape} and {ref.shape}")
    if pred.ndim not in (2, 3):
        raise UserError(f"masks must be 2D or 3D arrays, got {pred.ndim}D of shape {pred.shape}")
    if len(spacing) != pred.ndim or not all(s > 0 for s in spacing):
        raise UserError(f"spacing must be {pred.ndim} positive numbers (mm), got {tuple(spacing)}")
    pred, ref = _binary_mask("pred", pred), _binary_mask("ref", ref)
    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not pred_any and not ref_any:
        return {"dice": 100.0, "hd95": 0.0, "nsd": 100.0}
    if pred_any != ref_any:
        return {"dice": 0.0, "hd95": float(np.linalg.norm(np.multiply(pred.shape, spacing))), "nsd": 0.0}
    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(ref)[None, None].float()
    spacing = [float(s) for s in spacing]
    dice = compute_dice(y_pred, y, include_background=True)
    with warnings.catch_warnings():
        # MONAI 1.6's own get_edge_surface_distance passes get_mask_edges' deprecated always_return_as_numpy;
        # no argument of ours can avoid it, so exactly that message is silenced here.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(y_pred, y, [NSD_TOLERANCE_MM], include_background=True, spacing=spacing)
    return {"dice": 100.0 * float(dice[0, 0]), "hd95": float(hd95[0, 0]), "nsd": 100.0 * float(nsd[0, 0])}


def summarise(cases: Mapping[str, Mapping[str, float]]) -> dict:
    """Per-case metrics (case id -> ``case_metrics`` result, possibly with more keys such as ``dice_lcc``) with
    ``mean_<key>`` over cases for every key that all cases have."""
    if not cases:
        raise ValueError("no cases to summarise")
    incomplete = sorted(case for case, m in cases.items() if not {"dice", "hd95"} <= set(m))
    if incomplete:
        raise ValueError(f"cases {incomplete} lack 'dice' or 'hd95'")
    shared = [k for k in next(iter(cases.values())) if all(k in m for m in cases.values())]
    means = {f"mean_{k}": float(np.mean([m[k] for m in cases.values()])) for k in shared}
    return {"cases": {case: dict(m) for case, m in cases.items()}, **means}
