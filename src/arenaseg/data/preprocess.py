"""Preprocessing with MONAI transforms: the deterministic part is cached on disk, the random crops are not.

Pipeline (CPU preset of BENCHMARK.md): load -> channel first -> RAS orientation -> resample to 3 mm (image linear,
label nearest) -> HU window [-125, 275] scaled to [0, 1] -> crop to the body -> pad to the patch size.
The cache key hashes the files' bytes and these settings: an edited file or a changed setting never hits a
stale entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import PersistentDataset
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from arenaseg.data.datasets import Case


@dataclass(frozen=True)
class PreprocessSettings:
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    window: tuple[float, float] = (-125.0, 275.0)
    patch_size: tuple[int, int, int] = (64, 64, 64)
    body_threshold: float = 0.02  # on the [0, 1] scale: air and everything below the window is 0

    def to_dict(self) -> dict:
        return asdict(self)


def default_cache_dir() -> Path:
    """Honours ARENASEG_CACHE, then XDG_CACHE_HOME, then ~/.cache."""
    if os.environ.get("ARENASEG_CACHE"):
        return Path(os.environ["ARENASEG_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "arenaseg" / "preprocessed"


class CaseError(ValueError):
    """A case whose files cannot be used; the message names the file and what is wrong."""


def check_case_files(image: Path, labels: Sequence[Path] = ()) -> None:
    """Fail early and clearly on missing/corrupt files, non-3D images and image/label geometry mismatch."""
    img = _read_header(image)
    if len(img.shape) != 3:
        raise CaseError(f"{image}: expected a 3D volume, got shape {img.shape} ({len(img.shape)}D)")
    for path in labels:
        lab = _read_header(path)
        if tuple(lab.shape) != tuple(img.shape):
            raise CaseError(f"{path}: label shape {lab.shape} differs from image shape {img.shape} ({image})")
        if not np.allclose(lab.header.get_zooms()[:3], img.header.get_zooms()[:3], atol=1e-3):
            raise CaseError(
                f"{path}: label spacing {lab.header.get_zooms()[:3]} differs from image spacing "
                f"{img.header.get_zooms()[:3]} ({image})"
            )


def _read_header(path: Path) -> nib.Nifti1Image:
    if not Path(path).is_file():
        raise CaseError(f"file not found: {path}")
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises many types for damaged files
        raise CaseError(f"cannot read {path} as NIfTI: {err}") from err


class RejectNonFinited(MapTransform):
    """NaN or infinite voxels would silently poison training: refuse them."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if not torch.isfinite(torch.as_tensor(d[key])).all():
                raise CaseError(f"{d.get(key + '_path', key)}: volume contains NaN or infinite voxels")
        return d


class LoadStructuresd(MapTransform):
    """Build a label map from per-structure binary files (TotalSegmentator) on the image's grid."""

    def __init__(self, structure_key: str = "structures", label_key: str = "label") -> None:
        super().__init__([structure_key])
        self.structure_key, self.label_key = structure_key, label_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image = d["image"]
        label = torch.zeros(image.shape[1:], dtype=torch.uint8)
        for value, path in d.pop(self.structure_key):
            mask = np.asarray(nib.load(str(path)).dataobj) > 0
            label[torch.from_numpy(mask)] = value
        from monai.data import MetaTensor

        d[self.label_key] = MetaTensor(label[None], affine=image.affine, meta=dict(image.meta))
        return d


class MapLabelsd(MapTransform):
    """Keep the chosen label values (renumbered), everything else becomes background."""

    def __init__(self, keys: str, mapping: Mapping[int, int]) -> None:
        super().__init__(keys)
        self.mapping = dict(mapping)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            src = d[key]
            out = torch.zeros_like(src, dtype=torch.uint8)
            for orig, target in self.mapping.items():
                out[src == orig] = target
            d[key] = out
        return d


def case_item(case: Case, label_values: Mapping[str, int] | None) -> dict:
    """The dict a MONAI pipeline consumes. ``label_values`` maps organ names to the output class (None: image only).

    nnU-Net cases keep their label file (values are remapped by `MapLabelsd`); TotalSegmentator cases list the
    structure files to merge.
    """
    item: dict = {"case_id": case.case_id, "image": str(case.image)}
    if label_values is None:
        check_case_files(case.image)
        return item
    if case.label is not None:
        check_case_files(case.image, [case.label])
        item["label"] = str(case.label)
    else:
        missing = [o for o in label_values if o not in case.structure_files]
        if missing:
            raise CaseError(f"{case.case_id}: no segmentation file for {missing}")
        paths = [case.structure_files[o] for o in label_values]
        check_case_files(case.image, paths)
        item["structures"] = [(value, str(case.structure_files[o])) for o, value in label_values.items()]
    return item


def deterministic_transforms(
    settings: PreprocessSettings, label_mapping: Mapping[int, int] | None, structures: bool = False
) -> list:
    """Everything up to the random crop. ``label_mapping`` (file value -> class) for nnU-Net labels; None: no label."""
    with_label = label_mapping is not None or structures
    keys = ["image", "label"] if with_label else ["image"]
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    lo, hi = settings.window
    steps: list = [
        LoadImaged(keys=["image"]),
        EnsureChannelFirstd(keys=["image"]),
        RejectNonFinited(keys=["image"]),
    ]
    if structures:
        steps.append(LoadStructuresd())
    elif with_label:
        steps += [
            LoadImaged(keys=["label"]),
            EnsureChannelFirstd(keys=["label"]),
            MapLabelsd("label", label_mapping),
        ]
    steps += [
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=settings.spacing, mode=modes),
        ScaleIntensityRanged(keys=["image"], a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(
            keys=keys, source_key="image", select_fn=lambda x: x > settings.body_threshold, allow_smaller=True
        ),
        SpatialPadd(keys=keys, spatial_size=settings.patch_size),
    ]
    return steps


def random_patch_transform(settings: PreprocessSettings, num_samples: int) -> RandCropByPosNegLabeld:
    """Patches centred on foreground and background with probability 1:1 (BENCHMARK.md)."""
    return RandCropByPosNegLabeld(
        keys=["image", "label"],
        label_key="label",
        spatial_size=settings.patch_size,
        pos=1,
        neg=1,
        num_samples=num_samples,
        allow_smaller=False,
    )


def class_balanced_patch_transform(settings: PreprocessSettings, num_classes: int) -> RandCropByLabelClassesd:
    """Half the patches centred on background, the other half shared equally by the organs: with 1:1
    foreground:background centres a large organ (the liver) takes most foreground centres and small organs are
    rarely seen. Classes absent from a volume are skipped for that volume."""
    organs = num_classes - 1
    return RandCropByLabelClassesd(
        keys=["image", "label"],
        label_key="label",
        spatial_size=settings.patch_size,
        ratios=[organs] + [1] * organs,
        num_classes=num_classes,
        num_samples=1,
        allow_smaller=False,
        warn=False,
    )


def file_digest(path: str | Path, _memo: dict = {}) -> str:  # noqa: B006 - a per-process memo of file hashes
    """sha256 of a file's bytes, memoised by (path, size, mtime) so that a run hashes each file once."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _memo[key] = h.hexdigest()
    return _memo[key]


def preprocessed_dataset(
    items: Sequence[dict],
    settings: PreprocessSettings,
    label_mapping: Mapping[int, int] | None,
    cache_dir: str | Path | None = None,
) -> PersistentDataset:
    """MONAI PersistentDataset of the deterministic part, keyed by file contents + settings + label mapping."""
    structures = any("structures" in it for it in items)
    transform = Compose(
        [
            *deterministic_transforms(settings, label_mapping, structures),
            EnsureTyped(keys=["image", "label"], track_meta=False, allow_missing_keys=True),
        ]
    )
    tag = json.dumps({"settings": settings.to_dict(), "labels": sorted((label_mapping or {}).items()), "v": 1})

    def hash_item(item: dict) -> bytes:
        files = [item["image"], item.get("label")] + [p for _, p in item.get("structures", [])]
        digest = "|".join(file_digest(f) for f in files if f) + tag + json.dumps(item.get("structures", []))
        return hashlib.sha256(digest.encode()).hexdigest().encode()

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return PersistentDataset(list(items), transform=transform, cache_dir=cache, hash_func=hash_item)


def load_all(dataset: PersistentDataset, progress: bool = False) -> list[dict]:
    """Materialise every volume; a `CaseError` raised inside MONAI's transform wrapper surfaces as itself."""
    from tqdm import tqdm

    volumes = []
    for i in tqdm(range(len(dataset)), desc="preprocess", leave=False, disable=not progress):
        try:
            volumes.append(dataset[i])
        except Exception as err:
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, CaseError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None
    return volumes
