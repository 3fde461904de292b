"""Every option of every command explains itself and its default; the demo runs end to end."""

from __future__ import annotations

import argparse

import pytest

from arenaseg.cli import build_parser, main


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


def test_unknown_method_lists_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["adapt", "--data", "x", "--organ", "y", "--shots", "1", "--method", "nope", "--out", "z"])
    assert "arena" in capsys.readouterr().err


def test_unknown_builtin_model_lists_the_names(phantoms, tmp_path, capsys):
    args = ["adapt", "--data", str(phantoms), "--organ", "liver", "--shots", "1", "--model", "no-such-model",
            "--test-cases", "none", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 2
    assert "btcv-fs" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "before adaptation" in out and "after ARENA" in out and "learned rank per adapted layer" in out
    assert (tmp_path / "demo" / "overlay.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "phantom_0006_liver.nii.gz").is_file()
