"""Readers on both real layouts, preprocessing geometry, and the content-keyed preprocessing cache."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImaged

from arenaseg.data.datasets import open_dataset
from arenaseg.data.preprocess import CaseError, PreprocessSettings, case_item, load_all, preprocessed_dataset


def test_nnunet_reader_on_btcv30(shared_data):
    data = open_dataset(shared_data / "btcv30")
    assert data.layout == "nnunet" and len(data.cases) == 30
    assert data.labels["pancreas"] == 11
    assert data.case("btcv_0001").label.name == "btcv_0001.nii.gz"
    assert not data.has_organ("btcv_0035", "gallbladder") and data.has_organ("btcv_0036", "gallbladder")


def test_totalsegmentator_reader(shared_data):
    data = open_dataset(shared_data / "totalseg-example")
    assert data.layout == "totalsegmentator" and data.case_ids == ["s0001"]
    assert {"liver", "pancreas", "spleen"} <= set(data.organs)
    assert data.has_organ("s0001", "liver")
    item = case_item(data.case("s0001"), {"liver": 1})
    volume = preprocessed_dataset([item], PreprocessSettings(), None)[0]
    assert volume["label"].max() == 1 and volume["image"].shape == volume["label"].shape


def test_unknown_organ_lists_valid_names(shared_data):
    data = open_dataset(shared_data / "btcv30")
    with pytest.raises(ValueError, match="valid: spleen, right_kidney"):
        data.check_organ("brain")


def test_preprocessing_resamples_windows_and_pads(shared_data, tmp_path):
    data = open_dataset(shared_data / "btcv30")
    settings = PreprocessSettings()
    item = case_item(data.case("btcv_0001"), {"pancreas": 1})
    vol = preprocessed_dataset([item], settings, {11: 1}, tmp_path)[0]
    img = nib.load(data.case("btcv_0001").image)
    extent_mm = np.multiply(img.shape, img.header.get_zooms())
    # 3 mm grid, cropped to the body: never larger than the original field of view, at least one patch
    assert all(64 <= s <= e / 3.0 + 1 for s, e in zip(vol["image"].shape[1:], extent_mm, strict=True))
    assert float(vol["image"].min()) >= 0.0 and float(vol["image"].max()) <= 1.0
    assert set(np.unique(vol["label"].numpy())) == {0.0, 1.0}


def test_cache_hit_skips_loading(phantoms, tmp_path, monkeypatch):
    data = open_dataset(phantoms)
    items = [case_item(data.case(c), {"liver": 1}) for c in data.case_ids[:2]]
    first = [preprocessed_dataset(items, PreprocessSettings(), {5: 1}, tmp_path)[i] for i in range(2)]
    assert len(list(tmp_path.glob("*.pt"))) == 2

    def fail(*_a, **_k):
        raise AssertionError("cache miss: the volume was loaded again")

    monkeypatch.setattr(LoadImaged, "__call__", fail)
    second = [preprocessed_dataset(items, PreprocessSettings(), {5: 1}, tmp_path)[i] for i in range(2)]
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    # another setting is another key: it must load (and here fail loudly) instead of reusing a stale entry
    with pytest.raises(RuntimeError) as info:  # MONAI wraps errors raised inside a transform
        preprocessed_dataset(items, PreprocessSettings(spacing=(4.0, 4.0, 4.0)), {5: 1}, tmp_path)[0]
    assert "cache miss" in str(info.value.__cause__)


def _copy_case(phantoms, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(phantoms, root)
    return root


def test_geometry_mismatch_and_bad_volumes(phantoms, tmp_path):
    root = _copy_case(phantoms, tmp_path)
    image = root / "imagesTr" / "phantom_0001_0000.nii.gz"
    label = root / "labelsTr" / "phantom_0001.nii.gz"
    ref = nib.load(image)
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 60), np.uint8), ref.affine), label)
    data = open_dataset(root)
    with pytest.raises(CaseError, match="label shape"):
        case_item(data.case("phantom_0001"), {"liver": 1})
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])), label)
    with pytest.raises(CaseError, match="label spacing"):
        case_item(data.case("phantom_0001"), {"liver": 1})
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), image)
    with pytest.raises(CaseError, match="expected a 3D volume"):
        case_item(data.case("phantom_0001"), None)
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64, 2), np.int16), np.eye(4)), image)
    with pytest.raises(CaseError, match="4D"):
        case_item(data.case("phantom_0001"), None)
    image.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CaseError, match="cannot read"):
        case_item(data.case("phantom_0001"), None)
    image.unlink()
    with pytest.raises(CaseError, match="file not found"):
        case_item(data.case("phantom_0001"), None)


def test_nan_voxels_are_refused(phantoms, tmp_path):
    root = _copy_case(phantoms, tmp_path)
    image = root / "imagesTr" / "phantom_0002_0000.nii.gz"
    arr = np.asarray(nib.load(image).dataobj).astype(np.float32)
    arr[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(arr, nib.load(image).affine), image)
    data = open_dataset(root)
    item = case_item(data.case("phantom_0002"), {"liver": 1})
    with pytest.raises(CaseError, match="NaN"):
        load_all(preprocessed_dataset([item], PreprocessSettings(), {5: 1}, tmp_path / "c"))
