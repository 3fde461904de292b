"""Summarise the pretrain-split probe runs (benchmarks/probe.py JSON files) into one markdown page and a plot.

For each run: the held-in patch Dice curve, the held-in whole-volume Dice at the start and the end, the training
loss (mean of the last 25 steps), ARENA's active rank, and, replayed on the recorded loss, the step at which each
candidate stopping rule (the training loop's own PlateauStop) would have stopped. Then the global choices, applied
mechanically by docs/benchmark.md's written criteria (1 with its amendments, 2 to 5), or the runs each still
waits for: this is the evidence that the protocol's choices cite. Not a test.
Usage: python benchmarks/probe_report.py [--folder benchmarks/results/probe] [--decoder | --bench-arguments]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from arenaseg.adapters.factory import decoder_for
from arenaseg.train.loop import PlateauStop

RULES = tuple((p, d) for p in (25, 50) for d in (1e-3, 1e-2))  # (patience, min_delta) of PlateauStop, EMA 0.9
CAPS = (100, 200, 300)  # criterion 1's candidate step caps
MARGIN = 2.0  # criterion 1: patch-Dice points below a run's best trained point
POLICIES = ("frozen", "full", "lowrank")  # criterion 2's decoder policies
POLICY_MARGIN = 2.0  # criterion 2: volume-Dice points within which fewer parameters win
LAMBDAS = (0.0, 0.1, 0.3)  # criterion 3's candidates
PROBE_LAM = 0.3  # the lambda in effect when the criteria were written: the budget and decoder runs use it
RANK_MARGIN, LOSS_MARGIN = 1.0, 0.02  # criterion 3: r64 vs r16 volume Dice; r16 final loss vs lambda 0's
PATH_LAMBDAS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)  # criterion 6's lambda path (it goes on upward if the top qualifies)
PATH_EXTENSION = (1.2, 1.5)
TAIL_VARIANTS = ((0.7, 0.1),)  # criterion 6's settled-tail variants: (lambda, freeze_tail)
NOISE = 1.73  # criterion 6: one standard deviation of a two-organ probe score, from the v2 grid's seed spread
BASE_ORGAN, NOVEL_ORGAN = "right_kidney", "pancreas"
# Criterion 1's families; its choice was final (4544998) before AdaLoRA's probe runs, which criterion 4 alone reads
BUDGET_FAMILIES = ("lp", "fft", "lora", "arena")


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


def family(run: dict) -> str:
    return run["method"].split("-")[0]


def decoder(run: dict) -> str | None:
    """The decoder policy of a low-rank run; None for head-only and full-network runs."""
    return None if family(run) in ("lp", "fft", "scratch") else run["options"].get("decoder", "frozen")


def lam(run: dict) -> float | None:
    return run["options"]["lam"] if family(run) == "arena" else None


def tail(run: dict) -> float | None:
    """ARENA's freeze_tail (runs from before the option had none)."""
    return run["options"].get("freeze_tail") if family(run) == "arena" else None


def describe(organ: str, method: str, lam_: float | None = None, decoder_: str | None = None) -> str:
    return " ".join([organ, method, *([f"λ {lam_:g}"] if lam_ is not None else []), *([decoder_] if decoder_ else [])])


def find(
    runs: list[dict],
    organ: str,
    method: str,
    lam_: float | None = None,
    decoder_: str = "frozen",
    tail_: float | None = None,
):
    """The finished run of that setting, or None."""
    setting = (organ, method, lam_, tail_)
    return next(
        (
            r
            for r in runs
            if (r["organ"], r["method"], lam(r), tail(r)) == setting
            and decoder(r) in (None, decoder_)
            and "finished" in r
        ),
        None,
    )


def end_dice(run: dict) -> float:
    volume = run["volume_dice"]
    return volume[max(volume, key=int)]["mean"]


def best_trained(run: dict) -> float:
    """The best held-in patch Dice at a trained probe point (criterion 1 as amended: the start does not count)."""
    return max(d for step, d in run["patch_dice"] if step > 0)


def patch_at(run: dict, step: int) -> float:
    """Patch Dice at the last probe point at or before ``step``."""
    return [d for s, d in run["patch_dice"] if s <= step][-1]


def choose_decoder(runs: list[dict]) -> tuple[str | None, list[str]]:
    """Criterion 2: the highest held-in volume Dice averaged over LoRA r16 and ARENA r16 on the novel organ; a
    policy within POLICY_MARGIN of the best with fewer trainable parameters wins."""
    wanted = {
        (p, m): find(runs, NOVEL_ORGAN, m, PROBE_LAM if m.startswith("arena") else None, p)
        for p in POLICIES
        for m in ("lora-r16", "arena-r16")
    }
    missing = [
        describe(NOVEL_ORGAN, m, PROBE_LAM if m.startswith("arena") else None, p)
        for (p, m), run in wanted.items()
        if run is None
    ]
    if missing:
        return None, [f"waits for: {', '.join(missing)}"]
    score = {p: (wanted[p, "lora-r16"], wanted[p, "arena-r16"]) for p in POLICIES}
    dice = {p: (end_dice(a) + end_dice(b)) / 2 for p, (a, b) in score.items()}
    params = {p: (a["trainable_params"] + b["trainable_params"]) / 2 for p, (a, b) in score.items()}
    best = max(dice.values())
    chosen = min((p for p in POLICIES if dice[p] >= best - POLICY_MARGIN), key=params.get)
    return chosen, [f"{p}: mean volume Dice {dice[p]:.1f}, {params[p]:,.0f} trainable" for p in POLICIES]


def counted_runs(runs: list[dict], chosen_decoder: str, families: tuple[str, ...] = BUDGET_FAMILIES) -> list[dict]:
    """The runs criteria 1 and 4 count: every finished base-organ run of ``families``, the novel organ's under the
    policy each family runs by when the chosen one is asked of all (full for AdaLoRA: it cannot wrap a Conv3d)."""
    counted = [r for r in runs if "finished" in r and len(r["patch_dice"]) > 1 and family(r) in families]
    return [r for r in counted if r["track"] == "base" or decoder(r) in (None, decoder_for(family(r), chosen_decoder))]


def check_learning_rates(runs: list[dict], chosen_decoder: str | None, cap: int | None) -> tuple[str | None, list]:
    """Criterion 4: lr 1e-3 (head x10) stays for a family whose training loss has plateaued by the cap in every
    counted run, read as: every candidate PlateauStop rule, the most patient included, would have stopped it by
    then. Otherwise that family's lr needs the 3x probe, and the choice waits for it."""
    if cap is None:
        return None, ["waits for the step budget (criterion 1)"]
    counted = counted_runs(runs, chosen_decoder, (*BUDGET_FAMILIES, "adalora"))
    late = {
        f"{r['organ']} {r['method']}": family(r)
        for r in counted
        if any(stop_step(r["loss"][:cap], p, d) is None for p, d in RULES)
    }
    families = sorted({family(r) for r in counted})
    if late:
        return None, [
            f"not plateaued by step {cap}: {', '.join(late)}; probe lr 3x for {', '.join(sorted(set(late.values())))}"
        ]
    return "lr 1e-3, head x10 (unchanged)", [f"every counted run of {', '.join(families)} plateaus by step {cap}"]


def choose_budget(runs: list[dict], chosen_decoder: str | None) -> tuple[int | None, tuple | None, list[str]]:
    """Criterion 1 with its amendments: the smallest cap at which every counted run's patch Dice is within MARGIN
    of its best trained point (if there is none, the cap whose largest shortfall below a run's best is smallest),
    then the stopping rule among RULES that never stops a run at a point more than MARGIN below its best (judged at
    the last probe point at or before the stop); of those, the one that saves the most steps. Counted: every
    finished base-organ run, and the novel organ's under the chosen decoder policy."""
    if chosen_decoder is None:
        return None, None, ["waits for the decoder policy (criterion 2)"]
    counted = counted_runs(runs, chosen_decoder)
    if not counted:
        return None, None, ["waits for a finished run"]
    lines = []
    cap = next((c for c in CAPS if all(patch_at(r, c) >= best_trained(r) - MARGIN for r in counted)), None)
    for c in CAPS:
        short = [
            f"{r['organ']} {r['method']} ({best_trained(r) - patch_at(r, c):.2f} below)"
            for r in counted
            if patch_at(r, c) < best_trained(r) - MARGIN
        ]
        lines.append(f"cap {c}: " + (f"too short for {', '.join(short)}" if short else "every counted run within"))
    if cap is None:  # amendment 2: the cap whose worst shortfall is smallest (min keeps the smaller cap on ties)
        cap = min(CAPS, key=lambda c: max(best_trained(r) - patch_at(r, c) for r in counted))
        lines.append(f"no cap within {MARGIN:g} for every counted run: cap {cap} has the smallest worst shortfall")
    qualifying = {}
    for patience, delta in RULES:
        stops = [(r, stop_step(r["loss"][:cap], patience, delta)) for r in counted]
        if all(s is None or patch_at(r, s) >= best_trained(r) - MARGIN for r, s in stops):
            qualifying[patience, delta] = sum(cap - (s or cap) for _, s in stops)
        lines.append(
            f"patience {patience}, δ {delta:g}: stops at "
            + ", ".join("–" if s is None else str(s) for _, s in stops)
            + ("" if (patience, delta) in qualifying else " (stops a run too early)")
        )
    rule = max(qualifying, key=qualifying.get) if qualifying else None
    return cap, rule, [f"counted: {', '.join(describe(r['organ'], r['method'], lam(r)) for r in counted)}", *lines]


def choose_lambda(runs: list[dict], chosen_decoder: str | None) -> tuple[float | None, list[str]]:
    """Criterion 3: the largest lambda at which ARENA r64's held-in volume Dice is not more than RANK_MARGIN
    below r16's on both organs while r16's final training loss (last 25 steps) is within LOSS_MARGIN of lambda 0's;
    if none, the lambda with the best mean volume Dice over both ranks and organs.
    Decided as soon as the missing runs cannot change the answer: a lambda that one organ's finished runs already
    rule out needs no more runs, and the first qualifying lambda from the top wins whatever the smaller ones give.
    """
    if chosen_decoder is None:
        return None, ["waits for the decoder policy (criterion 2)"]
    organs = ((BASE_ORGAN, "frozen"), (NOVEL_ORGAN, chosen_decoder))
    decoders = dict(organs)
    wanted = {(o, m, x): find(runs, o, m, x, d) for o, d in organs for m in ("arena-r16", "arena-r64") for x in LAMBDAS}

    def verdict(x: float) -> tuple[bool | None, str]:
        """Whether lambda x qualifies (None: not known yet), and the evidence."""
        parts, known = [], []
        for o, _ in organs:
            r16, r64, r16_at_0 = wanted[o, "arena-r16", x], wanted[o, "arena-r64", x], wanted[o, "arena-r16", 0.0]
            if r16 is not None and r64 is not None:
                gap = end_dice(r64) - end_dice(r16)
                known.append(gap >= -RANK_MARGIN)
                parts.append(f"{o} r64 − r16 volume Dice {gap:+.1f}")
            if r16 is not None and r16_at_0 is not None:
                fit = tail_loss(r16["loss"]) - tail_loss(r16_at_0["loss"])
                known.append(fit <= LOSS_MARGIN)
                parts.append(f"{o} r16 loss − λ 0's {fit:+.3f}")
        text = f"λ {x:g}: " + ("; ".join(parts) if parts else "no finished pair yet")
        if not all(known):
            return False, text
        return (True if len(known) == 2 * len(organs) else None), text

    lines = []
    for x in sorted(LAMBDAS, reverse=True):
        qualifies, text = verdict(x)
        lines.append(text + {True: " (qualifies)", False: " (ruled out)", None: ""}[qualifies])
        if qualifies:
            return x, lines
        if qualifies is None:
            needed = [k for k, run in wanted.items() if run is None and (k[2] == x or k[1:] == ("arena-r16", 0.0))]
            waiting = [describe(o, m, y, decoders[o]) for o, m, y in needed]
            return None, [*lines, f"waits for: {', '.join(waiting)}"]
    missing = [describe(o, m, y, decoders[o]) for (o, m, y), run in wanted.items() if run is None]
    if missing:
        return None, [*lines, f"no λ qualifies; the best mean volume Dice decides, and waits for: {', '.join(missing)}"]
    mean = {x: statistics.fmean(end_dice(wanted[k]) for k in wanted if k[2] == x) for x in LAMBDAS}
    means = ", ".join(f"λ {x:g} {mean[x]:.2f}" for x in sorted(mean, reverse=True))
    return max(mean, key=mean.get), [*lines, f"no λ qualifies: the best mean volume Dice decides ({means})"]


def path_point(runs: list[dict], x: float, chosen_decoder: str, tail_: float | None = None) -> dict | None:
    """Criterion 6's numbers for lambda x (with freeze_tail ``tail_``) over its four runs, or None while one is
    missing."""
    wanted = [
        find(runs, organ, m, x, d, tail_)
        for organ, d in ((BASE_ORGAN, "frozen"), (NOVEL_ORGAN, chosen_decoder))
        for m in ("arena-r16", "arena-r64")
    ]
    if None in wanted:
        return None
    reports = [r.get("rank_report") for r in wanted]
    return {
        "score": statistics.fmean(end_dice(r) for r in wanted),
        "score_lcc": statistics.fmean(r["volume_dice"][max(r["volume_dice"], key=int)]["dice_lcc"] for r in wanted),
        "active_rank": statistics.fmean(r["active_rank"][-1][1] for r in wanted),
        "active_params": None if None in reports else statistics.fmean(t["totals"]["params"] for t in reports),
    }


def choose_lambda_path(
    runs: list[dict], chosen_decoder: str | None
) -> tuple[tuple[float, float | None] | None, bool, list[str]]:
    """Criterion 6: the sparsest candidate whose mean held-in volume Dice (four runs) is at least the best one's
    minus NOISE; a candidate is a lambda of the path (no tail) or a settled-tail variant (lambda, freeze_tail).
    Returns ((lambda, freeze_tail), final, evidence): final once every lambda of the path has its four runs and the
    top one does not qualify (else the path goes on upward); otherwise the choice among the finished candidates,
    provisional. A variant still running is waited for only once it has started. Sparsity is the mean active rank,
    which every run records (the active parameters only the newer ones)."""
    if chosen_decoder is None:
        return None, False, ["waits for the decoder policy (criterion 2)"]
    path = [*PATH_LAMBDAS, *(x for x in PATH_EXTENSION if find(runs, BASE_ORGAN, "arena-r16", x) is not None)]
    started = {(r["options"]["lam"], tail(r)) for r in runs if family(r) == "arena" and tail(r) is not None}
    candidates = [(x, None) for x in path] + [v for v in TAIL_VARIANTS if v in started]
    points = {c: path_point(runs, c[0], chosen_decoder, c[1]) for c in candidates}
    done = {c: p for c, p in points.items() if p is not None}
    if not done:
        return None, False, ["waits for a λ with all four runs"]
    best = max(p["score"] for p in done.values())
    qualifying = [c for c, p in done.items() if p["score"] >= best - NOISE]
    chosen = min(qualifying, key=lambda c: (done[c]["active_rank"], -c[0]))
    lines = []
    names = {c: f"λ {c[0]:g}" + ("" if c[1] is None else f" with freeze_tail {c[1]:g}") for c in candidates}
    for c, p in points.items():
        name = names[c]
        if p is None:
            lines.append(f"{name}: waits for its runs")
            continue
        params = "–" if p["active_params"] is None else f"{p['active_params']:,.0f}"
        verdict = "within noise" if c in qualifying else f"more than {NOISE:g} below the best"
        lines.append(
            f"{name}: mean volume Dice {p['score']:.2f} ({p['score_lcc']:.2f} with the largest component), "
            f"mean active rank {p['active_rank']:,.0f}, mean active parameters {params}: {verdict}"
        )
    top_qualifies = (max(path), None) in qualifying
    final = len(done) == len(points) and not (top_qualifies and len(path) < len(PATH_LAMBDAS) + len(PATH_EXTENSION))
    if not final:
        missing = [names[c] for c, p in points.items() if p is None]
        why = f"{', '.join(missing)} unfinished" if missing else "the largest λ qualifies: the path goes on upward"
        lines.append(f"provisional: {why}")
    return chosen, final, lines


def check_largest_component(runs: list[dict]) -> tuple[str | None, list[str]]:
    """Criterion 5: on if, over the finished runs' end points, the largest component raises the mean held-in
    volume Dice and lowers the mean HD95."""
    ends = [r["volume_dice"][max(r["volume_dice"], key=int)] for r in runs if "finished" in r]
    if not ends:
        return None, ["waits for a finished run"]
    mean = {k: statistics.fmean(e[k] for e in ends) for k in ("dice", "dice_lcc", "hd95", "hd95_lcc")}
    on = mean["dice_lcc"] > mean["dice"] and mean["hd95_lcc"] < mean["hd95"]
    return "on" if on else "off", [
        f"over {len(ends)} runs: Dice {mean['dice']:.1f} → {mean['dice_lcc']:.1f}, "
        f"HD95 {mean['hd95']:.1f} → {mean['hd95_lcc']:.1f} mm"
    ]


def bench_arguments(runs: list[dict]) -> str | None:
    """The `arenaseg bench` options that carry the choices to a grid, or None while a probe run is unfinished
    (criterion 1 counts every finished run: a choice made before all are in could change) or a choice waits."""
    if any("finished" not in r for r in runs):
        return None
    chosen_decoder = choose_decoder(runs)[0]
    cap, rule, _ = choose_budget(runs, chosen_decoder)
    chosen_path, final, _ = choose_lambda_path(runs, chosen_decoder)
    if not final:
        chosen_path = None
    if None in (chosen_decoder, cap, chosen_path, check_learning_rates(runs, chosen_decoder, cap)[0]):
        return None
    patience, delta = rule if rule is not None else (0, 1e-3)
    chosen_lam, chosen_tail = chosen_path
    return (
        f"--novel-decoder {chosen_decoder} --steps {cap} --stop-patience {patience} --stop-min-delta {delta:g} "
        f"--lam {chosen_lam:g}" + ("" if chosen_tail is None else f" --freeze-tail {chosen_tail:g}")
    )


def choices(runs: list[dict]) -> list[str]:
    """The markdown section that applies the written criteria to the runs."""
    chosen_decoder, decoder_lines = choose_decoder(runs)
    cap, rule, budget_lines = choose_budget(runs, chosen_decoder)
    chosen_lam, lam_lines = choose_lambda(runs, chosen_decoder)
    path_choice, final, path_lines = choose_lambda_path(runs, chosen_decoder)
    path_value = None
    if path_choice is not None:
        path_value = f"{path_choice[0]:g}" + ("" if path_choice[1] is None else f", freeze_tail {path_choice[1]:g}")
        path_value += "" if final else " (provisional)"
    rule_text = "no plateau stop" if rule is None else f"PlateauStop patience {rule[0]}, min_delta {rule[1]:g}"
    sections = [
        ("Criterion 2, decoder policy (novel track)", chosen_decoder, decoder_lines),
        ("Criterion 1 as amended, step budget", None if cap is None else f"{cap} steps, {rule_text}", budget_lines),
        (
            "Criterion 3, ARENA's λ (replaced by criterion 6)",
            None if chosen_lam is None else f"{chosen_lam:g}",
            lam_lines,
        ),
        ("Criterion 6, ARENA's λ path (one-SE rule)", path_value, path_lines),
        ("Criterion 4, learning rates", *check_learning_rates(runs, chosen_decoder, cap)),
        ("Criterion 5, largest-component post-processing", *check_largest_component(runs)),
    ]
    lines = ["## Choices by the written criteria (docs/benchmark.md)", ""]
    for title, value, evidence in sections:
        lines += [f"- **{title}**: {value or 'not yet decidable'}"]
        lines += [f"  - {line}" for line in evidence]
    return lines


def plot(runs: list[dict], path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    loss_ax, dice_ax = fig.subplots(1, 2)
    for run in runs:
        label = f"{run['organ']} {run['method']} " + (
            f"λ={run['options']['lam']:g}" if run["method"].startswith("arena") else ""
        )
        label += f" tail={tail(run):g}" if tail(run) else ""
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
    parser.add_argument(
        "--bench-arguments",
        action="store_true",
        help="only print the `arenaseg bench` options of the choices; exit 1 while any is not decidable",
    )
    parser.add_argument(
        "--decoder", action="store_true", help="only print the chosen decoder policy; exit 1 while not decidable"
    )
    args = parser.parse_args()
    folder = Path(args.folder)
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not runs:
        raise SystemExit(f"no probe runs in {folder}")
    if args.decoder:
        chosen = choose_decoder(runs)[0]
        if chosen is None:
            raise SystemExit("the decoder policy is not decidable yet: see the README's Choices section")
        print(chosen)
        return
    if args.bench_arguments:
        arguments = bench_arguments(runs)
        if arguments is None:
            raise SystemExit("the probe's choices are not all decidable yet: see the README's Choices section")
        print(arguments)
        return
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
        "",
        *choices(runs),
    ]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    plot(runs, folder / "probe.png")
    print(f"wrote {folder / 'README.md'} and {folder / 'probe.png'}")


if __name__ == "__main__":
    main()
