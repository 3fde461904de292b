"""`arenaseg report`: tables and plots from a synthetic bench folder (fixture cells, no training).

The fixture writes run.json files in the bench layout, as finished cells would, and results.csv is rebuilt from
them; every expected number below is recomputed from the fixture's own values.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from arenaseg.bench.grid import RESULTS_FILE, cell_dir, parse_method, rebuild_results
from arenaseg.bench.report import MISSING, learned_ranks, read_results, write_report
from arenaseg.data.splits import NOVEL_ORGANS

METHODS = ("lp", "lora-r4", "lora-r16", "lora-r64", "arena-r4", "arena-r16", "arena-r64")  # no fft, adalora
LAYERS = ("swinViT.layers1.0.blocks.0.attn.qkv", "swinViT.layers1.0.blocks.0.mlp.linear1")
TESTS = ["btcv_0036", "btcv_0037"]
SEEDS_BY_K = {1: (0, 1, 2), 5: (0, 1, 2), 10: (0,)}  # k=10: the whole pool, run once
DROPPED = {("lp", "pancreas", 1, 2)} | {("arena-r64", "esophagus", 5, s) for s in (0, 1, 2)}


def fake_record(name: str, organ: str, k: int, seed: int, model: str) -> dict:
    """A run.json as `run_adapt` writes it, with made-up but seeded numbers (test fixture)."""
    method, rank = parse_method(name)
    rng = random.Random(f"{name}/{organ}/{k}/{seed}")
    record = {
        "method": method,
        "organ": organ,
        "shots": k,
        "seed": seed,
        "support_cases": [f"btcv_00{26 + i}" for i in range(k)],
        "support_note": "whole pool" if k == 10 else None,
        "test_cases": TESTS,
        "model": model,
        "settings": {
            "train": {"steps": 100, "patches_per_step": 2, "lr": 0.001, "head_lr_scale": 10.0},
            "preprocess": {"spacing": [3.0, 3.0, 3.0], "patch_size": [64, 64, 64]},
            "options": {"rank": rank or 16, "lam": 0.05, "rho": 0.02},
        },
        "trainable_params": 13 if rank is None else 1000 * rank,
        "steps_done": 100,
        "seconds_per_step": rng.uniform(2.0, 4.0),
        "train_seconds": 300.0,
        "eval_seconds": 20.0,
        "peak_mem_mb": 900.0,
        "device": "cpu (fixture)",
        "git_commit": "abc1234",
        "adapter_bytes": 4 * (13 if rank is None else 1000 * rank),
        "rank_report": {"totals": {"params": 0 if rank is None else rng.randint(100, 1000 * rank)}},
        "mean_dice": rng.uniform(20, 80),
        "mean_hd95": rng.uniform(5, 40),
    }
    if method == "arena":
        record["ranks"] = {layer: {"initial": rank, "active": rng.randint(0, rank)} for layer in LAYERS}
        record["active_rank_total"] = sum(e["active"] for e in record["ranks"].values())
    return record


def write_cells(out: Path, cells: list[tuple[str, str, int, int]], model: str) -> dict:
    records = {}
    for key in cells:
        record = fake_record(*key, model)
        path = out / cell_dir(*key) / "run.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))
        records[key] = record
    return records


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
    """Row label -> {column header: cell} of the first Markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return rows


def fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def per_seed_organ_means(records, method: str, k: int, metric: str = "mean_dice") -> list[float]:
    """Per seed with every novel organ present, the mean over the organs (the fixture has no other gaps)."""
    seeds = [s for s in SEEDS_BY_K[k] if all((method, o, k, s) in records for o in NOVEL_ORGANS)]
    return [statistics.fmean(records[method, o, k, s][metric] for o in NOVEL_ORGANS) for s in seeds]


@pytest.fixture
def bench(tmp_path):
    model = tmp_path / "foundation.safetensors"
    card = {"eval": {"cases": TESTS, "dice_per_class": {"spleen": 91.0, "liver": 93.5, "stomach": 70.0}}}
    model.with_suffix(".json").write_text(json.dumps(card))
    out = tmp_path / "bench"
    cells = [(m, o, k, s) for m in METHODS for o in NOVEL_ORGANS for k, seeds in SEEDS_BY_K.items() for s in seeds]
    cells = [c for c in cells if c not in DROPPED]
    cells += [(m, "spleen", 5, s) for m in ("lora-r16", "arena-r16") for s in (0, 1, 2)]
    records = write_cells(out, cells, str(model))
    rebuild_results(out)
    report = write_report(out).read_text()
    return out, records, report


def test_main_table_is_mean_and_std_over_seeds_of_the_organ_mean(bench):
    _, records, report = bench
    text = section(report, "Table 1")
    rows = table(text)
    assert rows["lora-r16"]["Dice k=5"].strip("*") == fmt(per_seed_organ_means(records, "lora-r16", 5))
    assert rows["lp"]["Dice k=1"].strip("*") == fmt(per_seed_organ_means(records, "lp", 1))  # seeds 0, 1 only
    assert len(per_seed_organ_means(records, "lp", 1)) == 2
    assert rows["arena-r4"]["Dice k=10"].strip("*") == fmt(per_seed_organ_means(records, "arena-r4", 10))
    assert "±" not in rows["arena-r4"]["Dice k=10"]  # the whole pool, run once
    assert rows["arena-r64"]["Dice k=5"] == MISSING  # esophagus never ran: no mean over three organs
    assert set(rows["fft"].values()) == {MISSING} and set(rows["adalora-r16"].values()) == {MISSING}
    hd95 = {m: statistics.fmean(v) for m in METHODS if (v := per_seed_organ_means(records, m, 5, "mean_hd95"))}
    best_dice = max(METHODS, key=lambda m: statistics.fmean(per_seed_organ_means(records, m, 5) or [-1]))
    best_hd95 = min(hd95, key=hd95.get)
    for method, cells in rows.items():
        assert cells["Dice k=5"].startswith("**") == (method == best_dice)
        assert cells["HD95 k=5"].startswith("**") == (method == best_hd95)  # lower is better
    assert "commit(s) abc1234" in text and "foundation.safetensors" in text and "cpu (fixture)" in text
    assert "steps 100" in text and "lr 0.001 (head x10.0)" in text and "ARENA lambda 0.05, rho 0.02" in text

    pancreas = table(section(report, "Dice (%) per organ, k=5"))
    values = [records["arena-r64", "pancreas", 5, s]["mean_dice"] for s in (0, 1, 2)]
    assert pancreas["arena-r64"]["pancreas"].strip("*") == fmt(values)
    assert pancreas["arena-r64"]["esophagus"] == MISSING


def test_rank_table_and_spread(bench):
    _, records, report = bench
    rows = table(section(report, "Table 2"))
    means = {r: statistics.fmean(per_seed_organ_means(records, f"lora-r{r}", 5)) for r in (4, 16, 64)}
    for r in (4, 16, 64):
        assert rows["LoRA"][f"r={r}"].strip("*") == fmt(per_seed_organ_means(records, f"lora-r{r}", 5))
    assert rows["LoRA"]["spread"].strip("*") == f"{max(means.values()) - min(means.values()):.1f}"
    assert rows["ARENA"]["r=64"] == MISSING and rows["ARENA"]["spread"] == MISSING
    assert rows["LoRA"]["spread"].startswith("**")  # the only spread, so the best


def test_efficiency_table_relative_to_lora(bench):
    _, records, report = bench
    rows = table(section(report, "Table 3"))

    def mean(method, get):
        return statistics.fmean(get(r) for key, r in records.items() if key[0] == method)

    for method in ("arena-r16", "lora-r16", "lp"):
        cells = rows[method]
        assert cells["trainable params"].strip("*") == f"{mean(method, lambda r: r['trainable_params']):,.0f}"
        assert cells["cells"] == str(sum(key[0] == method for key in records))
    step = mean("arena-r16", lambda r: r["seconds_per_step"]) / mean("lora-r16", lambda r: r["seconds_per_step"])
    assert rows["arena-r16"]["s/step vs LoRA same r"].strip("*") == f"{step:.2f}x"
    active = mean("arena-r4", lambda r: r["rank_report"]["totals"]["params"]) / mean(
        "lora-r4", lambda r: r["rank_report"]["totals"]["params"]
    )
    assert rows["arena-r4"]["active adapter params vs LoRA same r"].strip("*") == f"{active:.2f}x"
    assert rows["lp"]["s/step vs LoRA same r"] == MISSING  # no rank, nothing to compare with
    assert rows["lp"]["trainable params"] == "**13**"


def test_transfer_table_with_zero_shot_from_the_model_card(bench):
    _, records, report = bench
    rows = table(section(report, "Table 4"))
    zero = next(cells for label, cells in rows.items() if label.startswith("zero-shot"))
    assert zero["spleen"] == "**91.0**"  # fixture Dice are below 80: the zero-shot row is the column's best
    assert zero["liver"] == "**93.5**"  # the only liver value
    spleen = [records["arena-r16", "spleen", 5, s]["mean_dice"] for s in (0, 1, 2)]
    assert rows["arena-r16 (k=5)"]["spleen"].strip("*") == fmt(spleen)
    assert rows["arena-r16 (k=5)"]["liver"] == MISSING
    assert "stomach" not in zero  # not a base-organ transfer target


def test_plots_are_written(bench):
    out, _, report = bench
    for name in ("dice_vs_rank.png", "learned_ranks.png", "dice_vs_params.png"):
        path = out / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
        assert f"(plots/{name})" in report


def test_learned_ranks_are_the_mean_over_seeds_of_the_cells_run_json(bench):
    out, records, _ = bench
    rows = read_results(out / RESULTS_FILE)
    found = learned_ranks(out, rows, "arena-r16")
    for layer in LAYERS:
        for organ in (*NOVEL_ORGANS, "spleen"):
            expected = statistics.fmean(records["arena-r16", organ, 5, s]["ranks"][layer]["active"] for s in (0, 1, 2))
            assert found[layer, organ] == expected
    assert {organ for _, organ in learned_ranks(out, rows, "arena-r64")} == set(NOVEL_ORGANS) - {"esophagus"}


def test_transfer_not_run_and_results_rebuilt_when_lost(tmp_path):
    out = tmp_path / "bench"
    write_cells(out, [("lora-r4", o, 5, 0) for o in NOVEL_ORGANS], str(tmp_path / "no-card.safetensors"))
    assert not (out / RESULTS_FILE).exists()
    report = write_report(out).read_text()
    assert (out / RESULTS_FILE).is_file()
    assert "not run" in section(report, "Table 4")
    assert "Learned rank per adapted layer (ARENA): not enough finished cells" in report
    assert table(section(report, "Table 2"))["ARENA"]["r=4"] == MISSING


def test_report_needs_a_bench_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `arenaseg bench"):
        write_report(tmp_path)


def test_report_over_chosen_organs_gives_means_where_the_full_set_cannot(bench):
    out, records, full = bench
    assert table(section(full, "Table 1"))["arena-r64"]["Dice k=5"] == MISSING  # esophagus never ran
    chosen = [o for o in NOVEL_ORGANS if o != "esophagus"]
    rows = table(section(write_report(out, chosen).read_text(), "Table 1"))
    seeds = [s for s in SEEDS_BY_K[5] if all(("arena-r64", o, 5, s) in records for o in chosen)]
    per_seed = [statistics.fmean(records["arena-r64", o, 5, s]["mean_dice"] for o in chosen) for s in seeds]
    assert rows["arena-r64"]["Dice k=5"].strip("*") == fmt(per_seed)
    with pytest.raises(ValueError, match="have no finished cell .* present: "):
        write_report(out, ["liver"])


def test_an_unmeasured_step_time_is_left_out_of_the_efficiency_mean(tmp_path):
    out = tmp_path / "bench"
    records = write_cells(out, [("lp", "pancreas", 5, s) for s in (0, 1)], str(tmp_path / "no-card.safetensors"))
    unmeasured = out / cell_dir("lp", "pancreas", 5, 0) / "run.json"
    unmeasured.write_text(json.dumps({**records["lp", "pancreas", 5, 0], "seconds_per_step": float("nan")}))
    row = table(section(write_report(out).read_text(), "Table 3"))["lp"]
    assert row["s/step"].strip("*") == f"{records['lp', 'pancreas', 5, 1]['seconds_per_step']:.2f}"
