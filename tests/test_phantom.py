from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from arenaseg.data.phantom import PHANTOM_LABELS, make_phantom_dataset

SPACING = (2.0, 2.5, 3.0)
SMALL = (48, 48, 32)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("ph") / "phantom", n_cases=3, seed=7, spacing=SPACING)


def _load(folder: Path, case: str) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    return nib.load(folder / "imagesTr" / f"{case}_0000.nii.gz"), nib.load(folder / "labelsTr" / f"{case}.nii.gz")


def _arrays(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    cases = json.loads((folder / "dataset.json").read_text())["cases"]
    return [tuple(np.asarray(img.dataobj) for img in _load(folder, c["case"])) for c in cases]


def test_nnunet_layout_and_dataset_json(phantom: Path) -> None:
    meta = json.loads((phantom / "dataset.json").read_text())
    assert meta["labels"] == PHANTOM_LABELS
    assert sorted(meta["labels"].values()) == list(range(len(PHANTOM_LABELS)))  # nnU-Net: consecutive labels
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == len(meta["cases"]) == 3
    names = [c["case"] for c in meta["cases"]]
    assert sorted(p.name for p in (phantom / "imagesTr").iterdir()) == [f"{n}_0000.nii.gz" for n in names]
    assert sorted(p.name for p in (phantom / "labelsTr").iterdir()) == [f"{n}.nii.gz" for n in names]
    assert sorted(p.name for p in phantom.parent.iterdir()) == ["phantom"]  # no temporary folder left behind
    for c in meta["cases"]:
        image, labels = _load(phantom, c["case"])
        assert image.get_data_dtype() == np.int16 and labels.get_data_dtype() == np.uint8
        assert list(image.shape) == list(labels.shape) == c["shape"] == [96, 96, 64]
        np.testing.assert_allclose(image.affine, np.diag([*SPACING, 1.0]))
        np.testing.assert_allclose(labels.affine, image.affine)
        np.testing.assert_allclose(image.header.get_zooms(), SPACING)
        assert c["spacing_mm"] == list(SPACING)
        present = sorted(int(v) for v in np.unique(np.asarray(labels.dataobj)) if v)
        assert c["labels_present"] == present == sorted(v for v in PHANTOM_LABELS.values() if v)


def test_every_organ_present_solid_and_visible_in_the_ct_window(phantom: Path) -> None:
    for image, labels in _arrays(phantom):
        fat = image[(labels == 0) & (image > -300) & (image < 0)]
        fat_hu = np.median(fat)
        assert -130 < fat_hu < -70
        assert np.percentile(image, 99.9) > 300  # bone
        medians = {}
        for name, value in PHANTOM_LABELS.items():
            if name == "background":
                continue
            interior = binary_erosion(labels == value)
            assert interior.sum() > 0, f"{name} is missing or a speck"
            medians[name] = float(np.median(image[interior]))
            assert -125 < medians[name] < 275, f"{name} is outside the benchmark's intensity window"
            assert medians[name] - fat_hu > 80, f"{name} does not stand out from fat"
        kidneys = [medians.pop("left_kidney"), medians.pop("right_kidney")]
        assert min(kidneys) > max(medians.values())  # contrast-enhanced
        assert medians["gallbladder"] == min(medians.values())  # fluid
        assert np.all(image[labels > 0] > -300)  # organs lie inside the body, never in air


def test_cases_differ_in_position_and_size(phantom: Path) -> None:
    (_, a), (_, b) = _arrays(phantom)[:2]
    for value in (PHANTOM_LABELS["liver"], PHANTOM_LABELS["pancreas"]):
        centroid_a = np.argwhere(a == value).mean(0)
        centroid_b = np.argwhere(b == value).mean(0)
        assert np.abs(centroid_a - centroid_b).max() > 0.5
        assert (a == value).sum() != (b == value).sum()


def test_deterministic_given_seed_and_cases_are_prefixes(tmp_path: Path) -> None:
    three = _arrays(make_phantom_dataset(tmp_path / "a", n_cases=3, seed=3, shape=SMALL))
    again = _arrays(make_phantom_dataset(tmp_path / "b", n_cases=1, seed=3, shape=SMALL))
    other = _arrays(make_phantom_dataset(tmp_path / "c", n_cases=1, seed=4, shape=SMALL))
    np.testing.assert_array_equal(again[0][0], three[0][0])
    np.testing.assert_array_equal(again[0][1], three[0][1])
    assert not np.array_equal(other[0][1], three[0][1])


def test_bad_input_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        make_phantom_dataset(tmp_path / "x", shape=(64, 64))
    with pytest.raises(ValueError, match="n_cases"):
        make_phantom_dataset(tmp_path / "x", n_cases=0)
    with pytest.raises(ValueError, match="spacing"):
        make_phantom_dataset(tmp_path / "x", spacing=(1.0, 0.0, 1.0))
    assert not (tmp_path / "x").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "old.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        make_phantom_dataset(occupied, n_cases=1, shape=SMALL)
    assert [p.name for p in occupied.iterdir()] == ["old.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (make_phantom_dataset(empty, n_cases=1, shape=SMALL) / "dataset.json").is_file()
