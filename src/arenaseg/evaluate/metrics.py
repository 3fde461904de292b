"""Dice (%) and 95% Hausdorff distance (mm) by MONAI, defined for empty masks so means stay finite."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


def _binary_mask(name: str, array: np.ndarray) -> np.ndarray:
    if array.dtype != bool and not ((array == 0) | (array == 1)).all():
        raise ValueError(f"{name} must be a binary mask (values 0/1 or bool), found values {np.unique(array)[:8]}")
    return array.astype(bool, copy=False)


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice (%) and symmetric 95th-percentile Hausdorff distance (mm) of two binary masks on one voxel grid.

    Both come from MONAI (``compute_dice``; ``compute_hausdorff_distance`` on the mask edges, ``spacing``
    in mm per array axis). MONAI gives NaN/inf when a mask is empty, which would poison a mean over test
    cases, so: both empty (organ absent and correctly not predicted) -> dice 100, hd95 0; exactly one empty ->
    dice 0, hd95 = the volume's diagonal in mm (sqrt(sum((shape * spacing)^2))), a finite penalty that no
    distance between two voxels of the volume exceeds.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must share one grid, got shapes {pred.shape} and {ref.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D arrays, got {pred.ndim}D of shape {pred.shape}")
    if len(spacing) != pred.ndim or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be {pred.ndim} positive numbers (mm), got {tuple(spacing)}")
    pred, ref = _binary_mask("pred", pred), _binary_mask("ref", ref)
    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not pred_any and not ref_any:
        return {"dice": 100.0, "hd95": 0.0}
    if pred_any != ref_any:
        return {"dice": 0.0, "hd95": float(np.linalg.norm(np.multiply(pred.shape, spacing)))}
    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(ref)[None, None].float()
    dice = compute_dice(y_pred, y, include_background=True)
    hd95 = compute_hausdorff_distance(
        y_pred, y, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
    )
    return {"dice": 100.0 * float(dice[0, 0]), "hd95": float(hd95[0, 0])}


def summarise(cases: Mapping[str, Mapping[str, float]]) -> dict:
    """Per-case metrics (case id -> ``case_metrics`` result) with their means over cases."""
    if not cases:
        raise ValueError("no cases to summarise")
    incomplete = sorted(case for case, m in cases.items() if not {"dice", "hd95"} <= set(m))
    if incomplete:
        raise ValueError(f"cases {incomplete} lack 'dice' or 'hd95'")
    return {
        "cases": {case: dict(m) for case, m in cases.items()},
        "mean_dice": float(np.mean([m["dice"] for m in cases.values()])),
        "mean_hd95": float(np.mean([m["hd95"] for m in cases.values()])),
    }
