"""Zero-shot predict (the class row adapt starts from), keeping the largest connected component, and the run's
evaluation scoring each prediction both ways in one pass."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import label as connected_components

from arenaseg import pipeline
from arenaseg.cli import main
from arenaseg.data.datasets import open_dataset
from arenaseg.evaluate.inference import largest_component
from arenaseg.models.registry import class_row, load_model
from arenaseg.models.swin_unetr import output_head

DEMO_CLASSES = "spleen, right_kidney, left_kidney, gallbladder, pancreas"


def test_zero_shot_head_is_the_class_log_odds_adapt_starts_from():
    model, preprocess = pipeline.zero_shot_model("phantom-demo", "Left kidney")  # names match up to case and order
    foundation = load_model("phantom-demo")
    row, background = class_row(foundation, "left_kidney")
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        full = foundation.model.eval()(x)
        binary = model.eval()(x)
    assert output_head(model).out_channels == 1
    assert torch.allclose(binary[:, 0], full[:, row] - full[:, background], atol=1e-4)
    assert preprocess.intensity == "ct" and preprocess.patch_size == (64, 64, 64)  # from the model's card


def test_zero_shot_predict_cli(phantoms, tmp_path, capsys):
    image = phantoms / "imagesTr" / "phantom_0001_0000.nii.gz"
    seg = tmp_path / "seg.nii.gz"
    base = ["predict", "--model", "phantom-demo", "--input", str(image), "--output", str(seg)]
    assert main([*base, "--organ", "left_kidney"]) == 0
    src, pred = nib.load(image), nib.load(seg)
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}

    capsys.readouterr()
    assert main([*base, "--organ", "liver"]) == 2
    err = capsys.readouterr().err
    assert "no class 'liver'" in err and DEMO_CLASSES in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--organ", "spleen", "--run", str(tmp_path)]) == 2
    assert "either --run" in capsys.readouterr().err
    assert main(base) == 2  # --model without --organ


def test_largest_component_option_keeps_one_piece(phantoms, tmp_path):
    image = phantoms / "imagesTr" / "phantom_0002_0000.nii.gz"
    raw, kept = tmp_path / "raw.nii.gz", tmp_path / "kept.nii.gz"
    base = ["predict", "--model", "phantom-demo", "--organ", "pancreas", "--input", str(image)]
    assert main([*base, "--output", str(raw), "--no-largest-component"]) == 0
    assert main([*base, "--output", str(kept), "--largest-component"]) == 0
    raw_mask, kept_mask = (np.asarray(nib.load(p).dataobj) for p in (raw, kept))
    assert connected_components(raw_mask, np.ones((3, 3, 3)))[1] > 1  # stray blobs in the raw prediction
    assert connected_components(kept_mask, np.ones((3, 3, 3)))[1] == 1
    assert np.array_equal(kept_mask, largest_component(raw_mask))
    assert np.all(kept_mask <= raw_mask)


def test_evaluation_scores_each_prediction_raw_and_largest_component(phantoms, monkeypatch):
    """A prediction = the true organ + a far blob: raw Dice/HD95/NSD pay for the blob, the LCC scores are perfect,
    and each case is predicted once."""
    data = open_dataset(phantoms)
    calls = []

    def fake_predict(model, image, settings, **options):
        cid = image.name.split("_0000")[0]
        calls.append(cid)
        pred, _ = pipeline.reference_mask(data, cid, "liver")
        pred = pred.astype(np.uint8)
        pred[-10:, -10:, :10] = 1  # a far corner blob, big enough to be more than 5 % of the surface (HD95)
        return pred

    monkeypatch.setattr(pipeline, "predict_volume", fake_predict)
    metrics = pipeline.evaluate_cases(None, data, "liver", ["phantom_0001", "phantom_0002"], None)
    assert calls == ["phantom_0001", "phantom_0002"]
    assert metrics["mean_dice_lcc"] == pytest.approx(100.0) and metrics["mean_dice"] < 100.0
    assert metrics["mean_hd95_lcc"] == pytest.approx(0.0) and metrics["mean_hd95"] > 0.0
    assert metrics["mean_nsd_lcc"] == pytest.approx(100.0) and metrics["mean_nsd"] < 100.0
