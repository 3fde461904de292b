from __future__ import annotations

import math

import numpy as np
import pytest

from arenaseg.evaluate.metrics import NSD_TOLERANCE_MM, case_metrics, summarise

SHAPE = (30, 28, 26)
SPACING = (0.8, 1.5, 2.5)


def _box(start: tuple[int, int, int], size: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = True
    return mask


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_of_offset_cubes_is_the_offset_in_mm(axis: int) -> None:
    # Cube faces lie `offset` voxels apart along `axis`; every other surface point is closer, and the two
    # far faces are a sixth of each surface (> 5%), so the 95th percentile is the offset itself.
    offset = 3
    start = [5, 5, 5]
    moved = list(start)
    moved[axis] += offset
    a, b = _box(tuple(start), (10, 10, 10)), _box(tuple(moved), (10, 10, 10))
    for pred, ref in ((a, b), (b, a)):
        assert case_metrics(pred, ref, SPACING)["hd95"] == pytest.approx(offset * SPACING[axis], rel=1e-6)


def test_nsd_counts_surface_within_the_tolerance() -> None:
    # a shift below NSD_TOLERANCE_MM leaves every surface point within tolerance of the other surface
    a = _box((5, 5, 5), (10, 10, 10))
    near = _box((5, 5, 6), (10, 10, 10))  # 1 voxel of 2.5 mm along axis 2
    assert SPACING[2] < NSD_TOLERANCE_MM
    assert case_metrics(a, near, SPACING)["nsd"] == pytest.approx(100.0)
    # 3 voxels of 2.5 mm: both far faces (a sixth of each surface) lie 7.5 mm from the other surface
    far = _box((5, 5, 8), (10, 10, 10))
    assert 3 * SPACING[2] > NSD_TOLERANCE_MM
    assert 50.0 < case_metrics(a, far, SPACING)["nsd"] < 100.0 - 100.0 / 6 + 1.0


def test_dice_of_half_overlapping_boxes() -> None:
    size = (8, 6, 4)
    shift = size[0] // 2
    a, b = _box((4, 4, 4), size), _box((4 + shift, 4, 4), size)
    overlap = (size[0] - shift) * size[1] * size[2]
    expected = 100 * 2 * overlap / (2 * math.prod(size))  # = 50: half of each box overlaps the other
    assert case_metrics(a.astype(np.uint8), b.astype(np.uint8), SPACING)["dice"] == pytest.approx(expected)


def test_identical_masks() -> None:
    a = _box((3, 4, 5), (6, 7, 8))
    assert case_metrics(a, a.copy(), SPACING) == pytest.approx({"dice": 100.0, "hd95": 0.0, "nsd": 100.0})


def test_empty_masks_have_defined_finite_values() -> None:
    empty = np.zeros(SHAPE, dtype=bool)
    assert case_metrics(empty, empty, SPACING) == {"dice": 100.0, "hd95": 0.0, "nsd": 100.0}
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING, strict=True)))
    some = _box((0, 0, 0), (1, 1, 1))
    assert case_metrics(some, empty, SPACING) == pytest.approx({"dice": 0.0, "hd95": diagonal, "nsd": 0.0})
    assert case_metrics(empty, some, SPACING) == pytest.approx({"dice": 0.0, "hd95": diagonal, "nsd": 0.0})
    far = _box(tuple(n - 1 for n in SHAPE), (1, 1, 1))
    worst = case_metrics(some, far, SPACING)  # opposite corners: the largest error with both masks non-empty
    assert worst["dice"] == 0.0 and 0 < worst["hd95"] < diagonal and worst["nsd"] == 0.0


def test_bad_input_is_refused() -> None:
    a = _box((0, 0, 0), (2, 2, 2))
    with pytest.raises(ValueError, match="same grid|share one grid"):
        case_metrics(a, a[:-1], SPACING)
    with pytest.raises(ValueError, match="spacing must be 3"):
        case_metrics(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="binary mask"):
        case_metrics(a.astype(np.uint8) * 2, a, SPACING)


def test_summarise_means_over_cases() -> None:
    cases = {"c1": {"dice": 80.0, "hd95": 4.0}, "c2": {"dice": 60.0, "hd95": 10.0}}
    summary = summarise(cases)
    assert summary["cases"] == cases
    assert summary["mean_dice"] == pytest.approx((80.0 + 60.0) / 2)
    assert summary["mean_hd95"] == pytest.approx((4.0 + 10.0) / 2)
    with_more = summarise(
        {"c1": {"dice": 80.0, "hd95": 4.0, "dice_lcc": 90.0}, "c2": {**cases["c2"], "dice_lcc": 70.0}}
    )
    assert with_more["mean_dice_lcc"] == pytest.approx(80.0) and with_more["mean_dice"] == pytest.approx(70.0)
    with pytest.raises(ValueError, match="no cases"):
        summarise({})
    with pytest.raises(ValueError, match="c2"):
        summarise({"c1": {"dice": 1.0, "hd95": 1.0}, "c2": {"dice": 1.0}})
