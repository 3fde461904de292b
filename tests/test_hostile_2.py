"""Hostile and careless input, second round (issue #34, docs/bad-inputs.md): each test failed on the code as it
was. Data loss first, then results accepted silently, tracebacks, and a newcomer's stalls."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import test_hostile
import torch
from test_hostile import adapt, error, save_like

from arenaseg.cli import main
from arenaseg.data.preprocess import explain_transform_error

# test_hostile's cohort, its private copy, the tiny model and a finished run, shared as fixtures
cohort, data, model, finished_run, run = (
    test_hostile.cohort,
    test_hostile.data,
    test_hostile.model,
    test_hostile.finished_run,
    test_hostile.run,
)


def predict(run: Path, src: Path, dst: Path, *extra: str) -> int:
    return main(["predict", "--run", str(run), "--input", str(src), "--output", str(dst), *extra])


def image_of(data: Path, case: str = "phantom_0001") -> Path:
    return data / "imagesTr" / f"{case}_0000.nii.gz"


def edit_meta(data: Path, edit) -> None:
    meta = json.loads((data / "dataset.json").read_text())
    edit(meta)
    (data / "dataset.json").write_text(json.dumps(meta))


# Data loss


def test_predict_replaces_only_masks_it_wrote(run, data, tmp_path, capsys):
    labels = {p.name: p.read_bytes() for p in (data / "labelsTr").iterdir()}
    assert predict(run, data / "imagesTr", data / "labelsTr") == 2
    assert "is not a mask written by arenaseg predict; not overwriting it" in error(capsys)
    assert {p.name: p.read_bytes() for p in (data / "labelsTr").iterdir()} == labels
    notes = tmp_path / "notes_user.nii.gz"
    notes.write_text("mine")
    assert predict(run, image_of(data), notes) == 2
    assert "not overwriting it" in error(capsys) and notes.read_text() == "mine"
    assert predict(run, image_of(data), tmp_path / "mask_noext") == 2
    assert "must end in .nii.gz" in error(capsys)
    mask = tmp_path / "mask.nii.gz"
    assert predict(run, image_of(data), mask) == 0 and predict(run, image_of(data), mask) == 0  # its own: fine
    assert f"predict: 1 mask of liver (run {run}) in {tmp_path}" in capsys.readouterr().out


def test_adapt_keeps_the_users_own_files_in_out(cohort, model, tmp_path, capsys):
    out = tmp_path / "myproj"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": 1}')
    assert adapt(cohort, out, model) == 2
    assert f"{out / 'metrics.json'} exists and is not a file of an arenaseg run" in error(capsys)
    assert (out / "metrics.json").read_text() == '{"mine": 1}' and [p.name for p in out.iterdir()] == ["metrics.json"]
    assert adapt(cohort, cohort / "labelsTr", model) == 2
    assert "a folder this command reads from" in error(capsys)


def test_two_inputs_for_one_output_name_are_refused(run, data, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(image_of(data), folder / "scan_0000.nii.gz")
    shutil.copy(image_of(data), folder / "scan.nii.gz")
    assert predict(run, folder, tmp_path / "out") == 2
    err = error(capsys)
    assert "scan.nii.gz and " in err and "scan_0000.nii.gz would both be written" in err
    assert not (tmp_path / "out").exists()


# Results accepted silently: the geometry of every image read


def _no_orientation(header):
    header.set_qform(None, code=0)
    header.set_sform(None, code=0)


def _pixdim_zero(header):
    header["pixdim"][1] = 0.0


def _sheared(header):
    affine = header.get_best_affine()
    affine[0, 1] = 1.5
    header.set_sform(affine, code=2)


def _spacing_1000mm(header):
    header.set_sform(np.diag([1000.0, 1000.0, 1000.0, 1.0]), code=2)
    header.set_zooms((1000.0, 1000.0, 1000.0))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_no_orientation, "qform and sform codes are 0"),
        (_pixdim_zero, "its pixdim [1.0, 3.0, 3.0] mm disagrees"),  # nibabel reads 0 as 1
        (_sheared, "sheared"),
        (_spacing_1000mm, "outside 0.01-50.0 mm"),
    ],
)
def test_predict_refuses_an_image_whose_geometry_is_unknown_or_damaged(run, data, tmp_path, damage, message, capsys):
    img = nib.load(str(image_of(data)))
    header = img.header.copy()
    damage(header)
    bad = tmp_path / "bad_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header), str(bad))
    assert predict(run, bad, tmp_path / "o.nii.gz") == 2
    err = error(capsys)
    assert f"{bad}: " in err and message in err and not (tmp_path / "o.nii.gz").exists()


def test_a_bit_flipped_inside_the_gzip_stream_is_found(run, data, tmp_path, capsys):
    raw = bytearray(image_of(data).read_bytes())
    raw[len(raw) // 2] ^= 0x10
    bad = tmp_path / "flip_0000.nii.gz"
    bad.write_bytes(bytes(raw))
    assert predict(run, bad, tmp_path / "o.nii.gz") == 2
    assert "cannot read its voxels" in error(capsys) and not (tmp_path / "o.nii.gz").exists()


# Results accepted silently: labels and dataset.json


def _damage_labels(data: Path, value: float) -> None:
    for label in (data / "labelsTr").iterdir():
        img = nib.load(str(label))
        voxels = np.asarray(img.dataobj).astype(np.float32)
        voxels[voxels == 5] = value  # the liver
        save_like(label, voxels, img.affine)


@pytest.mark.parametrize("value", [np.nan, 5.5, 0.5])
def test_labels_that_are_not_integer_classes_are_refused(data, model, tmp_path, value, capsys):
    _damage_labels(data, value)
    assert adapt(data, tmp_path / "run", model) == 2
    err = error(capsys)
    assert "labelsTr" in err and "a label map holds integer class values" in err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["labels"].update(liver=5.7), "'liver' is 5.7"),
        (lambda m: m.update(labels={"background": False, "liver": True}), "'background' is false"),
        (lambda m: m.update(channel_names={"0": "CT", "1": "PET"}), "take one channel"),
        (lambda m: m["cases"].append({"labels_present": [5]}), '"cases" must be a list'),
        (lambda m: m.update(cases=5), '"cases" must be a list'),
        (lambda m: m["cases"][0].update(labels_present=[[5]]), '"labels_present" must be a list'),
    ],
)
def test_a_malformed_dataset_json_is_named(data, model, tmp_path, edit, message, capsys):
    edit_meta(data, edit)
    assert adapt(data, tmp_path / "run", model) == 2
    err = error(capsys)
    assert "dataset.json" in err and message in err


def test_a_duplicate_key_in_dataset_json_is_named(data, model, tmp_path, capsys):
    text = (data / "dataset.json").read_text().replace('"liver": 5', '"liver": 5, "liver": 7')
    (data / "dataset.json").write_text(text)
    assert adapt(data, tmp_path / "run", model) == 2
    assert 'the key "liver" appears twice' in error(capsys)


def test_files_the_dataset_would_drop_are_named(data, model, tmp_path, capsys):
    image = image_of(data, "phantom_0002")
    image.with_name("phantom_0002_0000.nii").write_bytes(gzip.decompress(image.read_bytes()))
    image.unlink()
    assert adapt(data, tmp_path / "run", model) == 2
    assert "phantom_0002_0000.nii is not a first channel of file ending .nii.gz" in error(capsys)
    shutil.copy(image_of(data), image_of(data, "phantom_0002").with_name("phantom_0002_0001.nii.gz"))
    (data / "imagesTr" / "phantom_0002_0000.nii").unlink()
    assert adapt(data, tmp_path / "run", model) == 2
    assert "phantom_0002_0001.nii.gz is not a first channel" in error(capsys)
    (data / "imagesTr" / "phantom_0002_0001.nii.gz").unlink()
    label = data / "labelsTr" / "phantom_0003.nii.gz"
    label.unlink()
    label.symlink_to(label.name)  # a self-loop
    assert adapt(data, tmp_path / "run", model) == 2
    assert "symlink loop" in error(capsys)


def test_labels_present_missing_a_value_the_voxels_hold(data, model, tmp_path, capsys):
    edit_meta(data, lambda m: [c.update(labels_present=[]) for c in m["cases"]])
    assert adapt(data, tmp_path / "run", model) == 0  # the voxels decide


def test_repeated_or_all_test_cases(cohort, model, tmp_path, capsys):
    assert adapt(cohort, tmp_path / "run", model, "--test-cases", "phantom_0001,phantom_0001") == 2
    assert "--test-cases lists phantom_0001 more than once" in error(capsys)
    every = ",".join(f"phantom_000{i}" for i in range(1, 5))
    assert adapt(cohort, tmp_path / "run", model, "--test-cases", every) == 2
    err = error(capsys)
    assert "no labelled case" in err and "--test-cases takes 4 of its 4 cases" in err


# Results accepted silently: predict's inputs and the run's files


def test_predict_folder_refuses_what_is_not_a_one_channel_scan(run, data, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(image_of(data), folder / "a_0000.nii.gz")
    shutil.copy(image_of(data), folder / "a_0001.nii.gz")
    assert predict(run, folder, tmp_path / "out") == 2
    assert "a_0001.nii.gz is a channel other than _0000" in error(capsys)
    (folder / "a_0001.nii.gz").unlink()
    (folder / "zz_0000.nii.gz").mkdir()
    assert predict(run, folder, tmp_path / "out") == 2
    assert "zz_0000.nii.gz is a folder" in error(capsys)
    (folder / "zz_0000.nii.gz").rmdir()
    (folder / "loop_0000.nii.gz").symlink_to("loop_0000.nii.gz")
    assert predict(run, folder, tmp_path / "out") == 2
    assert "symlink loop" in error(capsys) and not (tmp_path / "out").exists()


def test_predict_checks_the_runs_model_and_adapter_config(run, data, tmp_path, capsys):
    from arenaseg.models.foundation import save_foundation
    from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr

    torch.manual_seed(1)
    config = ModelConfig.tiny(out_channels=3, class_names=("background", "spleen", "kidney"))
    other = save_foundation(tmp_path / "other", build_swin_unetr(config), config)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "model": str(other)}))
    assert predict(run, image_of(data), tmp_path / "o.nii.gz") == 2
    assert "is not the base model this run adapted" in error(capsys)
    (run / "run.json").write_text(json.dumps(record))
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    adapter_config["options"]["rank"] = 4
    (run / "adapter_config.json").write_text(json.dumps(adapter_config))
    assert predict(run, image_of(data), tmp_path / "o.nii.gz") == 2
    assert "is not the adapter this run trained (rank 4, run.json 16)" in error(capsys)


@pytest.mark.parametrize("sha", ["recorded", "updated"])
def test_a_truncated_adapter_is_named(run, data, tmp_path, sha, capsys):
    weights = run / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if sha == "updated":
        from arenaseg.data.preprocess import file_digest

        record = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**record, "adapter_sha256": file_digest(weights)}))
    assert predict(run, image_of(data), tmp_path / "o.nii.gz") == 2
    assert f"{weights}: not a readable safetensors file (truncated or damaged?)" in error(capsys)


def test_two_predicts_into_one_folder_at_once(run, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running folder predict holds
    try:
        assert predict(run, data / "imagesTr", out) == 2
    finally:
        os.close(fd)
    assert f"--output {out} is in use by another arenaseg process" in error(capsys)


def test_resume_after_a_support_label_changed_is_refused(cohort, model, tmp_path, capsys, monkeypatch):
    from arenaseg import pipeline

    data = Path(shutil.copytree(cohort, tmp_path / "ph"))
    real = pipeline.train_adapter

    def killed_after_the_first_checkpoint(adapted, sampler, settings, checkpoint, **kw):
        real(adapted, sampler, settings, checkpoint, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_adapter", killed_after_the_first_checkpoint)
    assert adapt(data, tmp_path / "run", model, "--shots", "4") == 130
    monkeypatch.setattr(pipeline, "train_adapter", real)
    label = data / "labelsTr" / "phantom_0002.nii.gz"
    img = nib.load(str(label))
    save_like(label, np.asarray(img.dataobj)[::-1].copy(), img.affine)
    capsys.readouterr()
    assert adapt(data, tmp_path / "run", model, "--shots", "4", "--resume") == 2
    assert f"(support_files.{label} is " in error(capsys)


# Results accepted silently: evaluate


def test_evaluate_binarises_prediction_and_reference_alike(data, tmp_path, capsys):
    labels = data / "labelsTr"
    out = tmp_path / "m.json"
    assert main(["evaluate", "--pred", str(labels), "--ref", str(labels), "--organ", "liver", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["mean_dice"] == 100.0  # was 86.9: --organ applied to the reference only
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["evaluate", "--pred", str(labels), "--ref", str(labels), "--out", str(out)]) == 2
    assert "pass --organ NAME" in error(capsys)
    assert main(["evaluate", "--pred", str(labels), "--ref", str(labels), "--organ", "liver"]) == 2
    assert "a folder this command reads from" in error(capsys) and not (labels / "metrics.json").exists()


def test_evaluate_reports_unmatched_references_and_the_runs_support_cases(finished_run, data, tmp_path, capsys):
    preds = tmp_path / "preds"
    preds.mkdir()
    for case in ("phantom_0001", "phantom_0002", "phantom_0004"):
        shutil.copy(data / "labelsTr" / f"{case}.nii.gz", preds / f"{case}.nii.gz")
    args = ["evaluate", "--pred", str(preds), "--ref", str(data / "labelsTr"), "--organ", "liver"]
    assert main([*args, "--run", str(finished_run)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((preds / "metrics.json").read_text())
    assert metrics["unmatched_references"] == ["phantom_0003.nii.gz"] and "had no prediction" in out
    support = set(json.loads((finished_run / "run.json").read_text())["support_cases"])
    assert set(metrics["support_cases"]) == support & {"phantom_0001", "phantom_0002", "phantom_0004"}
    assert not support & set(metrics["cases"]) and "not in the mean" in out


# Tracebacks before


def test_a_truncated_cache_entry_is_named_and_rebuilt(cohort, model, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert adapt(cohort, tmp_path / "run1", model, "--cache-dir", str(cache)) == 0
    for entry in cache.glob("*.pt"):
        entry.write_bytes(entry.read_bytes()[:100])
    capsys.readouterr()
    assert adapt(cohort, tmp_path / "run2", model, "--cache-dir", str(cache)) == 0
    assert "is damaged" in capsys.readouterr().err
    assert adapt(cohort, tmp_path / "run3", model, "--cache-dir", str(cache)) == 0
    assert "is damaged" not in capsys.readouterr().err


def test_a_patch_too_large_is_refused(cohort, model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        adapt(cohort, tmp_path / "run", model, "--patch", "4096")
    assert exit_.value.code == 2 and "--patch: must be a multiple of 32 from 64 to 512" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_running_out_of_memory_in_preprocessing_is_a_memory_error(data):
    err = RuntimeError("applying transform <monai.transforms.SpatialPadd object at 0x1>")
    err.__cause__ = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 274877906944")
    explained = explain_transform_error(err, [image_of(data)])
    assert isinstance(explained, MemoryError) and "SpatialPadd" in str(explained)


def test_an_unwritable_output_folder_is_found_before_the_work():
    from arenaseg.utils.outputs import check_writable

    with pytest.raises(PermissionError, match="not writable"):
        check_writable(Path("/proc"))


# A newcomer's stalls


def test_run_files_are_readable_like_the_masks(finished_run):
    assert {oct((finished_run / n).stat().st_mode & 0o777) for n in ("run.json", "adapter_config.json")} == {
        oct(0o666 & ~_umask())
    }


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
