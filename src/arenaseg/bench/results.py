"""One row of ``results.csv``: the schema the grid writes and the report reads, so the two cannot drift apart.

A method with a rank is two fields, ``method`` and ``rank``. ``arena-r16`` is only its name in the grid's notation
(``--methods``, cell folders, the report's labels): `parse_method` reads that notation where it comes in.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass

from arenaseg.adapters.factory import LOW_RANK_METHODS, METHODS
from arenaseg.pipeline import REFERENCE_METHODS
from arenaseg.utils.atomic import atomic_path
from arenaseg.utils.errors import UserError


def method_name(method: str, rank: int | None) -> str:
    """The grid's name of a method at a rank: ("lora", 16) -> ``lora-r16``, ("lp", None) -> ``lp``."""
    return method if rank is None else f"{method}-r{rank}"


def parse_method(name: str) -> tuple[str, int | None]:
    """``lora-r16`` -> ("lora", 16), ``lp`` -> ("lp", None); low-rank methods need a rank, the others take none."""
    match = re.fullmatch(r"(?P<method>[a-z][a-z-]*?)(?:-r(?P<rank>\d+))?", name)
    method = match["method"] if match else name
    rank = int(match["rank"]) if match and match["rank"] else None
    examples = "e.g. zero-shot, lp, fft, lora-r16, adalora-r16, arena-r4, scratch"
    if method not in (*METHODS, *REFERENCE_METHODS):
        valid = ", ".join((*METHODS, *REFERENCE_METHODS))
        raise UserError(f"unknown method {name!r} in the grid; methods: {valid} ({examples})")
    if method in LOW_RANK_METHODS and not rank:
        raise UserError(f"{method} needs an initial rank >= 1 in the grid, as {method}-rR ({examples})")
    if method not in LOW_RANK_METHODS and rank is not None:
        raise UserError(f"{method} has no rank; write it as {method!r} ({examples})")
    return method, rank


@dataclass(frozen=True, kw_only=True)
class ResultRow:
    """One finished cell, in results.csv's column order. The fields without a default are the columns every
    results.csv has had; None is a value the cell did not record (an empty field), never an invented one."""

    track: str | None = None
    method: str
    rank: int | None = None
    organ: str
    shots: int
    seed: int
    mean_dice: float | None = None
    mean_hd95: float | None = None
    mean_nsd: float | None = None
    mean_dice_lcc: float | None = None
    mean_hd95_lcc: float | None = None
    mean_nsd_lcc: float | None = None
    trainable_params: int | None = None
    active_params: int | None = None  # what changes the model: after ARENA's pruning, within AdaLoRA's budget
    active_rank_total: int | None = None
    active_adapter_params: int | None = None
    adapter_bytes: int | None = None
    seconds_per_step: float | None = None
    peak_mem_mb: float | None = None
    train_seconds: float | None = None
    wall_s: float | None = None
    steps_done: int | None = None
    stopped_early: bool | None = None
    final_loss: float | None = None
    support_loss: float | None = None
    whole_pool: bool | None = None
    support_cases: str | None = None
    test_cases: str | None = None
    device: str | None = None
    precision: str | None = None
    commit: str | None = None
    model: str | None = None
    model_sha256: str | None = None
    loss: str | None = None
    steps: int | None = None
    patches_per_step: int | None = None
    lr: float | None = None
    head_lr_scale: float | None = None
    spacing: str | None = None
    patch: str | None = None
    intensity: str | None = None
    decoder: str | None = None
    lam: float | None = None
    rho: float | None = None
    protocol: str | None = None

    @property
    def name(self) -> str:
        return method_name(self.method, self.rank)


COLUMNS = tuple(f.name for f in dataclasses.fields(ResultRow))
REQUIRED = tuple(f.name for f in dataclasses.fields(ResultRow) if f.default is dataclasses.MISSING)
# each column's type without its None: what a CSV field is parsed into
TYPES = {
    name: next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    for name, hint in typing.get_type_hints(ResultRow).items()
}


def write_results(path: str | os.PathLike, rows: Iterable[ResultRow]) -> None:
    """Write ``rows`` to ``path`` atomically, None as an empty field."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in dataclasses.asdict(row).items()} for row in rows)


def read_results(path: str | os.PathLike) -> list[ResultRow]:
    """results.csv's rows, typed by `ResultRow`; columns an older CSV lacks read as None. Before the rank had a
    column of its own, ``method`` held the grid's name (``arena-r16``, with a ``base_method`` column beside it):
    such a row reads as method arena, rank 16."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise UserError(f"{path} lacks the columns {missing}: not a results.csv of arenaseg bench")
        named = "base_method" in header or "rank" not in header
        rows = []
        for line, raw in enumerate(reader, start=2):
            values = {k: _parse(path, line, k, raw[k]) for k in COLUMNS if raw.get(k) not in (None, "")}
            if named:
                values["method"], values["rank"] = parse_method(raw["method"])
            empty = [k for k in REQUIRED if k not in values]
            if empty:
                raise UserError(f"{path}:{line}: column {empty[0]} is empty")
            rows.append(ResultRow(**values))
    return rows


def _parse(path: str | os.PathLike, line: int, key: str, value: str) -> str | int | float | bool:
    kind = TYPES[key]
    if kind is bool:
        return value == "True"
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"{path}:{line}: column {key} holds {value!r}, not a number") from None
