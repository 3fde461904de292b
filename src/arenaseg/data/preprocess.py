"""Preprocessing with MONAI transforms: the deterministic part is cached on disk, the random crops are not.

Pipeline (CPU preset of BENCHMARK.md): load -> channel first -> RAS orientation -> resample to 3 mm (image linear,
label nearest) -> intensities -> crop to the body -> pad to the patch size. Intensities (``intensity``): "ct", the
HU window [-125, 275] scaled to [0, 1] (the default); "percentile", each image's 0.5-99.5 % percentiles scaled to
[0, 1] (MRI, PET, shifted CT); "zscore", each image's non-zero voxels to mean 0, std 1 (nnU-Net's non-CT scheme).
The cache key hashes the files' bytes and these settings: an edited file or a changed setting never hits a
stale entry.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import PersistentDataset
from monai.transforms import (
    Compose,
    CopyItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from arenaseg.data.datasets import Case, Dataset
from arenaseg.utils.dataclass_json import from_json
from arenaseg.utils.errors import UserError
from arenaseg.utils.settings import described, is_number, rule

INTENSITY_MODES = ("ct", "percentile", "zscore")
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # Orientationd's meaning of "RAS", passed to silence its warning
PERCENTILES = (0.5, 99.5)  # "percentile": these percentiles of each image become 0 and 1
# The body on the percentile scale: an MRI's background noise and a CT's noisy air reach a few %, soft tissue
# lies far above (CT fat ~0.5); `body_threshold` (0.02) suits the CT window, where air is exactly 0.
PERCENTILE_BODY_THRESHOLD = 0.1


# The command line's largest patch side: a 512^3 patch already outgrows any GPU.
MAX_PATCH = 512


def _patch_side(side: int) -> bool:
    return 64 <= side <= MAX_PATCH and side % 32 == 0


@dataclass(frozen=True)
class PreprocessSettings:
    """How scans become training patches. The spacing and patch rules are the command line's (``cube``: one number
    for all three axes); the library takes any size, e.g. the tests' tiny patches."""

    spacing: tuple[float, float, float] = rule(
        (3.0, 3.0, 3.0),
        "> 0 and finite",
        lambda v: is_number(v) and v > 0,
        "isotropic resampling spacing in mm",
        parse=float,
        cube=True,
    )
    window: tuple[float, float] = (-125.0, 275.0)  # HU, used by intensity "ct" only
    patch_size: tuple[int, int, int] = rule(
        (64, 64, 64),
        f"a multiple of 32 from 64 to {MAX_PATCH} (Swin-UNETR downsamples 32x, and its bottleneck normalisation "
        "needs more than one voxel)",
        _patch_side,
        "cubic patch side in voxels, multiple of 32",
        parse=int,
        cube=True,
        flag="--patch",
    )
    body_threshold: float = 0.02  # on the [0, 1] scale: air and everything below the window is 0
    intensity: str = described(
        "ct",
        help="intensity scaling: ct = the HU window [-125, 275] -> [0, 1]; percentile = each image's 0.5-99.5 %% "
        "percentiles -> [0, 1] (MRI, PET, shifted CT); zscore = each image's non-zero voxels to mean 0, std 1",
        choices=INTENSITY_MODES,
    )

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_MODES:
            raise UserError(f"intensity must be one of {', '.join(INTENSITY_MODES)}, got {self.intensity!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> PreprocessSettings:
        """From ``to_dict``'s JSON form (lists for tuples); records written before ``intensity`` existed are CT."""
        return from_json(cls, values, error=UserError, tuples=True)


def settings_key(values: Mapping) -> dict:
    """The identity of preprocessing settings (``to_dict`` form) for cache keys and result matching: "ct" is left
    out, so that cache entries and run records written before the intensity option existed keep matching."""
    key = {k: v for k, v in values.items() if not (k == "intensity" and v == "ct")}
    if "intensity" in key:
        key["percentiles"], key["percentile_body_threshold"] = list(PERCENTILES), PERCENTILE_BODY_THRESHOLD
    return key


def default_cache_dir() -> Path:
    """Honours ARENASEG_CACHE, then XDG_CACHE_HOME, then ~/.cache."""
    if os.environ.get("ARENASEG_CACHE"):
        return Path(os.environ["ARENASEG_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "arenaseg" / "preprocessed"


class CaseError(UserError):
    """A case whose files cannot be used; the message names the file and what is wrong."""


# More voxels than any CT (512^3 is 1.3e8): a header that claims them is damaged, and reading it would exhaust memory.
MAX_VOXELS = 2**30
# Image and label affines may differ by this much (mm; rounding in the writers), no more: a label shifted or
# flipped against its image no longer lies on the organ.
AFFINE_TOLERANCE_MM = 1e-3
# Voxel sizes of CT, MRI and PET lie far inside this range (mm); outside it, or over this extent (no patient is
# 5 m long), the header is damaged, and resampling it would ask for terabytes.
SPACING_RANGE_MM = (0.01, 50.0)
MAX_EXTENT_MM = 5000.0
# Largest |cos| between two voxel axes, and largest relative gap between pixdim and the affine's voxel size.
GEOMETRY_TOLERANCE = 1e-3


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
        check_same_affine(path, lab.affine, image, img.affine)


def check_same_affine(path: Path, affine: np.ndarray, reference: Path, reference_affine: np.ndarray) -> None:
    """Two volumes of one grid must also lie at one place in the patient: same orientation and origin."""
    if not np.allclose(affine, reference_affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        diff = float(np.abs(np.asarray(affine) - np.asarray(reference_affine)).max())
        raise CaseError(
            f"{path}: its affine (voxel-to-patient orientation and origin) differs from that of {reference} by up "
            f"to {diff:.3g} mm: it would not lie on the same anatomy. Affine {np.round(affine, 3).tolist()} vs "
            f"{np.round(reference_affine, 3).tolist()}"
        )


def _read_header(path: Path) -> nib.Nifti1Image:
    """The header of a NIfTI file, checked (`check_geometry`, sizes) before any voxel is used; a compressed
    file's checksum is verified too (`check_compressed`)."""
    if not Path(path).is_file():
        raise CaseError(f"file not found: {path}")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for damaged files
        raise CaseError(f"cannot read {path} as NIfTI: {err}") from err
    shape = tuple(int(n) for n in img.shape)
    if 0 in shape:
        raise CaseError(f"{path}: the header gives a zero-size dimension {shape}: there are no voxels")
    voxels = int(np.prod(shape, dtype=np.float64))
    if voxels > MAX_VOXELS:
        raise CaseError(
            f"{path}: the header claims {' x '.join(map(str, shape))} = {voxels:.3g} voxels, more than {MAX_VOXELS:.3g}"
            " (no CT is this large): the header is damaged"
        )
    if not str(path).endswith(".gz") and isinstance(img, nib.Nifti1Image):
        needed = int(img.header["vox_offset"]) + voxels * img.get_data_dtype().itemsize
        size = Path(path).stat().st_size
        if size < needed:
            raise CaseError(f"{path}: truncated: the header needs {needed} bytes, the file holds {size}")
    check_geometry(path, img)
    check_compressed(path)
    return img


def check_geometry(path: Path, img: nib.Nifti1Image) -> None:
    """The one geometry check of every image and label read: where its voxels lie in the patient must be known
    (a qform or sform code), sane (voxel sizes in `SPACING_RANGE_MM`, pixdim agreeing with the affine) and
    rigid (axes at right angles, as ITK, nnU-Net's reader, requires). Else a mask comes out mirrored, shifted or
    skewed with no error at all."""
    header = img.header
    if len(img.shape) < 3:
        return  # not a volume: check_case_files says so
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise CaseError(
            f"{path}: the header gives no orientation (qform and sform codes are 0), so left and right cannot be "
            f"told apart and a mask would come out mirrored; set its qform or sform from the scanner's geometry"
        )
    axes = np.asarray(img.affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    lo, hi = SPACING_RANGE_MM
    for what, values in (("voxel size (from the affine)", spacing), ("pixdim", zooms)):
        if not ((values >= lo) & (values <= hi)).all():
            raise CaseError(
                f"{path}: its {what} {np.round(values, 4).tolist()} mm is outside {lo}-{hi} mm: the header is damaged"
            )
    directions = axes / spacing
    skew = float(np.abs(directions.T @ directions - np.eye(3)).max())
    if skew > GEOMETRY_TOLERANCE:
        raise CaseError(
            f"{path}: its affine is sheared (voxel axes not at right angles; cos up to {skew:.3g}): a scan's axes "
            f"are orthogonal, and resampling a sheared grid would skew the anatomy. Affine "
            f"{np.round(img.affine, 3).tolist()}"
        )
    if not np.allclose(zooms, spacing, rtol=GEOMETRY_TOLERANCE, atol=0):
        raise CaseError(
            f"{path}: its pixdim {np.round(zooms, 4).tolist()} mm disagrees with the voxel size of its affine "
            f"{np.round(spacing, 4).tolist()} mm: the header is damaged"
        )
    extent = np.asarray(img.shape[:3]) * spacing
    if extent.max() > MAX_EXTENT_MM:
        raise CaseError(
            f"{path}: the volume spans {np.round(extent).tolist()} mm, more than {MAX_EXTENT_MM:g} mm: the header "
            f"is damaged"
        )


def check_compressed(path: Path, _verified: set = set()) -> None:  # noqa: B006 - a per-process memo
    """Decompress a .gz file to its end, which verifies its checksum: nibabel stops at the voxels, so a bit
    flipped inside the stream gives silently wrong voxels. Memoised by (path, size, mtime)."""
    if not str(path).endswith(".gz"):
        return
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _verified:
        return
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as err:
        raise CaseError(f"{path}: cannot read its voxels (truncated or damaged?): {err}") from None
    _verified.add(key)


def check_label_values(voxels: torch.Tensor | np.ndarray, source: str | Path) -> None:
    """A label map holds integer class values: a NaN, a 5.5 or a soft 0.5 matches no class, and the voxels would
    silently become background."""
    t = torch.as_tensor(voxels)
    if not t.is_floating_point():
        return
    bad = t[~torch.isfinite(t) | (t != t.round())]
    if bad.numel():
        found = sorted({float(v) for v in bad.unique()[:5]}, key=str)
        raise CaseError(
            f"{source}: a label map holds integer class values; {bad.numel()} voxels hold others, e.g. {found}"
        )


class RejectNonIntegerLabelsd(MapTransform):
    """`check_label_values` in a MONAI pipeline, naming the file."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            check_label_values(d[key], getattr(d[key], "meta", {}).get("filename_or_obj", key))
        return d


class RejectNonFinited(MapTransform):
    """NaN or infinite voxels would silently poison training: refuse them."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if not torch.isfinite(torch.as_tensor(d[key])).all():
                source = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                raise CaseError(f"{source}: volume contains NaN or infinite voxels")
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

        d[self.label_key] = MetaTensor(label[None], meta=dict(image.meta))  # the image's meta holds its affine
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
            RejectNonIntegerLabelsd(keys=["label"]),
            MapLabelsd("label", label_mapping),
        ]
    steps += [
        Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS),
        Spacingd(keys=keys, pixdim=settings.spacing, mode=modes),
        *intensity_and_body_crop(settings, keys),
        SpatialPadd(keys=keys, spatial_size=settings.patch_size),
    ]
    return steps


def intensity_and_body_crop(settings: PreprocessSettings, keys: Sequence[str]) -> list:
    """Intensity scaling and the crop to the body's bounding box (voxels above a threshold on a [0, 1] scale).
    "ct" and "percentile" crop on the scaled image itself: air (CT) and the near-zero background of an MRI fall
    below the threshold. "zscore" leaves no such scale (the body is centred on 0), so the crop looks at a
    percentile-scaled copy of the image, and the z-score comes after it."""
    threshold = settings.body_threshold if settings.intensity == "ct" else PERCENTILE_BODY_THRESHOLD

    def body(x):
        return x > threshold

    crop = CropForegroundd(keys=keys, source_key="image", select_fn=body, allow_smaller=True)
    percentiles = dict(lower=PERCENTILES[0], upper=PERCENTILES[1], b_min=0.0, b_max=1.0, clip=True)
    if settings.intensity == "ct":
        lo, hi = settings.window
        return [ScaleIntensityRanged(keys=["image"], a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True), crop]
    if settings.intensity == "percentile":
        return [ScaleIntensityRangePercentilesd(keys=["image"], **percentiles), crop]
    return [
        CopyItemsd(keys=["image"], names=["body"]),
        ScaleIntensityRangePercentilesd(keys=["body"], **percentiles),
        CropForegroundd(keys=keys, source_key="body", select_fn=body, allow_smaller=True),
        DeleteItemsd(keys=["body"]),
        NormalizeIntensityd(keys=["image"], nonzero=True),
    ]


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
    tag = json.dumps(
        {"settings": settings_key(settings.to_dict()), "labels": sorted((label_mapping or {}).items()), "v": 1}
    )

    def hash_item(item: dict) -> bytes:
        files = [item["image"], item.get("label")] + [p for _, p in item.get("structures", [])]
        digest = "|".join(file_digest(f) for f in files if f) + tag + json.dumps(item.get("structures", []))
        return hashlib.sha256(digest.encode()).hexdigest().encode()

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return CheckedCache(list(items), transform=transform, cache_dir=cache, hash_func=hash_item)


class CheckedCache(PersistentDataset):
    """MONAI's on-disk cache, except that an entry that cannot be read (a killed copy, a full disk) is named,
    removed and rebuilt: MONAI re-raises most such errors, so every later run failed on the same file."""

    def _cachecheck(self, item_transformed):
        entry = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
        if entry.is_file():
            try:
                return torch.load(entry, weights_only=True)
            except Exception as err:  # torch raises many types for a damaged file; the entry is rebuilt anyway
                print(f"note: preprocessing cache entry {entry} is damaged ({err}); rebuilding it", file=sys.stderr)
                entry.unlink(missing_ok=True)
        return super()._cachecheck(item_transformed)


def load_all(dataset: PersistentDataset, progress: bool = False) -> list[dict]:
    """Materialise every volume; a problem of a case's files surfaces as a `CaseError` naming the file."""
    from tqdm import tqdm

    volumes = []
    for i in tqdm(range(len(dataset)), desc="preprocess", leave=False, disable=not progress):
        try:
            volumes.append(dataset[i])
        except Exception as err:
            item = dataset.data[i]
            paths = [item["image"], *([item["label"]] if "label" in item else [])]
            paths += [p for _, p in item.get("structures", [])]
            explained = explain_transform_error(err, paths)
            if explained is None:
                raise
            raise explained from None
    return volumes


def load_cases(
    data: Dataset,
    case_ids: Sequence[str],
    organ_values: Mapping[str, int],
    settings: PreprocessSettings,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> list[dict]:
    """The preprocessed volumes of ``case_ids``, each label holding ``organ_values`` (organ name -> output value,
    every other voxel 0): one path from a dataset's cases to training volumes, through the on-disk cache."""
    mapping = {data.labels[o]: v for o, v in organ_values.items()} if data.layout == "nnunet" else None
    items = [case_item(data.case(cid), organ_values) for cid in case_ids]
    return load_all(preprocessed_dataset(items, settings, mapping, cache_dir), progress=progress)


def explain_transform_error(err: Exception, paths: Sequence[str | Path]) -> Exception | None:
    """What the user needs from an error inside MONAI's "applying transform <... object at 0x...>" wrapper: our own
    `CaseError` as it is; else, when one of the case's files cannot be read, that file and why; else, for data
    MONAI cannot use (ValueError), the files and the transform's message; running out of memory becomes a
    MemoryError naming them (the CLI's out-of-memory exit). None for anything else: a bug keeps its traceback."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, CaseError):
            return cause
        cause = cause.__cause__
    if not isinstance(err, RuntimeError) or not str(err).startswith("applying transform"):
        return None
    for path in paths:
        try:
            np.asarray(nib.load(str(path)).dataobj)
        except Exception as read_err:  # nibabel, gzip and zlib raise many types for damaged files
            return CaseError(f"{path}: cannot read its voxels (truncated or damaged?): {read_err}")
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, MemoryError) or "can't allocate memory" in str(root):  # torch's CPU allocator: RuntimeError
        step = str(err).split("<")[-1].split(" object")[0].rsplit(".", 1)[-1]
        return MemoryError(f"{' / '.join(map(str, paths))}: preprocessing ({step}): {str(root).splitlines()[0]}")
    if isinstance(root, ValueError):
        step = str(err).split("<")[-1].split(" object")[0].rsplit(".", 1)[-1]
        names = " / ".join(map(str, paths))
        return CaseError(f"{names}: preprocessing ({step}) failed: {type(root).__name__}: {root}")
    return None
