"""Command-line interface: `arenaseg <command> --help` explains every option and its default."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from arenaseg.data.preprocess import PreprocessSettings
from arenaseg.utils.precision import DEFAULT_PRECISION


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_preprocess_args(p: argparse.ArgumentParser) -> None:
    d = PreprocessSettings()
    p.add_argument(
        "--spacing",
        type=float,
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
        "--cache-dir",
        default=None,
        help="preprocessing cache folder (default: $ARENASEG_CACHE or ~/.cache/arenaseg/preprocessed)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N (default: %(default)s)",
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


def _preprocess(args: argparse.Namespace) -> PreprocessSettings:
    if args.patch <= 0 or args.patch % 32:
        raise ValueError(f"--patch must be a positive multiple of 32 (Swin-UNETR downsamples 32x), got {args.patch}")
    if args.spacing <= 0:
        raise ValueError(f"--spacing must be positive, got {args.spacing}")
    return PreprocessSettings(spacing=(args.spacing,) * 3, patch_size=(args.patch,) * 3)


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
        rank=args.rank,
        lam=args.lam,
        test_cases=tests,
        train=_train_settings(args),
        preprocess=_preprocess(args),
        cache_dir=args.cache_dir,
        device=args.device,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    record = run_adapt(job)
    print(f"support cases: {', '.join(record['support_cases'])}")
    print(f"trainable parameters: {record['trainable_params']:,}; {record['seconds_per_step']:.2f} s/step")
    if "active_rank_total" in record:
        print(f"ARENA total active rank: {record['active_rank_total']}")
    if "mean_dice" in record:
        print(
            f"mean Dice {record['mean_dice']:.2f}%  mean HD95 {record['mean_hd95']:.2f} mm "
            f"on {len(record['test_cases'])} test cases"
        )
    print(f"wrote {args.out}")
    return 0


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")))


def cmd_predict(args: argparse.Namespace) -> int:
    from arenaseg.pipeline import run_predict

    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        raise FileNotFoundError(f"input not found: {src}")
    if src.is_dir():
        inputs = _nifti_files(src)
        if not inputs:
            raise ValueError(f"no .nii/.nii.gz files in {src}")
        outputs = [dst / p.name.replace("_0000.nii", ".nii") for p in inputs]
    else:
        inputs, outputs = [src], [dst]
    for path in run_predict(args.run, inputs, outputs, args.device, precision=args.precision):
        print(f"wrote {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from arenaseg.pipeline import evaluate_files

    pred, ref = Path(args.pred), Path(args.ref)
    metrics = evaluate_files(pred, ref, args.organ, Path(args.out) if args.out else None)
    for cid, m in metrics["cases"].items():
        print(f"{cid}: Dice {m['dice']:.2f}%  HD95 {m['hd95']:.2f} mm")
    print(f"mean: Dice {metrics['mean_dice']:.2f}%  HD95 {metrics['mean_hd95']:.2f} mm")
    return 0


def cmd_phantoms(args: argparse.Namespace) -> int:
    from arenaseg.data.phantom import make_phantom_dataset

    shape = tuple(int(v) for v in _csv(args.shape))
    if len(shape) != 3:
        raise ValueError(f"--shape needs three comma-separated sizes, got {args.shape!r}")
    path = make_phantom_dataset(args.out, n_cases=args.n_cases, seed=args.seed, shape=shape)
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
        raise ValueError(f"--{what} takes comma-separated integers, got {text!r}") from None


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
        test_cases=tests,
        partitions=args.partitions,
    )
    if args.results_from == "preset":
        results_from = committed_results(args.preset, device_kind(resolve_device(args.device)))
    else:
        results_from = None if args.results_from == "none" else args.results_from
    overrides = {
        "model": preset_model(args.preset, args.model),
        "train": TrainSettings(steps=args.steps, precision=args.precision),
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


def add_bench_parsers(sub) -> None:
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
    p.add_argument("--out", required=True, help="bench folder: cells/<method>/<organ>/k<k>/seed<s>/, results.csv")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated grid methods, NAME or NAME-rRANK (default: {','.join(btcv.methods)})",
    )
    p.add_argument(
        "--organs",
        default=None,
        help=f"comma-separated organs (default: btcv-fs: {','.join(btcv.organs)}; "
        "totalseg-fseft: every listed structure)",
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
        f"{btcv.results.format(device='cpu')} or {btcv.results.format(device='gpu')} by --device, when present), "
        "none, or a folder (default: %(default)s)",
    )
    p.add_argument(
        "--export-to",
        default=None,
        help="after the run, copy the finished cells' run.json/metrics.json into this folder, e.g. "
        f"{btcv.results.format(device='cpu')} (default: none)",
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
    from arenaseg.train.pretrain import PretrainSettings

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
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: %(default)s)")
    p.add_argument(
        "--patches-per-step", type=int, default=2, help="patches per step per process (default: %(default)s)"
    )
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW peak learning rate (default: %(default)s)")
    p.add_argument(
        "--warmup",
        type=int,
        default=50,
        help="linear warm-up steps before cosine decay (default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        help="steps between atomic resume checkpoints (default: %(default)s)",
    )
    p.add_argument(
        "--feature-size",
        type=int,
        default=12,
        help="Swin-UNETR feature size (default: %(default)s, the CPU preset)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
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
        default="class-balanced",
        choices=("class-balanced", "pos-neg"),
        help="patch centres: class-balanced = half background, half shared equally by the organs; pos-neg = "
        "foreground:background 1:1, so large organs dominate (default: %(default)s)",
    )
    p.add_argument(
        "--save-dtype",
        default="float32",
        choices=("float32", "float16"),
        help="dtype of the stored weights; float16 halves the file, loading casts back (default: %(default)s)",
    )
    _add_preprocess_args(p)
    _add_precision_arg(p, PretrainSettings.precision)
    p.set_defaults(func=cmd_pretrain)

    from arenaseg.adapters import METHODS
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
    p.add_argument("--method", default="arena", choices=METHODS, help="adaptation method (default: %(default)s)")
    p.add_argument("--rank", type=int, default=16, help="initial rank of low-rank methods (default: %(default)s)")
    p.add_argument(
        "--lam",
        type=float,
        default=None,
        help="ARENA l1 weight lambda (default: ArenaConfig's documented global default)",
    )
    p.add_argument("--steps", type=int, default=t.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument(
        "--patches-per-step", type=int, default=t.patches_per_step, help="patches per step (default: %(default)s)"
    )
    p.add_argument("--lr", type=float, default=t.lr, help="AdamW peak learning rate (default: %(default)s)")
    p.add_argument(
        "--head-lr-scale",
        type=float,
        default=t.head_lr_scale,
        help="the new output head's lr as a multiple of --lr: it starts from random weights and must move further "
        "than the adapters (default: %(default)s)",
    )
    p.add_argument(
        "--weight-decay", type=float, default=t.weight_decay, help="AdamW weight decay (default: %(default)s)"
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
    p.add_argument(
        "--stop-patience",
        type=int,
        default=t.stop_patience,
        help="stop when the smoothed training loss has not improved for this many steps; 0 = off "
        "(default: %(default)s)",
    )
    p.add_argument("--model", default="btcv-fs", help="built-in model name or checkpoint path (default: %(default)s)")
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

    p = sub.add_parser("predict", help="segment new scans with an adapted run")
    p.add_argument("--run", required=True, help="finished run folder from `arenaseg adapt`")
    p.add_argument("--input", required=True, help="image .nii.gz, or a folder of them")
    p.add_argument("--output", required=True, help="output .nii.gz (or folder when --input is a folder)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    _add_device_arg(p)
    _add_precision_arg(p, DEFAULT_PRECISION)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="Dice and HD95 of predictions against references, on the references' grid")
    p.add_argument("--pred", required=True, help="predicted mask .nii.gz, or a folder of them")
    p.add_argument("--ref", required=True, help="reference label .nii.gz, or a folder with files of the same names")
    p.add_argument(
        "--organ",
        default=None,
        help="organ to pick from a multi-class reference (via the dataset.json next to it); "
        "default: any non-zero label",
    )
    p.add_argument("--out", default=None, help="metrics.json to write (default: metrics.json beside --pred)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("phantoms", help="write a synthetic CT phantom cohort (nnU-Net layout) for demos and tests")
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--n-cases", type=int, default=12, help="number of cases (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default: %(default)s)")
    p.add_argument("--shape", default="96,96,64", help="volume shape in voxels at 3 mm (default: %(default)s)")
    p.set_defaults(func=cmd_phantoms)

    add_bench_parsers(sub)

    from arenaseg.demo import SETTINGS

    p = sub.add_parser("demo", help="offline demo: ARENA adapts the shipped phantom model to a new organ")
    p.add_argument(
        "--out", default="demo_out", help="folder for the phantoms, run, NIfTI and overlay (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=SETTINGS.steps, help="adaptation steps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, PermissionError) as err:
        print(f"arenaseg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
