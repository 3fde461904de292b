"""The run record's schema: every committed run.json reads under it, and a file that is not a record is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arenaseg.run_record import RunIdentity, RunRecord
from arenaseg.utils.differences import first_difference
from arenaseg.utils.errors import UserError

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_every_committed_run_json_reads_and_round_trips():
    paths = sorted(RESULTS.rglob("run.json"))
    assert paths, f"no committed cells under {RESULTS}"
    for path in paths:
        data = json.loads(path.read_text())
        record = RunRecord.read(path)
        assert {k: v for k, v in record.to_dict().items() if k in data} == data, path
        identity = RunIdentity.of(record)
        assert RunIdentity.of(identity.record(data=record.data)) == identity, path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("organ"), "no 'organ'"),
        (lambda d: d.update(mean_dcie=50.0), "unknown RunRecord keys \\['mean_dcie'\\]"),
        (lambda d: d["settings"].pop("preprocess"), "no 'settings.preprocess'"),
    ],
)
def test_a_file_that_is_not_a_record_is_refused_by_name(tmp_path, change, message):
    data = RunRecord("lp", "liver", 1, 0, "phantom-demo", {"train": {}, "preprocess": {}}).to_dict()
    change(data)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=f"{path} is not a run record of arenaseg adapt: {message}"):
        RunRecord.read(path)
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="holds a list"):
        RunRecord.read(path)


def test_the_first_difference_is_named_by_its_dotted_key():
    there = {"method": "lp", "train": {"steps": 300, "lr": 0.001}, "options": {"rank": 4}}
    assert first_difference(there, json.loads(json.dumps(there))) is None
    here = {"method": "lp", "train": {"steps": 250, "lr": 0.002}, "options": {"rank": 8}}
    assert first_difference(there, here) == "train.steps is 300 there, 250 now"
    assert first_difference(there, {**there, "organ": "liver"}, now="here") == "organ is None there, 'liver' here"
    assert first_difference({**there, "data": "/d"}, there) == "data is '/d' there, None now"
