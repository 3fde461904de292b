from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from arenaseg.data.splits import (
    BASE_ORGANS,
    BTCV_FS,
    NOVEL_ORGANS,
    TRANSFER_ORGANS,
    BenchmarkSplit,
    draw_support,
    fseft_support,
    organ_presence,
    read_fseft_list,
)

POOL = tuple(f"case_{i:02d}" for i in range(10))
HAS = {case: case != "case_03" for case in POOL}  # one pool case lacks the organ


@pytest.fixture(scope="module")
def btcv_json(shared_data: Path) -> dict:
    return json.loads((shared_data / "btcv30" / "dataset.json").read_text())


@pytest.fixture(scope="module")
def pancreas_list(shared_data: Path) -> list[tuple[str, str]]:
    return read_fseft_list(shared_data / "fseft-partitions" / "totalseg_selected" / "pancreas_train.txt")


def test_btcv_fs_split_covers_btcv30_disjointly(btcv_json: dict) -> None:
    assert (len(BTCV_FS.pretrain), len(BTCV_FS.support_pool), len(BTCV_FS.test)) == (15, 10, 5)
    every = [*BTCV_FS.pretrain, *BTCV_FS.support_pool, *BTCV_FS.test]
    assert sorted(every) == sorted(c["case"] for c in btcv_json["cases"])
    assert len(set(every)) == 30
    assert max(BTCV_FS.pretrain) < min(BTCV_FS.support_pool) and max(BTCV_FS.support_pool) < min(BTCV_FS.test)


def test_split_refuses_shared_or_repeated_ids() -> None:
    with pytest.raises(ValueError, match="shares case ids"):
        BenchmarkSplit(pretrain=("a", "b"), support_pool=("b",), test=("c",))
    with pytest.raises(ValueError, match="repeats"):
        BenchmarkSplit(pretrain=("a", "a"), support_pool=("b",), test=("c",))


def test_organ_groups_match_the_protocol(btcv_json: dict) -> None:
    labels = btcv_json["labels"]
    assert {labels[n] for n in BASE_ORGANS} == {1, 2, 3, 6, 7, 8, 9}
    assert {labels[n] for n in NOVEL_ORGANS} == {4, 5, 10, 11}
    assert {labels[n] for n in TRANSFER_ORGANS} == {1, 3, 6}
    assert set(TRANSFER_ORGANS) <= set(BASE_ORGANS)
    left_out = set(labels) - set(BASE_ORGANS) - set(NOVEL_ORGANS) - {"background"}
    assert left_out == {"right_adrenal_gland", "left_adrenal_gland"}


def test_draw_is_seeded_eligible_and_independent_of_pool_order_and_global_state() -> None:
    first = draw_support(POOL, HAS, k=5, seed=1)
    random.seed(12345)
    state = random.getstate()
    shuffled = random.Random(99).sample(POOL, len(POOL))
    again = draw_support(shuffled, HAS.__getitem__, k=5, seed=1)
    assert random.getstate() == state
    assert again == first and first.note is None
    assert len(first.cases) == len(set(first.cases)) == 5
    assert "case_03" not in first.cases and set(first.cases) <= set(POOL)
    assert first.cases == tuple(random.Random(1).sample(sorted(c for c in POOL if HAS[c]), 5))
    draws = {frozenset(draw_support(POOL, HAS, k=5, seed=s).cases) for s in (0, 1, 2)}
    assert len(draws) == 3


def test_whole_eligible_pool_when_k_reaches_it() -> None:
    eligible = tuple(sorted(c for c in POOL if HAS[c]))
    for seed in (0, 1, 2):
        for k in (len(eligible), 10, 50):
            draw = draw_support(POOL, HAS, k=k, seed=seed, organ="gallbladder")
            assert draw.cases == eligible
            assert "whole eligible pool" in draw.note and "gallbladder" in draw.note


def test_draw_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        draw_support(POOL, HAS, k=0, seed=0)
    with pytest.raises(ValueError, match="contains pancreas"):
        draw_support(POOL, lambda case: False, k=1, seed=0, organ="pancreas")
    with pytest.raises(ValueError, match="case_09"):
        draw_support(POOL, {c: True for c in POOL[:9]}, k=1, seed=0)
    with pytest.raises(ValueError, match="repeats"):
        draw_support([*POOL, "case_00"], HAS, k=1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        draw_support(POOL, HAS, k=1, seed=-1)


def test_btcv_gallbladder_pool_lacks_btcv_0035(shared_data: Path) -> None:
    presence = organ_presence(shared_data / "btcv30" / "dataset.json", "gallbladder")
    whole = draw_support(BTCV_FS.support_pool, presence, k=10, seed=0, organ="gallbladder")
    assert len(whole.cases) == 9 and "btcv_0035" not in whole.cases and whole.note is not None
    for seed in (0, 1, 2):
        assert "btcv_0035" not in draw_support(BTCV_FS.support_pool, presence, k=5, seed=seed).cases
    for organ in ("esophagus", "portal_and_splenic_vein", "pancreas"):
        full = draw_support(BTCV_FS.support_pool, organ_presence(shared_data / "btcv30" / "dataset.json", organ), 10, 0)
        assert full.cases == BTCV_FS.support_pool


def test_organ_presence_names_valid_organs(btcv_json: dict) -> None:
    with pytest.raises(ValueError, match="unknown organ 'kidney'.*left_kidney"):
        organ_presence(btcv_json, "kidney")
    with pytest.raises(ValueError, match="unknown organ"):
        organ_presence(btcv_json, "background")


def test_fseft_list_reads_image_label_pairs(pancreas_list: list[tuple[str, str]]) -> None:
    assert len(pancreas_list) == 30
    for image, label in pancreas_list:
        subject = image.split("/")[-2]
        assert image.endswith(f"/{subject}/ct.nii.gz")
        assert label.endswith(f"/{subject}/segmentations/pancreas.nii.gz")
    subjects = [image.split("/")[-2] for image, _ in pancreas_list]
    assert subjects.count("s0930") == 2  # as in FSEFT's own list


def test_fseft_support_reproduces_the_global_random_draw(pancreas_list: list[tuple[str, str]]) -> None:
    state = random.getstate()
    for seed in (0, 1, 2):
        for k in (1, 5, 10):
            random.seed(seed)
            expected = random.sample(pancreas_list, min(k + 1, 30))[:k]
            random.setstate(state)
            assert fseft_support(pancreas_list, k, seed) == expected
            assert random.getstate() == state


def test_fseft_support_keeps_one_validation_line(pancreas_list: list[tuple[str, str]]) -> None:
    for k in (29, 30, 40):
        support = fseft_support(pancreas_list, k, seed=0)
        assert len(support) == 29  # FSEFT's loader keeps data_dicts[:-1] of a 30-line sample
        held_out = [line for line in pancreas_list if line not in support]
        assert len(held_out) == 1


def test_fseft_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("a/ct.nii.gz   a/seg.nii.gz\nb/ct.nii.gz\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected 'IMAGE   LABEL'"):
        read_fseft_list(bad)
    with pytest.raises(FileNotFoundError):
        read_fseft_list(tmp_path / "missing.txt")
    lines = [("a", "b"), ("c", "d"), ("e", "f")]
    with pytest.raises(ValueError, match="k must be >= 1"):
        fseft_support(lines, 0, 0)
    with pytest.raises(ValueError, match="needs 6 lines"):
        fseft_support(lines, 5, 0)
