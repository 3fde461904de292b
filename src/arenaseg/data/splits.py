"""The BTCV-FS protocol as data (case splits, organ groups) and the seeded support-set draws.

The draw is a function of (pool, organ presence, k, seed) only, never of the method, so every method of a
table adapts on the same k volumes (BENCHMARK.md, "Support sets"). ``fseft_support`` reproduces the original
FSEFT benchmark's draw from its subject lists, for runs on that benchmark's data.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from arenaseg.utils.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class BenchmarkSplit:
    """Disjoint case-id lists: pretraining only, the pool that support sets come from, the held-out test."""

    pretrain: tuple[str, ...]
    support_pool: tuple[str, ...]
    test: tuple[str, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for name in ("pretrain", "support_pool", "test"):
            ids = getattr(self, name)
            shared = seen & set(ids)
            if shared or len(set(ids)) != len(ids):
                raise ValueError(f"split {name!r} repeats or shares case ids: {sorted(shared) or list(ids)}")
            seen |= set(ids)


def _btcv_ids(numbers: Sequence[int]) -> tuple[str, ...]:
    return tuple(f"btcv_{n:04d}" for n in numbers)


BTCV_FS = BenchmarkSplit(
    pretrain=_btcv_ids([*range(1, 11), *range(21, 26)]),
    support_pool=_btcv_ids(range(26, 36)),
    test=_btcv_ids(range(36, 41)),
)
# Label names as in btcv30's dataset.json. Adrenal glands are left out (a few voxels wide at this resolution).
BASE_ORGANS = ("spleen", "right_kidney", "left_kidney", "liver", "stomach", "aorta", "inferior_vena_cava")
NOVEL_ORGANS = ("gallbladder", "esophagus", "portal_and_splenic_vein", "pancreas")
TRANSFER_ORGANS = ("spleen", "left_kidney", "liver")
SHOTS = (1, 5, 10)
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class SupportDraw:
    """The k support cases in draw order; ``note`` says when the whole eligible pool was used instead."""

    cases: tuple[str, ...]
    note: str | None = None


def organ_presence(dataset: str | os.PathLike | Mapping, organ: str) -> dict[str, bool]:
    """Case id -> whether ``organ`` is labelled in it, from dataset.json's ``labels`` and ``labels_present``.

    ``dataset`` is the parsed dataset.json or its path (btcv30 and the phantoms list ``cases`` with labels).
    """
    if not isinstance(dataset, Mapping):
        dataset = json.loads(Path(dataset).read_text())
    labels = dataset.get("labels", {})
    if organ not in labels or organ == "background":
        valid = sorted(name for name in labels if name != "background")
        raise UserError(f"unknown organ {organ!r}; this dataset labels {valid}")
    if "cases" not in dataset:
        raise UserError("dataset.json has no 'cases' list with per-case 'labels_present'")
    return {c["case"]: labels[organ] in c["labels_present"] for c in dataset["cases"]}


def draw_support(
    pool: Sequence[str],
    has_organ: Callable[[str], bool] | Mapping[str, bool],
    k: int,
    seed: int,
    *,
    organ: str = "the target organ",
) -> SupportDraw:
    """Draw k support cases from the pool cases that contain the organ.

    The eligible cases are sorted (so the pool's order does not matter) and drawn with
    ``random.Random(seed).sample(eligible, k)``: a private generator, so the result depends on the seed alone
    and no global random state is read or changed. When k >= the number of eligible cases the whole eligible
    pool is returned, sorted, with a note: every seed gives that same set, so it is run once. ``organ`` only
    names the organ in messages.
    """
    if k <= 0:
        raise UserError(f"k must be >= 1, got {k}")
    if seed < 0:
        raise UserError(f"seed must be >= 0 (random.Random treats -s like s), got {seed}")
    if len(set(pool)) != len(pool):
        raise UserError(f"pool repeats case ids: {sorted(pool)}")
    if isinstance(has_organ, Mapping):
        missing = sorted(set(pool) - set(has_organ))
        if missing:
            raise UserError(f"no organ-presence entry for pool cases {missing}")
        is_present = has_organ.__getitem__
    else:
        is_present = has_organ
    eligible = sorted(case for case in pool if is_present(case))
    if not eligible:
        raise UserError(f"no case of the support pool {sorted(pool)} contains {organ}")
    if k >= len(eligible):
        note = (
            f"k={k} >= the {len(eligible)} pool cases containing {organ}: the whole eligible pool is used "
            "(the same for every seed)"
        )
        return SupportDraw(tuple(eligible), note)
    return SupportDraw(tuple(random.Random(seed).sample(eligible, k)))


def read_fseft_list(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(image, label) relative paths of an FSEFT partition file (``IMAGE   LABEL`` lines), in file order.

    File order matters: FSEFT's draw samples from the list as read.
    """
    pairs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if len(fields) != 2:
                raise UserError(f"{path}:{number}: expected 'IMAGE   LABEL', got {line.rstrip()!r}")
            pairs.append((fields[0], fields[1]))
    if not pairs:
        raise UserError(f"{path} lists no subjects")
    return pairs


def fseft_support(lines: Sequence[T], k: int, seed: int) -> list[T]:
    """FSEFT's k-shot support: ``random.seed(seed); random.sample(lines, min(k + 1, 30))``, all but the last.

    The last drawn line is FSEFT's held-out validation case, so for k >= 30 the support has 29 lines, as in
    FSEFT's loader (``data_dicts[:-1]``); below that it is the first k. A private ``random.Random(seed)``
    gives the same sample as the seeded global generator without touching the global state.
    """
    if k <= 0:
        raise UserError(f"k must be >= 1, got {k}")
    n = min(k + 1, 30)
    if n > len(lines):
        raise UserError(f"k={k} needs {n} lines (k support + 1 validation), the list has {len(lines)}")
    return random.Random(seed).sample(list(lines), n)[:-1]
