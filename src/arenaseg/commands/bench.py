"""`arenaseg bench` (a resumable benchmark grid) and `arenaseg report` (its tables and plots)."""

from __future__ import annotations

import argparse
from pathlib import Path

from arenaseg.adapters import AdaptOptions
from arenaseg.adapters.config import DECODER_POLICIES
from arenaseg.bench.grid import PRESETS, committed_results, export_results, plan_cells, preset_model
from arenaseg.bench.report import write_report
from arenaseg.bench.runner import run_bench
from arenaseg.commands import add_device, add_preprocess, add_training, preprocess_from, training_from
from arenaseg.utils.device import device_kind, resolve_device
from arenaseg.utils.errors import UserError
from arenaseg.utils.settings import add_arguments, comma_list

BTCV = PRESETS["btcv-fs"]


def _per_track(field: str) -> str:
    return "; ".join(f"{t.name}: {','.join(getattr(t, field))}" for t in BTCV.tracks)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark grid (method x organ x k x seed), resumable, on Ray")
    _add_grid_options(p)
    _add_run_options(p)
    p.set_defaults(func=run)
    _add_report_parser(sub)


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    """Which cells: the preset's protocol, its data, and the subsets of its grid."""
    p.add_argument("--preset", default="btcv-fs", choices=list(PRESETS), help="protocol (default: %(default)s)")
    p.add_argument(
        "--data",
        required=True,
        help="btcv-fs: nnU-Net folder (btcv30); totalseg-fseft: the data root of the FSEFT lists, or the "
        "TotalSegmentator subjects folder",
    )
    p.add_argument(
        "--out", required=True, help="bench folder: cells/<track>/<method>/<organ>/k<k>/seed<s>/, results.csv"
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated grid methods, NAME or NAME-rRANK, kept in each track that holds them (default: "
        f"{_per_track('methods')})",
    )
    p.add_argument(
        "--organs",
        default=None,
        help="comma-separated organs, kept in each track that holds them (default: btcv-fs: "
        f"{_per_track('organs')}; totalseg-fseft: every listed structure)",
    )
    p.add_argument(
        "--tracks",
        default=None,
        help="comma-separated tracks: base (the model's own organs, head from its class row; zero-shot is a row) "
        "and novel (new organs, new head; decoder policy: --novel-decoder) (default: every track of the preset)",
    )
    p.add_argument("--shots", default=None, help=f"comma-separated k (default: {','.join(map(str, BTCV.shots))})")
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds; where k >= the organ's pool only the first runs "
        f"(default: {','.join(map(str, BTCV.seeds))})",
    )
    p.add_argument(
        "--test-cases",
        default="auto",
        help="btcv-fs only: auto (BTCV-FS's test split) or comma-separated case ids (default: %(default)s)",
    )
    p.add_argument(
        "--partitions",
        default=None,
        help="totalseg-fseft only: folder holding totalseg_selected/<structure>_train.txt/_test.txt (default: none)",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """How the cells run: where, on what model, with which global settings, and which results count."""
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="cells at once; 1 runs in this process without Ray (default: %(default)s)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="address of an existing Ray cluster (default: none: a local Ray instance when --workers > 1)",
    )
    add_training(p)
    add_arguments(p, AdaptOptions, ["lam", "freeze_tail"])
    p.add_argument(
        "--novel-decoder",
        default=BTCV.track("novel").decoder,
        choices=DECODER_POLICIES,
        help="decoder policy of the novel track's low-rank methods; the base track's decoder stays frozen "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"foundation model, built-in name or checkpoint file (default: btcv-fs: {BTCV.model}; "
        "totalseg-fseft: required)",
    )
    p.add_argument(
        "--results-from",
        default="preset",
        help="committed cell results that count as finished: preset (btcv-fs: "
        f"{BTCV.results.format(device='cpu')} or {BTCV.results.format(device='gpu')} by --device, under the "
        "working directory, i.e. run from a clone of the repository), none, or a folder (default: %(default)s)",
    )
    p.add_argument(
        "--export-to",
        default=None,
        help="after the run, copy the finished cells' run.json/metrics.json into this folder, e.g. "
        f"{BTCV.results.format(device='cpu')}, and rebuild its results.csv (default: none)",
    )
    add_preprocess(p)
    add_device(p)


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="report.md (BENCHMARK.md's tables) and PNG plots from a bench folder")
    p.add_argument("out", help="bench folder holding results.csv (rebuilt from cells/ when missing)")
    p.add_argument(
        "--organs",
        default=None,
        help="comma-separated organs that the tables' means and the plots cover, in every track holding any of "
        "them, e.g. those whose grid is complete (default: the base track's 3 organs; in other tracks the organs "
        "whose grid is complete)",
    )
    p.add_argument("--tracks", default=None, help="comma-separated tracks to report, e.g. base (default: every track)")
    p.add_argument(
        "--lambda-path",
        default=None,
        help="comma-separated bench folders whose ARENA cells ran at other λs, e.g. an earlier grid: the report "
        "adds ARENA's λ path, compared on the cells every λ ran (default: none)",
    )
    p.set_defaults(func=run_report)


def _list(text: str | None, parse=str) -> list | None:
    return None if text is None else [parse(v) for v in comma_list(text)]


def _integers(text: str | None, option: str) -> list[int] | None:
    try:
        return _list(text, int)
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    cells = plan_cells(
        args.preset,
        _list(args.methods),
        _list(args.organs),
        _integers(args.shots, "--shots"),
        _integers(args.seeds, "--seeds"),
        args.data,
        tracks=_list(args.tracks),
        test_cases=args.test_cases if args.test_cases in ("auto", "none") else comma_list(args.test_cases),
        partitions=args.partitions,
        novel_decoder=args.novel_decoder,
    )
    overrides = {
        "model": preset_model(args.preset, args.model),
        "train": training_from(args),
        "options": {"lam": args.lam, "freeze_tail": args.freeze_tail},
        "preprocess": preprocess_from(args),
        "cache_dir": args.cache_dir,
        "device": args.device,
    }
    summary = run_bench(cells, args.out, args.workers, args.address, overrides, _results_from(args))
    print(summary.describe())
    if args.export_to:
        print(f"exported {len(export_results(args.out, args.export_to))} finished cells to {args.export_to}")
    return 1 if summary.failed else 0


def _results_from(args: argparse.Namespace) -> str | Path | None:
    """The committed cells that count as finished: the preset's for this device kind, none, or a folder."""
    if args.results_from != "preset":
        return None if args.results_from == "none" else args.results_from
    kind = device_kind(resolve_device(args.device))
    found = committed_results(args.preset, kind)
    if found is None:
        print(f"note: no committed {kind} results of {args.preset} under {Path.cwd()}: every cell runs here")
    return found


def run_report(args: argparse.Namespace) -> int:
    print(f"wrote {write_report(args.out, _list(args.organs), _list(args.tracks), _list(args.lambda_path) or ())}")
    return 0
