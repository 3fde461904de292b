"""Shipping an adapted run: a MONAI bundle that reproduces `predict --run` without arenaseg, the merged file that
`load_model` reads back (and adapt adapts again), several runs into one label map, and the refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import nibabel as nib
import numpy as np
import pytest
import torch

from arenaseg.cli import main
from arenaseg.deploy import export as export_module
from arenaseg.deploy.folder import EXPORT_FILE
from arenaseg.deploy.organs import LABELS_FILE, OrganStack
from arenaseg.models.registry import load_model
from arenaseg.pipeline import load_run

# On the CPU the two agree exactly: bundle and predict preprocess bit for bit alike, their logits differ by rounding
# only (merged weights, MONAI's attention: <= 1.5e-6, no voxel near enough to 0 to flip). The margin is for other
# kernels (a GPU's TF32 convolutions: a few voxels). Whole slices flipped by the nearest-neighbour inversion's exact
# ties (see bundle.inference_config) cost 0.15-0.65 % of the flipped scan per axis and fail it.
AGREEMENT = 0.999


def adapt(data, out, cache, organ, method, *extra, model="phantom-demo"):
    args = [
        "adapt", "--data", str(data), "--organ", organ, "--shots", "2", "--seed", "0", "--method", method,
        "--model", str(model), "--steps", "1", "--patches-per-step", "1", "--warmup", "1", "--rank", "4",
        "--cache-dir", str(cache), "--out", str(out), *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def runs(phantoms, tmp_path_factory):
    """Two quick runs of the shipped phantom model on organs it knows (so masks are real ones): ARENA on the spleen
    (with a held-out case, for the bundle's metrics), PEFT's LoRA on the right kidney (PEFT's own merge)."""
    root = tmp_path_factory.mktemp("runs")
    spleen = adapt(phantoms, root / "spleen", root / "cache", "spleen", "arena", "--test-cases", "phantom_0006")
    kidney = adapt(phantoms, root / "kidney", root / "cache", "right_kidney", "lora", "--test-cases", "none")
    return {"spleen": spleen, "kidney": kidney}


@pytest.fixture(scope="module")
def scans(phantoms, tmp_path_factory):
    """An input folder: a phantom as it is, and one on another grid (axis 0 flipped, 2.5 mm), so the bundle's
    orientation and resampling are undone as predict undoes them."""
    folder = tmp_path_factory.mktemp("scans")
    src = phantoms / "imagesTr" / "phantom_0005_0000.nii.gz"
    shutil.copy(src, folder / src.name)
    img = nib.load(src)
    data = np.asarray(img.dataobj)[::-1].copy()
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, 0] * (data.shape[0] - 1)
    affine[:3, 0] *= -1
    affine[:3, :3] *= 2.5 / 3.0
    nib.save(nib.Nifti1Image(data, affine), folder / "flipped_0000.nii.gz")
    return folder


def masks(folder) -> dict[str, nib.Nifti1Image]:
    return {p.name: nib.load(p) for p in sorted(folder.glob("*.nii.gz"))}


# Runs a `monai.bundle` command with no arenaseg on the import path: -I -S skip the site hook, and so the
# editable install's .pth file; only the venv's site-packages folder is added back.
ISOLATED = """
import importlib.util, runpy, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("arenaseg") is None, "arenaseg is importable"
from monai.bundle import verify_net_in_out
verify_net_in_out("network_def", meta_file="configs/metadata.json", config_file="configs/inference.json",
                  device="cpu", n=2)
sys.argv = ["monai.bundle", *sys.argv[2:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def test_bundle_reproduces_predict_without_arenaseg(runs, scans, tmp_path):
    bundle = tmp_path / "bundle"
    assert main(["export", "--run", str(runs["spleen"]), "--format", "monai-bundle", "--out", str(bundle)]) == 0
    for name in ("configs/inference.json", "configs/metadata.json", "models/model.pt", "docs/README.md"):
        assert (bundle / name).is_file(), name
    state = torch.load(bundle / "models/model.pt", weights_only=True)  # a plain tensor dict, no code
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())

    from monai.bundle import ConfigParser  # the config checks that need no schema download

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    parser.read_meta(str(bundle / "configs/metadata.json"))
    parser.update({"bundle_root": str(bundle), "dataset_dir": str(scans)})
    assert len(parser.get_parsed_content("datalist")) == 2
    parser.get_parsed_content("preprocessing")
    first = parser.get_parsed_content("postprocessing").transforms[0]  # the inversion runs on the CPU, as predict's
    assert type(first).__name__ == "ToDeviced" and str(first.converter.device) == "cpu"
    net = parser.get_parsed_content("network_def")
    assert type(net).__module__.startswith("monai.")
    net.load_state_dict(state, strict=True)
    meta = parser.get_parsed_content("_meta_")
    for key in ("version", "monai_version", "pytorch_version", "task", "network_data_format", "eval_metrics"):
        assert key in meta, key
    readme = (bundle / "docs/README.md").read_text()
    record = json.loads((runs["spleen"] / "run.json").read_text())
    assert all(case in readme for case in record["support_cases"]) and "Learned ranks" in readme

    script = tmp_path / "isolated.py"
    script.write_text(ISOLATED)
    bundle_out = tmp_path / "bundle_out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-I", "-S", str(script), sysconfig.get_paths()["purelib"], "run", "--config_file",
           "configs/inference.json", "--dataset_dir", str(scans), "--output_dir", str(bundle_out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    predicted = tmp_path / "predicted"
    assert main(["predict", "--run", str(runs["spleen"]), "--input", str(scans), "--output", str(predicted)]) == 0
    ours, theirs = masks(predicted), masks(bundle_out)
    assert set(ours) == set(theirs) == {"phantom_0005.nii.gz", "flipped.nii.gz"}
    for name, mask in ours.items():
        a, b = np.asarray(mask.dataobj), np.asarray(theirs[name].dataobj)
        assert a.shape == b.shape and np.allclose(mask.affine, theirs[name].affine, atol=1e-4), name
        assert a.sum() > 0, name  # a real mask, not two empty ones
        differ = a != b
        planes = [int(np.count_nonzero(differ.any(axis=tuple(i for i in range(3) if i != ax)))) for ax in range(3)]
        assert 1 - differ.mean() >= AGREEMENT, (name, f"{1 - differ.mean():.5f} agree", f"{differ.sum()} voxels differ",
                                                f"on {planes} slices of axes 0, 1, 2")  # fmt: skip


def test_merged_export_round_trips_through_load_model(runs, phantoms, tmp_path, capsys):
    out = tmp_path / "merged"
    args = ["export", "--run", str(runs["kidney"]), "--format", "merged", "--out", str(out)]
    assert main(args) == 0
    loaded = load_model(str(out / "model.safetensors"))
    assert loaded.head_kind == "sigmoid" and loaded.class_rows == {"right_kidney": 0}
    card = json.loads((out / "model.json").read_text())
    assert card["preprocessing"] == json.loads((runs["kidney"] / "run.json").read_text())["settings"]["preprocess"]
    adapted, _ = load_run(runs["kidney"])
    x = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = adapted.model.eval()(x), loaded.model.eval()(x)
    assert torch.allclose(got, expected, atol=1e-3 * (1 + float(expected.abs().max())))

    # an adapted model adapts again: its one class is a base organ
    again = tmp_path / "again"
    adapt(
        phantoms,
        again,
        tmp_path / "cache",
        "right_kidney",
        "arena",
        "--test-cases",
        "none",
        model=out / "model.safetensors",
    )
    assert json.loads((again / "run.json").read_text())["track"] == "base"

    # a second export replaces the first only with --overwrite, and only once complete
    capsys.readouterr()
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert (out / EXPORT_FILE).is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def one_line_error(capsys, args, fragment):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err


def test_export_refuses_bad_input_and_leaves_nothing(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(b"")
    one_line_error(capsys, ["export", "--run", str(unfinished), "--out", str(out)], "unfinished run")
    one_line_error(capsys, ["export", "--run", str(tmp_path / "nope"), "--out", str(out)], "not a folder")
    assert not out.exists()

    spleen = str(runs["spleen"])
    one_line_error(capsys, ["export", "--run", spleen, "--out", spleen, "--overwrite"], "is or contains the run")
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    one_line_error(capsys, ["export", "--run", spleen, "--out", str(out)], "not empty")
    one_line_error(capsys, ["export", "--run", spleen, "--out", str(out), "--overwrite"], "holds no earlier export")
    assert (out / "mine.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1

    def dies(folder, *args):
        (folder / "models").mkdir()
        (folder / "models" / "model.pt").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "write_bundle", dies)
    fresh = tmp_path / "fresh"
    assert main(["export", "--run", spleen, "--out", str(fresh)]) == 130
    assert not fresh.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".fresh")]

    # a model with the legacy PatchMerging order cannot run in MONAI's SwinUNETR: refused before any work (the
    # check reads run.json's model only, so a copy of the run that names a legacy model stands for such a run)
    from arenaseg.models.foundation import save_foundation
    from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr

    config = ModelConfig.tiny(out_channels=3, class_names=("background", "liver", "spleen"), legacy_merging=True)
    legacy = save_foundation(tmp_path / "legacy", build_swin_unetr(config), config)
    run = tmp_path / "legacy_run"
    shutil.copytree(runs["spleen"], run)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "model": str(legacy)}))
    one_line_error(capsys, ["export", "--run", str(run), "--out", str(fresh)], "legacy PatchMerging")
    assert not fresh.exists()


def test_several_runs_write_one_label_map(runs, scans, tmp_path, capsys):
    spleen, kidney = str(runs["spleen"]), str(runs["kidney"])
    out = tmp_path / "organs"
    base = ["predict", "--input", str(scans), "--no-largest-component"]
    assert main([*base, "--run", spleen, "--run", kidney, "--output", str(out)]) == 0
    labels = json.loads((out / LABELS_FILE).read_text())
    assert labels["labels"] == {"background": 0, "spleen": 1, "right_kidney": 2}
    single = {}
    for organ, run in (("spleen", spleen), ("right_kidney", kidney)):
        assert main([*base, "--run", run, "--output", str(tmp_path / organ)]) == 0
        single[organ] = masks(tmp_path / organ)
    for name, mask in masks(out).items():
        assert mask.shape == nib.load(scans / name.replace(".nii", "_0000.nii")).shape
        volume = np.asarray(mask.dataobj)
        assert set(np.unique(volume)) <= {0, 1, 2}
        s, k = (np.asarray(single[o][name].dataobj) > 0 for o in ("spleen", "right_kidney"))
        assert np.array_equal(volume > 0, s | k)  # every voxel one organ claims is labelled, no other
        assert np.all(volume[s & ~k] == 1) and np.all(volume[k & ~s] == 2)

    one_line_error(
        capsys, [*base, "--run", spleen, "--run", spleen, "--output", str(tmp_path / "twice")], "both segment"
    )
    assert not (tmp_path / "twice").exists()

    other = tmp_path / "other_spacing"
    shutil.copytree(runs["spleen"], other)
    record = json.loads((other / "run.json").read_text())
    record["organ"], record["settings"]["preprocess"]["spacing"] = "liver", [2.0, 2.0, 2.0]
    (other / "run.json").write_text(json.dumps(record))
    args = [*base, "--run", kidney, "--run", str(other), "--output", str(tmp_path / "mixed")]
    one_line_error(capsys, args, "different preprocessing (spacing")
    assert not (tmp_path / "mixed").exists()


def test_the_higher_probability_wins_where_organs_overlap():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor(logits).view(1, 1, -1)

        def forward(self, x):
            return self.logits

    stack = OrganStack([Fixed([1.0, -1.0, 3.0, -0.5]), Fixed([2.0, -2.0, -1.0, -0.1])])
    assert stack(None).argmax(1).flatten().tolist() == [2, 0, 1, 0]
