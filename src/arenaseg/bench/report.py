"""`arenaseg report OUT`: BENCHMARK.md's four tables and three plots from a bench's results.csv.

Only finished cells are used: a value with a missing cell behind it is shown as "–", never filled in, and every
table says which commits, models, devices and settings produced its numbers, so mixed provenance is visible.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from arenaseg.bench.grid import BTCV_ORGAN_ORDER, CELLS_DIR, DEFAULT_METHODS, RESULTS_FILE, cell_dir, rebuild_results
from arenaseg.data.splits import NOVEL_ORGANS, SHOTS, TRANSFER_ORGANS
from arenaseg.pipeline import RUN_FILE
from arenaseg.utils.atomic import atomic_path, write_text

REPORT_FILE, PLOTS_DIR = "report.md", "plots"
MISSING = "–"
RANK_FAMILIES = {"lora": "LoRA", "arena": "ARENA"}
RANK_K = 5  # BENCHMARK.md: rank robustness at k = 5; the learned-rank and Dice-vs-parameters plots follow it
INT_COLUMNS = (
    "rank",
    "shots",
    "seed",
    "trainable_params",
    "active_rank_total",
    "active_adapter_params",
    "adapter_bytes",
    "steps_done",
    "steps",
    "patches_per_step",
)
FLOAT_COLUMNS = (
    "mean_dice",
    "mean_hd95",
    "seconds_per_step",
    "peak_mem_mb",
    "train_seconds",
    "wall_s",
    "lr",
    "head_lr_scale",
    "lam",
    "rho",
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


def read_results(path: str | os.PathLike) -> list[dict]:
    """results.csv rows with numbers parsed; empty fields become None."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if value == "":
                row[key] = None
            elif key in INT_COLUMNS:
                row[key] = int(value)
            elif key in FLOAT_COLUMNS:
                row[key] = float(value)
        row["whole_pool"] = row["whole_pool"] == "True"
    return rows


def seed_values(rows: Iterable[dict], method: str, organ: str, k: int, metric: str) -> dict[int, float]:
    return {
        r["seed"]: r[metric]
        for r in rows
        if (r["method"], r["organ"], r["shots"]) == (method, organ, k) and r[metric] is not None
    }


def organ_stat(rows: Sequence[dict], method: str, organ: str, k: int, metric: str) -> Stat | None:
    return stat(list(seed_values(rows, method, organ, k, metric).values()))


def organ_mean(rows: Sequence[dict], method: str, k: int, organs: Sequence[str], metric: str) -> Stat | None:
    """Mean over seeds (± std over seeds) of the per-seed mean over ``organs``; None unless every organ has a run.

    An organ whose whole support pool was used ran once (BENCHMARK.md): that run stands for every seed. A seed
    counts only when every organ has its value, so a partial grid never yields a mean over fewer organs.
    """
    per_organ = {o: seed_values(rows, method, o, k, metric) for o in organs}
    if not organs or any(not v for v in per_organ.values()):
        return None
    whole = {
        o
        for o in organs
        if all(r["whole_pool"] for r in rows if (r["method"], r["organ"], r["shots"]) == (method, o, k))
    }
    single = {o: next(iter(v.values())) for o, v in per_organ.items() if o in whole and len(v) == 1}
    seeds = {s for o, v in per_organ.items() if o not in single for s in v}
    if not seeds:
        seeds = {min(s for v in per_organ.values() for s in v)}
    per_seed = []
    for seed in sorted(seeds):
        values = [single[o] if o in single else per_organ[o].get(seed) for o in organs]
        if None not in values:
            per_seed.append(statistics.fmean(values))
    return stat(per_seed)


def fmt(s: Stat | None, digits: int = 1) -> str:
    if s is None:
        return MISSING
    return f"{s.mean:.{digits}f}" + ("" if s.std is None else f" ± {s.std:.{digits}f}")


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
    """Header and columns of a table of ``Stat`` values, the best of each column in bold."""
    columns = [labels]
    for name, stats in stats_by_column.items():
        cells = [fmt(s) for s in stats]
        columns.append(bold_best([s.mean if s else None for s in stats], cells, better.get(name, max)))
    return ["Method", *stats_by_column], columns


def provenance(rows: Sequence[dict]) -> str:
    """Which cells, commits, models, devices and settings a table's numbers come from."""

    def distinct_in(subset: Sequence[dict], key: str) -> str:
        values = sorted({str(r[key]) for r in subset if r.get(key) is not None})
        return ", ".join(values) if values else MISSING

    def distinct(key: str) -> str:
        return distinct_in(rows, key)

    arena = [r for r in rows if r["lam"] is not None]
    return (
        f"_From {len(rows)} finished cells; commit(s) {distinct('commit')}; model(s) {distinct('model')} "
        f"(sha256 {distinct('model_sha256')}); loss {distinct('loss')}; "
        f"device(s) {distinct('device')}; steps {distinct('steps')}, patches/step {distinct('patches_per_step')}, "
        f"lr {distinct('lr')} (head x{distinct('head_lr_scale')}), spacing {distinct('spacing')} mm, "
        f"patch {distinct('patch')}"
        + (f", ARENA lambda {distinct_in(arena, 'lam')}, rho {distinct_in(arena, 'rho')}" if arena else "")
        + "._"
    )


def method_order(rows: Sequence[dict]) -> list[str]:
    """The nine grid methods (shown even when not run, as "–"), then any other method present."""
    return [*DEFAULT_METHODS, *sorted({r["method"] for r in rows} - set(DEFAULT_METHODS))]


def main_organs(rows: Sequence[dict]) -> list[str]:
    """BTCV-FS's four novel organs when the grid has any of them; else every organ run except base transfer."""
    present = {r["organ"] for r in rows}
    if present & set(NOVEL_ORGANS):
        return list(BTCV_ORGAN_ORDER)
    return sorted(present - set(TRANSFER_ORGANS))


def table_main(rows: Sequence[dict], organs: list[str]) -> str:
    used = [r for r in rows if r["organ"] in organs]
    methods = method_order(rows)
    shots = sorted(set(SHOTS) | {r["shots"] for r in used})
    stats = {
        f"{label} k={k}": [organ_mean(used, m, k, organs, metric) for m in methods]
        for label, metric in (("Dice", "mean_dice"), ("HD95", "mean_hd95"))
        for k in shots
    }
    better = {f"HD95 k={k}": min for k in shots}
    header, columns = stat_columns(methods, stats, better)
    parts = [
        "## Table 1: main results",
        f"Mean over the organs {', '.join(organs)} of Dice (%) and HD95 (mm), per method and k; mean ± std over "
        "seeds. A value needs every organ.",
        "",
        markdown_table(header, columns),
        "",
        provenance(used),
    ]
    for k in sorted({r["shots"] for r in used}):
        per_organ = {organ: [organ_stat(used, m, organ, k, "mean_dice") for m in methods] for organ in organs}
        header, columns = stat_columns(methods, per_organ, {})
        parts += ["", f"### Dice (%) per organ, k={k}", "", markdown_table(header, columns)]
    return "\n".join(parts)


def _family_ranks(rows: Sequence[dict]) -> list[int]:
    return sorted({4, 16, 64} | {r["rank"] for r in rows if r["base_method"] in RANK_FAMILIES})


def table_ranks(rows: Sequence[dict], organs: list[str]) -> str:
    used = [r for r in rows if r["base_method"] in RANK_FAMILIES and r["shots"] == RANK_K and r["organ"] in organs]
    ranks = _family_ranks(used)
    families = list(RANK_FAMILIES)
    stats = {f"r={r}": [organ_mean(used, f"{f}-r{r}", RANK_K, organs, "mean_dice") for f in families] for r in ranks}
    spreads = []
    for i in range(len(families)):
        means = [s[i].mean if s[i] else None for s in stats.values()]
        spreads.append(None if None in means else max(means) - min(means))
    header, columns = stat_columns([RANK_FAMILIES[f] for f in families], stats, {})
    spread_cells = [MISSING if s is None else f"{s:.1f}" for s in spreads]
    columns.append(bold_best(spreads, spread_cells, min))
    return "\n".join(
        [
            "## Table 2: rank robustness",
            f"Dice (%) at k={RANK_K}, mean over {', '.join(organs)} (mean ± std over seeds), by initial rank r; "
            "spread = max - min over r (lower is more robust).",
            "",
            markdown_table([*header, "spread"], columns),
            "",
            provenance(used),
        ]
    )


def _mean_of(rows: Sequence[dict], method: str, key: str) -> float | None:
    """Mean over the method's cells that measured ``key`` (older resumed cells could record a NaN step time)."""
    values = [r[key] for r in rows if r["method"] == method and r[key] is not None and not math.isnan(r[key])]
    return statistics.fmean(values) if values else None


def table_efficiency(rows: Sequence[dict]) -> str:
    methods = [m for m in method_order(rows) if any(r["method"] == m for r in rows)]
    rank_of = {r["method"]: r["rank"] for r in rows}
    columns: list[list[str]] = [methods]
    header = ["Method"]
    for key, label, digits, scale in (
        ("trainable_params", "trainable params", 0, 1),
        ("active_adapter_params", "active adapter params", 0, 1),
        ("adapter_bytes", "adapter KiB", 1, 1024),
        ("seconds_per_step", "s/step", 2, 1),
    ):
        values = [_mean_of(rows, m, key) for m in methods]
        cells = [MISSING if v is None else f"{v / scale:,.{digits}f}" for v in values]
        columns.append(bold_best(values, cells, min))
        header.append(label)
        if key == "trainable_params":
            continue
        ratios = []
        for m, v in zip(methods, values, strict=True):
            lora = _mean_of(rows, f"lora-r{rank_of[m]}", key) if rank_of[m] is not None else None
            ratios.append(None if v is None or not lora else v / lora)
        columns.append(bold_best(ratios, [MISSING if q is None else f"{q:.2f}x" for q in ratios], min))
        header.append(f"{label} vs LoRA same r")
    columns.append([str(sum(r["method"] == m for r in rows)) for m in methods])
    header.append("cells")
    return "\n".join(
        [
            "## Table 3: efficiency",
            "Means over each method's finished cells; active adapter params are those of the components left after "
            "ARENA's pruning (AdaLoRA: its budget); ratios are to LoRA at the same initial rank. Lowest in bold.",
            "",
            markdown_table(header, columns),
            "",
            provenance(rows),
        ]
    )


def zero_shot_dice(model: str, test_cases: set[str]) -> dict[str, float] | None:
    """The foundation model's per-class test Dice from its card, when the card was evaluated on ``test_cases``."""
    from arenaseg.models.registry import BUILTIN_DIR, BUILTIN_NAMES

    card = BUILTIN_DIR / f"{model}.json" if model in BUILTIN_NAMES else Path(model).with_suffix(".json")
    if not card.is_file():
        return None
    evaluation = json.loads(card.read_text()).get("eval")
    if not evaluation or set(evaluation.get("cases", [])) != test_cases:
        return None
    return evaluation["dice_per_class"]


def table_transfer(rows: Sequence[dict]) -> str:
    used = [r for r in rows if r["organ"] in TRANSFER_ORGANS]
    tests = {r["test_cases"] for r in rows if r["test_cases"]}
    zero = {}
    if len(tests) == 1:
        test_set = set(tests.pop().split(";"))
        for model in sorted({r["model"] for r in rows if r["model"]}):
            dice = zero_shot_dice(model, test_set)
            if dice:
                zero[model] = dice
    organs = [o for o in TRANSFER_ORGANS if any(r["organ"] == o for r in used) or any(o in d for d in zero.values())]
    title = "## Table 4: base-organ transfer and zero-shot Dice"
    if not organs:
        return f"{title}\nnot run (no base-organ cells, and no model card evaluated on these test cases)."
    labels = [f"zero-shot ({model})" for model in zero]
    stats = {o: [Stat(d[o], None, 1) if o in d else None for d in zero.values()] for o in organs}
    for k in sorted({r["shots"] for r in used}):
        for m in method_order(used):
            labels.append(f"{m} (k={k})")
            for o in organs:
                stats[o].append(organ_stat(used, m, o, k, "mean_dice"))
    header, columns = stat_columns(labels, stats, {})
    return "\n".join(
        [
            title,
            "Dice (%) on the test cases, mean ± std over seeds; zero-shot: the foundation model's own class "
            "(its card's evaluation on the same test cases).",
            "",
            markdown_table(["Row", *header[1:]], columns),
            "",
            provenance(used) if used else "_No base-organ cells finished._",
        ]
    )


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_dice_vs_rank(rows: Sequence[dict], organs: list[str], path: Path) -> Path | None:
    families = [f for f in RANK_FAMILIES if any(r["base_method"] == f and r["shots"] == RANK_K for r in rows)]
    if not families:
        return None
    ranks = _family_ranks(rows)
    fig = Figure(figsize=(5 * len(families), 4))
    axes = fig.subplots(1, len(families), sharey=True, squeeze=False)[0]
    for ax, family in zip(axes, families, strict=True):
        for organ in organs:
            points = [
                (r, s.mean) for r in ranks if (s := organ_stat(rows, f"{family}-r{r}", organ, RANK_K, "mean_dice"))
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=organ)
        means = [(r, s.mean) for r in ranks if (s := organ_mean(rows, f"{family}-r{r}", RANK_K, organs, "mean_dice"))]
        if means:
            ax.plot(*zip(*means, strict=True), marker="s", color="black", linewidth=2.5, label="mean")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_title(f"{RANK_FAMILIES[family]}, k={RANK_K}")
        ax.set_xlabel("initial rank r")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice (%)")
    axes[-1].legend(fontsize=8)
    return _save(fig, path)


def learned_ranks(out: Path, rows: Sequence[dict], method: str) -> dict[tuple[str, str], float]:
    """(layer, organ) -> active rank (mean over seeds) of one ARENA method at k = RANK_K, from its cells' run.json."""
    ranks: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        if r["method"] != method or r["shots"] != RANK_K:
            continue
        run = out / cell_dir(method, r["organ"], r["shots"], r["seed"]) / RUN_FILE
        if run.is_file():
            for layer, entry in json.loads(run.read_text()).get("ranks", {}).items():
                ranks.setdefault((layer, r["organ"]), []).append(entry["active"])
    return {key: statistics.fmean(values) for key, values in ranks.items()}


def plot_learned_ranks(out: Path, rows: Sequence[dict], path: Path) -> Path | None:
    """One heatmap (layers x organs) per ARENA method, on shared axes so that the methods compare at a glance."""
    arena = [m for m in method_order(rows) if any(r["method"] == m and r["base_method"] == "arena" for r in rows)]
    maps = {m: found for m in arena if (found := learned_ranks(out, rows, m))}
    if not maps:
        return None
    layers = list(dict.fromkeys(layer for found in maps.values() for layer, _ in found))
    present = {organ for found in maps.values() for _, organ in found}
    organs = [o for o in BTCV_ORGAN_ORDER if o in present] + sorted(present - set(BTCV_ORGAN_ORDER))
    fig = Figure(figsize=(3 + len(maps) * (1.5 + 0.6 * len(organs)), 2 + 0.3 * len(layers)))
    axes = fig.subplots(1, len(maps), sharey=True, squeeze=False)[0]
    for ax, (method, found) in zip(axes, maps.items(), strict=True):
        grid = np.array([[found.get((layer, organ), np.nan) for organ in organs] for layer in layers])
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0)
        ax.set_xticks(range(len(organs)), organs, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{method}, k={RANK_K}")
        fig.colorbar(image, ax=ax, label="active rank (mean over seeds)")
    axes[0].set_yticks(range(len(layers)), [name.removeprefix("swinViT.") for name in layers], fontsize=7)
    return _save(fig, path)


def plot_dice_vs_params(rows: Sequence[dict], organs: list[str], path: Path) -> Path | None:
    points = []
    for method in method_order(rows):
        dice = organ_mean(rows, method, RANK_K, organs, "mean_dice")
        params = _mean_of(rows, method, "trainable_params")
        if dice and params:
            points.append((method, params, dice))
    if not points:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for method, params, dice in points:
        ax.errorbar(params, dice.mean, yerr=dice.std or 0, marker="o", capsize=3)
        ax.annotate(method, (params, dice.mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"Dice (%), k={RANK_K}, mean over {len(organs)} organs")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_report(out: str | os.PathLike, organs: Sequence[str] | None = None) -> Path:
    """Write OUT/report.md (and OUT/plots/*.png) from OUT/results.csv, rebuilt from OUT/cells when it is missing.

    ``organs`` restricts the tables' organ means and the plots to those organs (e.g. the ones whose grid is
    complete while the others still run); default: BTCV-FS's four novel organs (see `main_organs`)."""
    out = Path(out)
    if not (out / RESULTS_FILE).is_file():
        if not (out / CELLS_DIR).is_dir():
            raise FileNotFoundError(
                f"{out} holds no {RESULTS_FILE} and no {CELLS_DIR}/: run `arenaseg bench --out {out}`"
            )
        rebuild_results(out)
    rows = read_results(out / RESULTS_FILE)
    if not rows:
        raise ValueError(f"{out / RESULTS_FILE} lists no finished cell yet")
    if organs is None:
        organs = main_organs(rows)
    else:
        present = sorted({r["organ"] for r in rows})
        unknown = [o for o in organs if o not in present]
        if unknown or not organs:
            raise ValueError(
                f"organs {unknown or organs} have no finished cell in {out}; present: {', '.join(present)}"
            )
        organs = list(organs)
    plots = out / PLOTS_DIR
    figures = {
        "Dice vs initial rank": plot_dice_vs_rank(rows, organs, plots / "dice_vs_rank.png"),
        "Learned rank per adapted layer (ARENA)": plot_learned_ranks(out, rows, plots / "learned_ranks.png"),
        "Dice vs trainable parameters": plot_dice_vs_params(rows, organs, plots / "dice_vs_params.png"),
    }
    parts = [
        f"# Benchmark report: {out.name}",
        "",
        f"{len(rows)} finished cells from `{RESULTS_FILE}`. Best value per column in **bold**; {MISSING} = not run "
        "(missing cells are never filled in).",
        "",
        table_main(rows, organs),
        "",
        table_ranks(rows, organs),
        "",
        table_efficiency(rows),
        "",
        table_transfer(rows),
        "",
        "## Plots",
    ]
    for title, path in figures.items():
        parts.append(
            f"![{title}]({path.relative_to(out)})" if path else f"{title}: not enough finished cells for this plot."
        )
    path = out / REPORT_FILE
    write_text(path, "\n".join(parts) + "\n")
    return path
