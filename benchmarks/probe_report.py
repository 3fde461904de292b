"""Summarise the pretrain-split probe runs (benchmarks/probe.py JSON files) into one markdown page and a plot.

For each run: the held-in patch Dice curve, the held-in whole-volume Dice at the start and the end, the training
loss (mean of the last 25 steps), ARENA's active rank, and, replayed on the recorded loss, the step at which each
candidate stopping rule (the training loop's own PlateauStop) would have stopped. This is the evidence that the
protocol's global choices cite (docs/benchmark.md). Not a test.
Usage: python benchmarks/probe_report.py [--folder benchmarks/results/probe]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from arenaseg.train.loop import PlateauStop

RULES = ((25, 1e-3), (50, 1e-3), (50, 1e-2))  # (patience in steps, min_delta) of PlateauStop, EMA 0.9


def stop_step(losses: list[float], patience: int, min_delta: float) -> int | None:
    """The step after which PlateauStop(patience, min_delta) ends training on this loss curve; None: never."""
    rule = PlateauStop(patience, min_delta)
    return next((i + 1 for i, loss in enumerate(losses) if rule.update(loss)), None)


def tail_loss(losses: list[float], n: int = 25) -> float | None:
    return statistics.fmean(losses[-n:]) if losses else None


def fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def row(run: dict) -> str:
    volume = run["volume_dice"]
    steps = sorted(volume, key=int)
    patch = run["patch_dice"]
    ranks = [r for _, r in run["active_rank"] if r is not None]
    stops = [stop_step(run["loss"], p, d) for p, d in RULES]
    return " | ".join(
        [
            f"| {run['track']}",
            run["organ"],
            run["method"],
            fmt(run["options"].get("lam"), 2) if run["method"].startswith("arena") else "–",
            "–" if run["method"].split("-")[0] in ("lp", "fft", "scratch") else run["options"].get("decoder", "frozen"),
            f"{run['trainable_params']:,}",
            f"{len(run['loss'])}" + ("" if "finished" in run else " (running)"),
            fmt(tail_loss(run["loss"]), 3),
            " → ".join(f"{d:.1f}" for _, d in patch),
            fmt(volume[steps[0]]["mean"]) if steps and steps[0] == "0" else "–",
            fmt(volume[steps[-1]]["mean"]) if steps and steps[-1] != "0" else "–",
            _with_lcc(volume[steps[-1]], "dice") if steps and steps[-1] != "0" else "–",
            _with_lcc(volume[steps[-1]], "hd95") if steps and steps[-1] != "0" else "–",
            f"{ranks[0]} → {ranks[-1]}" if ranks else "–",
            " / ".join("–" if s is None else str(s) for s in stops) + " |",
        ]
    )


def _with_lcc(means: dict, metric: str) -> str:
    """'raw / largest component' of a held-in volume metric (criterion 5 of docs/benchmark.md)."""
    return f"{fmt(means.get(metric))} / {fmt(means.get(metric + '_lcc'))}"


def plot(runs: list[dict], path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    loss_ax, dice_ax = fig.subplots(1, 2)
    for run in runs:
        label = f"{run['organ']} {run['method']} " + (
            f"λ={run['options']['lam']:g}" if run["method"].startswith("arena") else ""
        )
        label += "" if run["options"].get("decoder", "frozen") == "frozen" else f" dec={run['options']['decoder']}"
        losses = run["loss"]
        smooth = [statistics.fmean(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
        loss_ax.plot(range(1, len(smooth) + 1), smooth, label=label)
        dice_ax.plot(*zip(*run["patch_dice"], strict=True), marker="o", label=label)
    loss_ax.set(xlabel="step", ylabel="training Dice loss (10-step mean)", title="training loss")
    dice_ax.set(xlabel="step", ylabel="held-in patch Dice %", title="held-in patches (pretrain split)")
    dice_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="benchmarks/results/probe", help="probe JSON folder (default: %(default)s)")
    args = parser.parse_args()
    folder = Path(args.folder)
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not runs:
        raise SystemExit(f"no probe runs in {folder}")
    runs.sort(key=lambda r: (r["track"], r["organ"], r["method"], r["options"].get("lam", 0)))
    rules = " / ".join(f"patience {p}, δ {d:g}" for p, d in RULES)
    lines = [
        "# Pretrain-split probe runs",
        "",
        "Adapted on the first k pretrain-split cases that contain the organ, measured on 3 other pretrain-split "
        "cases (never the support pool or the test cases). Written by `python benchmarks/probe_report.py`; each "
        "run's command, commit, model and device are in its JSON file beside this page.",
        "",
        f"- commits: {', '.join(sorted({r['git_commit'] for r in runs}))}; "
        f"devices: {', '.join(sorted({r['device'] for r in runs}))}; "
        f"models: {', '.join(sorted({r['model_sha256'] for r in runs}))}",
        f"- stop step: where PlateauStop (EMA 0.9 of the training loss) would end the run, for {rules}; "
        "'–' = not within the steps run",
        "",
        "| track | organ | method | λ | decoder | trainable | steps | loss (last 25) | held-in patch Dice % by "
        "probe point | volume Dice % start | volume Dice % end | Dice raw / LCC | HD95 mm raw / LCC | active rank "
        "| stop step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(row(r) for r in runs),
        "",
        "![training loss and held-in patch Dice](probe.png)",
    ]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    plot(runs, folder / "probe.png")
    print(f"wrote {folder / 'README.md'} and {folder / 'probe.png'}")


if __name__ == "__main__":
    main()
