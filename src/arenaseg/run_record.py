"""The record of one adaptation run (its ``run.json``): one schema for the run folder, results.csv and the report.

`pipeline.run_adapt` writes it, `predict --run` reads the model and preprocessing back from it, and the benchmark
reads cells' settings and results from it; its `RunIdentity` says which run it is. Fields that older runs did not
record read as None (e.g. ``track`` and ``protocol`` before protocol v2, the ``*_lcc`` metrics before the
largest-component option); a key that is not a field is refused, so a misspelt or foreign file never passes for a
run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from arenaseg.utils.atomic import write_json
from arenaseg.utils.dataclass_json import from_json
from arenaseg.utils.errors import UserError

# The means over test cases that `evaluate.metrics.summarise` gives: as predicted, then the largest component only.
METRICS = ("mean_dice", "mean_hd95", "mean_nsd", "mean_dice_lcc", "mean_hd95_lcc", "mean_nsd_lcc")


@dataclass(frozen=True)
class RunIdentity:
    """Which run a run is: every setting that shapes its result. A checkpoint stores it and resumes only under the
    same (`train.loop`), run.json records it, and a bench's finished cell counts as a job's result when their
    identities match (`bench.runner.signature_mismatch`). Where and when a run ran is no part of it."""

    method: str
    organ: str
    shots: int
    seed: int
    model: str
    model_sha256: str | None
    track: str | None
    protocol: str | None
    support_cases: list[str] | None  # None: a job's, to be drawn by (organ, shots, seed)
    test_cases: str | list[str]
    train: dict  # TrainSettings.to_dict()
    options: dict  # AdaptOptions.to_dict()
    preprocess: dict  # PreprocessSettings.to_dict()

    @classmethod
    def of(cls, record: RunRecord) -> RunIdentity:
        return cls(**{f.name: getattr(record, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # JSON's view: tuples become lists

    def record(self, **fields) -> RunRecord:
        """The run.json record of a run of this identity, with its other ``fields``."""
        values = dataclasses.asdict(self)
        settings = {key: values.pop(key) for key in ("train", "preprocess", "options")}
        return RunRecord(**values, settings=settings, **fields)


@dataclass
class RunRecord:
    # what ran
    method: str
    organ: str
    shots: int
    seed: int
    model: str
    settings: dict  # {"train": TrainSettings, "preprocess": PreprocessSettings, "options": AdaptOptions} as dicts
    track: str | None = None  # "base" (head from the model's class row) or "novel"
    protocol: str | None = None
    model_sha256: str | None = None  # a name like btcv-fs can be retrained: this pins the weights
    zero_shot_head_row: int | None = None
    data: str | None = None
    support_cases: list[str] = field(default_factory=list)
    support_note: str | None = None  # set when the pool had fewer cases with the organ than asked
    test_cases: list[str] = field(default_factory=list)
    # the adapter
    trainable_params: int | None = None  # while training (0 for zero-shot)
    active_params: int | None = None  # what changes the model: after ARENA's pruning, within AdaLoRA's budget
    total_params: int | None = None
    adapter_bytes: int | None = None
    adapter_sha256: str | None = None  # predict refuses an adapter put in the run's place
    rank_report: dict = field(default_factory=dict)
    ranks: dict | None = None  # ARENA: layer -> {"initial", "active"}
    active_rank_total: int | None = None
    # training
    steps_done: int | None = None
    stopped_early: bool | None = None
    final_loss: float | None = None  # the last step's: one batch, noisy
    support_loss: float | None = None  # train.loop.support_loss: the final model's fit to its support scans
    seconds_per_step: float | None = None
    train_seconds: float | None = None
    peak_mem_mb: float | None = None
    device: str | None = None
    git_commit: str | None = None
    git_commit_note: str | None = None  # e.g. why a committed cell's commit reads "-dirty"
    # test cases (absent when none were evaluated)
    mean_dice: float | None = None
    mean_hd95: float | None = None
    mean_nsd: float | None = None
    mean_dice_lcc: float | None = None
    mean_hd95_lcc: float | None = None
    mean_nsd_lcc: float | None = None
    eval_seconds: float | None = None

    @property
    def train(self) -> dict:
        return self.settings.get("train", {})

    @property
    def preprocess(self) -> dict:
        return self.settings.get("preprocess", {})

    @property
    def options(self) -> dict:
        return self.settings.get("options", {})

    @property
    def evaluated(self) -> bool:
        return self.mean_dice is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, source: str = "run record") -> RunRecord:
        """A record from its JSON form; anything that is not one is a UserError naming ``source``."""
        if not isinstance(data, dict):
            raise UserError(f"{source} is not a run record of arenaseg adapt: it holds a {type(data).__name__}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if not missing and not (isinstance(data["settings"], dict) and "preprocess" in data["settings"]):
            missing = ["settings.preprocess"]
        if missing:
            raise UserError(f"{source} is not a run record of arenaseg adapt: no {missing[0]!r}")
        return from_json(cls, data, error=UserError, where=f"{source} is not a run record of arenaseg adapt: ")

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data, str(path))
