"""`arenaseg report`: protocol-v2 tables and plots from a synthetic bench folder (fixture cells, no training).

The fixture writes run.json files in the bench layout (both tracks, zero-shot and scratch, several seeds), as
finished cells would, and results.csv is rebuilt from them; every expected number below is recomputed from the
fixture's own values.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import shutil
import statistics
from pathlib import Path

import pytest

from arenaseg.bench.grid import BASE_ORGANS, PROTOCOL, RESULTS_FILE, cell_dir, rebuild_results
from arenaseg.bench.report import MISSING, full_ranks, learned_ranks, method_style, write_report
from arenaseg.bench.results import ResultRow, parse_method, read_results
from arenaseg.cli import main
from arenaseg.utils.errors import UserError

LAYERS = (
    "swinViT.layers1.0.blocks.0.attn.qkv",
    "swinViT.layers1.0.blocks.0.mlp.linear1",
    "decoder2.conv_block.conv1.conv",
)
FULL_RANK = {LAYERS[0]: 12}  # a narrow layer (min(in, out)); the other cells' rank reports predate the field
TESTS = ["btcv_0036", "btcv_0037"]
RANKED = ("lora-r4", "lora-r16", "lora-r64", "arena-r4", "arena-r16", "arena-r64")
BASE = ("lp", "fft", *RANKED)  # no adalora-r16: its row is all "–"
NOVEL = ("lp", "fft", *RANKED, "scratch")
NOVEL_ORGANS = ("pancreas", "gallbladder")
SEEDS_BY_K = {1: (0, 1, 2), 5: (0, 1, 2), 10: (0,)}  # k = 10: the whole pool, run once
# Missing cells: lora-r64's aorta at k = 1 (no mean over the 3 base organs), arena-r64's stomach at k = 5 seed 2
# (a mean over 2 seeds)
DROPPED = {("base", "lora-r64", "aorta", 1, s) for s in (0, 1, 2)} | {("base", "arena-r64", "stomach", 5, 2)}
NO_LCC = "lp"  # its novel cells predate the LCC and NSD metrics
V1_COLUMNS = "method,base_method,rank,organ,shots,seed,mean_dice,mean_hd95,trainable_params,whole_pool,steps_done"


def fake_record(track: str, name: str, organ: str, k: int, seed: int, precision: str = "fp32") -> dict:
    """A run.json as `run_adapt` writes it, with made-up but seeded numbers (test fixture)."""
    method, rank = parse_method(name)
    rng = random.Random(f"{track}/{name}/{organ}/{k}/{seed}/{precision}")
    trainable = 0 if method == "zero-shot" else 13 if method == "lp" else 4_000_000 if rank is None else 1000 * rank
    record = {
        "method": method,
        "track": track,
        "protocol": PROTOCOL,
        "organ": organ,
        "shots": k,
        "seed": seed,
        "support_cases": [f"btcv_00{26 + i}" for i in range(k)],
        "support_note": "whole pool" if k == 10 else None,
        "test_cases": TESTS,
        "model": "btcv-fs",
        "model_sha256": "0123456789abcdef",
        "settings": {
            # a zero-shot cell records the default steps it never ran
            "train": {
                "steps": 100 if k == 0 else 400,
                "patches_per_step": 2,
                "lr": 0.001,
                "head_lr_scale": 10.0,
                "precision": precision,
            },
            "preprocess": {"spacing": [3.0, 3.0, 3.0], "patch_size": [64, 64, 64]},
            "options": {"rank": rank or 16, "lam": 0.05, "rho": 0.02, "decoder": "frozen"},
        },
        "trainable_params": trainable,
        "steps_done": 0 if k == 0 else rng.randint(150, 400),
        "stopped_early": k > 0 and rng.random() < 0.5,
        "final_loss": None if k == 0 else rng.uniform(0.2, 0.9),
        "support_loss": None if k == 0 or seed == 1 else rng.uniform(0.1, 0.6),  # seed 1: recorded before the field
        "seconds_per_step": None if k == 0 else rng.uniform(2.0, 4.0),
        "train_seconds": 300.0,
        "eval_seconds": 20.0,
        "peak_mem_mb": 900.0,
        "device": "cpu (fixture)",
        "git_commit": "abc1234",
        "adapter_bytes": 4 * trainable,
        "rank_report": {"totals": {"params": 0 if rank is None else rng.randint(100, 1000 * rank)}},
        "mean_dice": rng.uniform(20, 80),
        "mean_hd95": rng.uniform(5, 40),
    }
    if not (track == "novel" and name == NO_LCC):
        for metric in ("mean_dice_lcc", "mean_hd95_lcc", "mean_nsd", "mean_nsd_lcc"):
            record[metric] = rng.uniform(5, 90)
    if method == "arena":
        record["ranks"] = {layer: {"initial": rank, "active": rng.randint(0, rank)} for layer in LAYERS}
        record["active_rank_total"] = sum(e["active"] for e in record["ranks"].values())
        record["rank_report"]["layers"] = {layer: {"full_rank": full} for layer, full in FULL_RANK.items()}
    record["active_params"] = rng.randint(trainable // 10, trainable) if method == "arena" else trainable
    return record


def write_cells(out: Path, cells: list[tuple], precision: str = "fp32") -> dict:
    records = {}
    for key in cells:
        record = fake_record(*key, precision)
        path = out / cell_dir(*key) / "run.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))
        records[key] = record
    return records


def grid_cells() -> list[tuple]:
    cells = [("base", "zero-shot", o, 0, 0) for o in BASE_ORGANS]
    cells += [("base", m, o, k, s) for m in BASE for o in BASE_ORGANS for k in (1, 5) for s in SEEDS_BY_K[k]]
    cells += [("novel", m, o, k, s) for m in NOVEL for o in NOVEL_ORGANS for k in (5, 10) for s in SEEDS_BY_K[k]]
    cells += [("novel", "lora-r16", "esophagus", 5, s) for s in (0, 1, 2)]  # an organ whose grid is incomplete
    return [c for c in cells if c not in DROPPED]


def section(report: str, heading: str) -> str:
    """The text of the section whose heading starts with ``heading``, up to the next heading."""
    lines, keep = [], False
    for line in report.splitlines():
        if line.startswith("#"):
            keep = line.lstrip("# ").startswith(heading)
            continue
        if keep:
            lines.append(line)
    return "\n".join(lines)


def table(text: str) -> dict[str, dict[str, str]]:
    """Row label -> {column header: cell} of the first Markdown table in ``text`` (bold marks removed)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return rows


def first_row(text: str) -> str:
    return [line for line in text.splitlines() if line.startswith("|")][2].strip("|").split("|")[0].strip()


def fmt(values: list[float], digits: int = 1) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def organ_means(records, track, method, k, organs, metric="mean_dice") -> list[float]:
    """Per seed with every organ present, the mean over the organs (the fixture's whole-pool k = 10 has seed 0)."""
    seeds = [s for s in (0, 1, 2) if all((track, method, o, k, s) in records for o in organs)]
    return [statistics.fmean(records[track, method, o, k, s][metric] for o in organs) for s in seeds]


V2 = f"{PROTOCOL} fp32"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "bench"
    records = write_cells(out, grid_cells())
    bf16 = write_cells(out, [("base", "lp", o, 5, 3) for o in BASE_ORGANS], "bf16")  # another precision: own table
    rebuild_results(out)
    return out, records, bf16, write_report(out).read_text()


def test_base_table_per_organ_with_zero_shot_first(bench):
    _, records, _, report = bench
    text = section(report, f"base track, {V2}: Dice (%) per organ, k=5")
    rows = table(text)
    assert first_row(text) == "zero-shot"
    for organ in BASE_ORGANS:
        assert rows["zero-shot"][organ] == fmt([records["base", "zero-shot", organ, 0, 0]["mean_dice"]])
        assert rows["lp"][organ] == fmt([records["base", "lp", organ, 5, s]["mean_dice"] for s in (0, 1, 2)])
    assert rows["zero-shot"]["mean"] == fmt(organ_means(records, "base", "zero-shot", 0, BASE_ORGANS))
    assert rows["fft"]["mean"] == fmt(organ_means(records, "base", "fft", 5, BASE_ORGANS))
    assert set(rows["adalora-r16"].values()) == {MISSING}  # in the track's grid, never run
    assert "scratch" not in rows  # a novel-track method
    # arena-r64's stomach lacks seed 2: the mean is over seeds 0 and 1, and says so
    assert rows["arena-r64"]["mean"] == fmt(organ_means(records, "base", "arena-r64", 5, BASE_ORGANS)) + " (n=2)"
    assert len(organ_means(records, "base", "arena-r64", 5, BASE_ORGANS)) == 2
    fewer_seeds = next(line for line in text.splitlines() if line.startswith("| arena-r64"))
    assert "**" not in fewer_seeds  # a mean over fewer seeds never counts as the best
    assert "commit(s) abc1234" in text and "cpu (fixture)" in text and "precision fp32" in text
    assert "ARENA lambda 0.05, rho 0.02" in text and "step cap 400," in text  # the trained cells' cap alone

    k1 = table(section(report, f"base track, {V2}: Dice (%) per organ, k=1"))
    assert k1["lora-r64"]["aorta"] == MISSING and k1["lora-r64"]["mean"] == MISSING  # a mean needs every organ
    assert k1["zero-shot"] == rows["zero-shot"]  # the same k = 0 cells head every k's table


def test_rows_of_another_precision_get_their_own_tables(bench):
    _, records, bf16, report = bench
    assert f"Groups here: {V2}; {PROTOCOL} bf16." in report
    v2 = table(section(report, f"base track, {V2}: Dice (%) per organ, k=5"))
    assert v2["lp"]["right_kidney"] == fmt(
        [records["base", "lp", "right_kidney", 5, s]["mean_dice"] for s in (0, 1, 2)]
    )
    other = table(section(report, f"base track, {PROTOCOL} bf16: Dice (%) per organ, k=5"))
    assert other["lp"]["right_kidney"] == fmt([bf16["base", "lp", "right_kidney", 5, 3]["mean_dice"]])
    assert other["fft"]["right_kidney"] == MISSING


def test_novel_table_over_the_organs_whose_grid_is_complete(bench):
    _, records, _, report = bench
    text = section(report, f"novel track, {V2}")
    assert "Organs of the means: pancreas, gallbladder (the organs whose grid is complete; left out: esophagus)" in text
    rows = table(section(report, f"novel track, {V2}: mean over organs per k"))
    assert "zero-shot" not in rows
    for method in ("scratch", "arena-r16", "fft"):
        assert rows[method]["Dice k=5"] == fmt(organ_means(records, "novel", method, 5, NOVEL_ORGANS))
        assert rows[method]["HD95 k=5"] == fmt(organ_means(records, "novel", method, 5, NOVEL_ORGANS, "mean_hd95"))
    assert rows["lp"]["Dice k=10"] == fmt(organ_means(records, "novel", "lp", 10, NOVEL_ORGANS))
    assert "±" not in rows["lp"]["Dice k=10"]  # the whole pool, run once
    assert set(rows["adalora-r16"].values()) == {MISSING}


def test_post_processing_table_shows_lcc_beside_the_raw_metric(bench):
    _, records, _, report = bench
    rows = table(section(report, f"novel track, {V2}: with and without largest-component post-processing, k=5"))
    for label, metric in (("Dice", "mean_dice"), ("Dice LCC", "mean_dice_lcc"), ("HD95 LCC", "mean_hd95_lcc")):
        assert rows["arena-r4"][label] == fmt(organ_means(records, "novel", "arena-r4", 5, NOVEL_ORGANS, metric))
    assert rows[NO_LCC]["Dice"] == fmt(organ_means(records, "novel", NO_LCC, 5, NOVEL_ORGANS))
    assert {rows[NO_LCC][c] for c in ("Dice LCC", "HD95 LCC", "NSD", "NSD LCC")} == {MISSING}  # never invented


def test_rank_table_and_spread_per_track(bench):
    _, records, _, report = bench
    for track, organs in (("base", BASE_ORGANS), ("novel", NOVEL_ORGANS)):
        rows = table(section(report, f"{track} track, {V2}: rank robustness"))
        for family, label in (("lora", "LoRA"), ("arena", "ARENA")):
            per_rank = {r: organ_means(records, track, f"{family}-r{r}", 5, organs) for r in (4, 16, 64)}
            for r, values in per_rank.items():
                assert rows[label][f"r={r}"].removesuffix(" (n=2)") == fmt(values)
            means = [statistics.fmean(v) for v in per_rank.values()]
            assert rows[label]["spread"] == f"{max(means) - min(means):.1f}"
            assert rows[label]["r=64 - r=4"] == f"{means[2] - means[0]:+.1f}"
        text = section(report, f"{track} track, {V2}: rank robustness")
        assert not any(line.endswith("** |") for line in text.splitlines())  # a signed change is not a score
        assert "Spread and change over r=4, r=16, r=64." in section(report, f"{track} track, {V2}: rank robustness")


def test_rank_spread_over_the_ranks_both_families_ran(tmp_path):
    """The decisive grid runs r = 4 and 64 only, and ARENA alone r = 16: both spreads are over r = 4 and 64."""
    cells = [("base", m, o, 5, 0) for m in ("lora-r4", "lora-r64", *RANKED[3:]) for o in BASE_ORGANS]
    records = write_cells(tmp_path, cells)
    rebuild_results(tmp_path)
    text = section(write_report(tmp_path).read_text(), f"base track, {V2}: rank robustness")
    rows = table(text)
    assert rows["LoRA"]["r=16"] == MISSING
    for family, label in (("lora", "LoRA"), ("arena", "ARENA")):
        means = [statistics.fmean(organ_means(records, "base", f"{family}-r{r}", 5, BASE_ORGANS)) for r in (4, 64)]
        assert rows[label]["spread"] == f"{max(means) - min(means):.1f}"
        assert rows[label]["r=64 - r=4"] == f"{means[1] - means[0]:+.1f}"
    assert "Spread and change over r=4, r=64." in text

    # with one common rank there is nothing to compare
    only_r4 = tmp_path / "r4"
    write_cells(only_r4, [c for c in cells if c[1] in ("lora-r4", "arena-r4", "arena-r64")])
    rebuild_results(only_r4)
    rows = table(section(write_report(only_r4).read_text(), f"base track, {V2}: rank robustness"))
    assert rows["LoRA"]["spread"] == rows["ARENA"]["spread"] == MISSING
    assert rows["ARENA"]["highest - lowest r"] == MISSING


def test_arena_minus_the_others_is_paired_by_seed(bench):
    """Differences of the same seed's cells, never of means over different seeds; no bold on a difference."""
    _, records, _, report = bench
    text = section(report, f"base track, {V2}: ARENA minus the others, paired by seed, k=5")
    rows = table(text)
    assert list(rows) == [f"arena-r{a} - {b}" for a in (4, 16, 64) for b in ("lora-r4", "lora-r16", "lora-r64", "fft")]
    assert "**" not in text

    def signed(values: list[float]) -> str:
        mean = statistics.fmean(values)
        return f"{mean:+.1f}" if len(values) == 1 else f"{mean:+.1f} ± {statistics.stdev(values):.1f}"

    def dice(method, organ, seed, metric="mean_dice"):
        return records["base", method, organ, 5, seed][metric]

    row = rows["arena-r64 - lora-r4"]
    seeds = {o: (0, 1) if o == "stomach" else (0, 1, 2) for o in BASE_ORGANS}  # arena-r64's stomach lacks seed 2
    diffs = {o: [dice("arena-r64", o, s) - dice("lora-r4", o, s) for s in seeds[o]] for o in BASE_ORGANS}
    for organ in ("right_kidney", "aorta"):
        assert row[organ] == signed(diffs[organ])
    assert row["stomach"] == signed(diffs["stomach"]) + " (n=2)"
    for column, metric in (("mean", "mean_dice"), ("mean LCC", "mean_dice_lcc")):
        per_seed = [
            statistics.fmean(dice("arena-r64", o, s, metric) for o in BASE_ORGANS)
            - statistics.fmean(dice("lora-r4", o, s, metric) for o in BASE_ORGANS)
            for s in (0, 1)
        ]
        assert row[column] == signed(per_seed) + " (n=2)"
    higher = [d for v in diffs.values() for d in v]
    assert row["ARENA higher"] == f"{sum(d > 0 for d in higher)}/8"


def per_seed_means(records, track, method, organs, metric="mean_dice", k=5) -> dict[int, float]:
    """Seed -> the mean over ``organs`` for the seeds where every organ has the method's cell."""
    seeds = [s for s in (0, 1, 2) if all((track, method, o, k, s) in records for o in organs)]
    return {s: statistics.fmean(records[track, method, o, k, s][metric] for o in organs) for s in seeds}


def signed_fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:+.1f}" if len(values) == 1 else f"{mean:+.1f} ± {statistics.stdev(values):.1f}"


def test_the_papers_claims_are_paired_differences_at_k5(bench):
    """P1-P4: one method minus another on the same seeds (mean over the organs), and their parameters kept."""
    out, records, _, _ = bench
    rows = table(section(write_report(out).read_text(), f"base track, {V2}: the paper's claims, P1-P4"))
    assert [row["here"] for row in rows.values()] == [
        "lora-r64 - lora-r4",
        "arena-r64 - arena-r4",
        "arena-r64 - lora-r64",
        "arena-r64 - fft",
    ]
    p3 = rows["P3"]
    for column, metric in (("Dice", "mean_dice"), ("Dice LCC", "mean_dice_lcc")):
        arena, lora = (per_seed_means(records, "base", m, BASE_ORGANS, metric) for m in ("arena-r64", "lora-r64"))
        assert sorted(arena) == [0, 1]  # arena-r64's stomach lacks seed 2: only two seeds pair
        assert p3[column] == signed_fmt([arena[s] - lora[s] for s in (0, 1)])
    assert p3["seeds"] == "2"
    kept = {
        m: statistics.fmean(r["active_params"] for key, r in records.items() if key[:2] == ("base", m) and key[3] == 5)
        for m in ("arena-r64", "lora-r64")
    }
    assert p3["params kept, ratio"] == f"{kept['arena-r64'] / kept['lora-r64']:.2f}x"
    assert float(p3["params kept, ratio"].rstrip("x")) < 1  # the fixture's ARENA keeps a part of its parameters


def test_the_lambda_path_compares_the_cells_every_lambda_ran(bench, tmp_path):
    """Another folder's ARENA cells at another λ: paired with this folder's on the (organ, seed) cells both ran."""
    source, records, _, _ = bench
    out, other = tmp_path / "bench", tmp_path / "lam0.3"
    shutil.copytree(source, out)
    at_03 = {}
    for organ in BASE_ORGANS:
        for seed in (0, 1):  # this folder's arena-r64 lacks the stomach's seed 2; the other folder lacks seed 2
            key = ("base", "arena-r64", organ, 5, seed)
            record = fake_record(*key)
            record["settings"]["options"]["lam"] = 0.3
            record["mean_dice"] = records[key]["mean_dice"] - 2.0 - seed  # a lower Dice, by a known amount
            path = other / cell_dir(*key) / "run.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(record))
            at_03[key] = record
    rebuild_results(other)
    assert main(["report", str(out), "--lambda-path", str(other)]) == 0
    report = (out / "report.md").read_text()
    rows = table(section(report, f"base track, {V2}: ARENA's λ path, k=5"))
    assert list(rows) == ["arena-r64, λ 0.05", "arena-r64, λ 0.3"]  # no other ARENA rank has two λs
    assert rows["arena-r64, λ 0.3"]["cells"] == rows["arena-r64, λ 0.05"]["cells"] == "6"
    assert rows["arena-r64, λ 0.3"]["Dice"] == fmt(
        list(per_seed_means(at_03, "base", "arena-r64", BASE_ORGANS).values())
    )
    assert rows["arena-r64, λ 0.3"]["Dice - at λ 0.05, paired"] == "-2.5 ± 0.7"  # -2 and -3 on the two seeds
    assert rows["arena-r64, λ 0.05"]["Dice - at λ 0.05, paired"] == MISSING
    kept = statistics.fmean(r["active_params"] for r in at_03.values())
    assert rows["arena-r64, λ 0.3"]["params kept"] == f"{kept:,.0f}"
    assert (out / "plots" / "base_dice_vs_params.png").stat().st_size > 1000
    with pytest.raises(UserError, match="no ARENA cell at a λ this report lacks \\(its λs: 0.05\\)"):
        write_report(out, lambda_path=[source])
    with pytest.raises(UserError, match="no results.csv there"):
        write_report(out, lambda_path=[tmp_path])


def test_learned_rank_per_layer_family(bench):
    """Active of initial components per organ, summed over a family's layers (a Swin stage, the conv blocks)."""
    out, records, _, _ = bench
    rows = table(section(write_report(out).read_text(), f"novel track, {V2}: learned rank per layer family, k=5"))
    assert list(rows)[:2] == ["arena-r4, pancreas", "arena-r4, gallbladder"]
    cells = [records["novel", "arena-r16", "pancreas", 5, s]["ranks"] for s in (0, 1, 2)]
    swin = statistics.fmean(sum(c[layer]["active"] for layer in LAYERS[:2]) for c in cells)
    conv = statistics.fmean(c[LAYERS[2]]["active"] for c in cells)
    assert rows["arena-r16, pancreas"]["Swin stage 1"] == f"{swin:,.0f} of 32 ({100 * swin / 32:.0f} %)"
    assert rows["arena-r16, pancreas"]["conv blocks"] == f"{conv:,.0f} of 16 ({100 * conv / 16:.0f} %)"


def test_training_table_support_loss_last_step_loss_and_steps(bench):
    """Means over each method's cells; the support loss over the cells that recorded it."""
    _, records, _, report = bench
    rows = table(section(report, f"base track, {V2}: training"))
    assert "zero-shot" not in rows  # trains nothing
    for method in ("fft", "arena-r64"):
        cells = [r for key, r in records.items() if key[:2] == ("base", method) and key[3] == 5]
        measured = [r["support_loss"] for r in cells if r["support_loss"] is not None]
        assert 0 < len(measured) < len(cells)
        assert rows[method]["support loss k=5"] == f"{statistics.fmean(measured):.3f}"
        assert rows[method]["last-step loss k=5"] == f"{statistics.fmean(r['final_loss'] for r in cells):.3f}"
        assert rows[method]["steps run k=5"] == f"{statistics.fmean(r['steps_done'] for r in cells):.0f}"
        assert rows[method]["stopped early k=5"] == f"{sum(r['stopped_early'] for r in cells)}/{len(cells)}"
    assert rows["adalora-r16"]["support loss k=1"] == rows["adalora-r16"]["last-step loss k=1"] == MISSING


def test_efficiency_relative_to_lora_at_the_same_rank(bench):
    _, records, _, report = bench
    rows = table(section(report, f"novel track, {V2}: efficiency"))

    def mean(method, get):
        return statistics.fmean(
            get(r) for k, r in records.items() if k[:2] == ("novel", method) and k[2] != "esophagus"
        )

    step = mean("arena-r16", lambda r: r["seconds_per_step"]) / mean("lora-r16", lambda r: r["seconds_per_step"])
    assert rows["arena-r16"]["s/step vs LoRA same r"] == f"{step:.2f}x"
    active = mean("arena-r4", lambda r: r["rank_report"]["totals"]["params"]) / mean(
        "lora-r4", lambda r: r["rank_report"]["totals"]["params"]
    )
    assert rows["arena-r4"]["active adapter params vs LoRA same r"] == f"{active:.2f}x"
    assert rows["scratch"]["trainable params"] == "4,000,000" and rows["scratch"]["s/step vs LoRA same r"] == MISSING
    assert rows["lp"]["cells"] == str(sum(k[:2] == ("novel", "lp") for k in records))
    assert "zero-shot" not in table(section(report, f"base track, {V2}: efficiency"))
    ratios = [v for row in rows.values() for name, v in row.items() if name.endswith("vs LoRA same r")]
    assert ratios and not any("**" in v for v in ratios)


def test_plots_per_track_and_the_v1_link(bench):
    out, _, _, report = bench
    for track in ("base", "novel"):
        for name in ("dice_vs_rank", "dice_vs_params", "learned_ranks"):
            path = out / "plots" / f"{track}_{name}.png"
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
            assert f"(plots/{track}_{name}.png)" in report
    assert "[v1 (history)](" in report and "btcv-fs-gpu/report.md)" in report


def test_learned_ranks_are_the_mean_over_seeds_of_the_track_cells(bench):
    out, records, _, _ = bench
    rows = [r for r in read_results(out / RESULTS_FILE) if r.track == "novel"]
    found = learned_ranks(out, rows, "arena-r16")
    for layer in LAYERS:
        for organ in NOVEL_ORGANS:
            expected = statistics.fmean(
                records["novel", "arena-r16", organ, 5, s]["ranks"][layer]["active"] for s in (0, 1, 2)
            )
            assert found[layer, organ] == expected


def test_full_ranks_come_from_the_cells_rank_reports(bench):
    """The heatmap marks layers above their full rank: only where a cell recorded it, never guessed."""
    out, _, _, _ = bench
    rows = [r for r in read_results(out / RESULTS_FILE) if r.track == "novel"]
    assert full_ranks(out, rows, "arena-r16") == FULL_RANK
    assert full_ranks(out, rows, "lora-r16") == {}  # records no per-layer report here


def test_tracks_and_organs_chosen_from_the_cli(bench, capsys):
    out, records, _, _ = bench
    assert main(["report", str(out), "--tracks", "novel", "--organs", "pancreas"]) == 0
    report = (out / "report.md").read_text()
    assert "## base track" not in report
    rows = table(section(report, f"novel track, {V2}: mean over organs per k"))
    assert rows["fft"]["Dice k=5"] == fmt(organ_means(records, "novel", "fft", 5, ["pancreas"]))
    with pytest.raises(UserError, match="have no finished cell .* present: "):
        write_report(out, ["liver"])
    with pytest.raises(UserError, match="tracks \\['other'\\]"):
        write_report(out, tracks=["other"])


def test_report_rebuilds_results_and_needs_a_bench_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `arenaseg bench"):
        write_report(tmp_path)
    out = tmp_path / "bench"
    write_cells(out, [("novel", "lora-r4", "pancreas", 5, 0)])
    report = write_report(out).read_text()
    assert (out / RESULTS_FILE).is_file()
    assert "Learned rank per adapted layer (ARENA): not enough finished cells" in report
    assert table(section(report, f"novel track, {V2}: rank robustness"))["ARENA"]["r=4"] == MISSING


def test_zero_shot_alone_has_its_row(tmp_path):
    """The zero-shot cells finish first: their row shows before any trained cell (k = 5's table)."""
    out = tmp_path / "bench"
    records = write_cells(out, [("base", "zero-shot", o, 0, 0) for o in BASE_ORGANS])
    rows = table(section(write_report(out).read_text(), f"base track, {V2}: Dice (%) per organ, k=5"))
    assert rows["zero-shot"]["mean"] == fmt(organ_means(records, "base", "zero-shot", 0, BASE_ORGANS))
    assert set(rows["fft"].values()) == {MISSING}


def test_a_v1_results_csv_reads_as_its_own_group(tmp_path):
    """v1's results.csv has no track, protocol or precision columns: it is reported apart, never as v2."""
    with open(tmp_path / RESULTS_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(V1_COLUMNS.split(","))
        for seed, dice in enumerate((10.0, 20.0)):
            writer.writerow(["lp", "lp", "", "pancreas", 5, seed, dice, 30.0, 13, "False", 100])
    report = write_report(tmp_path).read_text()
    assert "Groups here: v1 fp32." in report
    assert table(section(report, "unrecorded track, v1 fp32: mean over organs per k"))["lp"]["Dice k=5"] == "15.0 ± 7.1"


def test_results_csv_header_is_the_row_type(bench):
    """results.csv's columns are ResultRow's fields, in order, with the rank beside the method."""
    out, records, _, _ = bench
    with open(out / RESULTS_FILE, newline="") as f:
        header = next(csv.reader(f))
    assert header == [f.name for f in dataclasses.fields(ResultRow)]
    assert header[:3] == ["track", "method", "rank"] and "base_method" not in header
    rows = {(r.track, r.name, r.organ, r.shots, r.seed): r for r in read_results(out / RESULTS_FILE)}
    arena = rows["novel", "arena-r16", "pancreas", 5, 1]
    assert (arena.method, arena.rank, arena.whole_pool, arena.steps) == ("arena", 16, False, 400)
    assert arena.mean_dice == records["novel", "arena-r16", "pancreas", 5, 1]["mean_dice"]
    assert (rows["novel", "lp", "pancreas", 5, 1].method, rows["novel", "lp", "pancreas", 5, 1].rank) == ("lp", None)


def test_an_old_results_csv_reads_as_the_new_one(bench, tmp_path):
    """Rows written before the rank had its own meaning (method ``arena-r16``, with a base_method column, or no
    rank column at all) read to the same typed rows as results.csv written now."""
    out, _, _, _ = bench
    with open(out / RESULTS_FILE, newline="") as f:
        new = list(csv.DictReader(f))
    rows = read_results(out / RESULTS_FILE)
    for name, drop in (("with_base_method", ()), ("without_rank", ("rank",))):
        old = [{**r, "method": parse_name(r), "base_method": r["method"]} for r in new]
        if drop:
            old = [{k: v for k, v in r.items() if k not in (*drop, "base_method")} for r in old]
        path = tmp_path / name / RESULTS_FILE
        path.parent.mkdir()
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(old[0]))
            writer.writeheader()
            writer.writerows(old)
        assert read_results(path) == rows, name
    assert {(r.method, r.rank) for r in rows if r.name == "arena-r16"} == {("arena", 16)}


def parse_name(row: dict) -> str:
    """The method column as results.csv spelt it before the rank column: ``arena-r16``."""
    return row["method"] + (f"-r{row['rank']}" if row["rank"] else "")


def test_a_method_looks_the_same_in_every_plot_colour_by_family_marker_by_rank():
    grid = ["lp", "fft", "scratch", *(f"{m}-r{r}" for m in ("lora", "arena", "adalora") for r in (4, 16, 64))]
    styles = {name: method_style(name) for name in grid}
    for name, style in styles.items():
        family, rank = parse_method(name)
        same_family = {other for other in grid if parse_method(other)[0] == family}
        assert {n for n in grid if styles[n]["color"] == style["color"]} == same_family
        assert {n for n in same_family if styles[n]["marker"] == style["marker"]} == {name}
