"""Intensity schemes (ct, percentile, zscore): the CT path is today's, bit for bit and cache key for cache key; the
body crop works for each; MRI-like phantoms adapt and predict end to end with --intensity percentile."""

from __future__ import annotations

import hashlib
import json
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from arenaseg import pipeline
from arenaseg.cli import main
from arenaseg.data.phantom import PHANTOM_LABELS, make_phantom_dataset
from arenaseg.data.preprocess import (
    MapLabelsd,
    PreprocessSettings,
    RejectNonFinited,
    deterministic_transforms,
    file_digest,
    preprocessed_dataset,
    settings_key,
)
from arenaseg.utils.errors import UserError

LIVER = {PHANTOM_LABELS["liver"]: 1}


@pytest.fixture(scope="module")
def mri_phantoms(tmp_path_factory):
    return make_phantom_dataset(
        tmp_path_factory.mktemp("mri") / "phantoms", n_cases=3, seed=3, shape=(64, 64, 64), modality="mri"
    )


def _case(folder, i=1):
    return {"image": str(folder / "imagesTr" / f"phantom_{i:04d}_0000.nii.gz"), "label": str(
        folder / "labelsTr" / f"phantom_{i:04d}.nii.gz")}  # fmt: skip


def test_ct_path_is_the_untouched_transform_chain(phantoms):
    """The chain as it was before the intensity option (MONAI's deprecated Orientationd default included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        before = Compose(
            [
                LoadImaged(keys=["image"]),
                EnsureChannelFirstd(keys=["image"]),
                RejectNonFinited(keys=["image"]),
                LoadImaged(keys=["label"]),
                EnsureChannelFirstd(keys=["label"]),
                MapLabelsd("label", LIVER),
                Orientationd(keys=["image", "label"], axcodes="RAS"),
                Spacingd(keys=["image", "label"], pixdim=(3.0, 3.0, 3.0), mode=("bilinear", "nearest")),
                ScaleIntensityRanged(keys=["image"], a_min=-125.0, a_max=275.0, b_min=0.0, b_max=1.0, clip=True),
                CropForegroundd(
                    keys=["image", "label"], source_key="image", select_fn=lambda x: x > 0.02, allow_smaller=True
                ),
                SpatialPadd(keys=["image", "label"], spatial_size=(64, 64, 64)),
            ]
        )(_case(phantoms))
    now = Compose(deterministic_transforms(PreprocessSettings(), LIVER))(_case(phantoms))
    for key in ("image", "label"):
        assert torch.equal(now[key].as_tensor(), before[key].as_tensor()), key
        assert np.array_equal(now[key].affine, before[key].affine), key


def test_ct_cache_key_is_unchanged(phantoms):
    """Every volume cached before the option existed is still a hit: the key is the old formula's."""
    item = _case(phantoms)
    old_settings = {"spacing": (3.0, 3.0, 3.0), "window": (-125.0, 275.0), "patch_size": (64, 64, 64),
                    "body_threshold": 0.02}  # fmt: skip
    old_tag = json.dumps({"settings": old_settings, "labels": sorted(LIVER.items()), "v": 1})
    old_key = "|".join(file_digest(item[k]) for k in ("image", "label")) + old_tag + json.dumps([])
    dataset = preprocessed_dataset([item], PreprocessSettings(), LIVER)
    assert dataset.hash_func(item) == hashlib.sha256(old_key.encode()).hexdigest().encode()
    keys = {dataset.hash_func(item)}
    for mode in ("percentile", "zscore"):
        keys.add(preprocessed_dataset([item], PreprocessSettings(intensity=mode), LIVER).hash_func(item))
    assert len(keys) == 3


def test_records_without_intensity_are_ct():
    old = {"spacing": [3.0, 3.0, 3.0], "window": [-125.0, 275.0], "patch_size": [64, 64, 64], "body_threshold": 0.02}
    assert PreprocessSettings.from_dict(old) == PreprocessSettings()
    as_json = json.loads(json.dumps(PreprocessSettings().to_dict()))  # what run.json holds
    assert as_json["intensity"] == "ct" and settings_key(as_json) == settings_key(old)
    assert settings_key({**as_json, "intensity": "percentile"}) != settings_key(old)
    with pytest.raises(UserError, match="percentile"):
        PreprocessSettings(intensity="mri")


def test_mri_phantom_has_the_same_anatomy_and_another_contrast(mri_phantoms, tmp_path):
    ct = make_phantom_dataset(tmp_path / "ct", n_cases=1, seed=3, shape=(64, 64, 64))
    mri_img = np.asarray(nib.load(_case(mri_phantoms)["image"]).dataobj)
    ct_img = np.asarray(nib.load(_case(ct)["image"]).dataobj)
    labels = np.asarray(nib.load(_case(mri_phantoms)["label"]).dataobj)
    assert np.array_equal(labels, np.asarray(nib.load(_case(ct)["label"]).dataobj))
    assert mri_img.min() >= 0 and 700 < mri_img.max() < 1500
    assert np.median(mri_img[0]) < 50  # the first x-slab lies outside the body: background ~0
    liver, gallbladder = labels == PHANTOM_LABELS["liver"], labels == PHANTOM_LABELS["gallbladder"]
    # CT: gallbladder (fluid) a little darker than liver; T1 MRI: far darker, and pancreas brighter than liver
    assert np.median(ct_img[liver]) - np.median(ct_img[gallbladder]) < 80
    assert np.median(mri_img[liver]) - np.median(mri_img[gallbladder]) > 250
    assert np.median(mri_img[labels == PHANTOM_LABELS["pancreas"]]) > np.median(mri_img[liver])


@pytest.mark.parametrize("mode", ["percentile", "zscore"])
def test_body_crop_keeps_every_organ_and_drops_background(mri_phantoms, mode):
    item = _case(mri_phantoms)
    out = Compose(deterministic_transforms(PreprocessSettings(intensity=mode), LIVER))(item)
    liver_voxels = (np.asarray(nib.load(item["label"]).dataobj) == PHANTOM_LABELS["liver"]).sum()
    assert out["label"].sum().item() == liver_voxels  # 3 mm in, 3 mm out: nothing of the liver was cropped
    box = np.subtract(out["foreground_end_coord"], out["foreground_start_coord"])
    assert np.prod(box) < 0.8 * 64**3  # the air around the elliptical body is gone (before padding to 64^3)
    image = out["image"].as_tensor()
    if mode == "percentile":
        assert image.min() == 0 and image.max() == 1
    else:
        body = image != 0
        assert abs(image[body].mean().item()) < 1e-3 and abs(image[body].std().item() - 1) < 1e-2


def test_adapt_and_predict_an_mri_folder_with_percentile(mri_phantoms, tiny_foundation, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["adapt", "--data", str(mri_phantoms), "--organ", "liver", "--shots", "2", "--model", str(tiny_foundation),
            "--steps", "2", "--patches-per-step", "1", "--warmup", "1", "--test-cases", "phantom_0003",
            "--intensity", "percentile", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["preprocess"]["intensity"] == "percentile"
    assert json.loads((out / "adapter_config.json").read_text())["preprocess"]["intensity"] == "percentile"
    assert 0 <= run["mean_dice"] <= 100 and 0 <= run["mean_nsd"] <= 100

    seen = []
    real = pipeline.predict_volume
    monkeypatch.setattr(pipeline, "predict_volume", lambda m, src, s, **kw: seen.append(s) or real(m, src, s, **kw))
    image = _case(mri_phantoms, 3)["image"]
    seg = tmp_path / "seg.nii.gz"
    assert main(["predict", "--run", str(out), "--input", image, "--output", str(seg)]) == 0
    assert [s.intensity for s in seen] == ["percentile"]  # the run's own choice, no option to get it wrong
    assert nib.load(seg).shape == nib.load(image).shape
    with pytest.raises(SystemExit):
        main(["predict", "--run", str(out), "--input", image, "--output", str(seg), "--intensity", "ct"])
