"""Every command from the command line: its help states each option's default, it exits 0 with its output files,
and a user's mistake exits 2 with one line that names it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from arenaseg.cli import build_parser, main

FAST = ["--steps", "1", "--patches-per-step", "1", "--warmup", "0", "--threads", "1"]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_help_with_its_default(name):
    for action in subcommands()[name]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help"
        if action.option_strings and not action.required:
            assert "default" in action.help, f"{name} {action.option_strings}: help does not state the default"


def test_the_help_shows_the_settings_actual_defaults():
    """Declared once on the settings fields: a changed default shows in --help, never a stale copy."""
    from arenaseg.adapters import AdaptOptions
    from arenaseg.train.loop import TrainSettings

    helps = {a.dest: a.help % {"default": a.default} for a in subcommands()["adapt"]._actions}
    assert helps["lam"].endswith(f"(default: {AdaptOptions().lam})")
    assert helps["steps"].endswith(f"(default: {TrainSettings().steps})")
    bench = {a.dest: a.default for a in subcommands()["bench"]._actions}
    assert (bench["lam"], bench["steps"]) == (AdaptOptions().lam, TrainSettings().steps)


def refused(capsys, args: list[str], *words: str) -> None:
    """``args`` exit 2 with one line on stderr that names ``words``."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"arenaseg {args[0]}: error:") and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort") / "ph"
    assert main(["phantoms", "--out", str(folder), "--n-cases", "5", "--shape", "32,32,32"]) == 0
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from arenaseg.models.foundation import save_foundation
    from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr

    torch.manual_seed(0)
    config = ModelConfig.tiny(out_channels=3, class_names=("background", "spleen", "liver"))
    return str(save_foundation(tmp_path_factory.mktemp("model") / "tiny", build_swin_unetr(config), config))


@pytest.fixture(scope="module")
def run(cohort, model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    args = ["adapt", "--data", str(cohort), "--organ", "pancreas", "--shots", "2", "--model", model]
    assert main([*args, *FAST, "--test-cases", "phantom_0004", "--rank", "4", "--out", str(out)]) == 0
    return out


def test_phantoms(tmp_path, capsys):
    assert main(["phantoms", "--out", str(tmp_path / "ph"), "--n-cases", "3", "--shape", "32,32,32"]) == 0
    assert len(list((tmp_path / "ph" / "imagesTr").glob("*.nii.gz"))) == 3
    refused(capsys, ["phantoms", "--out", str(tmp_path / "bad"), "--shape", "32,32"], "--shape")
    assert not (tmp_path / "bad").exists()


def test_adapt(run, cohort, model, tmp_path, capsys):
    record = json.loads((run / "run.json").read_text())
    assert (record["method"], record["organ"], record["settings"]["options"]["rank"]) == ("arena", "pancreas", 4)
    assert record["settings"]["options"]["lam"] == subcommands()["adapt"].get_default("lam")
    assert (run / "adapter.safetensors").is_file() and (run / "metrics.json").is_file()
    args = ["adapt", "--data", str(cohort), "--organ", "no_such_organ", "--shots", "2", "--model", model]
    refused(capsys, [*args, *FAST, "--out", str(tmp_path / "bad")], "no_such_organ")
    assert not (tmp_path / "bad").exists()


def test_adapt_refuses_a_bad_value_before_running(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["adapt", "--data", "x", "--organ", "y", "--shots", "1", "--patch", "48", "--out", str(tmp_path / "r")])
    assert exit_.value.code == 2 and "--patch: must be a multiple of 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["adapt", "--data", "x", "--organ", "y", "--shots", "1", "--method", "nope", "--out", "z"])
    assert "arena" in capsys.readouterr().err


def test_predict(run, cohort, tmp_path, capsys):
    image = cohort / "imagesTr" / "phantom_0004_0000.nii.gz"
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", "--run", str(run), "--input", str(image), "--output", str(out), "--threads", "1"]) == 0
    assert out.is_file() and "1 mask of pancreas" in capsys.readouterr().out
    refused(capsys, ["predict", "--input", str(image), "--output", str(tmp_path / "m2.nii.gz")], "--run")


def test_evaluate(run, cohort, tmp_path, capsys):
    image, ref = cohort / "imagesTr" / "phantom_0004_0000.nii.gz", cohort / "labelsTr" / "phantom_0004.nii.gz"
    pred = tmp_path / "phantom_0004.nii.gz"
    assert main(["predict", "--run", str(run), "--input", str(image), "--output", str(pred)]) == 0
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--organ", "pancreas"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["mean_dice"] <= 100 and list(metrics["cases"]) == ["phantom_0004"]
    refused(capsys, ["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "m.json")], "--organ")


def test_export(run, tmp_path, capsys):
    assert main(["export", "--run", str(run), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    refused(capsys, ["export", "--run", str(tmp_path), "--out", str(tmp_path / "none")], "run")
    assert not (tmp_path / "none").exists()


def test_bench_and_report(cohort, model, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--data", str(cohort), "--out", str(out), "--model", model, "--methods", "lp",
            "--organs", "pancreas", "--tracks", "novel", "--shots", "1", "--seeds", "0",
            "--test-cases", "phantom_0005", "--results-from", "none", *FAST]  # fmt: skip
    assert main(args) == 0
    assert (out / "results.csv").is_file() and (out / "cells/novel/lp/pancreas/k1/seed0/run.json").is_file()
    assert main(["report", str(out), "--organs", "pancreas"]) == 0
    assert (out / "report.md").is_file()
    refused(capsys, [*args[: -len(FAST)], "--seeds", "zero"], "--seeds")
    refused(capsys, ["report", str(tmp_path / "nothing")])


def test_pretrain(cohort, tmp_path, capsys):
    base = ["pretrain", "--data", str(cohort), "--cases", "phantom_0001,phantom_0002", "--organs", "liver,spleen",
            "--feature-size", "12", *FAST]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m.safetensors").is_file() and (tmp_path / "m.json").is_file()
    refused(capsys, [*base, "--cases", "phantom_0001,nope", "--out", str(tmp_path / "bad")], "nope")
    assert not (tmp_path / "bad.safetensors").exists()


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "before adaptation" in out and "after ARENA" in out and "learned rank per adapted layer" in out
    assert (tmp_path / "demo" / "overlay.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "phantom_0006_liver.nii.gz").is_file()
    refused(capsys, ["demo", "--out", str(tmp_path / "demo" / "overlay.png")])
