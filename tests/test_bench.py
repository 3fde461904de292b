"""`arenaseg bench`: grid planning (BTCV-FS and FSEFT lists), restart safety, committed results, Ray fan-out."""

from __future__ import annotations

import csv
import json
import random
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from arenaseg import pipeline
from arenaseg.adapters.config import NEW_HEAD_DECODER
from arenaseg.bench import runner
from arenaseg.bench.grid import (
    BTCV_ORGAN_ORDER,
    CELLS_DIR,
    DEFAULT_METHODS,
    ERROR_FILE,
    RESULTS_FILE,
    committed_results,
    copy_cell_results,
    export_results,
    plan_cells,
    preset_model,
    rebuild_results,
)
from arenaseg.bench.results import method_name, parse_method
from arenaseg.bench.runner import cell_job, run_bench, signature_mismatch
from arenaseg.data.phantom import make_phantom_dataset
from arenaseg.data.splits import BTCV_FS
from arenaseg.models.foundation import save_foundation
from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr
from arenaseg.run_record import RunRecord
from arenaseg.train.loop import TrainSettings
from arenaseg.utils.atomic import folder_lock
from arenaseg.utils.device import device_kind
from arenaseg.utils.errors import UserError

TEST_CASE = "phantom_0004"
# What must agree between two runs of the same cell (timings, memory and device legitimately differ).
RESULT_KEYS = (
    "method",
    "rank",
    "organ",
    "shots",
    "seed",
    "mean_dice",
    "mean_hd95",
    "trainable_params",
    "active_params",
    "active_rank_total",
    "active_adapter_params",
    "adapter_bytes",
    "steps_done",
    "support_cases",
    "test_cases",
    "model",
)


def read_rows(out: Path) -> list[dict]:
    with open(out / RESULTS_FILE, newline="") as f:
        return list(csv.DictReader(f))


def test_parse_method_names():
    assert parse_method("lora-r16") == ("lora", 16)
    assert parse_method("arena-r4") == ("arena", 4)
    assert parse_method("lp") == ("lp", None)
    assert parse_method("affine-ln") == ("affine-ln", None)
    for bad, message in (("lora", "needs an initial rank"), ("fft-r4", "has no rank"), ("lora-r0", "rank >= 1")):
        with pytest.raises(ValueError, match=message):
            parse_method(bad)
    with pytest.raises(ValueError, match="unknown method 'mlp'"):
        parse_method("mlp")
    for name in ("lora-r16", "lp", "affine-ln", "zero-shot"):
        assert method_name(*parse_method(name)) == name


def test_btcv_default_grid_is_track_then_organ_major_with_one_seed_for_whole_pools(shared_data):
    data = shared_data / "btcv30"
    meta = json.loads((data / "dataset.json").read_text())
    present = {c["case"]: set(c["labels_present"]) for c in meta["cases"]}
    organs = {"base": ("right_kidney", "aorta", "stomach"), "novel": BTCV_ORGAN_ORDER}
    eligible = {
        o: sum(meta["labels"][o] in present[c] for c in BTCV_FS.support_pool) for t in organs.values() for o in t
    }

    cells = plan_cells("btcv-fs", None, None, None, None, data)

    trained = [c for c in cells if c.name != "zero-shot"]
    draws = list(dict.fromkeys((c.track, c.organ, c.shots, c.seed) for c in trained))
    expected_draws = [
        (track, organ, k, seed)
        for track in ("base", "novel")
        for organ in organs[track]
        for k in (5, 1, 10)
        for seed in ((0, 1, 2) if k < eligible[organ] else (0,))
    ]
    assert draws == expected_draws
    methods = {t: [m for m in DEFAULT_METHODS if any(c.track == t and c.name == m for c in cells)] for t in organs}
    assert methods["base"] == [m for m in DEFAULT_METHODS if m != "scratch"]
    assert methods["novel"] == [m for m in DEFAULT_METHODS if m != "zero-shot"]
    zero_shot = [(c.organ, c.shots, c.seed) for c in cells if c.name == "zero-shot"]
    assert zero_shot == [(o, 0, 0) for o in organs["base"]]  # one untrained cell per organ, whatever k and seed
    assert eligible["gallbladder"] == 9 and ("novel", "gallbladder", 10, 1) not in draws  # absent from btcv_0035
    assert all(c.test_cases == BTCV_FS.test and c.support_cases is None for c in cells)
    assert {c.protocol for c in cells} == {"btcv-fs-v2"}
    lora = next(c for c in cells if c.name == "lora-r64" and c.track == "novel")
    assert (lora.method, lora.rank, lora.decoder) == ("lora", 64, NEW_HEAD_DECODER)
    assert str(lora.rel_dir) == "cells/novel/lora-r64/pancreas/k5/seed0"
    assert {c.decoder for c in cells if c.track == "base" or c.method in ("lp", "fft", "scratch")} == {"frozen"}


def test_plan_rejects_bad_grids(tmp_path, shared_data):
    data = shared_data / "btcv30"
    with pytest.raises(ValueError, match="unknown bench preset"):
        plan_cells("btcv", None, None, None, None, data)
    with pytest.raises(ValueError, match="shots repeat"):
        plan_cells("btcv-fs", ["lp"], ["pancreas"], [5, 5], None, data)
    with pytest.raises(ValueError, match=r"organs \['kidney'\] are in no chosen track"):
        plan_cells("btcv-fs", ["lp"], ["pancreas", "kidney"], None, None, data)
    with pytest.raises(ValueError, match="method zero-shot is in no chosen track"):
        plan_cells("btcv-fs", ["zero-shot"], ["pancreas"], None, None, data, tracks=["novel"])
    with pytest.raises(ValueError, match="has no track 'new'"):
        plan_cells("btcv-fs", ["lp"], ["pancreas"], None, None, data, tracks=["new"])
    with pytest.raises(ValueError, match="needs test cases"):
        plan_cells("btcv-fs", ["lp"], ["pancreas"], None, None, data, test_cases="none")
    with pytest.raises(ValueError, match="needs --partitions"):
        plan_cells("totalseg-fseft", ["lp"], None, None, None, data)


def _write_lists(folder: Path, structure: str, train: list[str], test: list[str]) -> Path:
    lists = folder / "totalseg_selected"
    lists.mkdir(parents=True)
    for split, subjects in (("train", train), ("test", test)):
        lines = [
            f"14_TotalSegmentator/data/{s}/ct.nii.gz   14_TotalSegmentator/data/{s}/segmentations/{structure}.nii.gz"
            for s in subjects
        ]
        (lists / f"{structure}_{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_fseft_plan_draws_support_from_the_lists(tmp_path, shared_data):
    # FSEFT's data root holds 14_TotalSegmentator/data/<subject>; every subject here is the one shared example.
    subjects = tmp_path / "root" / "14_TotalSegmentator" / "data"
    subjects.mkdir(parents=True)
    for s in ("s0001", "s0002", "s0003", "s0004", "s0005"):
        (subjects / s).symlink_to(shared_data / "totalseg-example" / "s0001")
    parts = _write_lists(tmp_path / "parts", "pancreas", ["s0001", "s0002", "s0003", "s0004"], ["s0005"])

    cells = plan_cells("totalseg-fseft", ["lp", "arena-r4"], None, [1, 2], [0, 1], tmp_path / "root", partitions=parts)

    lines = (parts / "totalseg_selected" / "pancreas_train.txt").read_text().splitlines()
    assert len(cells) == 2 * 2 * 2
    for cell in cells:
        # FSEFT: random.seed(seed); random.sample(lines, k + 1); the last line is its validation case.
        drawn = random.Random(cell.seed).sample([tuple(line.split()) for line in lines], cell.shots + 1)[:-1]
        assert cell.support_cases == tuple(Path(image).parent.name for image, _ in drawn)
        assert cell.test_cases == ("s0005",)
        assert cell.data == str(subjects.resolve())
    job = cell_job(cells[0], tmp_path / "out", {"model": "model.safetensors"})
    assert job.support_cases == list(cells[0].support_cases) and job.test_cases == ["s0005"] and job.resume
    assert job.out == str(
        tmp_path / "out" / "cells" / "novel" / "arena-r4" / "pancreas" / "k1" / "seed0"
    )  # track order
    with pytest.raises(ValueError, match=r"cannot set \['seed'\]"):
        cell_job(cells[0], tmp_path / "out", {"seed": 3})
    with pytest.raises(ValueError, match="has no default model: pass --model"):
        preset_model("totalseg-fseft", None)
    assert preset_model("totalseg-fseft", "fseft.pth") == "fseft.pth" and preset_model("btcv-fs", None) == "btcv-fs"


def test_fseft_plan_checks_subjects_before_running(tmp_path, shared_data):
    example = shared_data / "totalseg-example"  # a TotalSegmentator folder given directly as the data root
    overlap = _write_lists(tmp_path / "a", "pancreas", ["s0001", "s0001"], ["s0001"])
    with pytest.raises(ValueError, match=r"support subjects \['s0001'\] are also test subjects"):
        plan_cells("totalseg-fseft", ["lp"], ["pancreas"], [1], [0], example, partitions=overlap)
    missing = _write_lists(tmp_path / "b", "pancreas", ["s0001", "s0001"], ["s0009"])
    with pytest.raises(FileNotFoundError, match="subject s0009"):
        plan_cells("totalseg-fseft", ["lp"], ["pancreas"], [1], [0], example, partitions=missing)
    with pytest.raises(ValueError, match="no train/test lists for"):
        plan_cells("totalseg-fseft", ["lp"], ["liver"], [1], [0], example, partitions=missing)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A 2-cell grid (lp and arena-r4, k=1, seed 0) on phantoms with a tiny foundation model, 2 steps per cell."""
    tmp = tmp_path_factory.mktemp("grid")
    data = make_phantom_dataset(tmp / "phantoms", n_cases=4, shape=(64, 64, 64))
    config = ModelConfig.tiny(out_channels=3, class_names=("background", "liver", "spleen"))
    torch.manual_seed(0)
    model = save_foundation(tmp / "tiny", build_swin_unetr(config), config)
    cells = plan_cells("btcv-fs", ["lp", "arena-r4"], ["pancreas"], [1], [0], data, test_cases=[TEST_CASE])
    cells.sort(key=lambda c: c.name != "lp")  # lp first: the tests below kill and resume the second cell, ARENA
    overrides = {
        "model": str(model),
        "train": TrainSettings(steps=2, patches_per_step=1),
        "cache_dir": str(tmp / "cache"),
    }
    return tmp, cells, overrides


@pytest.fixture(scope="module")
def in_process(grid):
    """Run cell 1; "kill" the bench in cell 2 after its training (evaluation raises); restart with both cells.

    One thread, as each Ray worker gets on this 2-core machine, so that the Ray run can be compared exactly.
    """
    tmp, cells, overrides = grid
    out = tmp / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seen = {}
    try:
        seen["first"] = run_bench(cells[:1], out, job_overrides=overrides)
        seen["rows_first"] = read_rows(out)

        def killed(*args, **kwargs):
            raise RuntimeError("simulated kill during evaluation")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pipeline, "evaluate_cases", killed)
            seen["killed"] = run_bench(cells, out, job_overrides=overrides)
        second = out / cells[1].rel_dir
        seen["error_text"] = (second / ERROR_FILE).read_text()
        seen["checkpoint_left"] = (second / pipeline.CHECKPOINT_FILE).is_file()
        seen["rows_killed"] = read_rows(out)
        seen["restart"] = run_bench(cells, out, job_overrides=overrides)
    finally:
        torch.set_num_threads(threads)
    return out, seen


def test_killed_and_resumed_grid_yields_exactly_one_row_per_cell(grid, in_process):
    _, cells, _ = grid
    out, seen = in_process
    assert (seen["first"].ran, len(seen["rows_first"])) == (1, 1)

    killed = seen["killed"]
    assert (killed.finished_before, killed.ran) == (1, 0)
    assert killed.failed == [str(cells[1].rel_dir)]
    assert "simulated kill during evaluation" in seen["error_text"] and "Traceback" in seen["error_text"]
    assert seen["checkpoint_left"]
    assert len(seen["rows_killed"]) == 1

    restart = seen["restart"]
    assert (restart.finished_before, restart.ran, restart.failed) == (1, 1, [])
    rows = read_rows(out)
    assert len(rows) == 2
    assert sorted((r["method"], r["rank"], r["organ"], r["shots"], r["seed"]) for r in rows) == [
        ("arena", "4", "pancreas", "1", "0"),
        ("lp", "", "pancreas", "1", "0"),
    ]
    assert all(r["steps_done"] == "2" and r["mean_dice"] != "" for r in rows)  # the resumed cell lost no steps
    # the cell killed after its last step still reports its training speed (from the checkpoint's step times)
    assert all(float(r["seconds_per_step"]) > 0 for r in rows)
    lp, arena = sorted(rows, key=lambda r: r["method"] != "lp")
    assert lp["support_cases"] == arena["support_cases"] and TEST_CASE not in lp["support_cases"]  # one draw
    record = RunRecord.read(out / cells[1].rel_dir / pipeline.RUN_FILE)
    assert arena["active_rank_total"] == str(sum(e["active"] for e in record.ranks.values()))
    assert lp["active_rank_total"] == ""
    second = out / cells[1].rel_dir
    assert not (second / ERROR_FILE).exists() and not (second / pipeline.CHECKPOINT_FILE).exists()


def test_results_csv_is_rebuilt_from_the_cell_folders(in_process):
    out, _ = in_process
    before = (out / RESULTS_FILE).read_text()
    (out / RESULTS_FILE).unlink()
    assert rebuild_results(out) == out / RESULTS_FILE
    assert (out / RESULTS_FILE).read_text() == before


def test_a_cell_folder_names_the_method_and_rank_its_record_ran(grid, in_process, tmp_path):
    _, cells, _ = grid
    out, _ = in_process
    arena = next(c for c in cells if c.method == "arena")
    copy_cell_results(out / arena.rel_dir, tmp_path / replace(arena, rank=16).rel_dir)
    with pytest.raises(ValueError, match="records cells/novel/arena-r4/.* but lies in .*arena-r16.*: a misplaced cell"):
        rebuild_results(tmp_path)


def test_rerun_with_other_settings_is_refused_before_running(grid, in_process):
    _, cells, overrides = grid
    out, _ = in_process
    before = (out / RESULTS_FILE).read_text()
    other = {**overrides, "train": replace(overrides["train"], lr=0.002)}
    refused = rf"finished with other settings \(train.lr is {overrides['train'].lr} there, 0.002 in this bench\)"
    with pytest.raises(UserError, match=refused):
        run_bench(cells, out, job_overrides=other)
    assert (out / RESULTS_FILE).read_text() == before


def test_results_record_the_parameters_a_method_keeps(in_process):
    """The frontier's x: all of LP's trainable parameters, ARENA's after pruning (never more than it trained)."""
    out, _ = in_process
    rows = {r["method"]: r for r in read_rows(out)}
    assert int(rows["lp"]["active_params"]) == int(rows["lp"]["trainable_params"]) > 0
    assert 0 < int(rows["arena"]["active_params"]) <= int(rows["arena"]["trainable_params"])


def test_committed_results_count_as_finished(grid, in_process, tmp_path):
    _, cells, overrides = grid
    out, _ = in_process
    committed = tmp_path / "committed"
    exported = export_results(out, committed)
    assert sorted(p.relative_to(committed) for p in exported) == sorted(c.rel_dir for c in cells)
    cell_files = {p.name for p in (committed / CELLS_DIR).rglob("*") if p.is_file()}
    assert cell_files == {pipeline.RUN_FILE, pipeline.METRICS_FILE}
    assert read_rows(committed) == read_rows(out)  # its results.csv lists the exported cells

    later = tmp_path / "later"
    summary = run_bench(cells, later, job_overrides=overrides, results_from=committed)
    assert (summary.adopted, summary.ran, summary.failed) == (2, 0, [])
    assert read_rows(later) == read_rows(out)

    record = RunRecord.read(committed / cells[0].rel_dir / pipeline.RUN_FILE)
    assert signature_mismatch(cell_job(cells[0], later, overrides), record) is None
    other_model = cell_job(cells[0], later, {**overrides, "model": "btcv-fs"})
    assert "model" in signature_mismatch(other_model, record)
    other_steps = cell_job(cells[0], later, {**overrides, "train": replace(overrides["train"], steps=3)})
    assert "train" in signature_mismatch(other_steps, record)
    retrained = replace(record, model_sha256="0" * 64)  # same model name, other weights (e.g. a re-pretrained built-in)
    assert "model_sha256" in signature_mismatch(cell_job(cells[0], later, overrides), retrained)
    # ARENA's λ shapes the ARENA cell's result only: the lp cell counts under another λ, the ARENA cell does not
    other_lam = {**overrides, "options": {"lam": 0.75}}
    for cell in cells:
        record = RunRecord.read(committed / cell.rel_dir / pipeline.RUN_FILE)
        mismatch = signature_mismatch(cell_job(cell, later, other_lam), record)
        assert mismatch is None if cell.method == "lp" else mismatch.startswith("options.lam is ")


def test_an_export_waits_for_another_into_the_same_folder(in_process, tmp_path):
    """Two benches exporting at once must not write back each other's older results.csv: the second waits."""
    out, _ = in_process
    committed = tmp_path / "committed"
    with folder_lock(committed):
        export = threading.Thread(target=export_results, args=(out, committed))
        export.start()
        export.join(timeout=1.0)
        assert export.is_alive() and not (committed / RESULTS_FILE).exists()
    export.join(timeout=60)
    assert not export.is_alive() and read_rows(committed) == read_rows(out)


def test_committed_gpu_results_never_count_for_a_cpu_bench(grid, in_process, tmp_path):
    _, cells, overrides = grid
    out, _ = in_process
    committed = tmp_path / "committed"
    export_results(out, committed)
    gpu_cell = committed / cells[0].rel_dir / pipeline.RUN_FILE
    gpu_cell.write_text(json.dumps({**json.loads(gpu_cell.read_text()), "device": "NVIDIA H100 80GB HBM3"}))

    later = tmp_path / "later"
    rows_before = read_rows(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the in_process run, so that the rerun's numbers can be compared exactly
    try:
        summary = run_bench(cells[:1], later, job_overrides={**overrides, "device": "cpu"}, results_from=committed)
    finally:
        torch.set_num_threads(threads)
    assert (summary.adopted, summary.ran, summary.failed) == (0, 1, [])
    assert "ran on NVIDIA H100 80GB HBM3, this bench runs on a cpu" in summary.not_adopted[0]
    assert read_rows(later)[0]["device"].startswith("cpu")
    assert [{k: r[k] for k in RESULT_KEYS} for r in read_rows(later)] == [
        {k: r[k] for k in RESULT_KEYS} for r in rows_before[:1]
    ]


def test_committed_results_are_found_in_the_named_checkout_only(tmp_path, monkeypatch):
    """The preset's committed results are looked up under an explicit checkout (the working directory by default),
    never inside the installed package; each device kind has its own folder, and a preset without one has none."""
    monkeypatch.chdir(tmp_path)
    assert committed_results("btcv-fs", "cpu") is None  # a working directory that is not a clone
    (tmp_path / "benchmarks" / "results" / "btcv-fs-v2-cpu").mkdir(parents=True)
    assert committed_results("btcv-fs", "cpu") == Path("benchmarks/results/btcv-fs-v2-cpu")
    assert committed_results("btcv-fs", "gpu") is None
    assert committed_results("btcv-fs", "gpu", tmp_path.parent) is None
    assert committed_results("totalseg-fseft", "cpu") is None


def test_committed_cells_ran_on_the_device_kind_of_their_folder():
    """Every committed cell record of the repository sits in the folder of the device kind it ran on."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    folders = [f for f in results.iterdir() if f.is_dir() and f.name.rsplit("-", 1)[-1] in ("cpu", "gpu")]
    assert folders, f"no committed result folders in {results}"
    for folder in folders:
        kinds = {device_kind(json.loads(p.read_text())["device"]) for p in folder.rglob(pipeline.RUN_FILE)}
        assert kinds <= {folder.name.rsplit("-", 1)[-1]}, folder


@pytest.mark.slow
def test_ray_and_in_process_give_the_same_rows(grid, in_process, monkeypatch):
    tmp, cells, overrides = grid
    out, _ = in_process
    # Each Ray task would get cores // workers threads (1 only on a 2-core machine), and another thread count sums
    # in another order while the rows are compared to the last digit: one thread, as in_process, on any machine.
    monkeypatch.setattr(runner, "_thread_share", lambda ray, workers, local: (1, 1))
    ray_out = tmp / "ray"
    summary = run_bench(cells, ray_out, workers=2, job_overrides=overrides)
    assert (summary.ran, summary.failed) == (2, [])
    ray_rows, rows = read_rows(ray_out), read_rows(out)
    assert len(ray_rows) == 2
    assert [{k: r[k] for k in RESULT_KEYS} for r in ray_rows] == [{k: r[k] for k in RESULT_KEYS} for r in rows]
    shutil.rmtree(ray_out)
