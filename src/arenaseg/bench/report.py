"""`arenaseg report OUT`: BENCHMARK.md's protocol-v2 tables and plots, per track, from a bench's results.csv.

Only finished cells are used: a value with a missing cell behind it is shown as "–", never filled in, and every
table says which commits, models, devices and settings produced its numbers, so mixed provenance is visible. Rows
of different (protocol, precision) never share a table: each such group gets its own tables. A method is labelled
by its grid name (``arena-r16``: `ResultRow.name`), as its cell folders are.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from arenaseg.adapters.factory import METHODS
from arenaseg.bench.grid import (
    BASE_ORGANS,
    BTCV_ORGAN_ORDER,
    CELLS_DIR,
    DEFAULT_METHODS,
    PRESETS,
    PROTOCOL,
    RESULTS_FILE,
    cell_dir,
    rebuild_results,
)
from arenaseg.bench.results import ResultRow, method_name, parse_method, read_results
from arenaseg.pipeline import REFERENCE_METHODS, RUN_FILE
from arenaseg.run_record import RunRecord
from arenaseg.train.loop import SUPPORT_LOSS_STEPS
from arenaseg.utils.atomic import atomic_path, write_text
from arenaseg.utils.errors import UserError
from arenaseg.utils.precision import DEFAULT_PRECISION

REPORT_FILE, PLOTS_DIR = "report.md", "plots"
MISSING = "–"
RANK_FAMILIES = {"lora": "LoRA", "arena": "ARENA"}
RANK_MARKERS = {4: "v", 16: "s", 64: "o"}  # the grid's ranks; a rank-free method is a circle too
RANK_K = 5  # BENCHMARK.md: rank robustness at k = 5; the learned-rank and Dice-vs-parameters plots follow it
ZERO_SHOT = "zero-shot"  # one cell per organ at k = 0: the first row of every k's table
TRACK_ORDER = ("base", "novel")
UNRECORDED = "unrecorded"  # the track of rows from before the track column (v1)
V1 = "v1"  # the protocol of rows from before the protocol column
V1_REPORT = Path("benchmarks/results/btcv-fs-gpu/report.md")  # v1's committed report, relative to the checkout
# The paper's claims as predictions on this grid (docs/benchmark.md, "The paper's claims, P1-P4"): (label, method,
# the method it is compared with, what the paper reports)
CLAIMS = (
    ("P1", "lora-r64", "lora-r4", "LoRA loses 6-11 Dice at r = 64 (5-shot base organs)"),
    ("P2", "arena-r64", "arena-r4", "ARENA loses about 1-3 at r = 64"),
    (
        "P3",
        "arena-r64",
        "lora-r64",
        "ARENA at least matches LoRA with fewer parameters (76.8 Dice at 123k, LoRA 75.9 at 138k)",
    ),
    ("P4", "arena-r64", "fft", "ARENA comes close to full fine-tuning"),
)
# (column, label, lower is better) of the post-processing table: each metric as predicted and after keeping the
# largest connected component (LCC)
SURFACE_METRICS = (
    ("mean_dice", "Dice", False),
    ("mean_dice_lcc", "Dice LCC", False),
    ("mean_hd95", "HD95", True),
    ("mean_hd95_lcc", "HD95 LCC", True),
    ("mean_nsd", "NSD", False),
    ("mean_nsd_lcc", "NSD LCC", False),
)


@dataclass(frozen=True)
class Stat:
    """Mean and sample std over seeds (std None for a single value)."""

    mean: float
    std: float | None
    n: int


def stat(values: Sequence[float]) -> Stat | None:
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def seed_values(rows: Iterable[ResultRow], name: str, organ: str, k: int, metric: str) -> dict[int, float]:
    """Seed -> ``metric`` of the cells of the method named ``name`` (``arena-r16``: the report's label)."""
    return {
        r.seed: getattr(r, metric)
        for r in rows
        if (r.name, r.organ, r.shots) == (name, organ, k) and getattr(r, metric) is not None
    }


def organ_stat(rows: Sequence[ResultRow], name: str, organ: str, k: int, metric: str) -> Stat | None:
    return stat(list(seed_values(rows, name, organ, k, metric).values()))


def seed_means(rows: Sequence[ResultRow], name: str, k: int, organs: Sequence[str], metric: str) -> dict[int, float]:
    """Seed -> the mean over ``organs``; empty unless every organ has a run.

    An organ whose whole support pool was used ran once (BENCHMARK.md): that run stands for every seed. A seed
    counts only when every organ has its value, so a partial grid never yields a mean over fewer organs.
    """
    per_organ = {o: seed_values(rows, name, o, k, metric) for o in organs}
    if not organs or any(not v for v in per_organ.values()):
        return {}
    whole = {o for o in organs if all(r.whole_pool for r in rows if (r.name, r.organ, r.shots) == (name, o, k))}
    single = {o: next(iter(v.values())) for o, v in per_organ.items() if o in whole and len(v) == 1}
    seeds = {s for o, v in per_organ.items() if o not in single for s in v}
    if not seeds:
        seeds = {min(s for v in per_organ.values() for s in v)}
    per_seed = {}
    for seed in sorted(seeds):
        values = [single[o] if o in single else per_organ[o].get(seed) for o in organs]
        if None not in values:
            per_seed[seed] = statistics.fmean(values)
    return per_seed


def organ_mean(rows: Sequence[ResultRow], name: str, k: int, organs: Sequence[str], metric: str) -> Stat | None:
    """Mean over seeds (± std over seeds) of the per-seed mean over ``organs``; None unless every organ has a run."""
    return stat(list(seed_means(rows, name, k, organs, metric).values()))


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """a - b for each seed both have: the same support scans, so the support draw's luck cancels."""
    return [a[s] - b[s] for s in sorted(a.keys() & b.keys())]


def shots_of(method: str, k: int) -> int:
    """The k whose cells stand for ``method`` in k's tables: zero-shot's single cell is at k = 0."""
    return 0 if method == ZERO_SHOT else k


def fmt(s: Stat | None, digits: int = 1, full_n: int = 1, signed: bool = False) -> str:
    """Mean ± std; "(n=2)" marks a mean over fewer seeds than the table's others (a seed still missing)."""
    if s is None:
        return MISSING
    text = f"{s.mean:{'+' if signed else ''}.{digits}f}" + ("" if s.std is None else f" ± {s.std:.{digits}f}")
    return text + (f" (n={s.n})" if s.n < full_n else "")


def bold_best(column: list[float | None], cells: list[str], better: Callable = max) -> list[str]:
    """Bold the cells whose value is the column's best (``max`` or ``min``); None values never win."""
    values = [v for v in column if v is not None]
    if not values:
        return cells
    best = better(values)
    return [f"**{c}**" if v is not None and v == best else c for v, c in zip(column, cells, strict=True)]


def markdown_table(header: Sequence[str], columns: Sequence[Sequence[str]]) -> str:
    """A Markdown table from its header and its columns (each the same length)."""
    rows = list(zip(*columns, strict=True))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def stat_columns(
    labels: list[str], stats_by_column: dict[str, list[Stat | None]], better: dict[str, Callable]
) -> tuple[list[str], list[list[str]]]:
    """Header and columns of a table of ``Stat`` values, the best of each column in bold. A value over fewer
    seeds than the column's fullest trained row says so, and is not a candidate for best (zero-shot is one cell
    by design)."""
    columns = [labels]
    for name, stats in stats_by_column.items():
        full = [1 if label == ZERO_SHOT else None for label in labels]
        full_n = max((s.n for f, s in zip(full, stats, strict=True) if s and f is None), default=1)
        full = [f or full_n for f in full]
        cells = [fmt(s, full_n=f) for f, s in zip(full, stats, strict=True)]
        means = [s.mean if s and s.n >= f else None for f, s in zip(full, stats, strict=True)]
        columns.append(bold_best(means, cells, better.get(name, max)))
    return ["Method", *stats_by_column], columns


def provenance(rows: Sequence[ResultRow]) -> str:
    """Which cells, commits, models, devices and settings a table's numbers come from; the training settings are
    the trained cells' (a zero-shot row records defaults it never used)."""

    def distinct_in(subset: Sequence[ResultRow], key: str) -> str:
        values = sorted({str(getattr(r, key)) for r in subset if getattr(r, key) is not None})
        return ", ".join(values) if values else MISSING

    def distinct(key: str) -> str:
        return distinct_in(rows, key)

    def trained(key: str) -> str:
        return distinct_in([r for r in rows if r.name != ZERO_SHOT], key)

    arena = [r for r in rows if r.lam is not None]
    return (
        f"_From {len(rows)} finished cells; protocol {distinct('protocol')}, precision {distinct('precision')}; "
        f"commit(s) {distinct('commit')}; model(s) {distinct('model')} (sha256 {distinct('model_sha256')}); "
        f"loss {trained('loss')}; device(s) {distinct('device')}; step cap {trained('steps')}, "
        f"patches/step {trained('patches_per_step')}, lr {trained('lr')} (head x{trained('head_lr_scale')}), "
        f"decoder {trained('decoder')}, spacing {distinct('spacing')} mm, patch {distinct('patch')}, "
        f"intensity {distinct('intensity')}"
        + (f", ARENA lambda {distinct_in(arena, 'lam')}, rho {distinct_in(arena, 'rho')}" if arena else "")
        + "._"
    )


def method_order(rows: Sequence[ResultRow], track: str) -> list[str]:
    """The track's grid methods in DEFAULT_METHODS' order (shown even when not run, as "–"), then any other."""
    expected = {m for preset in PRESETS.values() for t in preset.tracks if t.name == track for m in t.methods}
    wanted = expected | {r.name for r in rows}
    return [m for m in DEFAULT_METHODS if m in wanted] + sorted(wanted - set(DEFAULT_METHODS))


def ordered_organs(organs: Iterable[str]) -> list[str]:
    order = (*BASE_ORGANS, *BTCV_ORGAN_ORDER)
    organs = set(organs)
    return [o for o in order if o in organs] + sorted(organs - set(order))


def complete_organs(rows: Sequence[ResultRow]) -> list[str]:
    """Organs with a cell for every (method, k, seed) that any organ of ``rows`` has (a whole-pool organ ran once
    per (method, k)): the organs whose grid is complete so far."""
    have = {(r.organ, r.name, r.shots, r.seed) for r in rows}
    whole = {(r.organ, r.name, r.shots) for r in rows if r.whole_pool}
    need = {key[1:] for key in have}
    present = {r.organ for r in rows}
    return ordered_organs(o for o in present if all((o, m, k, s) in have or (o, m, k) in whole for m, k, s in need))


def default_organs(rows: Sequence[ResultRow], track: str) -> tuple[list[str], str]:
    """The organs a track's means cover, and why: the base track's three organs (the paper's mean), else the
    organs whose grid is complete."""
    present = {r.organ for r in rows}
    if track == "base" and present <= set(BASE_ORGANS):
        return list(BASE_ORGANS), "the base track's organs"
    complete = complete_organs(rows)
    left_out = ordered_organs(present - set(complete))
    why = "the organs whose grid is complete" + (f"; left out: {', '.join(left_out)}" if left_out else "")
    return complete, why


def table_per_organ(rows: Sequence[ResultRow], methods: list[str], organs: list[str], k: int) -> str:
    """Dice per organ and the mean over ``organs`` at k (zero-shot's k = 0 cell as its row)."""
    stats = {o: [organ_stat(rows, m, o, shots_of(m, k), "mean_dice") for m in methods] for o in organs}
    stats["mean"] = [organ_mean(rows, m, shots_of(m, k), organs, "mean_dice") for m in methods]
    header, columns = stat_columns(methods, stats, {})
    return markdown_table(header, columns)


def table_over_k(rows: Sequence[ResultRow], methods: list[str], organs: list[str], shots: list[int]) -> str:
    stats = {
        f"{label} k={k}": [organ_mean(rows, m, shots_of(m, k), organs, metric) for m in methods]
        for label, metric in (("Dice", "mean_dice"), ("HD95", "mean_hd95"))
        for k in shots
    }
    header, columns = stat_columns(methods, stats, {f"HD95 k={k}": min for k in shots})
    return markdown_table(header, columns)


def table_post_processing(rows: Sequence[ResultRow], methods: list[str], organs: list[str], k: int) -> str:
    metrics = [m for m in SURFACE_METRICS if any(getattr(r, m[0]) is not None for r in rows)]
    stats = {label: [organ_mean(rows, m, shots_of(m, k), organs, col) for m in methods] for col, label, _ in metrics}
    header, columns = stat_columns(methods, stats, {label: min for _, label, lower in metrics if lower})
    return markdown_table(header, columns)


def _family_ranks(rows: Sequence[ResultRow]) -> list[int]:
    return sorted({4, 16, 64} | {r.rank for r in rows if r.method in RANK_FAMILIES})


def table_ranks(rows: Sequence[ResultRow], organs: list[str]) -> str:
    """Dice by initial rank, the spread over ranks and the signed change from the lowest to the highest rank.

    Both summaries compare families, so they use the same ranks for each: those every family has run. The signed
    change is the paper's question: negative when over-ranking hurts, positive when more rank helps. It is not a
    score, so only the smallest spread is in bold."""
    used = [r for r in rows if r.method in RANK_FAMILIES and r.shots == RANK_K]
    families = list(RANK_FAMILIES)
    ranks = _family_ranks(used)
    stats = {
        f"r={r}": [organ_mean(used, method_name(f, r), RANK_K, organs, "mean_dice") for f in families] for r in ranks
    }
    common = [r for r in ranks if all(stats[f"r={r}"])]
    header, columns = stat_columns([RANK_FAMILIES[f] for f in families], stats, {})
    change = f"r={common[-1]} - r={common[0]}" if len(common) >= 2 else "highest - lowest r"
    for name, summary in (("spread", lambda means: max(means) - min(means)), (change, lambda m: m[-1] - m[0])):
        values = [None] * len(families)
        if len(common) >= 2:
            values = [summary([stats[f"r={r}"][i].mean for r in common]) for i in range(len(families))]
        cells = [MISSING if v is None else f"{v:+.1f}" if name == change else f"{v:.1f}" for v in values]
        header.append(name)
        columns.append(bold_best(values, cells, min) if name == "spread" else cells)
    over = (
        ", ".join(f"r={r}" for r in common) if len(common) >= 2 else "none: fewer than two ranks every family has run"
    )
    return markdown_table(header, columns) + f"\n\nSpread and change over {over}.\n\n" + provenance(used)


def table_paired(rows: Sequence[ResultRow], organs: list[str], k: int) -> str | None:
    """ARENA's Dice minus LoRA's (each rank) and FFT's on the same seeds, per organ and over organs; None when no
    pair of cells exists. Paired differences: each seed's support scans are shared, so their luck cancels."""
    at_k = {(r.method, r.rank or 0, r.name) for r in rows if r.shots == k}
    arenas = [m for base, _, m in sorted(at_k) if base == "arena"]
    others = [m for base, _, m in sorted(at_k) if base == "lora"] + [m for base, _, m in at_k if base == "fft"]
    pairs = [(a, b) for a in arenas for b in others]
    if not pairs:
        return None
    columns: dict[str, list[list[float]]] = {o: [] for o in [*organs, "mean", "mean LCC"]}
    wins = []
    for a, b in pairs:
        by_organ = {o: paired(*(seed_values(rows, m, o, k, "mean_dice") for m in (a, b))) for o in organs}
        for o, diffs in by_organ.items():
            columns[o].append(diffs)
        for name, metric in (("mean", "mean_dice"), ("mean LCC", "mean_dice_lcc")):
            columns[name].append(paired(*(seed_means(rows, m, k, organs, metric) for m in (a, b))))
        diffs = [d for v in by_organ.values() for d in v]
        wins.append(f"{sum(d > 0 for d in diffs)}/{len(diffs)}" if diffs else MISSING)
    table = [[f"{a} - {b}" for a, b in pairs]]
    for diffs in columns.values():
        full_n = max(map(len, diffs))
        table.append([fmt(stat(d), full_n=full_n, signed=True) for d in diffs])
    return markdown_table(["ARENA - other", *columns, "ARENA higher"], [*table, wins])


def table_claims(rows: Sequence[ResultRow], organs: list[str]) -> str:
    """The paper's claims P1-P4 beside what this grid measured: each as one method's Dice minus another's at
    k = RANK_K, paired by seed over ``organs``, and the ratio of the parameters they keep. Numbers, not verdicts:
    docs/benchmark.md says how to read them."""
    at_k = [r for r in rows if r.shots == RANK_K]
    lines = []
    for label, method, other, paper in CLAIMS:
        raw, lcc = (
            paired(seed_means(at_k, method, RANK_K, organs, metric), seed_means(at_k, other, RANK_K, organs, metric))
            for metric in ("mean_dice", "mean_dice_lcc")
        )
        kept = [_mean_of(at_k, m, "active_params") for m in (method, other)]
        ratio = f"{kept[0] / kept[1]:.2f}x" if None not in kept else MISSING
        diffs = [fmt(stat(raw), signed=True), fmt(stat(lcc), signed=True)]
        lines.append([label, paper, f"{method} - {other}", *diffs, ratio, str(len(raw))])
    header = ["claim", "the paper", "here", "Dice", "Dice LCC", "params kept, ratio", "seeds"]
    return markdown_table(header, list(zip(*lines, strict=True)))


def lambda_path(rows: Sequence[ResultRow], name: str, organs: Sequence[str]) -> dict[float, list[ResultRow]]:
    """λ -> the k = RANK_K cells of the ARENA method ``name`` on ``organs`` at that λ, kept to the (organ, seed)
    pairs that every λ ran, so that the λs compare on the same support scans; empty below two λs."""
    by_lam: dict[float, list[ResultRow]] = {}
    for r in rows:
        if r.name == name and r.shots == RANK_K and r.organ in organs and r.lam is not None:
            by_lam.setdefault(r.lam, []).append(r)
    if len(by_lam) < 2:
        return {}
    common = set.intersection(*({(r.organ, r.seed) for r in cells} for cells in by_lam.values()))
    return {lam: [r for r in by_lam[lam] if (r.organ, r.seed) in common] for lam in sorted(by_lam)}


def table_lambda_path(rows: Sequence[ResultRow], others: Sequence[ResultRow], organs: list[str]) -> str | None:
    """ARENA at each λ (this folder's and the ``others``' cells) on the cells every λ ran: Dice, its paired
    difference to this folder's λ, and what the λ keeps. None when no ARENA method has two λs."""
    lines = []
    for _, name in sorted({(r.rank, r.name) for r in rows if r.method == "arena"}):
        path = lambda_path([*rows, *others], name, organs)
        own = {r.lam for r in rows if r.name == name}
        if not path or len(own) != 1:
            continue
        reference = path[own.pop()]
        for lam, cells in path.items():
            diff = paired(*(seed_means(c, name, RANK_K, organs, "mean_dice") for c in (cells, reference)))
            row = [
                f"{name}, λ {lam:g}",
                str(len(cells)),
                fmt(organ_mean(cells, name, RANK_K, organs, "mean_dice")),
                fmt(organ_mean(cells, name, RANK_K, organs, "mean_dice_lcc")),
                MISSING if cells is reference else fmt(stat(diff), signed=True),
            ]
            for key, digits, scale in (
                ("active_rank_total", 0, 1),
                ("active_params", 0, 1),
                ("adapter_bytes", 1, 1024),
            ):
                value = _mean_of(cells, name, key)
                row.append(MISSING if value is None else f"{value / scale:,.{digits}f}")
            lines.append(row)
    if not lines:
        return None
    reference_lams = ", ".join(sorted({f"{r.lam:g}" for r in rows if r.method == "arena" and r.lam is not None}))
    header = [
        "ARENA",
        "cells",
        "Dice",
        "Dice LCC",
        f"Dice - at λ {reference_lams}, paired",
        "active rank",
        "params kept",
        "adapter KiB",
    ]
    return markdown_table(header, list(zip(*lines, strict=True)))


def _mean_of(rows: Sequence[ResultRow], name: str, key: str) -> float | None:
    """Mean over the method's cells that measured ``key`` (older resumed cells could record a NaN step time)."""
    values = [v for r in rows if r.name == name and (v := getattr(r, key)) is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else None


def table_training(rows: Sequence[ResultRow], methods: list[str], shots: list[int]) -> str:
    """Support loss (the final model's mean loss on its last training batches), last step's loss and steps run,
    mean over each method's cells, per k: whether the methods fit."""
    trained = [m for m in methods if m != ZERO_SHOT]
    columns: list[list[str]] = [trained]
    header = ["Method"]
    for k in shots:
        at_k = [r for r in rows if r.shots == k]
        for key, label, digits in (
            ("support_loss", "support loss", 3),
            ("final_loss", "last-step loss", 3),
            ("steps_done", "steps run", 0),
        ):
            values = [_mean_of(at_k, m, key) for m in trained]
            columns.append([MISSING if v is None else f"{v:.{digits}f}" for v in values])
            header.append(f"{label} k={k}")
        stopped = []
        for m in trained:
            flags = [r.stopped_early for r in at_k if r.name == m and r.stopped_early is not None]
            stopped.append(f"{sum(flags)}/{len(flags)}" if flags else MISSING)
        columns.append(stopped)
        header.append(f"stopped early k={k}")
    return markdown_table(header, columns)


def table_efficiency(rows: Sequence[ResultRow], methods: list[str]) -> str:
    methods = [m for m in methods if m != ZERO_SHOT and any(r.name == m for r in rows)]
    if not methods:
        return "No trained cell finished yet."
    rank_of = {r.name: r.rank for r in rows}
    columns: list[list[str]] = [methods]
    header = ["Method"]
    for key, label, digits, scale in (
        ("trainable_params", "trainable params", 0, 1),
        ("active_params", "params kept", 0, 1),
        ("active_adapter_params", "active adapter params", 0, 1),
        ("adapter_bytes", "adapter KiB", 1, 1024),
        ("seconds_per_step", "s/step", 2, 1),
    ):
        values = [_mean_of(rows, m, key) for m in methods]
        cells = [MISSING if v is None else f"{v / scale:,.{digits}f}" for v in values]
        columns.append(bold_best(values, cells, min))
        header.append(label)
        ratios = []
        for m, v in zip(methods, values, strict=True):
            lora = _mean_of(rows, method_name("lora", rank_of[m]), key) if rank_of[m] is not None else None
            ratios.append(None if v is None or not lora else v / lora)
        columns.append([MISSING if q is None else f"{q:.2f}x" for q in ratios])
        header.append(f"{label} vs LoRA same r")
    columns.append([str(sum(r.name == m for r in rows)) for m in methods])
    header.append("cells")
    return markdown_table(header, columns)


def _over(organs: Sequence[str]) -> str:
    """An axis label's organs: the one organ, or how many a mean is over."""
    return organs[0] if len(organs) == 1 else f"mean over {len(organs)} organs"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def family_colour(family: str) -> str:
    """A method family's colour, the same in every plot (zero-shot is a grey line)."""
    families = [m for m in (*METHODS, *REFERENCE_METHODS) if m != ZERO_SHOT]
    return f"C{families.index(family) % 10}"


def method_style(name: str) -> dict[str, str]:
    """A grid method's colour and marker in every plot: the colour tells the family, the marker the rank."""
    family, rank = parse_method(name)
    return {"color": family_colour(family), "marker": RANK_MARKERS.get(rank, "o")}


def plot_dice_vs_rank(rows: Sequence[ResultRow], organs: list[str], title: str, path: Path) -> Path | None:
    """LoRA and ARENA Dice (mean over ``organs``) against the initial rank at k = RANK_K, seed std as bars."""
    ranks = _family_ranks(rows)
    lines = {}
    for family in RANK_FAMILIES:
        points = [(r, s) for r in ranks if (s := organ_mean(rows, method_name(family, r), RANK_K, organs, "mean_dice"))]
        if points:
            lines[family] = points
    if not lines:
        return None
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for family, points in lines.items():
        ax.errorbar(
            [r for r, _ in points],
            [s.mean for _, s in points],
            yerr=[s.std or 0 for _, s in points],
            marker="o",
            capsize=3,
            label=RANK_FAMILIES[family],
            color=family_colour(family),
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_title(f"{title}, k={RANK_K}")
    ax.set_xlabel("initial rank r")
    ax.set_ylabel(f"Dice (%), {_over(organs)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_dice_vs_params(
    rows: Sequence[ResultRow],
    methods: list[str],
    organs: list[str],
    title: str,
    path: Path,
    others: Sequence[ResultRow] = (),
) -> Path | None:
    """The paper's Fig. 1b, the efficiency frontier: Dice (mean over ``organs``) against the parameters a method
    keeps, after ARENA's pruning (log x; cells recorded before that count read their trainable parameters), one
    marker per method; zero-shot (nothing trained) is a horizontal line. With ARENA cells at other λs
    (``others``), each ARENA method's λ path is a dashed line through its λs, on the cells every λ ran."""
    points = []
    for method in methods:
        dice = organ_mean(rows, method, RANK_K, organs, "mean_dice")
        params = _mean_of(rows, method, "active_params") or _mean_of(rows, method, "trainable_params")
        if dice and params:
            points.append((method, params, dice))
    if not points:
        return None
    zero = organ_mean(rows, ZERO_SHOT, 0, organs, "mean_dice")
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for method, params, dice in points:
        lams = sorted({r.lam for r in rows if r.name == method and r.lam is not None})
        label = method + "".join(f", λ {lam:g}" for lam in lams)
        ax.errorbar(params, dice.mean, yerr=dice.std or 0, capsize=3, label=label, **method_style(method))
    for name in sorted({r.name for r in rows if r.method == "arena"}):
        line = [
            (lam, params, dice.mean)
            for lam, cells in lambda_path([*rows, *others], name, organs).items()
            if (dice := organ_mean(cells, name, RANK_K, organs, "mean_dice"))
            and (params := _mean_of(cells, name, "active_params"))
        ]
        if len(line) >= 2:
            ax.plot(
                [p for _, p, _ in line],
                [d for _, _, d in line],
                linestyle="--",
                markersize=4,
                label=f"{name}, λ path",
                **method_style(name),
            )
            own = {r.lam for r in rows if r.name == name}  # the method's marker, named in the legend
            for lam, params, dice in line:
                if lam not in own:
                    ax.annotate(f"λ {lam:g}", (params, dice), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if zero:
        ax.axhline(zero.mean, color="grey", linestyle="--", label=f"zero-shot ({zero.mean:.1f})")
    # a legend beside the axes, not labels on them: the markers of similar methods overlap
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel("trainable parameters kept (after ARENA's pruning)")
    ax.set_ylabel(f"Dice (%), k={RANK_K}, {_over(organs)}")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _cell_ranks(out: Path, rows: Sequence[ResultRow], name: str) -> Iterable[tuple[str, dict[str, dict]]]:
    """(organ, layer -> {"initial", "active"}) of each k = RANK_K cell of the ARENA method ``name``, from run.json."""
    for r in rows:
        if r.name != name or r.shots != RANK_K:
            continue
        run = out / cell_dir(r.track, name, r.organ, r.shots, r.seed) / RUN_FILE
        if run.is_file():
            yield r.organ, RunRecord.read(run).ranks or {}


def learned_ranks(out: Path, rows: Sequence[ResultRow], name: str) -> dict[tuple[str, str], float]:
    """(layer, organ) -> active rank (mean over seeds) of one ARENA method at k = RANK_K, from its cells' run.json."""
    ranks: dict[tuple[str, str], list[int]] = {}
    for organ, layers in _cell_ranks(out, rows, name):
        for layer, entry in layers.items():
            ranks.setdefault((layer, organ), []).append(entry["active"])
    return {key: statistics.fmean(values) for key, values in ranks.items()}


def layer_family(layer: str) -> str:
    """The family a layer's learned rank is summed in: its Swin stage, or the convolutional blocks of the UNETR's
    encoder and decoder paths (adapted on the novel track only)."""
    stage = re.match(r"swinViT\.layers(\d+)\.", layer)
    return f"Swin stage {stage[1]}" if stage else "conv blocks"


def table_family_ranks(out: Path, rows: Sequence[ResultRow], methods: list[str]) -> str | None:
    """Per ARENA method and organ, the components each layer family keeps: active of initial (mean over seeds),
    so that what an organ keeps and lets go reads at a glance; None without ARENA cells."""
    kept: dict[tuple[str, str], dict[str, list[tuple[int, int]]]] = {}
    for name in [m for m in methods if any(r.name == m and r.method == "arena" for r in rows)]:
        for organ, layers in _cell_ranks(out, rows, name):
            cell: dict[str, tuple[int, int]] = {}
            for layer, entry in layers.items():
                active, initial = cell.get(layer_family(layer), (0, 0))
                cell[layer_family(layer)] = (active + entry["active"], initial + entry["initial"])
            for family, value in cell.items():
                kept.setdefault((name, organ), {}).setdefault(family, []).append(value)
    if not kept:
        return None
    families = sorted({f for per_family in kept.values() for f in per_family})
    keys = sorted(kept, key=lambda key: (methods.index(key[0]), ordered_organs(o for _, o in kept).index(key[1])))
    columns = [[f"{name}, {organ}" for name, organ in keys]]
    for family in families:
        cells = []
        for key in keys:
            values = kept[key].get(family)
            if not values:
                cells.append(MISSING)
                continue
            active, initial = (statistics.fmean(v[i] for v in values) for i in (0, 1))
            cells.append(f"{active:,.0f} of {initial:,.0f} ({100 * active / initial:.0f} %)")
        columns.append(cells)
    return markdown_table(["ARENA, organ", *families], columns)


def full_ranks(out: Path, rows: Sequence[ResultRow], name: str) -> dict[str, int]:
    """layer -> full rank (min(in, out) of its update: no more independent components exist) as the method's cells
    recorded it in their rank report (cells from before the field lack it)."""
    found = {}
    for r in rows:
        run = out / cell_dir(r.track, name, r.organ, r.shots, r.seed) / RUN_FILE
        if r.name == name and run.is_file():
            for layer, entry in RunRecord.read(run).rank_report.get("layers", {}).items():
                if "full_rank" in entry:
                    found[layer] = entry["full_rank"]
    return found


def plot_learned_ranks(out: Path, rows: Sequence[ResultRow], methods: list[str], path: Path) -> Path | None:
    """One heatmap (layers x organs) per ARENA method, on shared axes so that the methods compare at a glance; a +
    marks a layer that keeps more active components than its full rank (the excess adds no new direction)."""
    arena = [m for m in methods if any(r.name == m and r.method == "arena" for r in rows)]
    maps = {m: found for m in arena if (found := learned_ranks(out, rows, m))}
    if not maps:
        return None
    layers = list(dict.fromkeys(layer for found in maps.values() for layer, _ in found))
    organs = ordered_organs(organ for found in maps.values() for _, organ in found)
    fig = Figure(figsize=(3 + len(maps) * (1.5 + 0.6 * len(organs)), 2 + 0.3 * len(layers)))
    axes = fig.subplots(1, len(maps), sharey=True, squeeze=False)[0]
    for ax, (method, found) in zip(axes, maps.items(), strict=True):
        grid = np.array([[found.get((layer, organ), np.nan) for organ in organs] for layer in layers])
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0)
        full = full_ranks(out, rows, method)
        over = [
            (i, j) for i, layer in enumerate(layers) for j in range(len(organs)) if grid[i, j] > full.get(layer, np.inf)
        ]
        for i, j in over:
            ax.text(j, i, "+", ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(range(len(organs)), organs, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{method}, k={RANK_K}")
        if over:
            ax.set_xlabel("+: active rank above the layer's full rank", fontsize=8)
        fig.colorbar(image, ax=ax, label="active rank (mean over seeds)")
    axes[0].set_yticks(range(len(layers)), [name.removeprefix("swinViT.") for name in layers], fontsize=7)
    return _save(fig, path)


def _group_key(row: ResultRow) -> tuple[str, str]:
    """(protocol, precision): rows recorded before these columns are v1's, trained in fp32."""
    return row.protocol or V1, row.precision or DEFAULT_PRECISION


def _sort_groups(keys: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """This protocol at the default precision first, then the others."""
    return sorted(keys, key=lambda g: (g[0] != PROTOCOL, g[1] != DEFAULT_PRECISION, g))


def _sort_tracks(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda t: (TRACK_ORDER.index(t) if t in TRACK_ORDER else len(TRACK_ORDER), t))


def track_section(
    out: Path,
    rows: list[ResultRow],
    track: str,
    group: tuple[str, str],
    organs: list[str],
    why: str,
    slug: str,
    others: Sequence[ResultRow] = (),
) -> list[str]:
    """Every table and plot of one track within one (protocol, precision) group; ``others``: this track's ARENA
    cells at other λs, from other bench folders."""
    methods = method_order(rows, track)
    title = f"{track} track, {group[0]} {group[1]}"
    shots = sorted({r.shots for r in rows if r.name != ZERO_SHOT}) or [RANK_K]  # zero-shot alone: k = 5
    shots = [k for k in shots if k == RANK_K] + [k for k in shots if k != RANK_K]  # k = 5 first
    used = [r for r in rows if r.organ in organs]
    listed = ", ".join(organs) or MISSING
    parts = [f"## {title}", "", f"Organs of the means: {listed} ({why}). Mean ± std over seeds.", ""]
    zero = " Zero-shot (nothing trained, one cell per organ) is every k's first row." if ZERO_SHOT in methods else ""
    for k in shots:
        at_k = [r for r in used if r.shots in (k, 0)]
        parts += [
            f"### {title}: Dice (%) per organ, k={k}",
            "",
            f"Dice per organ and the mean over {listed}; a mean needs every organ.{zero}",
            "",
            table_per_organ(used, methods, organs, k),
            "",
            provenance(at_k),
            "",
        ]
    if shots:
        parts += [
            f"### {title}: mean over organs per k",
            "",
            f"Dice (%) and HD95 (mm), mean over {listed}, per method and k.",
            "",
            table_over_k(used, methods, organs, shots),
            "",
            provenance(used),
            "",
        ]
    if any(getattr(r, col) is not None for r in used for col in ("mean_dice_lcc", "mean_nsd")):
        for k in shots:
            at_k = [r for r in used if r.shots in (k, 0)]
            parts += [
                f"### {title}: with and without largest-component post-processing, k={k}",
                "",
                f"Mean over {listed} of each metric as predicted and keeping the largest connected component (LCC); "
                f"NSD in %. {MISSING}: a cell that did not record the metric.",
                "",
                table_post_processing(used, methods, organs, k),
                "",
                provenance(at_k),
                "",
            ]
    parts += [
        f"### {title}: rank robustness",
        "",
        f"Dice (%) at k={RANK_K}, mean over {listed}, by initial rank r; spread = max - min and the change from the "
        "lowest to the highest r, both over the ranks every family has run (named under the table).",
        "",
        table_ranks(used, organs),
        "",
    ]
    for k in shots:
        paired_table = table_paired(used, organs, k)
        if paired_table:
            parts += [
                f"### {title}: ARENA minus the others, paired by seed, k={k}",
                "",
                f"Dice (%) of ARENA minus another method trained on the same support scans (same seed), mean ± std "
                f"over the seeds both ran, per organ and over {listed} (LCC: keeping the largest component); "
                "ARENA higher: the (organ, seed) pairs where ARENA's Dice is higher. No bold: a difference is not a "
                "score.",
                "",
                paired_table,
                "",
                provenance([r for r in used if r.shots == k and r.method in ("arena", "lora", "fft")]),
                "",
            ]
    parts += [
        f"### {title}: the paper's claims, P1-P4",
        "",
        f"Each claim as one method's Dice (%) minus another's at k={RANK_K}, paired by seed, mean ± std over the "
        f"seeds both ran of the mean over {listed}; params kept, ratio: the first method's parameters kept (after "
        "ARENA's pruning) over the second's. Numbers, not verdicts: docs/benchmark.md says how to read them.",
        "",
        table_claims(used, organs),
        "",
        provenance([r for r in used if r.shots == RANK_K and r.name in {m for c in CLAIMS for m in c[1:3]}]),
        "",
    ]
    path_table = table_lambda_path(used, [r for r in others if r.organ in organs], organs)
    if path_table:
        path_rows = [r for r in [*used, *others] if r.method == "arena" and r.shots == RANK_K and r.organ in organs]
        parts += [
            f"### {title}: ARENA's λ path, k={RANK_K}",
            "",
            f"ARENA at each λ on the (organ, seed) cells that every λ ran (cells: how many), Dice (%) mean over "
            f"{listed}; the paired column is Dice minus the same cell's Dice at this folder's λ; active rank, "
            "params kept and adapter KiB are means over the cells.",
            "",
            path_table,
            "",
            provenance(path_rows),
            "",
        ]
    family_table = table_family_ranks(out, rows, methods)
    if family_table:
        parts += [
            f"### {title}: learned rank per layer family, k={RANK_K}",
            "",
            "Components ARENA keeps (active of initial, summed over the family's layers, mean over seeds) per organ: "
            "where the organ keeps rank and where it lets it go. The heatmap under plots shows every layer.",
            "",
            family_table,
            "",
        ]
    parts += [
        f"### {title}: training",
        "",
        "Means over each method's cells of these organs. Support loss: the final model's mean training loss on the "
        f"batches of its last {SUPPORT_LOSS_STEPS} steps (how well it fits its support scans); last-step loss: the "
        "loss of the last step's one batch, noisy; stopped early: cells that stopped on the training-loss plateau "
        "before the step cap.",
        "",
        table_training(used, methods, shots),
        "",
        provenance([r for r in used if r.name != ZERO_SHOT]),
        "",
        f"### {title}: efficiency",
        "",
        "Means over each method's cells of these organs; active adapter params are those of the components left "
        "after ARENA's pruning (AdaLoRA: its budget); ratios are to LoRA at the same initial rank. Lowest value "
        "in bold; ratios are not, as each has its own reference.",
        "",
        table_efficiency(used, methods),
        "",
        provenance([r for r in used if r.name != ZERO_SHOT]),
        "",
        f"### {title}: plots",
        "",
    ]
    plots = out / PLOTS_DIR
    figures = {
        "Dice vs initial rank": plot_dice_vs_rank(used, organs, title, plots / f"{slug}_dice_vs_rank.png"),
        "Dice vs parameters kept": plot_dice_vs_params(
            used, methods, organs, title, plots / f"{slug}_dice_vs_params.png", others
        ),
        "Learned rank per adapted layer (ARENA)": plot_learned_ranks(
            out, rows, methods, plots / f"{slug}_learned_ranks.png"
        ),
    }
    for name, path in figures.items():
        parts += [
            f"![{title}: {name}]({path.relative_to(out)})" if path else f"{name}: not enough finished cells.",
            "",
        ]
    return parts


def write_report(
    out: str | os.PathLike,
    organs: Sequence[str] | None = None,
    tracks: Sequence[str] | None = None,
    lambda_path: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write OUT/report.md (and OUT/plots/*.png) from OUT/results.csv, rebuilt from OUT/cells when it is missing.

    ``tracks`` limits the report to those tracks. ``organs`` sets the organs of the means and plots of every
    track holding any of them (e.g. the ones whose grid is complete while the others still run); a track holding
    none keeps its default (`default_organs`). ``lambda_path``: other bench folders whose ARENA cells ran at other
    λs; their cells draw ARENA's λ path beside this folder's λ."""
    out = Path(out)
    if not (out / RESULTS_FILE).is_file():
        if not (out / CELLS_DIR).is_dir():
            raise FileNotFoundError(
                f"{out} holds no {RESULTS_FILE} and no {CELLS_DIR}/: run `arenaseg bench --out {out}`"
            )
        rebuild_results(out)
    rows = [replace(r, track=r.track or UNRECORDED) for r in read_results(out / RESULTS_FILE)]
    if not rows:
        raise UserError(f"{out / RESULTS_FILE} lists no finished cell yet")
    if tracks is not None:
        present = _sort_tracks({r.track for r in rows})
        unknown = [t for t in tracks if t not in present]
        if unknown or not tracks:
            raise UserError(f"tracks {unknown or tracks} have no finished cell in {out}; present: {', '.join(present)}")
        rows = [r for r in rows if r.track in tracks]
    if organs is not None:
        present = ordered_organs(r.organ for r in rows)
        unknown = [o for o in organs if o not in present]
        if unknown or not organs:
            raise UserError(f"organs {unknown or organs} have no finished cell in {out}; present: {', '.join(present)}")

    others = _other_lambdas(rows, lambda_path)
    groups = _sort_groups({_group_key(r) for r in rows})
    v1 = Path(os.path.relpath(V1_REPORT.resolve(), out.resolve())).as_posix()
    parts = [
        f"# Benchmark report: {out.name}",
        "",
        f"{len(rows)} finished cells from `{RESULTS_FILE}`. Best value per column in **bold**; {MISSING} = not run "
        "(missing cells are never filled in). Rows are grouped by (protocol, precision): rows of different groups "
        f"never share a table. Groups here: {'; '.join(f'{p} {q}' for p, q in groups)}.",
        "",
        f"Protocol v1 results (novel organs, 100 steps, no tracks): [v1 (history)]({v1}).",
        "",
    ]
    for group in groups:
        in_group = [r for r in rows if _group_key(r) == group]
        for track in _sort_tracks({r.track for r in in_group}):
            track_rows = [r for r in in_group if r.track == track]
            chosen = [o for o in organs or () if any(r.organ == o for r in track_rows)]
            if chosen:
                why = "chosen with --organs"
            else:
                chosen, why = default_organs(track_rows, track)
            slug = track if group == groups[0] else re.sub(r"[^A-Za-z0-9.-]+", "_", f"{group[0]}_{group[1]}_{track}")
            track_others = [r for r in others if _group_key(r) == group and r.track == track]
            parts += track_section(out, track_rows, track, group, chosen, why, slug, track_others)
    path = out / REPORT_FILE
    write_text(path, "\n".join(parts).rstrip("\n") + "\n")
    return path


def _other_lambdas(rows: Sequence[ResultRow], folders: Sequence[str | os.PathLike]) -> list[ResultRow]:
    """The ARENA cells of ``folders`` at λs this folder's ARENA cells did not run: the other points of the λ path
    (a cell that two folders hold counts once, from the first)."""
    own = {r.lam for r in rows if r.method == "arena"}
    others: dict[tuple, ResultRow] = {}
    for folder in folders:
        path = Path(folder) / RESULTS_FILE
        if not path.is_file():
            raise UserError(f"--lambda-path {folder}: no {RESULTS_FILE} there (a bench folder's results)")
        arena = [r for r in read_results(path) if r.method == "arena" and r.lam is not None]
        new = [r for r in arena if r.lam not in own]
        if not new:
            ran = ", ".join(sorted({f"{r.lam:g}" for r in arena})) or "none"
            raise UserError(f"--lambda-path {folder}: no ARENA cell at a λ this report lacks (its λs: {ran})")
        for r in new:
            others.setdefault((r.track, r.name, r.organ, r.shots, r.seed, r.lam, _group_key(r)), r)
    return list(others.values())
