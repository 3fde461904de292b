"""Hostile and careless input (docs/bad-inputs.md): each gets one readable message and a non-zero exit, loses no
data and leaves no partial artifact; our own bugs keep their traceback."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from arenaseg import pipeline
from arenaseg.cli import main
from arenaseg.data.phantom import make_phantom_dataset
from arenaseg.utils.errors import UserError

FAST = ["--steps", "1", "--patches-per-step", "1", "--warmup", "0", "--threads", "1", "--test-cases", "none"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Four 32^3 phantoms, never modified by a test (copy them first)."""
    return make_phantom_dataset(tmp_path_factory.mktemp("cohort") / "ph", n_cases=4, seed=0, shape=(32, 32, 32))


@pytest.fixture()
def data(cohort, tmp_path) -> Path:
    """A private copy of the cohort that a test may damage."""
    return Path(shutil.copytree(cohort, tmp_path / "ph"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from arenaseg.models.foundation import save_foundation
    from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr

    torch.manual_seed(0)
    config = ModelConfig.tiny(out_channels=3, class_names=("background", "spleen", "kidney"))
    return str(save_foundation(tmp_path_factory.mktemp("model") / "tiny", build_swin_unetr(config), config))


def adapt(data: Path, out: Path, model: str, *extra: str, organ: str = "liver") -> int:
    args = ["adapt", "--data", str(data), "--organ", organ, "--shots", "2", "--model", model, "--out", str(out)]
    return main([*args, *FAST, *extra])


@pytest.fixture(scope="module")
def finished_run(cohort, model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert adapt(cohort, out, model) == 0
    return out


@pytest.fixture()
def run(finished_run, tmp_path) -> Path:
    """A private copy of the finished run."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def error(capsys) -> str:
    """The error message, which must be one line (the last one of stderr) and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("arenaseg "), err
    return err


def save_like(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


# Data loss


def test_predict_refuses_to_write_over_its_input(run, data, capsys):
    image = data / "imagesTr" / "phantom_0001_0000.nii.gz"
    before = image.read_bytes()
    assert main(["predict", "--run", str(run), "--input", str(image), "--output", str(image)]) == 2
    assert "one of the inputs" in error(capsys)
    folder = data / "imagesTr"
    assert main(["predict", "--run", str(run), "--input", str(folder), "--output", str(folder)]) == 2
    assert "other than the input folder" in error(capsys)
    assert image.read_bytes() == before


def test_predict_refuses_an_existing_folder_as_output_before_inference(run, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_run", lambda *a: pytest.fail("inference ran"))
    image = data / "imagesTr" / "phantom_0001_0000.nii.gz"
    assert main(["predict", "--run", str(run), "--input", str(image), "--output", str(tmp_path)]) == 2
    assert "existing folder" in error(capsys)


def test_evaluate_never_writes_over_the_reference_or_another_file(data, tmp_path, capsys):
    ref = data / "labelsTr" / "phantom_0001.nii.gz"
    before = ref.read_bytes()
    args = ["evaluate", "--pred", str(ref), "--ref", str(ref), "--organ", "liver"]
    assert main([*args, "--out", str(ref)]) == 2
    assert "is an input or a NIfTI file" in error(capsys)
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert main([*args, "--out", str(other)]) == 2
    assert "not a metrics file" in error(capsys)
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert "is a folder" in error(capsys)
    assert ref.read_bytes() == before and other.read_text() == "mine"
    metrics = tmp_path / "metrics.json"
    assert main([*args, "--out", str(metrics)]) == 0 and main([*args, "--out", str(metrics)]) == 0  # its own: fine
    assert json.loads(metrics.read_text())["mean_dice"] == 100.0


def test_overwrite_keeps_the_finished_run_when_the_new_one_fails(run, cohort, tmp_path, capsys, monkeypatch):
    before = files(run)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert adapt(cohort, run, str(empty), "--overwrite") == 2
    assert "empty.pt" in error(capsys)
    assert files(run) == before

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_adapter", killed)  # Ctrl-C in the middle of the new run's training
    assert adapt(cohort, run, files_model(run), "--overwrite") == 130
    assert files(run) == before and [p.name for p in run.iterdir()] == list(before)


def files_model(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["model"]


def test_overwrite_replaces_the_run_when_it_succeeds(run, cohort, capsys):
    before = json.loads((run / "run.json").read_text())
    assert adapt(cohort, run, files_model(run), "--overwrite", "--seed", "1") == 0
    after = json.loads((run / "run.json").read_text())
    assert (before["seed"], after["seed"]) == (0, 1)
    assert sorted(p.name for p in run.iterdir()) == ["adapter.safetensors", "adapter_config.json", "run.json"]


def test_a_second_adapt_into_a_folder_in_use_fails_naming_it(cohort, model, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running adapt holds
    try:
        assert adapt(cohort, out, model) == 2
    finally:
        os.close(fd)
    assert f"{out} is in use by another arenaseg process" in error(capsys)
    assert list(out.iterdir()) == []


def test_folder_predict_reports_what_it_wrote_and_names_the_failing_file(run, data, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(data / "imagesTr" / "phantom_0001_0000.nii.gz", inputs / "a_0000.nii.gz")
    img = nib.load(str(inputs / "a_0000.nii.gz"))
    bad = np.asarray(img.dataobj).astype(np.float32)
    bad[3, 3, 3] = np.nan
    save_like(inputs / "b_0000.nii.gz", bad, img.affine)
    assert main(["predict", "--run", str(run), "--input", str(inputs), "--output", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert f"wrote {tmp_path / 'out' / 'a.nii.gz'}" in captured.out
    assert f"{inputs / 'b_0000.nii.gz'}: volume contains NaN" in captured.err


# Wrong results accepted silently


def test_a_label_whose_affine_differs_from_its_image_is_refused(data, model, tmp_path, capsys):
    for case in ("phantom_0001", "phantom_0002", "phantom_0003", "phantom_0004"):
        label = data / "labelsTr" / f"{case}.nii.gz"
        img = nib.load(str(label))
        moved = img.affine @ np.diag([-1.0, 1, 1, 1])
        moved[0, 3] += 100.0
        save_like(label, np.asarray(img.dataobj), moved)
    assert adapt(data, tmp_path / "run", model) == 2
    assert "affine" in error(capsys)


def test_evaluate_refuses_a_prediction_that_lies_elsewhere(data, tmp_path, capsys):
    ref = data / "labelsTr" / "phantom_0001.nii.gz"
    img = nib.load(str(ref))
    moved = img.affine.copy()
    moved[0, 3] += 100.0
    pred = save_like(tmp_path / "pred.nii.gz", np.asarray(img.dataobj), moved)
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "m.json")]) == 2
    assert "affine" in error(capsys) and not (tmp_path / "m.json").exists()


def test_label_values_missing_from_dataset_json_are_found_in_the_voxels(data, model, tmp_path, capsys):
    for label in (data / "labelsTr").iterdir():
        img = nib.load(str(label))
        voxels = np.asarray(img.dataobj).copy()
        voxels[voxels == 5] = 99  # the liver, relabelled; dataset.json still says liver = 5
        save_like(label, voxels, img.affine)
    assert adapt(data, tmp_path / "run", model) == 2
    assert "values [99]" in error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_resume_under_other_settings_names_the_first_difference(cohort, model, tmp_path, capsys, monkeypatch):
    """The checkpoint holds the run's identity: a resume under another lr or organ is refused, the checkpoint kept."""
    out = tmp_path / "run"
    real = pipeline.train_adapter

    def killed_after_the_first_checkpoint(adapted, sampler, settings, checkpoint, **kw):
        real(adapted, sampler, settings, checkpoint, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_adapter", killed_after_the_first_checkpoint)
    assert adapt(cohort, out, model) == 130
    assert (out / pipeline.CHECKPOINT_FILE).is_file()
    monkeypatch.setattr(pipeline, "train_adapter", real)
    capsys.readouterr()
    assert adapt(cohort, out, model, "--resume", "--lr", "0.002") == 2
    assert "started with other settings (train.lr is 0.001 there, 0.002 now)" in error(capsys)
    assert adapt(cohort, out, model, "--resume", organ="spleen") == 2
    assert "(organ is 'liver' there, 'spleen' now)" in error(capsys)
    assert (out / pipeline.CHECKPOINT_FILE).is_file()
    assert adapt(cohort, out, model, "--resume") == 0


@pytest.mark.parametrize(
    "option", [["--lr", "inf"], ["--lr", "nan"], ["--spacing", "inf"], ["--spacing", "nan"], ["--lam", "nan"]]
)
def test_non_finite_numbers_are_refused(cohort, model, tmp_path, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        adapt(cohort, tmp_path / "run", model, *option)
    assert exit_.value.code == 2
    assert f"argument {option[0]}: must be" in (err := capsys.readouterr().err) and "finite" in err
    assert not (tmp_path / "run").exists()


def test_train_settings_refuse_non_finite_numbers():
    from arenaseg.train.loop import TrainSettings

    for field in ("lr", "head_lr_scale", "weight_decay"):
        with pytest.raises(UserError, match=field):
            TrainSettings(**{field: float("inf")})


def test_predict_refuses_an_adapter_that_is_not_the_runs_own(run, data, tmp_path, capsys):
    weights = run / "adapter.safetensors"
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(weights))
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in tensors.items()}, str(weights))  # another run's adapter, same shapes
    image = data / "imagesTr" / "phantom_0001_0000.nii.gz"
    assert main(["predict", "--run", str(run), "--input", str(image), "--output", str(tmp_path / "o.nii.gz")]) == 2
    assert "is not the adapter this run trained" in error(capsys)


def test_predict_refuses_an_image_of_air(run, data, tmp_path, capsys):
    img = nib.load(str(data / "imagesTr" / "phantom_0001_0000.nii.gz"))
    air = save_like(tmp_path / "air_0000.nii.gz", np.full(img.shape, -1000, np.int16), img.affine)
    assert main(["predict", "--run", str(run), "--input", str(air), "--output", str(tmp_path / "o.nii.gz")]) == 2
    assert "nothing to segment" in error(capsys) and not (tmp_path / "o.nii.gz").exists()


# Resource exhaustion


def test_a_rank_no_layer_can_use_is_refused_before_allocation(cohort, model, tmp_path, capsys):
    assert adapt(cohort, tmp_path / "run", model, "--rank", "10000") == 2
    assert "--rank 10000 is more than any adapted layer can use" in error(capsys)
    assert not (tmp_path / "run").exists()


# Tracebacks before: each is now one message and exit 2


def _labels_as_list(data: Path) -> None:
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"] = list(meta["labels"])
    (data / "dataset.json").write_text(json.dumps(meta))


def test_dataset_json_labels_as_a_list(data, model, tmp_path, capsys):
    _labels_as_list(data)
    assert adapt(data, tmp_path / "run", model) == 2
    assert '"labels" must be an object' in error(capsys)


def test_duplicate_label_values_are_named(data, model, tmp_path, capsys):
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"]["spleen"] = meta["labels"]["liver"]
    (data / "dataset.json").write_text(json.dumps(meta))
    assert adapt(data, tmp_path / "run", model) == 2
    assert "share the value 5" in error(capsys)


def test_negative_threads(cohort, model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        adapt(cohort, tmp_path / "run", model, "--threads", "-1")
    assert exit_.value.code == 2


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_damaged_safetensors_model(cohort, model, tmp_path, damage, capsys):
    bad = tmp_path / "bad.safetensors"
    content = Path(model).read_bytes()
    bad.write_bytes(os.urandom(4000) if damage == "random" else content[: len(content) // 3])
    assert adapt(cohort, tmp_path / "run", str(bad)) == 2
    assert f"{bad}:" in error(capsys)


@pytest.mark.parametrize("content", ["random", "pickle"])
def test_damaged_or_unsafe_resume_checkpoint(cohort, model, tmp_path, content, capsys):
    out = tmp_path / "run"
    out.mkdir()
    if content == "random":
        (out / pipeline.CHECKPOINT_FILE).write_bytes(os.urandom(3000))
    else:
        torch.save({"settings": subprocess.Popen}, out / pipeline.CHECKPOINT_FILE)  # a global: could run code
    assert adapt(cohort, out, model, "--resume") == 2
    err = error(capsys)
    assert ("could run code" in err) == (content == "pickle")
    assert ("truncated or corrupt" in err) == (content == "random")


def test_random_bytes_pt_is_called_damaged_not_dangerous(cohort, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(4000))
    assert adapt(cohort, tmp_path / "run", str(bad)) == 2
    err = error(capsys)
    assert "truncated or corrupt" in err and "could run code" not in err


@pytest.mark.parametrize("damage", ["no model", "not json"])
def test_damaged_run_json(run, data, tmp_path, damage, capsys):
    record = json.loads((run / "run.json").read_text())
    del record["model"]
    (run / "run.json").write_text(json.dumps(record) if damage == "no model" else "{oops")
    image = data / "imagesTr" / "phantom_0001_0000.nii.gz"
    assert main(["predict", "--run", str(run), "--input", str(image), "--output", str(tmp_path / "o.nii.gz")]) == 2
    assert f"{run / 'run.json'}" in error(capsys)


def test_truncated_prediction_and_labels_as_a_list_in_evaluate(data, tmp_path, capsys):
    ref = data / "labelsTr" / "phantom_0001.nii.gz"
    pred = tmp_path / "pred.nii.gz"
    pred.write_bytes(ref.read_bytes()[: ref.stat().st_size // 2])
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref)]) == 2
    assert f"{pred}" in error(capsys)
    _labels_as_list(data)
    assert main(["evaluate", "--pred", str(ref), "--ref", str(ref), "--organ", "liver"]) == 2
    assert '"labels" must be an object' in error(capsys)


def test_report_on_a_results_csv_missing_columns(tmp_path, capsys):
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    assert main(["report", str(tmp_path)]) == 2
    assert "lacks the columns" in error(capsys)


# Unreadable messages: each names the file and the problem


def _truncated(data: Path) -> Path:
    image = data / "imagesTr" / "phantom_0001_0000.nii.gz"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return image


def _zero_size(data: Path) -> Path:
    image = data / "imagesTr" / "phantom_0001_0000.nii.gz"
    return save_like(image, np.zeros((32, 0, 32), np.int16), nib.load(str(image)).affine)


def _huge_header(data: Path) -> Path:
    image = data / "imagesTr" / "phantom_0001_0000.nii"
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.int16)
    image.write_bytes(header.binaryblock + b"\0" * 1000)
    return image


def _nan_voxels(data: Path) -> Path:
    image = data / "imagesTr" / "phantom_0001_0000.nii.gz"
    img = nib.load(str(image))
    voxels = np.asarray(img.dataobj).astype(np.float32)
    voxels[1, 1, 1] = np.nan
    return save_like(image, voxels, img.affine)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncated, "cannot read its voxels"),
        (_zero_size, "zero-size dimension"),
        (_huge_header, "the header is damaged"),
        (_nan_voxels, "NaN or infinite voxels"),
    ],
)
def test_damaged_images_are_named_in_predict(run, data, tmp_path, damage, message, capsys):
    image = damage(data)
    assert main(["predict", "--run", str(run), "--input", str(image), "--output", str(tmp_path / "o.nii.gz")]) == 2
    err = error(capsys)
    assert f"{image}: " in err and message in err and "applying transform" not in err


def test_a_truncated_label_is_named_in_adapt(data, model, tmp_path, capsys):
    for label in (data / "labelsTr").iterdir():
        label.write_bytes(label.read_bytes()[: label.stat().st_size // 2])
    assert adapt(data, tmp_path / "run", model, "--cache-dir", str(tmp_path / "cache")) == 2
    err = error(capsys)
    assert "labelsTr" in err and "cannot read its voxels" in err and "applying transform" not in err


# Promises kept partly


def test_failed_runs_leave_no_folder_they_created(cohort, tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    out = tmp_path / "new" / "run"
    assert adapt(cohort, out, str(empty)) == 2  # fails once the folder exists (the model loads after it)
    assert not (tmp_path / "new").exists()


def test_demo_with_zero_steps_writes_nothing(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "0"]) == 2
    assert not (tmp_path / "demo").exists()


def test_filesystem_root_is_refused_as_a_run_folder(cohort, tmp_path, capsys):
    empty = tmp_path / "empty.pt"  # should the check go, the run still fails before writing into /
    empty.write_bytes(b"")
    assert adapt(cohort, Path("/"), str(empty)) == 2
    assert "filesystem root" in error(capsys)


def test_sigterm_leaves_no_temporary_phantom_folder(tmp_path):
    out = tmp_path / "ph"
    code = "import sys; from arenaseg.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "phantoms", "--out", str(out), "--n-cases", "400", "--shape", "32,32,32"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = 120
    while deadline and not any(p.name.startswith(".ph.") for p in tmp_path.iterdir()):
        subprocess.run(["sleep", "0.5"])
        deadline -= 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert "interrupted" in proc.stderr.read()
    assert list(tmp_path.iterdir()) == []


# Part of the error contract: users' mistakes are one line, our bugs keep their traceback


def test_a_bug_keeps_its_traceback(cohort, model, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch inside our code")

    monkeypatch.setattr(pipeline, "train_adapter", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        adapt(cohort, tmp_path / "run", model)


def test_out_of_memory_names_the_options_that_lower_it(cohort, model, tmp_path, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(pipeline, "train_adapter", oom)
    assert adapt(cohort, tmp_path / "run", model) == 3
    err = error(capsys)
    assert "out of memory" in err and "--patch" in err and "--rank" in err and "--device cpu" in err


def test_bad_config_metadata_names_the_model_file(cohort, tmp_path, capsys):
    from safetensors.torch import save_file

    from arenaseg.models.foundation import CONFIG_KEY

    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad), metadata={CONFIG_KEY: '{"no_such_key": 1}'})
    assert adapt(cohort, tmp_path / "run", str(bad)) == 2
    assert f"{bad}: its model configuration" in error(capsys)


def test_a_diverged_run_is_an_error_not_a_finished_run(cohort, model, tmp_path, capsys):
    # --lr 1e9: the weights reach 1e10 at step 1 and NaN at step 2 while the Dice loss stays below 1
    assert adapt(cohort, tmp_path / "run", model, "--lr", "1e9", "--steps", "2") == 2
    assert "training diverged at step 2" in error(capsys)
    assert not (tmp_path / "run" / "run.json").exists() and not (tmp_path / "run" / "adapter.safetensors").exists()


def test_a_hand_edited_adapter_config_is_named(run, data, tmp_path, capsys):
    config = json.loads((run / "adapter_config.json").read_text())
    config["options"]["rank"] = -1
    (run / "adapter_config.json").write_text(json.dumps(config))
    image = data / "imagesTr" / "phantom_0001_0000.nii.gz"
    assert main(["predict", "--run", str(run), "--input", str(image), "--output", str(tmp_path / "o.nii.gz")]) == 2
    assert f"{run / 'adapter_config.json'}" in error(capsys)
