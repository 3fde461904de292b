"""Synthetic abdominal CT phantoms in btcv30's nnU-Net v2 raw layout: tests and demos without real data.

Each case is an elliptical body (fat inside a muscle rim), a vertebral column and six organs drawn as randomly
deformed, rotated and jittered ellipsoids at organ-like Hounsfield units, slightly blurred (partial volume),
noisy. Liver, spleen and kidneys play the "base" organs a foundation model knows; gallbladder and pancreas the
small "novel" ones. Label names follow btcv30's dataset.json, so organ lists written for the real benchmark
(``arenaseg.data.splits``) apply to the phantom unchanged.

``modality="mri"`` paints the same anatomy (the same label maps for a seed) with T1-like scanner units instead:
a background near 0, bright fat and marrow, dark fluid (gallbladder) and bone cortex, organs between 300 and 550,
a smooth multiplicative bias field and magnitude (non-negative) noise, so a CT window turns it into noise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from arenaseg.utils.atomic import write_json
from arenaseg.utils.errors import UserError

PHANTOM_LABELS: dict[str, int] = {
    "background": 0,
    "spleen": 1,
    "right_kidney": 2,
    "left_kidney": 3,
    "gallbladder": 4,
    "liver": 5,
    "pancreas": 6,
}

AIR_HU, FAT_HU, MUSCLE_HU, MARROW_HU, CORTEX_HU = -1000.0, -100.0, 50.0, 400.0, 700.0
NOISE_HU = 15.0
CT_TISSUE = {"air": AIR_HU, "fat": FAT_HU, "muscle": MUSCLE_HU, "marrow": MARROW_HU, "cortex": CORTEX_HU}
MODALITIES = ("ct", "mri")
# T1-weighted-like intensities in scanner units (the organs' CT values are in _ORGANS).
MRI_TISSUE = {"air": 0.0, "fat": 850.0, "muscle": 300.0, "marrow": 650.0, "cortex": 60.0}
MRI_ORGANS = {
    "gallbladder": 120.0,
    "pancreas": 550.0,
    "right_kidney": 380.0,
    "left_kidney": 380.0,
    "spleen": 330.0,
    "liver": 480.0,
}
BLUR_VOXELS = 0.6


@dataclass(frozen=True)
class _OrganSpec:
    """Mean geometry in fractions of the volume (x: patient right to left, y: anterior to posterior)."""

    name: str
    hu: float
    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    angle: float = 0.0  # rotation in the axial (x, y) plane, radians


# Painting order is priority (an organ only takes free voxels): small organs first, so they are never carved.
_ORGANS = (
    _OrganSpec("gallbladder", 10.0, (0.40, 0.29, 0.40), (0.04, 0.04, 0.08), 0.3),
    _OrganSpec("pancreas", 40.0, (0.56, 0.50, 0.45), (0.15, 0.035, 0.05), 0.25),
    _OrganSpec("right_kidney", 150.0, (0.32, 0.68, 0.40), (0.06, 0.07, 0.15), -0.3),
    _OrganSpec("left_kidney", 150.0, (0.68, 0.68, 0.38), (0.06, 0.07, 0.15), 0.3),
    _OrganSpec("spleen", 50.0, (0.76, 0.58, 0.64), (0.08, 0.10, 0.16), 0.5),
    _OrganSpec("liver", 60.0, (0.32, 0.42, 0.62), (0.18, 0.19, 0.30), 0.0),
)


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates in fractions of the volume, as broadcastable open grids."""
    return tuple(
        ((np.arange(n) + 0.5) / n).reshape([-1 if a == i else 1 for a in range(3)]) for i, n in enumerate(shape)
    )


def _deformed_ellipsoid(grid: tuple[np.ndarray, ...], spec: _OrganSpec, rng: np.random.Generator) -> np.ndarray:
    """A random organ: jittered centre, size and angle; the boundary rippled by three low-frequency waves."""
    centre = np.asarray(spec.centre) + rng.uniform(-0.03, 0.03, 3)
    semi = np.asarray(spec.semi_axes) * rng.uniform(0.85, 1.15, 3)
    angle = spec.angle + rng.uniform(-0.3, 0.3)
    dx, dy, dz = (g - c for g, c in zip(grid, centre, strict=True))
    c, s = np.cos(angle), np.sin(angle)
    u = (c * dx + s * dy) / semi[0]
    v = (-s * dx + c * dy) / semi[1]
    w = dz / semi[2]
    directions = rng.normal(size=(3, 3))
    directions *= rng.uniform(0.5, 1.2, (3, 1)) / np.linalg.norm(directions, axis=1, keepdims=True)
    ripple = sum(
        0.1 * np.sin(2 * np.pi * (d[0] * u + d[1] * v + d[2] * w) + phase)
        for d, phase in zip(directions, rng.uniform(0, 2 * np.pi, 3), strict=True)
    )
    return u**2 + v**2 + w**2 <= (1.0 + ripple) ** 2


def _phantom_case(
    shape: tuple[int, int, int], rng: np.random.Generator, modality: str = "ct"
) -> tuple[np.ndarray, np.ndarray]:
    """(int16 image, uint8 label map) of one case: HU for CT, scanner units for MRI (same anatomy and draws)."""
    mri = modality == "mri"
    tissue = MRI_TISSUE if mri else CT_TISSUE
    grid = _grid(shape)
    x, y, _ = grid
    body_a, body_b = 0.45 * rng.uniform(0.95, 1.0), 0.36 * rng.uniform(0.95, 1.05)
    body_r2 = ((x - 0.5) / body_a) ** 2 + ((y - 0.5) / body_b) ** 2
    body = np.broadcast_to(body_r2 <= 1.0, shape)
    inner = np.broadcast_to(body_r2 <= 0.9**2, shape)  # fat; the ring outside it is the muscle wall

    spine_y = 0.5 + 0.65 * body_b
    spine_r2 = ((x - 0.5) / 0.06) ** 2 + ((y - spine_y) / 0.05) ** 2
    cortex = np.broadcast_to(spine_r2 <= 1.0, shape)
    marrow = np.broadcast_to(spine_r2 <= 0.7**2, shape)

    image = np.full(shape, tissue["air"])
    image[body] = tissue["muscle"]
    image[inner] = tissue["fat"]
    image[cortex] = tissue["cortex"]
    image[marrow] = tissue["marrow"]

    labels = np.zeros(shape, np.uint8)
    free = inner & ~cortex
    for spec in _ORGANS:
        kept = _deformed_ellipsoid(grid, spec, rng) & free
        if not kept.any():  # the layout keeps organs apart; this guards the "every organ present" promise
            raise RuntimeError(f"{spec.name} vanished from a phantom of shape {shape}")
        labels[kept] = PHANTOM_LABELS[spec.name]
        image[kept] = (MRI_ORGANS[spec.name] if mri else spec.hu) + rng.uniform(-5, 5)
        free &= ~kept

    image = gaussian_filter(image, BLUR_VOXELS)
    if mri:  # coil sensitivity: a smooth +-15 % gain across the volume, drawn after the anatomy
        gradient = rng.normal(size=3)
        image *= 1.0 + 0.15 * np.tanh(sum(g * (c - 0.5) * 2 for g, c in zip(gradient, grid, strict=True)))
        return np.abs(image + rng.normal(0.0, NOISE_HU, shape)).round().astype(np.int16), labels
    image += rng.normal(0.0, NOISE_HU, shape)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), labels


def _validate(n_cases: int, seed: int, shape: Sequence[int], spacing: Sequence[float], modality: str) -> None:
    if modality not in MODALITIES:
        raise UserError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if seed < 0:
        raise UserError(f"seed must be >= 0 (numpy seed sequence), got {seed}")
    if n_cases < 1:
        raise UserError(f"n_cases must be >= 1, got {n_cases}")
    if len(shape) != 3 or any(int(n) != n or n < 32 for n in shape):
        raise UserError(f"shape must be 3 integers >= 32 (voxels), got {tuple(shape)}")
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise UserError(f"spacing must be 3 positive numbers (mm), got {tuple(spacing)}")


def make_phantom_dataset(
    out_dir: str | os.PathLike,
    n_cases: int = 12,
    seed: int = 0,
    shape: Sequence[int] = (96, 96, 64),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    modality: str = "ct",
) -> Path:
    """Write ``n_cases`` phantoms as an nnU-Net v2 raw dataset folder at ``out_dir`` and return it.

    Case ``phantom_NNNN`` (1-based) depends only on ``(seed, NNNN)``: a smaller ``n_cases`` gives a prefix of
    a larger one, and ``modality`` "mri" gives the same label maps as "ct". Every organ of ``PHANTOM_LABELS``
    is present in every case. The folder is built beside ``out_dir`` and renamed into place, so it is complete
    or absent; an existing non-empty ``out_dir`` is refused rather than mixed with stale cases.
    """
    _validate(n_cases, seed, shape, spacing, modality)
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; give a new path or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        affine = np.diag([*spacing, 1.0])
        cases = []
        for i in range(1, n_cases + 1):
            case = f"phantom_{i:04d}"
            image, labels = _phantom_case(shape, np.random.default_rng([seed, i]), modality)
            for array, path in (
                (image, tmp / "imagesTr" / f"{case}_0000.nii.gz"),
                (labels, tmp / "labelsTr" / f"{case}.nii.gz"),
            ):
                nifti = nib.Nifti1Image(array, affine)
                nifti.header.set_xyzt_units("mm")
                nib.save(nifti, path)
            cases.append(
                {
                    "case": case,
                    "shape": list(shape),
                    "spacing_mm": list(spacing),
                    "labels_present": [int(v) for v in np.unique(labels) if v != 0],
                    "dtype_image": "int16",
                    "dtype_label": "uint8",
                }
            )
        write_json(
            tmp / "dataset.json",
            {
                "name": "phantom",
                "description": f"synthetic abdominal {modality.upper()} phantoms (arenaseg.data.phantom, seed {seed})",
                "channel_names": {"0": modality.upper()},
                "labels": PHANTOM_LABELS,
                "numTraining": n_cases,
                "file_ending": ".nii.gz",
                "seed": seed,
                "cases": cases,
            },
        )
        os.replace(tmp, out_dir)  # also replaces an existing empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
