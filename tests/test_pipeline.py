"""The CLI contract end to end: adapt -> artifacts, predict -> NIfTI in the input's geometry, resume, bad input."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from arenaseg import pipeline
from arenaseg.adapters.config import ArenaConfig
from arenaseg.cli import main
from arenaseg.data.sampling import PatchSampler
from arenaseg.evaluate.inference import KEEP_LARGEST_COMPONENT


def adapt_args(data, model, out, *extra, organ="pancreas", shots="2", method="arena", steps="2"):
    return [
        "adapt", "--data", str(data), "--organ", organ, "--shots", shots, "--seed", "0", "--method", method,
        "--model", str(model), "--steps", steps, "--patches-per-step", "1", "--warmup", "1", "--out", str(out),
        *extra,
    ]  # fmt: skip


def test_adapt_on_btcv30_writes_the_whole_contract(shared_data, tiny_foundation, tmp_path):
    out = tmp_path / "run"
    args = adapt_args(shared_data / "btcv30", tiny_foundation, out, "--test-cases", "btcv_0036", "--rank", "4")
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    for key in ("method", "organ", "shots", "seed", "support_cases", "settings", "trainable_params",
                "seconds_per_step", "peak_mem_mb", "device", "git_commit", "ranks", "active_rank_total"):  # fmt: skip
        assert key in run, key
    assert run["method"] == "arena" and run["organ"] == "pancreas" and run["shots"] == 2
    options = run["settings"]["options"]
    assert options["lam"] == ArenaConfig().lam  # no --lam given: the library's default, recorded
    assert (
        options["freeze_tail"] == ArenaConfig().freeze_tail
        and options["total_steps"] == run["settings"]["train"]["steps"]
    )
    assert set(run["support_cases"]) <= {f"btcv_{i:04d}" for i in range(26, 36)}
    assert all(v["initial"] == 4 and 0 <= v["active"] <= 4 for v in run["ranks"].values())
    assert run["active_rank_total"] == sum(v["active"] for v in run["ranks"].values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["cases"]) == {"btcv_0036"} and 0.0 <= metrics["mean_dice"] <= 100.0
    assert metrics["mean_dice"] == run["mean_dice"]
    assert (out / "adapter.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "checkpoint.pt").exists()

    scored = predict_and_evaluate(out, shared_data / "btcv30", "btcv_0036", "pancreas", tmp_path)
    assert_same_numbers(scored, metrics["cases"]["btcv_0036"])


def predict_and_evaluate(run, data, case: str, organ: str, tmp_path) -> dict:
    """`arenaseg predict` on one nnU-Net case's image, then `arenaseg evaluate` against its label: the case's
    metrics as the CLI writes them. The prediction must be a binary NIfTI on the input's grid, with its affine."""
    image, ref = data / "imagesTr" / f"{case}_0000.nii.gz", data / "labelsTr" / f"{case}.nii.gz"
    seg = tmp_path / "seg.nii.gz"
    assert main(["predict", "--run", str(run), "--input", str(image), "--output", str(seg)]) == 0
    src, pred = nib.load(image), nib.load(seg)
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
    scores = tmp_path / "scores.json"
    assert main(["evaluate", "--pred", str(seg), "--ref", str(ref), "--organ", organ, "--out", str(scores)]) == 0
    return json.loads(scores.read_text())["cases"][case]


def assert_same_numbers(scored: dict, own: dict) -> None:
    """The CLI's scores of its prediction are the run's own scores of the same case. Both score the same mask: the
    run predicts with its trained model in memory, `predict` with the model rebuilt from the run's files (the same
    float32 tensors, inference code and thread count), and both score it on the reference grid with the same metric
    code. So the tolerance is for float arithmetic only: 1e-6 (Dice in %, HD95 and NSD in mm / %) is far below
    what one differing voxel moves Dice by (100 / organ voxels, >= 1e-3 for organs under 1e5 voxels). `predict`
    keeps the largest component by default (KEEP_LARGEST_COMPONENT), so its scores are the run's ``_lcc`` ones."""
    assert KEEP_LARGEST_COMPONENT
    assert scored.keys() and {f"{k}_lcc" for k in scored} <= own.keys()
    for key, value in scored.items():
        assert value == pytest.approx(own[f"{key}_lcc"], rel=1e-6, abs=1e-6), key


def test_predict_and_evaluate_reproduce_the_runs_own_metrics_on_phantoms(tmp_path):
    """The offline twin of the real-data contract test: a phantom cohort from `arenaseg phantoms`, the shipped
    phantom-demo model adapted for an organ it knows (so that the mask is a real one), predict + evaluate."""
    data, out = tmp_path / "phantoms", tmp_path / "run"
    assert main(["phantoms", "--out", str(data), "--n-cases", "4", "--shape", "64,64,64"]) == 0
    args = adapt_args(data, "phantom-demo", out, "--test-cases", "phantom_0004", "--rank", "4", organ="spleen")
    assert main(args) == 0
    own = json.loads((out / "metrics.json").read_text())["cases"]["phantom_0004"]
    assert 0 < own["dice"] < 100  # neither an empty nor a trivially perfect mask
    assert_same_numbers(predict_and_evaluate(out, data, "phantom_0004", "spleen", tmp_path), own)


def test_support_loss_is_measured_again_from_the_saved_adapter(phantoms, tiny_foundation, tmp_path):
    """run.json's support_loss is the shipped model's mean loss on the batches of the last training steps: measured
    again from the saved adapter and the recorded support cases (how runs recorded before the field get it), it is
    the same number, up to float arithmetic only. A Dice loss lies in [0, 1]."""
    from arenaseg.data.preprocess import PreprocessSettings, load_cases
    from arenaseg.train.loop import TrainSettings, support_loss

    out = tmp_path / "run"
    assert main(adapt_args(phantoms, tiny_foundation, out, "--test-cases", "none", "--rank", "4", steps="3")) == 0
    recorded = json.loads((out / "run.json").read_text())["support_loss"]
    assert 0.0 <= recorded <= 1.0
    adapted, record = pipeline.load_run(out)
    preprocess, settings = PreprocessSettings.from_dict(record.preprocess), TrainSettings(**record.train)
    volumes = load_cases(pipeline.open_dataset(record.data), record.support_cases, {record.organ: 1}, preprocess)
    sampler = PatchSampler(volumes, preprocess, settings.patches_per_step, settings.seed)
    again = support_loss(adapted.model, sampler, record.steps_done, settings)
    assert again == pytest.approx(recorded, rel=1e-6, abs=1e-6)


def test_support_loss_averages_the_batches_of_the_last_steps(phantoms):
    """With a model that calls every voxel the organ, each batch's Dice loss depends on that batch's labels only, so
    the mean says which batches were used: those of steps [done - last, done), however many steps ran."""
    from arenaseg.data.datasets import open_dataset
    from arenaseg.data.preprocess import PreprocessSettings, load_cases
    from arenaseg.train.loop import TrainSettings, loss_function, support_loss

    settings = TrainSettings(patches_per_step=1)
    data, preprocess = open_dataset(phantoms), PreprocessSettings(patch_size=(32, 32, 32))
    volumes = load_cases(data, ["phantom_0001", "phantom_0002"], {"liver": 1}, preprocess)
    sampler = PatchSampler(volumes, preprocess, settings.patches_per_step, seed=0)
    everywhere = torch.nn.Conv3d(1, 1, 1)
    torch.nn.init.zeros_(everywhere.weight), torch.nn.init.constant_(everywhere.bias, 20.0)
    loss_fn = loss_function(settings.cross_entropy)
    per_step = [loss_fn(everywhere(sampler.batch(step)[0]), sampler.batch(step)[1]).item() for step in range(8)]
    assert max(per_step) - min(per_step) > 0.01  # the batches differ, so a wrong window would show
    assert support_loss(everywhere, sampler, 8, settings, last=3) == pytest.approx(np.mean(per_step[5:8]), abs=1e-6)
    assert support_loss(everywhere, sampler, 2, settings, last=3) == pytest.approx(np.mean(per_step[:2]), abs=1e-6)


def test_support_draw_is_the_same_for_every_method(phantoms, tiny_foundation, tmp_path):
    draws = []
    for method in ("lp", "arena"):
        out = tmp_path / method
        assert main(adapt_args(phantoms, tiny_foundation, out, "--test-cases", "none", method=method, steps="1")) == 0
        draws.append(json.loads((out / "run.json").read_text())["support_cases"])
    assert draws[0] == draws[1] and len(draws[0]) == 2


class Killed(Exception):
    pass


def importance_scores(adapted) -> dict[tuple[str, str], torch.Tensor]:
    """AdaLoRA's running importance statistics (PEFT's RankAllocator), which choose the components it masks."""
    allocator = adapted.model.base_model.rankallocator
    keys = ("ipt", "exp_avg_ipt", "exp_avg_unc")
    return {(key, name): t for key in keys for name, t in getattr(allocator, key).items()}


def adalora_budgets(adapted) -> list[tuple[torch.nn.Module, int]]:
    """(AdaLoRA layer, its unmasked triplets), read from PEFT's own rank pattern (masks keyed by lora_E's name)."""
    tuner = adapted.model.base_model
    modules = dict(tuner.model.named_modules())
    pattern = tuner.peft_config["default"].rank_pattern
    return [(modules[name.split(".lora_E")[0]], sum(mask)) for name, mask in pattern.items()]


@pytest.mark.parametrize("method", ["arena", "adalora"])
def test_resume_after_kill_reaches_the_uninterrupted_tensors(method, phantoms, tiny_foundation, tmp_path, monkeypatch):
    """Killed after its step-2 checkpoint and resumed, a run ends on the uninterrupted run's tensors. AdaLoRA masks
    its rank budget at every step by importance scores averaged over all the steps before: the resumed run must
    carry them on (restarted, they differ, though in so short a run they need not change the masks)."""
    trained = {}
    real_train = pipeline.train_adapter

    def recording_train(adapted, *args, **kwargs):
        trained["adapted"] = adapted
        return real_train(adapted, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_adapter", recording_train)
    common = ("--test-cases", "none", "--checkpoint-every", "2", "--rank", "4")
    full = tmp_path / "full"
    assert main(adapt_args(phantoms, tiny_foundation, full, *common, method=method, steps="4")) == 0
    uninterrupted = trained.pop("adapted")

    killed = tmp_path / "killed"
    real_batch = PatchSampler.batch

    def dying_batch(self, step, rank=0):
        if step == 3:
            raise Killed("simulated kill")
        return real_batch(self, step, rank)

    monkeypatch.setattr(PatchSampler, "batch", dying_batch)
    with pytest.raises(Killed):
        main(adapt_args(phantoms, tiny_foundation, killed, *common, method=method, steps="4"))
    assert (killed / "checkpoint.pt").exists() and not (killed / "run.json").exists()
    seconds_before_kill = torch.load(killed / "checkpoint.pt", weights_only=True)["train_seconds"]
    assert seconds_before_kill > 0
    # a plain rerun refuses and points at --resume
    monkeypatch.setattr(PatchSampler, "batch", real_batch)
    assert main(adapt_args(phantoms, tiny_foundation, killed, *common, method=method, steps="4")) == 2
    assert main(adapt_args(phantoms, tiny_foundation, killed, *common, "--resume", method=method, steps="4")) == 0
    # the record counts the training time of both sessions, not only the resumed one
    assert json.loads((killed / "run.json").read_text())["train_seconds"] > seconds_before_kill
    a, b = load_file(full / "adapter.safetensors"), load_file(killed / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key].numpy(), b[key].numpy()), key
    if method == "adalora":
        expected, resumed = importance_scores(uninterrupted), importance_scores(trained["adapted"])
        assert expected and expected.keys() == resumed.keys()
        for key, scores in expected.items():
            assert torch.equal(resumed[key], scores), key
        record = json.loads((full / "run.json").read_text())
        totals = record["rank_report"]["totals"]
        assert totals["active_rank"] < totals["initial_rank"]  # the scores did mask components
        # the parameters kept leave out each masked triplet: a row of A, a column of B and its singular value
        masked = sum(
            (layer.r["default"] - budget) * (layer.lora_A["default"].shape[1] + layer.lora_B["default"].shape[0] + 1)
            for layer, budget in adalora_budgets(uninterrupted)
        )
        assert masked > 0
        assert record["active_params"] == record["trainable_params"] - masked


def _fails(capsys, args, *fragments):
    assert main(args) != 0
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_bad_input_is_refused_clearly(phantoms, tiny_foundation, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(capsys, adapt_args(tmp_path / "nope", tiny_foundation, out), "data folder not found")
    _fails(capsys, adapt_args(phantoms, tiny_foundation, out, organ="brain"), "valid: spleen, right_kidney")
    _fails(capsys, adapt_args(phantoms, tiny_foundation, out, shots="0"), "shots")
    _fails(capsys, adapt_args(phantoms, tmp_path / "missing.safetensors", out), "neither a built-in model")
    assert not out.exists() or not any(out.iterdir())

    # organ absent from every pool case
    root = tmp_path / "no_pancreas"
    shutil.copytree(phantoms, root)
    for label in (root / "labelsTr").glob("*.nii.gz"):
        img = nib.load(label)
        arr = np.asarray(img.dataobj).copy()
        arr[arr == 6] = 0
        nib.save(nib.Nifti1Image(arr, img.affine, img.header), label)
    meta = json.loads((root / "dataset.json").read_text())
    for case in meta["cases"]:
        case["labels_present"] = [v for v in case["labels_present"] if v != 6]
    (root / "dataset.json").write_text(json.dumps(meta))
    _fails(capsys, adapt_args(root, tiny_foundation, out, "--test-cases", "none"), "contains pancreas")


def test_k_larger_than_pool_uses_the_whole_pool(phantoms, tiny_foundation, tmp_path, capsys):
    out = tmp_path / "run"
    args = adapt_args(phantoms, tiny_foundation, out, "--test-cases", "phantom_0006", shots="50", steps="1")
    assert main(args) == 0
    assert "whole eligible pool" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert len(run["support_cases"]) == 5 and "phantom_0006" not in run["support_cases"]
    # a finished run is refused unless --overwrite
    _fails(capsys, args, "finished run", "--overwrite")
    assert main([*args, "--overwrite"]) == 0


def test_unwritable_output_is_refused(phantoms, tiny_foundation, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _fails(capsys, adapt_args(phantoms, tiny_foundation, blocker / "run"), "not writable")
