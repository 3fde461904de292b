"""The command line's commands, one module each: ``add_parser(sub)`` declares the command's options (from the
settings dataclasses' fields, `arenaseg.utils.settings`) and sets ``func``, the job's entry point. `arenaseg.cli`
only dispatches. Options that several commands share are declared here, once."""

from __future__ import annotations

import argparse
import dataclasses

from arenaseg.data.preprocess import PreprocessSettings
from arenaseg.pipeline import AdaptJob
from arenaseg.train.loop import TrainSettings
from arenaseg.utils.settings import add_arguments, from_arguments

PREPROCESS_FIELDS = ("spacing", "patch_size", "intensity")
# adapt's and bench's training options; the seed is the job's (bench: its cells'), which seeds training too
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainSettings) if f.name != "seed")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive, default=None, help="CPU threads for torch (default: torch's choice)")


def add_device(p: argparse.ArgumentParser) -> None:
    add_arguments(p, AdaptJob, ["device"])


def add_preprocess(p: argparse.ArgumentParser) -> None:
    """The preprocessing options, the cache folder and the thread count: every command that trains."""
    add_arguments(p, PreprocessSettings, PREPROCESS_FIELDS)
    add_arguments(p, AdaptJob, ["cache_dir"])
    add_threads(p)


def add_training(p: argparse.ArgumentParser) -> None:
    add_arguments(p, TrainSettings, TRAIN_FIELDS)


def training_from(args: argparse.Namespace) -> TrainSettings:
    return from_arguments(TrainSettings, args, TRAIN_FIELDS)


def preprocess_from(args: argparse.Namespace) -> PreprocessSettings:
    return from_arguments(PreprocessSettings, args, PREPROCESS_FIELDS)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
