"""The probe's written criteria applied by benchmarks/probe_report.py (docs/benchmark.md): synthetic runs whose
right answer is known."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("probe_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(
    organ,
    method,
    patch=(),
    dice=50.0,
    lam=0.3,
    decoder="frozen",
    params=1000,
    loss=0.5,
    finished=True,
    rank=100,
    tail=None,
):
    """A probe JSON as benchmarks/probe.py writes it (only the fields the criteria read)."""
    record = {
        "organ": organ,
        "track": "base" if organ == "right_kidney" else "novel",
        "method": method,
        "options": {"lam": lam, "decoder": decoder, "freeze_tail": tail},
        "trainable_params": params,
        "patch_dice": [[0, 50.0], *patch],
        "loss": [loss] * 300,
        "active_rank": [[0, 0], [300, rank]],
        "volume_dice": {"300": {"mean": dice, "dice": dice, "dice_lcc": dice + 1, "hd95": 50.0, "hd95_lcc": 20.0}},
    }
    return {**record, "finished": "2026-12-02 12:00"} if finished else record


def novel(report, dice_by_policy, params_by_policy):
    return [
        run("pancreas", m, [[100, 10.0], [300, 10.0]], dice_by_policy[p], decoder=p, params=params_by_policy[p])
        for p in report.POLICIES
        for m in ("lora-r16", "arena-r16")
    ]


def test_decoder_waits_for_missing_runs_and_prefers_fewer_parameters_within_the_margin(report):
    params = {"frozen": 10, "full": 1000, "lowrank": 100}
    runs = novel(report, {"frozen": 5.0, "full": 30.0, "lowrank": 28.5}, params)
    assert report.choose_decoder(runs)[0] == "lowrank"  # 1.5 points below full, 10x fewer parameters
    assert report.choose_decoder(novel(report, {"frozen": 5.0, "full": 30.0, "lowrank": 27.5}, params))[0] == "full"
    chosen, lines = report.choose_decoder(runs[:-1])
    assert chosen is None and "pancreas arena-r16 λ 0.3 lowrank" in lines[0]


def test_budget_is_the_smallest_cap_within_the_margin_of_each_runs_best_trained_point(report):
    slow = run("right_kidney", "fft", [[100, 60.0], [200, 64.5], [300, 66.0]])
    # the start (50) beats every trained point: the amended criterion ignores it
    flat = run("right_kidney", "lp", [[100, 44.0], [200, 45.0], [300, 44.5]])
    decided = novel(report, {"frozen": 5.0, "full": 30.0, "lowrank": 1.0}, {"frozen": 1, "full": 2, "lowrank": 3})
    cap, rule, _ = report.choose_budget([slow, flat, *decided], "full")
    assert cap == 200 and rule is None  # a constant loss plateaus at once: every rule stops fft at step <= 50
    assert report.choose_budget([slow, flat], None)[0] is None


def test_without_a_cap_within_the_margin_the_smallest_worst_shortfall_decides(report):
    early = run("right_kidney", "lora-r64", [[100, 50.0], [200, 47.0], [300, 44.0]])  # 0, 3, 6 below its best
    late = run("right_kidney", "fft", [[100, 40.0], [200, 45.0], [300, 48.0]])  # 8, 3, 0 below
    decided = novel(report, {"frozen": 5.0, "full": 30.0, "lowrank": 1.0}, {"frozen": 1, "full": 2, "lowrank": 3})
    assert report.choose_budget([early, late, *decided], "full")[0] == 200  # worst shortfalls 8, 3, 6


def test_learning_rates_stay_unless_a_family_s_loss_still_falls_at_the_cap(report):
    flat = run("right_kidney", "fft", [[100, 60.0], [200, 60.0], [300, 60.0]])
    falling = run("right_kidney", "lora-r64", [[100, 60.0], [200, 60.0], [300, 60.0]])
    falling["loss"] = [1.0 - 0.003 * i for i in range(300)]  # the EMA still gains 0.003 a step at step 300
    value, lines = report.check_learning_rates([flat, falling], "lowrank", 300)
    assert value is None and "probe lr 3x for lora" in lines[0] and "fft" not in lines[0]
    assert report.check_learning_rates([flat], "lowrank", 300)[0] is not None
    assert report.check_learning_rates([flat], "lowrank", None)[0] is None


def test_adalora_s_runs_are_read_by_criterion_4_alone(report):
    flat = run("right_kidney", "fft", [[100, 60.0], [200, 60.0], [300, 60.0]])
    # AdaLoRA cannot wrap a Conv3d: under the lowrank policy its novel-organ run trains the decoder in full
    adalora = run("pancreas", "adalora-r16", [[100, 20.0], [200, 10.0], [300, 30.0]], decoder="full")
    adalora["loss"] = [1.0 - 0.003 * i for i in range(300)]
    value, lines = report.check_learning_rates([flat, adalora], "lowrank", 300)
    assert value is None and "probe lr 3x for adalora" in lines[0]
    # its patch Dice is 20 points short at cap 200, yet criterion 1, final before it ran, does not count it
    assert report.choose_budget([flat, adalora], "lowrank")[0] == 100


def arena(organ, decoder, dice16, dice64, lam, loss16=0.5, tail=None, rank=None):
    rank = round(1000 * (1 - lam)) if rank is None else rank  # sparser with lambda, as every probe run is
    return [
        run(organ, "arena-r16", dice=dice16, lam=lam, decoder=decoder, loss=loss16, rank=rank, tail=tail),
        run(organ, "arena-r64", dice=dice64, lam=lam, decoder=decoder, rank=rank, tail=tail),
    ]


def path_runs(scores, tail=None, rank=None):
    """Criterion 6's runs: every organ and rank at lambda x scores scores[x]."""
    return [
        r
        for x, dice in scores.items()
        for r in (
            *arena("right_kidney", "frozen", dice, dice, x, tail=tail, rank=rank),
            *arena("pancreas", "lowrank", dice, dice, x, tail=tail, rank=rank),
        )
    ]


def test_lambda_path_takes_the_sparsest_lambda_within_noise_of_the_best(report):
    scores = {0.0: 40.0, 0.1: 41.0, 0.3: 40.5, 0.5: 39.5, 0.7: 39.0, 0.9: 30.0}  # 0.7 is 2.0 below: out
    chosen, final, lines = report.choose_lambda_path(path_runs(scores), "lowrank")
    assert (chosen, final) == ((0.5, None), True)
    assert "λ 0.7" in lines[4] and "below the best" in lines[4]
    # a missing lambda makes the choice provisional; the finished ones still give one
    unfinished = path_runs({x: d for x, d in scores.items() if x != 0.9})
    assert report.choose_lambda_path(unfinished, "lowrank")[:2] == ((0.5, None), False)
    # the top of the path qualifies: the path goes on upward before the choice is final
    flat = path_runs({x: 40.0 for x in report.PATH_LAMBDAS})
    chosen, final, lines = report.choose_lambda_path(flat, "lowrank")
    assert (chosen, final) == ((0.9, None), False) and "goes on upward" in lines[-1]
    extended = flat + path_runs({1.2: 39.0, 1.5: 20.0})
    assert report.choose_lambda_path(extended, "lowrank")[:2] == ((1.2, None), True)


def test_a_settled_tail_variant_is_one_more_candidate_under_the_same_rule(report):
    scores = {0.0: 40.0, 0.1: 41.0, 0.3: 40.5, 0.5: 41.5, 0.7: 40.0, 0.9: 30.0}
    plain = path_runs(scores)
    # the variant keeps lambda 0.7's Dice with fewer components: the sparsest candidate within noise
    settled = plain + path_runs({0.7: 40.0}, tail=0.1, rank=100)
    chosen, final, lines = report.choose_lambda_path(settled, "lowrank")
    assert (chosen, final) == ((0.7, 0.1), True)
    assert any(line.startswith("λ 0.7 with freeze_tail 0.1: mean volume Dice 40.00") for line in lines)
    # more than the noise below the best: not a candidate, whatever its sparsity
    assert report.choose_lambda_path(plain + path_runs({0.7: 39.0}, tail=0.1, rank=1), "lowrank")[0] == (0.7, None)
    # started but unfinished: the choice waits for it
    started = path_runs({0.7: 40.0}, tail=0.1)[0]
    started.pop("finished")
    assert report.choose_lambda_path([*plain, started], "lowrank")[1] is False


def lambda_runs():
    return [
        *arena("right_kidney", "frozen", 60, 55, 0.0),
        *arena("right_kidney", "frozen", 60, 59.5, 0.1),
        *arena("right_kidney", "frozen", 60, 60, 0.3, loss16=0.6),  # no longer fits its support patches
        *arena("pancreas", "lowrank", 20, 18, 0.0),
        *arena("pancreas", "lowrank", 20, 19.2, 0.1),
        *arena("pancreas", "lowrank", 20, 20, 0.3),
    ]


def test_lambda_is_the_largest_that_keeps_r64_beside_r16_while_r16_still_fits(report):
    runs = lambda_runs()
    assert report.choose_lambda(runs, "lowrank")[0] == 0.1


def without(runs, organ, method, lam):
    return [r for r in runs if (r["organ"], r["method"], r["options"]["lam"]) != (organ, method, lam)]


def test_lambda_is_decided_once_the_missing_runs_cannot_change_it(report):
    runs = lambda_runs()
    # lambda 0.3 is already ruled out by the base organ's r16 loss, and 0.1 qualifies: smaller lambdas do not matter
    assert report.choose_lambda(without(runs, "pancreas", "arena-r64", 0.3), "lowrank")[0] == 0.1
    assert report.choose_lambda(without(runs, "pancreas", "arena-r64", 0.0), "lowrank")[0] == 0.1
    chosen, lines = report.choose_lambda(without(runs, "pancreas", "arena-r64", 0.1), "lowrank")
    assert chosen is None and lines[-1] == "waits for: pancreas arena-r64 λ 0.1 lowrank"
    # no lambda qualifies (r64 far below r16 everywhere on the pancreas): the fallback needs every run
    fallback = [r for r in runs if r["organ"] == "right_kidney"] + [
        *arena("pancreas", "lowrank", 20, 10, 0.0),
        *arena("pancreas", "lowrank", 20, 12, 0.1),
        *arena("pancreas", "lowrank", 20, 11, 0.3),
    ]
    assert report.choose_lambda(fallback, "lowrank")[0] == 0.1
    assert report.choose_lambda(without(fallback, "pancreas", "arena-r64", 0.0), "lowrank")[0] is None


def test_largest_component_is_on_only_if_it_raises_dice_and_lowers_hd95(report):
    assert report.check_largest_component([run("right_kidney", "lp")])[0] == "on"
    worse = run("right_kidney", "lp")
    worse["volume_dice"]["300"]["hd95_lcc"] = 80.0
    assert report.check_largest_component([worse])[0] == "off"
    assert report.check_largest_component([run("right_kidney", "lp", finished=False)])[0] is None


def test_bench_arguments_carry_every_choice_once_every_run_is_finished(report):
    runs = [
        run("right_kidney", "fft", [[100, 60.0], [200, 64.5], [300, 66.0]]),
        *novel(report, {"frozen": 5.0, "full": 20.0, "lowrank": 19.0}, {"frozen": 1, "full": 9, "lowrank": 3}),
        *path_runs({0.0: 40.0, 0.1: 41.0, 0.3: 40.5, 0.5: 39.5, 0.7: 30.0, 0.9: 20.0}),
    ]
    assert report.bench_arguments(runs) == (
        "--novel-decoder lowrank --steps 200 --stop-patience 0 --stop-min-delta 0.001 --lam 0.5"
    )
    assert report.bench_arguments(runs[:-1]) is None  # criterion 6 is not final while a run of its path is missing
    assert report.bench_arguments([*runs, run("right_kidney", "lp", finished=False)]) is None
