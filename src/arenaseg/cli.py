"""Command-line interface: `arenaseg <command> --help` explains every option and its default."""

from __future__ import annotations

import argparse
import contextlib
import math
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from arenaseg.data.preprocess import INTENSITY_MODES, PreprocessSettings
from arenaseg.evaluate.inference import KEEP_LARGEST_COMPONENT
from arenaseg.utils.errors import UserError
from arenaseg.utils.outputs import hold_folder
from arenaseg.utils.precision import DEFAULT_PRECISION
from arenaseg.utils.provenance import git_commit


def _finite(text: str) -> float:
    """A float option: NaN and infinities pass every ``x <= 0`` check, so they are refused here."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_preprocess_args(p: argparse.ArgumentParser) -> None:
    d = PreprocessSettings()
    p.add_argument(
        "--spacing",
        type=_finite,
        default=d.spacing[0],
        help="isotropic resampling spacing in mm (default: %(default)s)",
    )
    p.add_argument(
        "--patch",
        type=int,
        default=d.patch_size[0],
        help="cubic patch side in voxels, multiple of 32 (default: %(default)s)",
    )
    p.add_argument(
        "--intensity",
        default=d.intensity,
        choices=INTENSITY_MODES,
        help="intensity scaling: ct = the HU window [-125, 275] -> [0, 1]; percentile = each image's 0.5-99.5 %% "
        "percentiles -> [0, 1] (MRI, PET, shifted CT); zscore = each image's non-zero voxels to mean 0, std 1 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="preprocessing cache folder (default: $ARENASEG_CACHE or ~/.cache/arenaseg/preprocessed)",
    )
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads for torch (default: torch's choice)")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N (default: %(default)s)",
    )


def _add_stopping_args(p: argparse.ArgumentParser) -> None:
    from arenaseg.train.loop import TrainSettings

    t = TrainSettings()
    p.add_argument(
        "--stop-patience",
        type=int,
        default=t.stop_patience,
        help="stop once the smoothed training loss has not improved for this many steps; 0 = the step cap alone "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--stop-min-delta",
        type=_finite,
        default=t.stop_min_delta,
        help="the improvement that --stop-patience counts (default: %(default)s)",
    )


def _add_precision_arg(p: argparse.ArgumentParser, default: str) -> None:
    from arenaseg.utils.precision import PRECISIONS

    p.add_argument(
        "--precision",
        default=default,
        choices=PRECISIONS,
        help="autocast precision of the forward pass and loss: fp32 (none), bf16, or fp16 (with loss scaling); "
        "weights and optimizer states stay float32. fp32 on every device until bf16's Dice parity is measured; "
        "fp16 is slow on CPUs without half-precision kernels (default: %(default)s)",
    )


MAX_PATCH = 512


def _preprocess(args: argparse.Namespace) -> PreprocessSettings:
    if args.patch < 64 or args.patch % 32 or args.patch > MAX_PATCH:
        raise UserError(
            f"--patch must be a multiple of 32 from 64 to {MAX_PATCH} (Swin-UNETR downsamples 32x, its bottleneck "
            f"normalisation needs more than one voxel, and a {MAX_PATCH}^3 patch already outgrows any GPU), got "
            f"{args.patch}"
        )
    if args.spacing <= 0:
        raise UserError(f"--spacing must be positive, got {args.spacing}")
    return PreprocessSettings(spacing=(args.spacing,) * 3, patch_size=(args.patch,) * 3, intensity=args.intensity)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from arenaseg.data.datasets import open_dataset
    from arenaseg.train.pretrain import PretrainSettings, pretrain

    data = open_dataset(args.data)
    if "btcv-fs" in (args.cases, args.organs, args.eval_cases):
        from arenaseg.data.splits import BASE_ORGANS, BTCV_FS
    cases = BTCV_FS.pretrain if args.cases == "btcv-fs" else data.case_ids if args.cases == "all" else _csv(args.cases)
    eval_cases = (
        () if args.eval_cases == "none" else BTCV_FS.test if args.eval_cases == "btcv-fs" else _csv(args.eval_cases)
    )
    for cid in [*cases, *eval_cases]:
        data.case(cid)
    organs = BASE_ORGANS if args.organs == "btcv-fs" else _csv(args.organs)
    settings = PretrainSettings(
        steps=args.steps,
        patches_per_step=args.patches_per_step,
        lr=args.lr,
        warmup_steps=args.warmup,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        feature_size=args.feature_size,
        save_dtype=args.save_dtype,
        sampling=args.sampling,
        init=args.init,
        precision=args.precision,
    )
    result = pretrain(
        data,
        cases,
        organs,
        args.out,
        settings,
        _preprocess(args),
        eval_cases,
        args.cache_dir,
        args.resume,
        command="arenaseg " + shlex.join(sys.argv[1:]),
    )
    if result.path is not None:
        print(f"wrote {result.path} (card: {result.path.with_suffix('.md')})")
    return 0


def _adapt_options(args: argparse.Namespace):
    """The method options the adapt flags set; the others keep AdaptOptions' global defaults."""
    from arenaseg.adapters import AdaptOptions

    given = {"rank": args.rank, "lam": args.lam, "decoder": args.decoder}
    try:
        return AdaptOptions(**{k: v for k, v in given.items() if v is not None})
    except ValueError as err:  # AdaptOptions checks with ValueError; these values come from the command line
        raise UserError(str(err)) from None


def _train_settings(args: argparse.Namespace):
    from arenaseg.train.loop import TrainSettings

    return TrainSettings(
        steps=args.steps,
        patches_per_step=args.patches_per_step,
        lr=args.lr,
        head_lr_scale=args.head_lr_scale,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        cross_entropy=args.cross_entropy,
        checkpoint_every=args.checkpoint_every,
        stop_patience=args.stop_patience,
        stop_min_delta=args.stop_min_delta,
        seed=args.seed,
        precision=args.precision,
    )


def cmd_adapt(args: argparse.Namespace) -> int:
    from arenaseg.pipeline import AdaptJob, run_adapt

    if args.test_cases in ("auto", "none"):
        tests: str | list[str] = args.test_cases
    else:
        tests = _csv(args.test_cases)
    job = AdaptJob(
        data=args.data,
        organ=args.organ,
        shots=args.shots,
        seed=args.seed,
        method=args.method,
        out=args.out,
        model=args.model,
        options=_adapt_options(args),
        track=args.track,
        test_cases=tests,
        train=_train_settings(args),
        preprocess=_preprocess(args),
        cache_dir=args.cache_dir,
        device=args.device,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    record = run_adapt(job)
    print(f"support cases: {', '.join(record.support_cases)}")
    print(f"trainable parameters: {record.trainable_params:,}; {record.seconds_per_step:.2f} s/step")
    if record.active_rank_total is not None:
        totals = record.rank_report["totals"]
        print(
            f"ARENA total active rank: {record.active_rank_total} of {totals['initial_rank']}, of which at most "
            f"{totals['usable_rank']} independent (a layer's update has at most min(in, out) components)"
        )
    if record.evaluated:
        print(
            f"mean Dice {record.mean_dice:.2f}%  mean HD95 {record.mean_hd95:.2f} mm  "
            f"mean NSD {record.mean_nsd:.2f}% on {len(record.test_cases)} test cases; largest component "
            f"only: Dice {record.mean_dice_lcc:.2f}%  HD95 {record.mean_hd95_lcc:.2f} mm  "
            f"NSD {record.mean_nsd_lcc:.2f}%"
        )
    print(f"wrote {args.out}")
    return 0


def _nifti_files(folder: Path) -> list[Path]:
    from arenaseg.pipeline import predict_inputs

    return predict_inputs(folder)


def cmd_predict(args: argparse.Namespace) -> int:
    from arenaseg.pipeline import check_outputs, run_predict

    if args.run and len(args.run) > 1:  # several organs into one label map
        from arenaseg.deploy.organs import cmd_predict_organs

        return cmd_predict_organs(args)
    args.run = args.run[0] if args.run else None

    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        raise FileNotFoundError(f"input not found: {src}")
    if src.is_dir():
        inputs = _nifti_files(src)
        if not inputs:
            raise UserError(f"no .nii/.nii.gz files in {src}")
        outputs = [dst / p.name.replace("_0000.nii", ".nii") for p in inputs]
        if dst.resolve() == src.resolve() or dst.is_file():
            raise UserError(f"--output {dst} must be a folder other than the input folder {src}")
    else:
        inputs, outputs = [src], [dst]
    if (args.run is None) == (args.model is None) or (args.model is None) != (args.organ is None):
        raise UserError("predict needs either --run RUN, or --model MODEL with --organ ORGAN (zero-shot)")
    run_files = [Path(args.run), *Path(args.run).iterdir()] if args.run and Path(args.run).is_dir() else []
    check_outputs(inputs, outputs, [*run_files, *([src] if src.is_dir() else [])])
    zero_shot = (args.model, args.organ) if args.model else None
    with hold_folder(dst) if src.is_dir() else contextlib.nullcontext():  # one predict at a time into a folder
        written = run_predict(
            args.run,
            inputs,
            outputs,
            args.device,
            args.largest_component,
            zero_shot,
            precision=args.precision,
            report=lambda path: print(f"wrote {path}", flush=True),  # as they come: a later file may fail
        )
    print(f"predict: {_plural(len(written), 'mask')} of {_predicted_organ(args)} in {written[0].parent}")
    return 0


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _predicted_organ(args: argparse.Namespace) -> str:
    """What predict segmented, for its summary line: the organ and the run or model it came from."""
    from arenaseg.run_record import RunRecord

    if args.model:
        return f"{args.organ} (zero-shot, {args.model})"
    return f"{RunRecord.read(Path(args.run) / 'run.json').organ} (run {args.run})"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from arenaseg.pipeline import evaluate_files

    pred, ref = Path(args.pred), Path(args.ref)
    run = Path(args.run) if args.run else None
    metrics, target = evaluate_files(pred, ref, args.organ, Path(args.out) if args.out else None, run)
    for cid, m in metrics["cases"].items():
        print(f"{cid}: Dice {m['dice']:.2f}%  HD95 {m['hd95']:.2f} mm  NSD {m['nsd']:.2f}%")
    for cid, m in metrics.get("support_cases", {}).items():
        print(f"{cid}: Dice {m['dice']:.2f}% (a support case of {run}: trained on, not in the mean)")
    print(f"mean: Dice {metrics['mean_dice']:.2f}%  HD95 {metrics['mean_hd95']:.2f} mm  NSD {metrics['mean_nsd']:.2f}%")
    unmatched = metrics.get("unmatched_references", [])
    if unmatched:
        print(
            f"note: {_plural(len(unmatched), 'reference')} in {ref} had no prediction and were not scored: "
            f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}"
        )
    print(f"wrote {target} ({_plural(len(metrics['cases']), 'case')} in the mean)")
    return 0


def cmd_phantoms(args: argparse.Namespace) -> int:
    from arenaseg.data.phantom import make_phantom_dataset

    shape = tuple(_ints(args.shape, "shape"))
    if len(shape) != 3:
        raise UserError(f"--shape needs three comma-separated sizes, got {args.shape!r}")
    path = make_phantom_dataset(args.out, n_cases=args.n_cases, seed=args.seed, shape=shape, modality=args.modality)
    print(f"wrote {args.n_cases} phantom cases to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from arenaseg.demo import run_demo

    run_demo(args.out, steps=args.steps)
    return 0


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in _csv(text)]
    except ValueError:
        raise UserError(f"--{what} takes comma-separated integers, got {text!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from arenaseg.bench.grid import committed_results, export_results, plan_cells, preset_model
    from arenaseg.bench.runner import run_bench
    from arenaseg.train.loop import TrainSettings
    from arenaseg.utils.device import device_kind, resolve_device

    tests = args.test_cases if args.test_cases in ("auto", "none") else _csv(args.test_cases)
    cells = plan_cells(
        args.preset,
        _csv(args.methods) if args.methods else None,
        _csv(args.organs) if args.organs else None,
        _ints(args.shots, "shots"),
        _ints(args.seeds, "seeds"),
        args.data,
        tracks=_csv(args.tracks) if args.tracks else None,
        test_cases=tests,
        partitions=args.partitions,
        novel_decoder=args.novel_decoder,
    )
    if args.results_from == "preset":
        kind = device_kind(resolve_device(args.device))
        results_from = committed_results(args.preset, kind)
        if results_from is None:
            print(f"note: no committed {kind} results of {args.preset} under {Path.cwd()}: every cell runs here")
    else:
        results_from = None if args.results_from == "none" else args.results_from
    overrides = {
        "model": preset_model(args.preset, args.model),
        "train": TrainSettings(
            steps=args.steps,
            stop_patience=args.stop_patience,
            stop_min_delta=args.stop_min_delta,
            precision=args.precision,
        ),
        "options": {"lam": args.lam},
        "preprocess": _preprocess(args),
        "cache_dir": args.cache_dir,
        "device": args.device,
    }
    summary = run_bench(cells, args.out, args.workers, args.address, overrides, results_from)
    print(summary.describe())
    if args.export_to:
        print(f"exported {len(export_results(args.out, args.export_to))} finished cells to {args.export_to}")
    return 1 if summary.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from arenaseg.bench.report import write_report

    organs = _csv(args.organs) if args.organs else None
    print(f"wrote {write_report(args.out, organs, _csv(args.tracks) if args.tracks else None)}")
    return 0


def add_export_parser(sub) -> None:
    from arenaseg.deploy.commands import add_export_parser as add

    add(sub)


def add_bench_parsers(sub) -> None:
    from arenaseg.adapters import AdaptOptions
    from arenaseg.adapters.config import DECODER_POLICIES
    from arenaseg.bench.grid import PRESETS
    from arenaseg.train.loop import TrainSettings

    btcv = PRESETS["btcv-fs"]
    p = sub.add_parser("bench", help="run a benchmark grid (method x organ x k x seed), resumable, on Ray")
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

    def per_track(field: str) -> str:
        return "; ".join(f"{t.name}: {','.join(getattr(t, field))}" for t in btcv.tracks)

    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated grid methods, NAME or NAME-rRANK, kept in each track that holds them (default: "
        f"{per_track('methods')})",
    )
    p.add_argument(
        "--organs",
        default=None,
        help="comma-separated organs, kept in each track that holds them (default: btcv-fs: "
        f"{per_track('organs')}; totalseg-fseft: every listed structure)",
    )
    p.add_argument(
        "--tracks",
        default=None,
        help="comma-separated tracks: base (the model's own organs, head from its class row; zero-shot is a row) "
        "and novel (new organs, new head; decoder policy: --novel-decoder) (default: every track "
        "of the preset)",
    )
    p.add_argument("--shots", default=None, help=f"comma-separated k (default: {','.join(map(str, btcv.shots))})")
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds; where k >= the organ's pool only the first runs "
        f"(default: {','.join(map(str, btcv.seeds))})",
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
    p.add_argument(
        "--steps", type=int, default=TrainSettings().steps, help="training steps per cell (default: %(default)s)"
    )
    _add_stopping_args(p)
    p.add_argument(
        "--lam",
        type=_finite,
        default=AdaptOptions().lam,
        help="ARENA's sparsity weight λ, one value for every cell (default: %(default)s)",
    )
    p.add_argument(
        "--novel-decoder",
        default=btcv.track("novel").decoder,
        choices=DECODER_POLICIES,
        help="decoder policy of the novel track's low-rank methods; the base track's decoder stays frozen "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"foundation model, built-in name or checkpoint file (default: btcv-fs: {btcv.model}; "
        "totalseg-fseft: required)",
    )
    p.add_argument(
        "--results-from",
        default="preset",
        help="committed cell results that count as finished: preset (btcv-fs: "
        f"{btcv.results.format(device='cpu')} or {btcv.results.format(device='gpu')} by --device, under the "
        "working directory, i.e. run from a clone of the repository), none, or a folder (default: %(default)s)",
    )
    p.add_argument(
        "--export-to",
        default=None,
        help="after the run, copy the finished cells' run.json/metrics.json into this folder, e.g. "
        f"{btcv.results.format(device='cpu')}, and rebuild its results.csv (default: none)",
    )
    _add_preprocess_args(p)
    _add_device_arg(p)
    _add_precision_arg(p, TrainSettings.precision)
    p.set_defaults(func=cmd_bench)

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
    p.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    from arenaseg.train.pretrain import SAMPLINGS, PretrainSettings

    parser = argparse.ArgumentParser(prog="arenaseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="supervised multi-organ pretraining of a foundation model (torchrun-ready)")
    p.add_argument("--data", required=True, help="nnU-Net v2 raw folder or TotalSegmentator folder")
    p.add_argument("--out", required=True, help="output path stem: writes OUT.safetensors, OUT.json, OUT.md")
    p.add_argument(
        "--cases",
        default="btcv-fs",
        help="comma-separated training case ids, all, or btcv-fs for its 15 pretrain cases (default: %(default)s)",
    )
    p.add_argument(
        "--organs",
        default="btcv-fs",
        help="comma-separated organ names (other labels become background), or btcv-fs for its 7 base organs "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--eval-cases",
        default="none",
        help="held-out case ids to evaluate into the card, btcv-fs for its test cases, or none (default: %(default)s)",
    )
    ps = PretrainSettings()
    p.add_argument("--steps", type=int, default=ps.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument(
        "--patches-per-step",
        type=int,
        default=ps.patches_per_step,
        help="patches per step per process (default: %(default)s)",
    )
    p.add_argument("--lr", type=_finite, default=ps.lr, help="AdamW peak learning rate (default: %(default)s)")
    p.add_argument(
        "--warmup",
        type=int,
        default=ps.warmup_steps,
        help="linear warm-up steps before cosine decay (default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=ps.checkpoint_every,
        help="steps between atomic resume checkpoints (default: %(default)s)",
    )
    p.add_argument(
        "--feature-size",
        type=int,
        default=ps.feature_size,
        help="Swin-UNETR feature size (default: %(default)s, the CPU preset)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=ps.seed,
        help="seed for initialisation and patch sampling (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.state.pt (default: off)")
    p.add_argument(
        "--init",
        default="",
        help="continue pretraining from this model (built-in name or our .safetensors; same classes and "
        "architecture), with a fresh schedule; empty = random initialisation (default: empty)",
    )
    p.add_argument(
        "--sampling",
        default=ps.sampling,
        choices=SAMPLINGS,
        help="patch centres: class-balanced = half background, half shared equally by the organs; pos-neg = "
        "foreground:background 1:1, so large organs dominate (default: %(default)s)",
    )
    p.add_argument(
        "--save-dtype",
        default=ps.save_dtype,
        choices=("float32", "float16"),
        help="dtype of the stored weights; float16 halves the file, loading casts back (default: %(default)s)",
    )
    _add_preprocess_args(p)
    _add_precision_arg(p, PretrainSettings.precision)
    p.set_defaults(func=cmd_pretrain)

    from arenaseg.adapters import METHODS, AdaptOptions
    from arenaseg.adapters.config import DECODER_POLICIES, NEW_HEAD_DECODER
    from arenaseg.pipeline import REFERENCE_METHODS, TRACKS, AdaptJob
    from arenaseg.train.loop import TrainSettings

    t = TrainSettings()
    p = sub.add_parser("adapt", help="adapt a foundation model to one organ from k labelled scans")
    p.add_argument("--data", required=True, help="nnU-Net v2 raw folder or TotalSegmentator folder")
    p.add_argument("--organ", required=True, help="target organ name as in the dataset's label map")
    p.add_argument("--shots", type=int, required=True, help="k: number of labelled support scans")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the support draw, initialisation and patches (default: %(default)s)",
    )
    p.add_argument(
        "--method",
        default="arena",
        choices=(*METHODS, *REFERENCE_METHODS),
        help="adaptation method; zero-shot (with --shots 0) evaluates the model's own class for the organ, scratch "
        "trains the same network in full from random weights (default: %(default)s)",
    )
    p.add_argument(
        "--rank", type=int, default=AdaptOptions.rank, help="initial rank of low-rank methods (default: %(default)s)"
    )
    p.add_argument(
        "--decoder",
        choices=("auto", *DECODER_POLICIES),
        default="auto",
        help="what the low-rank methods do with the convolutional decoder: frozen, full (trained in full), lowrank "
        f"(the method's adapters on its Conv3d layers too), or auto: {NEW_HEAD_DECODER} for a new head (novel "
        "track; full for adalora and pissa, whose adapters cannot wrap a Conv3d), frozen when the head starts from "
        "the model's class (base track); the benchmark's probe chose this (docs/benchmark.md) (default: %(default)s)",
    )
    p.add_argument(
        "--track",
        choices=TRACKS,
        default="auto",
        help="how the organ's head starts: base (the model's own class row: its zero-shot prediction), novel (a "
        "new head), auto (base when the model knows the organ) (default: %(default)s)",
    )
    p.add_argument(
        "--lam",
        type=_finite,
        default=None,
        help="ARENA l1 weight lambda (default: ArenaConfig's documented global default)",
    )
    p.add_argument("--steps", type=int, default=t.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument(
        "--patches-per-step", type=int, default=t.patches_per_step, help="patches per step (default: %(default)s)"
    )
    p.add_argument("--lr", type=_finite, default=t.lr, help="AdamW peak learning rate (default: %(default)s)")
    p.add_argument(
        "--head-lr-scale",
        type=_finite,
        default=t.head_lr_scale,
        help="the new output head's lr as a multiple of --lr: it starts from random weights and must move further "
        "than the adapters (default: %(default)s)",
    )
    p.add_argument(
        "--weight-decay", type=_finite, default=t.weight_decay, help="AdamW weight decay (default: %(default)s)"
    )
    p.add_argument(
        "--warmup", type=int, default=t.warmup_steps, help="warm-up steps before cosine decay (default: %(default)s)"
    )
    p.add_argument(
        "--cross-entropy",
        action=argparse.BooleanOptionalAction,
        default=t.cross_entropy,
        help="add binary cross-entropy to the Dice loss (nnU-Net's loss); within 100 steps on a small new organ it "
        "keeps every logit below 0, so the default trains on Dice alone (default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=t.checkpoint_every,
        help="steps between resume checkpoints (default: %(default)s)",
    )
    _add_stopping_args(p)
    p.add_argument(
        "--model", default=AdaptJob.model, help="built-in model name or checkpoint path (default: %(default)s)"
    )
    p.add_argument(
        "--test-cases",
        default="auto",
        help="auto (the dataset's benchmark test split, if any), none, or comma-separated ids (default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="run folder to write (run.json, adapter, metrics.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out (default: refuse)")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out (default: refuse)")
    _add_preprocess_args(p)
    _add_device_arg(p)
    _add_precision_arg(p, t.precision)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("predict", help="segment new scans with an adapted run, or zero-shot with a foundation model")
    p.add_argument(
        "--run",
        action="append",
        default=None,
        help="finished run folder from `arenaseg adapt`; its preprocessing (e.g. --intensity) is applied. Repeat "
        "it for several organs (runs with the same preprocessing, one per organ): one multi-label mask per input "
        "plus a label map (labels.json in the output folder, NAME.json beside one output file); where two organs "
        "claim a voxel, the higher probability wins (default: none, then --model and --organ are required)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="zero-shot instead of --run: a built-in model name or checkpoint path, whose class --organ is "
        "predicted with the preprocessing of its card (default: none)",
    )
    p.add_argument("--organ", default=None, help="with --model: one of the model's classes (default: none)")
    p.add_argument("--input", required=True, help="image .nii.gz, or a folder of them")
    p.add_argument("--output", required=True, help="output .nii.gz (or folder when --input is a folder)")
    p.add_argument(
        "--largest-component",
        action=argparse.BooleanOptionalAction,
        default=KEEP_LARGEST_COMPONENT,
        help="keep only the largest connected component of each mask (drops stray blobs) (default: %(default)s)",
    )
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads for torch (default: torch's choice)")
    _add_device_arg(p)
    _add_precision_arg(p, DEFAULT_PRECISION)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="Dice, HD95 and NSD of predictions against references, on the references' grid")
    p.add_argument("--pred", required=True, help="predicted mask .nii.gz, or a folder of them")
    p.add_argument("--ref", required=True, help="reference label .nii.gz, or a folder with files of the same names")
    p.add_argument(
        "--organ",
        default=None,
        help="organ to pick from a multi-class reference (via the dataset.json next to it); required when a "
        "reference or prediction holds several labels (default: none)",
    )
    p.add_argument("--out", default=None, help="metrics.json to write (default: metrics.json beside --pred)")
    p.add_argument(
        "--run",
        default=None,
        help="the run folder that predicted: its support cases (trained on) are scored apart, out of the means "
        "(default: none)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "phantoms", help="write a synthetic CT or MRI-like phantom cohort (nnU-Net layout) for demos and tests"
    )
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--n-cases", type=int, default=12, help="number of cases (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default: %(default)s)")
    p.add_argument("--shape", default="96,96,64", help="volume shape in voxels at 3 mm (default: %(default)s)")
    p.add_argument(
        "--modality",
        default="ct",
        choices=("ct", "mri"),
        help="ct: Hounsfield units; mri: T1-like scanner units (0-900, fat bright, fluid dark) on the same "
        "anatomy, for trying --intensity percentile (default: %(default)s)",
    )
    p.set_defaults(func=cmd_phantoms)

    add_bench_parsers(sub)
    add_export_parser(sub)

    from arenaseg.demo import SETTINGS

    p = sub.add_parser("demo", help="offline demo: ARENA adapts the shipped phantom model to a new organ")
    p.add_argument(
        "--out", default="demo_out", help="folder for the phantoms, run, NIfTI and overlay (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=SETTINGS.steps, help="adaptation steps (default: %(default)s)")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=cmd_demo)
    return parser


# Options that lower memory, per command, for the out-of-memory message.
MEMORY_HINTS = {
    "adapt": "a smaller --patch (e.g. 64), --patches-per-step 1, a lower --rank, fewer --threads, or --device cpu",
    "pretrain": "a smaller --patch (e.g. 64), --patches-per-step 1, a smaller --feature-size, or fewer --threads",
    "predict": "fewer --threads, or --device cpu",
    "bench": "a smaller --patch (e.g. 64), fewer --workers or --threads, or --device cpu",
    "demo": "fewer --threads",
}


def _terminate(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so that temporary files and folders are removed on the way out."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Users' mistakes (UserError, missing/existing/unwritable paths) print one line and exit 2; out of memory
    says which options lower it (exit 3); Ctrl-C exits 130; anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    git_commit()  # the code this process imports now, whatever the checkout does while it runs
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    prefix = f"arenaseg {args.command}: "
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError) as err:
        print(f"{prefix}error: {err}", file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, MemoryError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = MEMORY_HINTS.get(args.command, "fewer --threads")
        print(f"{prefix}error: out of memory ({detail}); lower it with {hint}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        resume = " (continue it with --resume)" if args.command in ("adapt", "pretrain") else ""
        print(f"{prefix}interrupted{resume}", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
