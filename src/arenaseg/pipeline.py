"""The adapt / predict / evaluate jobs behind the CLI: a run folder in, artifacts out, nothing half-written.

Run folder contract (RUN_DIR): ``checkpoint.pt`` while training (the resume point; it holds the run's
`RunIdentity`), then ``adapter.safetensors`` + ``adapter_config.json``, ``metrics.json`` (when test cases were
evaluated) and last ``run.json``, whose presence marks a finished run. One process at a time holds RUN_DIR
(`RunFolder`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from arenaseg.adapters import METHODS
from arenaseg.adapters.config import NEW_HEAD_DECODER, AdaptOptions
from arenaseg.data.datasets import Dataset, open_dataset
from arenaseg.data.preprocess import PreprocessSettings, check_same_affine, file_digest, load_cases
from arenaseg.data.sampling import PatchSampler
from arenaseg.data.splits import BTCV_FS, SupportDraw, draw_support
from arenaseg.evaluate.inference import (
    KEEP_LARGEST_COMPONENT,
    is_our_mask,
    largest_component,
    predict_volume,
    read_label,
    write_like,
)
from arenaseg.evaluate.metrics import case_metrics, summarise
from arenaseg.models.swin_unetr import replace_with_binary_head
from arenaseg.run_record import METRICS, RunIdentity, RunRecord
from arenaseg.train.loop import (
    TrainResult,
    TrainSettings,
    check_finite,
    read_checkpoint,
    support_loss,
    train_adapter,
)
from arenaseg.utils.atomic import write_json
from arenaseg.utils.device import resolve_device
from arenaseg.utils.errors import UserError
from arenaseg.utils.outputs import check_outputs as check_output_rule
from arenaseg.utils.precision import DEFAULT_PRECISION
from arenaseg.utils.provenance import device_name, git_commit
from arenaseg.utils.settings import comma_list, described

RUN_FILE, METRICS_FILE, CHECKPOINT_FILE = "run.json", "metrics.json", "checkpoint.pt"
# How the binary head starts: "base" from the foundation model's class row for the organ (its zero-shot
# prediction; the organ must be one of its classes), "novel" as a new head, "auto" base when the model knows the organ.
TRACKS = ("auto", "base", "novel")
# Rows of a benchmark that are not adaptation methods of the factory: the foundation model as it is (base
# track), and the same network trained in full from random initialisation (what pretraining buys).
REFERENCE_METHODS = ("zero-shot", "scratch")


@dataclass
class AdaptJob:
    """Everything `arenaseg adapt` needs: each field's declaration is also its command-line option."""

    data: str = described(help="nnU-Net v2 raw folder or TotalSegmentator folder")
    organ: str = described(help="target organ name as in the dataset's label map")
    shots: int = described(help="k: number of labelled support scans", parse=int)
    out: str = described(help="run folder to write (run.json, adapter, metrics.json)")
    seed: int = described(0, help="seed of the support draw, initialisation and patches", parse=int)
    method: str = described(
        "arena",
        help="adaptation method; zero-shot (with --shots 0) evaluates the model's own class for the organ, scratch "
        "trains the same network in full from random weights",
        choices=(*METHODS, *REFERENCE_METHODS),
    )
    model: str = described("btcv-fs", help="built-in model name or checkpoint path")
    options: AdaptOptions = field(default_factory=AdaptOptions)  # total_steps is set from train.steps
    track: str = described(
        "auto",
        help="how the organ's head starts: base (the model's own class row: its zero-shot prediction), novel (a new "
        "head), auto (base when the model knows the organ)",
        choices=TRACKS,
    )
    protocol: str | None = None  # the benchmark protocol of a bench cell: part of its identity
    test_cases: str | list[str] = described(
        "auto",
        help="auto (the dataset's benchmark test split, if any), none, or comma-separated ids",
        parse=lambda text: text if text in ("auto", "none") else comma_list(text),
    )
    support_cases: list[str] | None = None  # explicit support set (e.g. FSEFT lists) instead of a seeded draw
    train: TrainSettings = field(default_factory=TrainSettings)
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)
    cache_dir: str | None = described(
        None,
        help="preprocessing cache folder",
        default_text="$ARENASEG_CACHE or ~/.cache/arenaseg/preprocessed",
    )
    # where it runs: not part of a result's settings
    device: str = described("auto", help="auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N")
    overwrite: bool = described(False, help="replace a finished run in --out", default_text="refuse", negatable=False)
    resume: bool = described(False, help="continue an unfinished run in --out", default_text="refuse", negatable=False)


def benchmark_split(data: Dataset):
    """The BTCV-FS split when the dataset holds its cases, else None."""
    ids = set(data.case_ids)
    return BTCV_FS if set(BTCV_FS.support_pool) | set(BTCV_FS.test) <= ids else None


def resolve_test_cases(data: Dataset, test_cases: str | Sequence[str]) -> list[str]:
    if test_cases == "none":
        return []
    if test_cases == "auto":
        split = benchmark_split(data)
        return list(split.test) if split else []
    repeated = sorted({c for c in test_cases if list(test_cases).count(c) > 1})
    if repeated:
        raise UserError(f"--test-cases lists {', '.join(repeated)} more than once; each case is scored once")
    for cid in test_cases:
        data.case(cid)
    return list(test_cases)


def support_pool(data: Dataset, test_cases: Sequence[str]) -> list[str]:
    split = benchmark_split(data)
    pool = list(split.support_pool) if split else [c for c in data.case_ids if c not in set(test_cases)]
    labelled = [c for c in pool if data.layout != "nnunet" or data.case(c).label is not None]
    return [c for c in labelled if c not in set(test_cases)]


def prepare_run_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber a finished run or silently restart an unfinished one. Nothing is deleted here: a run that
    replaces another is trained aside and moved in at its end (`RunFolder`)."""
    if out.resolve() == Path(out.resolve().anchor):
        raise UserError(f"--out {out} is the filesystem root; give a folder for the run")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if (out / RUN_FILE).exists():
        if not overwrite:
            raise FileExistsError(f"{out} holds a finished run ({RUN_FILE}); pass --overwrite to replace it")
    elif (out / CHECKPOINT_FILE).exists() and not resume and not overwrite:
        raise FileExistsError(f"{out} holds an unfinished run ({CHECKPOINT_FILE}); pass --resume to continue it")


RUN_FILES = (RUN_FILE, METRICS_FILE, CHECKPOINT_FILE, "adapter.safetensors", "adapter_config.json")


def check_run_outputs(out: Path, data_root: Path) -> None:
    """adapt's --out under the output rule (`arenaseg.utils.outputs`): never the data's folders; and a folder
    that holds no run of ours (no run.json, no checkpoint) keeps its own files of a run's names, e.g. a user's
    metrics.json, instead of losing them to the run."""
    ours = (out / RUN_FILE).is_file() or (out / CHECKPOINT_FILE).is_file()
    check_output_rule(
        [out / name for name in RUN_FILES],
        reads=[data_root, data_root / "imagesTr", data_root / "labelsTr"],
        ours=lambda path: ours,
        kind="a file of an arenaseg run (the folder holds no run.json)",
        what="--out file",
    )


class RunFolder:
    """An adapt run's --out, held under an exclusive lock (``fcntl.flock`` on the folder) from the first check to
    the last file, so that a second process into the same folder fails at once instead of replacing the first's
    run (nnU-Net leaves this to the user; a lock costs nothing and the kernel releases it when a process dies).

    A run that replaces another (--overwrite) writes into a hidden subfolder and is moved in at its end, so that a
    failure leaves the old run whole. A failed run removes the folders it created, when they are empty.
    """

    def __init__(self, out: Path) -> None:
        self.out, self.work, self.fd, self.created = out, None, None, []

    def __enter__(self) -> RunFolder:
        prepare_run_dir(self.out, overwrite=True, resume=True)  # the path itself; the run's state is checked later
        self.created = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            self.created = []
            raise PermissionError(f"run folder {self.out} is not writable (cannot create it): {err}") from err
        self.fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.__exit__(UserError, None, None)
            raise UserError(
                f"{self.out} is in use by another arenaseg process; wait for it to finish or choose another --out"
            ) from None
        return self

    def start(self, overwrite: bool, resume: bool) -> Path:
        """Check the folder again under the lock and return where the run writes: --out itself, or a hidden
        subfolder when it replaces a run (a resume checks its checkpoint's identity: `train.loop.read_checkpoint`)."""
        prepare_run_dir(self.out, overwrite, resume)
        replacing = (self.out / RUN_FILE).exists() or ((self.out / CHECKPOINT_FILE).exists() and not resume)
        try:
            self.work = Path(tempfile.mkdtemp(prefix=".replacing-", dir=self.out)) if replacing else self.out
            probe = self.work / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise PermissionError(f"run folder {self.out} is not writable: {err}") from err
        return self.work

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.work not in (None, self.out):
                self._move_in()
        finally:
            if self.work not in (None, self.out):
                shutil.rmtree(self.work, ignore_errors=True)
            if self.fd is not None:
                os.close(self.fd)  # releases the lock
            if exc_type is not None:
                for folder in self.created:  # deepest first
                    try:
                        folder.rmdir()
                    except OSError:
                        break

    def _move_in(self) -> None:
        """Replace the old run's files by the new run's, run.json removed first and written last."""
        new = {p.name for p in self.work.iterdir()}
        (self.out / RUN_FILE).unlink(missing_ok=True)
        for name in (METRICS_FILE, CHECKPOINT_FILE, "adapter.safetensors", "adapter_config.json"):
            if name not in new:
                (self.out / name).unlink(missing_ok=True)
        for name in sorted(new - {RUN_FILE}):
            os.replace(self.work / name, self.out / name)
        os.replace(self.work / RUN_FILE, self.out / RUN_FILE)


def support_files(data: Dataset, case_ids: Sequence[str], organ: str) -> dict[str, str]:
    """sha256 of the files the support cases train on (memoised: the cache key hashes them too)."""
    paths = []
    for cid in case_ids:
        case = data.case(cid)
        paths += [case.image, case.label if case.label else case.structure_files[organ]]
    return {str(p): file_digest(p) for p in paths}


def build_adapted(model_name: str, organ: str, method: str, options: AdaptOptions, seed: int, track: str = "auto"):
    """Foundation model + binary head (started as ``track`` says) + method; returns (loaded checkpoint, adapted
    model, options with decoder ``auto`` resolved by the head's start, class row or None). ``zero-shot`` adapts as
    ``lp`` (its head is what a run saves) and is never trained; ``scratch`` is ``fft`` on the same network
    re-initialised at random, with a new head."""
    from arenaseg.adapters import adapt_model
    from arenaseg.adapters.factory import decoder_for
    from arenaseg.models.registry import class_row, load_model
    from arenaseg.models.swin_unetr import build_swin_unetr

    if track not in TRACKS:
        raise UserError(f"unknown track {track!r}; valid: {', '.join(TRACKS)}")
    torch.manual_seed(seed)
    loaded = load_model(model_name)
    if method == "scratch":
        loaded.model.load_state_dict(build_swin_unetr(loaded.config).state_dict())
        track = "novel"
    row = class_row(loaded, organ) if track != "novel" else None
    if row is None and (track == "base" or method == "zero-shot"):
        known = ", ".join(loaded.class_rows) or "none"
        raise UserError(f"{organ} is not a class of {model_name} (its classes: {known}): no base-track start")
    replace_with_binary_head(loaded.model, *(row if row else (None, None)))
    factory_method = {"zero-shot": "lp", "scratch": "fft"}.get(method, method)
    if options.decoder == "auto":
        policy = "frozen" if row else NEW_HEAD_DECODER
        options = dataclasses.replace(options, decoder=decoder_for(factory_method, policy))
    try:  # the factory checks options and targets with ValueError: here they come from the user
        check_rank(loaded.model, factory_method, options)
        adapted = adapt_model(loaded.model, factory_method, options)
    except UserError:
        raise
    except ValueError as err:
        raise UserError(str(err)) from err
    return loaded, adapted, options, row


def check_rank(model: torch.nn.Module, method: str, options) -> None:
    """Refuse, before anything is allocated, a rank that no adapted layer can use: a layer of in x out weights
    has at most min(in, out) independent components (a Conv3d: min(in * kernel volume, out)). Without this,
    --rank 10000 grows until the kernel kills the process."""
    from arenaseg.adapters.factory import LOW_RANK_METHODS, target_names

    if method not in LOW_RANK_METHODS:
        return
    sizes = []
    for name in target_names(model, options):
        m = model.get_submodule(name)
        if isinstance(m, torch.nn.Linear):
            sizes.append(min(m.in_features, m.out_features))
        elif isinstance(m, torch.nn.Conv3d):
            sizes.append(min(m.in_channels * int(np.prod(m.kernel_size)), m.out_channels))
    if sizes and options.rank > max(sizes):
        raise UserError(
            f"--rank {options.rank} is more than any adapted layer can use: the largest min(in, out) of the "
            f"{len(sizes)} target layers is {max(sizes)}; use --rank {max(sizes)} or less"
        )


def job_settings(job: AdaptJob) -> tuple[TrainSettings, AdaptOptions]:
    """The training settings (under the job's seed) and method options (total_steps from them) a job runs with."""
    settings = dataclasses.replace(job.train, seed=job.seed)
    return settings, dataclasses.replace(job.options, total_steps=settings.steps)


def run_identity(job: AdaptJob, **settled) -> RunIdentity:
    """The `RunIdentity` of ``job``'s run as the job states it (the job's fields of the same names; no model sha256);
    ``settled`` replaces what only the run settles (the organ's name, track, model sha256, support and test cases,
    the decoder of ``options``)."""
    settings, options = job_settings(job)
    stated = {f.name: getattr(job, f.name, None) for f in dataclasses.fields(RunIdentity)}
    as_dicts = {"train": asdict(settings), "options": asdict(options), "preprocess": job.preprocess.to_dict()}
    return RunIdentity(**{**stated, **as_dicts, **settled})


def run_adapt(job: AdaptJob) -> RunRecord:
    """Adapt, save the adapter, evaluate, and write run.json (returned); --out is locked while it runs."""
    with RunFolder(Path(job.out)) as folder:
        return _adapt(job, folder)


def _adapt(job: AdaptJob, folder: RunFolder) -> RunRecord:
    """Everything the user gave (data, model, options) is checked before the run folder is touched."""
    from arenaseg.adapters import save_adapter

    out = folder.out
    device = resolve_device(job.device)
    data = open_dataset(job.data)
    organ = data.check_organ(job.organ)
    zero_shot = job.method == "zero-shot"
    if zero_shot != (job.shots == 0) or job.shots < 0:
        raise UserError(f"--shots must be >= 1 (0 for zero-shot, which trains nothing), got {job.shots}")
    tests = resolve_test_cases(data, job.test_cases)
    if zero_shot:
        draw = SupportDraw(())
    elif job.support_cases is not None:
        overlap = sorted(set(job.support_cases) & set(tests))
        if overlap:
            raise UserError(f"support cases {overlap} are also test cases")
        draw = SupportDraw(tuple(data.case(c).case_id for c in job.support_cases))
    else:
        pool = support_pool(data, tests)
        if not pool:
            raise UserError(
                f"no labelled case of {data.root} is left for the support set: --test-cases takes "
                f"{len(tests)} of its {len(data.case_ids)} cases; leave some out of it"
            )
        draw = draw_support(pool, lambda c: data.has_organ(c, organ), job.shots, job.seed, organ=organ)
    if draw.note:
        print(f"note: {draw.note}")
    prepare_run_dir(out, job.overwrite, job.resume)
    check_run_outputs(out, data.root)

    settings, options = job_settings(job)
    loaded, adapted, options, row = build_adapted(job.model, organ, job.method, options, job.seed, job.track)
    adapted.model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # one process may run many bench cells
    volumes = load_cases(data, draw.cases, {organ: 1}, job.preprocess, job.cache_dir)
    for cid, volume in zip(draw.cases, volumes, strict=True):
        if not volume["label"].any():
            raise UserError(_no_organ_voxels(data, cid, organ))
    identity = run_identity(
        job,
        organ=organ,
        track="base" if row else "novel",
        model_sha256=file_digest(loaded.source),
        support_cases=list(draw.cases),
        test_cases=tests,
        options=asdict(options),
    )
    # a resumed run must also read the same data: the same folder, the same support files
    resumes_under = {
        **identity.to_dict(),
        "data": str(data.root.resolve()),
        "support_files": support_files(data, draw.cases, organ),
    }
    out = folder.start(job.overwrite, job.resume)  # from here on the run writes into out

    if zero_shot:  # nothing trains; the head (the class row) is saved as lp's would be, so that predict works
        if (out / CHECKPOINT_FILE).exists():  # another run's: a zero-shot run writes none
            read_checkpoint(out / CHECKPOINT_FILE, resumes_under)
        result = TrainResult(steps_done=0, stopped_early=False, final_loss=None, seconds_per_step=None, train_seconds=0)
    else:
        sampler = PatchSampler(volumes, job.preprocess, settings.patches_per_step, settings.seed)
        result = train_adapter(adapted, sampler, settings, out / CHECKPOINT_FILE, identity=resumes_under)
    trainable_while_training = 0 if zero_shot else adapted.trainable_params
    adapted.finalize()  # e.g. ARENA's pruning to the active rank
    fit = None if zero_shot else support_loss(adapted.model, sampler, result.steps_done, settings)
    if fit is not None:
        check_finite(fit, adapted.model, result.steps_done, settings)  # the final model, in eval mode
    save_adapter(adapted, out, job.preprocess.to_dict())
    report = adapted.rank_report()

    record = identity.record(
        support_note=draw.note,
        zero_shot_head_row=row[0] if row else None,
        data=str(data.root),
        trainable_params=trainable_while_training,
        active_params=trainable_while_training and adapted.trainable_params - report["totals"]["masked_params"],
        total_params=adapted.total_params,
        steps_done=result.steps_done,
        stopped_early=result.stopped_early,
        final_loss=result.final_loss,
        support_loss=fit,
        seconds_per_step=result.seconds_per_step,
        train_seconds=round(result.train_seconds, 1),
        peak_mem_mb=peak_memory_mb(device),
        device=device_name(device),
        git_commit=git_commit(),
        adapter_bytes=(out / "adapter.safetensors").stat().st_size,
        adapter_sha256=file_digest(out / "adapter.safetensors"),
        rank_report=report,
    )
    if job.method == "arena":
        record.ranks = {
            name: {"initial": e["initial_rank"], "active": e["active_rank"]} for name, e in report["layers"].items()
        }
        record.active_rank_total = report["totals"]["active_rank"]
    if tests:
        t0 = time.time()
        metrics = evaluate_cases(adapted.model, data, organ, tests, job.preprocess, settings.precision)
        write_json(out / METRICS_FILE, metrics)
        for name in METRICS:  # mean_dice: as predicted; mean_dice_lcc: the largest component only
            setattr(record, name, metrics[name])
        record.eval_seconds = round(time.time() - t0, 1)
    record.write(out / RUN_FILE)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return record


def _no_organ_voxels(data: Dataset, case_id: str, organ: str) -> str:
    """Why a support case has no voxel of the organ, read from the label file itself (dataset.json's
    ``labels_present`` chose the case; the voxels may disagree, e.g. hold values the label map does not name)."""
    case = data.case(case_id)
    path = case.label if case.label is not None else case.structure_files[organ]
    value = data.labels[organ] if case.label is not None else 1
    found = {int(v) for v in np.unique(np.asarray(nib.load(str(path)).dataobj))}
    unknown = sorted(found - set(data.labels.values()))
    detail = f"; it holds values {unknown} that {data.root / 'dataset.json'} does not name" if unknown else ""
    where = "after resampling and the crop to the body"
    return f"support case {case_id}: no {organ} voxels (value {value}) in {path} {where}{detail}"


def peak_memory_mb(device: torch.device) -> float:
    """GPU: the peak of torch's allocations since the run began; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def reference_mask(data: Dataset, case_id: str, organ: str) -> tuple[np.ndarray, tuple[float, ...]]:
    case = data.case(case_id)
    path = case.label if case.label is not None else case.structure_files[organ]
    ref, spacing = read_label(path)
    return (ref == data.labels[organ] if case.label is not None else ref > 0), spacing


def evaluate_cases(
    model,
    data: Dataset,
    organ: str,
    case_ids: Sequence[str],
    preprocess: PreprocessSettings,
    precision: str = DEFAULT_PRECISION,
) -> dict:
    """Each case predicted once (in the run's training ``precision``) and scored twice: as predicted (dice, hd95,
    nsd) and after keeping the largest connected component (dice_lcc, hd95_lcc, nsd_lcc), so one pass shows what
    the post-processing does."""
    cases = {}
    for cid in case_ids:
        pred = predict_volume(model, data.case(cid).image, preprocess, head="sigmoid", precision=precision) > 0
        ref, spacing = reference_mask(data, cid, organ)
        lcc = case_metrics(largest_component(pred), ref, spacing)
        cases[cid] = {**case_metrics(pred, ref, spacing), **{f"{k}_lcc": v for k, v in lcc.items()}}
    return summarise(cases)


def load_run(run_dir: str | Path, device: str = "cpu"):
    """Rebuild the adapted model of a finished run (base model from run.json + saved adapter) on ``device``."""
    from arenaseg.adapters import load_adapter
    from arenaseg.adapters.io import read_adapter_weights
    from arenaseg.models.registry import load_model

    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run folder (no {RUN_FILE})")
    record = RunRecord.read(run_dir / RUN_FILE)
    recorded_sha = record.adapter_sha256  # absent from runs written before 2026-12-02
    adapter = run_dir / "adapter.safetensors"
    if recorded_sha and adapter.is_file() and file_digest(adapter) != recorded_sha:
        read_adapter_weights(adapter)  # a truncated file is named as such
        raise UserError(
            f"{adapter} is not the adapter this run trained ({RUN_FILE} records another sha256): it was replaced, "
            f"e.g. by another run's ({record.organ} expected)"
        )
    check_adapter_config(run_dir, record)
    loaded = load_model(record.model)
    if record.model_sha256 and file_digest(loaded.source) != record.model_sha256:
        raise UserError(
            f"{loaded.source} ({record.model!r}) is not the base model this run adapted ({RUN_FILE} records another "
            f"sha256): {RUN_FILE} was edited or the model file replaced; predict needs the model the run trained on"
        )
    replace_with_binary_head(loaded.model)
    try:
        adapted = load_adapter(loaded.model, run_dir)
    except UserError:
        raise
    except (ValueError, KeyError) as err:  # a hand-edited config: the factory checks options with ValueError
        raise UserError(f"{run_dir / 'adapter_config.json'} does not describe a usable adapter: {err!r}") from err
    adapted.model.to(resolve_device(device))
    return adapted, record


def check_adapter_config(run_dir: Path, record: RunRecord) -> None:
    """adapter_config.json must describe the adapter that run.json says the run trained (method and options):
    another run's adapter and config copied in would otherwise be used under this run's name."""
    from arenaseg.adapters.io import read_adapter_config

    config = read_adapter_config(run_dir)
    method = {"zero-shot": "lp", "scratch": "fft"}.get(record.method, record.method)
    options = config.get("options") if isinstance(config.get("options"), dict) else {}
    changed = [k for k in sorted(record.options) if k in options and options[k] != record.options[k]]
    if config.get("method") != method or changed:
        what = f"method {config.get('method')!r}, {RUN_FILE} {method!r}" if config.get("method") != method else ""
        what = what or "; ".join(f"{k} {options[k]!r}, {RUN_FILE} {record.options[k]!r}" for k in changed[:3])
        raise UserError(
            f"{run_dir / 'adapter_config.json'} is not the adapter this run trained ({what}): it was replaced, "
            f"e.g. by another run's"
        )


def zero_shot_model(model_name: str, organ: str, device: str = "auto"):
    """The foundation model with the binary head that `adapt` starts from (the organ's class row), and the
    preprocessing its card records (the default settings when it has no card)."""
    from arenaseg.models.registry import class_row, load_model

    loaded = load_model(model_name)
    row = class_row(loaded, organ)
    if row is None:
        classes = ", ".join(c for c in loaded.class_rows if c != "background") or "none"
        raise UserError(f"{model_name} has no class {organ!r} to predict zero-shot; its classes: {classes}")
    replace_with_binary_head(loaded.model, *row)
    card = Path(loaded.source).with_suffix(".json")
    recorded = json.loads(card.read_text()).get("preprocessing") if card.is_file() else None
    preprocess = PreprocessSettings.from_dict(recorded) if recorded else PreprocessSettings()
    return loaded.model.to(resolve_device(device)), preprocess


def run_predict(
    run_dir: str | Path | None,
    inputs: Sequence[Path],
    outputs: Sequence[Path],
    device: str = "auto",
    keep_largest: bool = KEEP_LARGEST_COMPONENT,
    zero_shot: tuple[str, str] | None = None,
    precision: str = DEFAULT_PRECISION,
    report: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Masks of ``inputs`` from a finished run, or with ``zero_shot`` = (model, organ) from the foundation model
    alone; ``keep_largest`` keeps each mask's largest connected component; ``precision``: the forward's autocast;
    ``report`` is called with each output as soon as it is written."""
    if zero_shot is not None:
        model, preprocess = zero_shot_model(*zero_shot, device)
    else:
        adapted, record = load_run(run_dir, device)
        model = adapted.model
        preprocess = PreprocessSettings.from_dict(record.preprocess)  # the run's own, never the user's
    written = []
    for src, dst in zip(inputs, outputs, strict=True):
        labels = predict_volume(model, src, preprocess, head="sigmoid", precision=precision)
        written.append(write_like(src, largest_component(labels) if keep_largest else labels, dst))
        if report is not None:
            report(written[-1])
    return written


def _label_value(ref: Path, organ: str) -> int:
    """The organ's value in a multi-class reference, from the dataset.json of the folder it belongs to."""

    from arenaseg.data.datasets import read_label_map

    for folder in (ref.parent, ref.parent.parent):
        meta = folder / "dataset.json"
        if meta.is_file():
            _, labels = read_label_map(meta)
            if organ not in labels or organ == "background":
                valid = ", ".join(k for k in labels if k != "background")
                raise UserError(f"organ {organ!r} not in {meta}; valid: {valid}")
            return int(labels[organ])
    raise FileNotFoundError(f"--organ needs a dataset.json beside {ref} or one folder up to map the organ to a label")


def evaluate_files(
    pred: Path, ref: Path, organ: str | None, out: Path | None, run_dir: Path | None = None
) -> tuple[dict, Path]:
    """Metrics of prediction file(s) against reference file(s) on the reference grid; writes metrics.json and
    returns (metrics, where it was written). Both files of a pair are binarised by one rule (`organ_mask`);
    references without a prediction are listed (``unmatched_references``); with ``run_dir`` the run's support
    cases are scored apart (``support_cases``), out of the means, since the run trained on them."""
    for path in (pred, ref):
        if not path.exists():
            raise FileNotFoundError(f"not found: {path}")
    if pred.is_dir() != ref.is_dir():
        raise UserError("--pred and --ref must both be files or both be folders")
    support = set(RunRecord.read(run_dir / RUN_FILE).support_cases) if run_dir is not None else set()
    target = out or (pred if pred.is_dir() else pred.parent) / METRICS_FILE
    unmatched: list[str] = []
    if pred.is_dir():
        names = sorted(p.name for p in pred.iterdir() if p.name.endswith((".nii.gz", ".nii")))
        missing = [n for n in names if not (ref / n).is_file()]
        if not names or missing:
            raise UserError(f"references missing in {ref} for {missing[:5] or 'every prediction (none found)'}")
        pairs = [(pred / n, ref / n) for n in names]
        unmatched = sorted(
            p.name for p in ref.iterdir() if p.name.endswith((".nii.gz", ".nii")) and p.name not in names
        )
    else:
        pairs = [(pred, ref)]
    value = _label_value(pairs[0][1], organ) if organ else None
    reads = [*(p for p in (pred, ref) if p.is_file()), ref if ref.is_dir() else ref.parent]
    check_metrics_target(target, reads, given=out is not None)
    cases, support_cases = {}, {}
    for p, r in pairs:
        check_same_affine(p, nib.load(str(p)).affine, r, nib.load(str(r)).affine)
        (ref_labels, spacing), (pred_labels, _) = read_label(r), read_label(p)
        if pred_labels.shape != ref_labels.shape:
            raise UserError(f"{p} has shape {pred_labels.shape}, reference {r} has {ref_labels.shape}")
        cid = r.name.split(".nii")[0]
        scores = case_metrics(organ_mask(pred_labels, value, p), organ_mask(ref_labels, value, r), spacing)
        (support_cases if cid in support else cases)[cid] = scores
    if not cases:
        raise UserError(f"every prediction is a support case of {run_dir}: nothing is left to score")
    metrics = summarise(cases)
    if unmatched:
        metrics["unmatched_references"] = unmatched
    if support_cases:
        metrics["support_cases"] = support_cases
    write_json(target, metrics)
    return metrics, target


def organ_mask(labels: np.ndarray, value: int | None, path: Path) -> np.ndarray:
    """The organ's voxels, by one rule for a prediction and its reference: a binary mask (values 0 and 1, what
    predict writes) as it is; a label map, the organ's ``value`` (--organ), which it needs when it holds several
    labels: without it any non-zero voxel would count, and a multi-organ reference would score a liver against
    every organ at once."""
    present = [int(v) for v in np.unique(labels) if v != 0]
    if set(present) <= {1}:
        return labels == 1
    if value is None:
        if len(present) > 1:
            raise UserError(
                f"{path} holds the labels {present[:10]}: pass --organ NAME to say which one is scored "
                f"(its value comes from the dataset.json beside the reference)"
            )
        return labels != 0
    return labels == value


def check_metrics_target(target: Path, reads: Sequence[Path], given: bool = True) -> None:
    """evaluate's --out under the output rule (`arenaseg.utils.outputs`): a .json file, never one it reads nor
    one in the references' folder, replacing an earlier metrics file only."""
    if target.is_dir():
        raise UserError(f"--out {target} is a folder; give a file name, e.g. {target / METRICS_FILE}")
    if target.name.endswith((".nii", ".nii.gz")):
        raise UserError(f"--out {target} is an input or a NIfTI file; metrics go to a .json file, e.g. {METRICS_FILE}")
    what = "--out" if given else "the default --out (beside --pred)"
    check_output_rule(
        [target], reads=reads, ours=_is_metrics_file, kind="a metrics file of arenaseg evaluate", what=what
    )


def _is_metrics_file(path: Path) -> bool:
    try:
        earlier = json.loads(path.read_text()) if path.stat().st_size < 2**24 else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(earlier, dict) and "mean_dice" in earlier


def check_outputs(inputs: Sequence[Path], outputs: Sequence[Path], protected: Sequence[Path] = ()) -> None:
    """predict's outputs under the output rule (`arenaseg.utils.outputs`): NIfTI names, never an input or a
    ``protected`` path (the run's files and folder, the input folder), never two from one name, and never over
    an existing file that is not a mask of ours; checked before anything runs."""
    for dst in outputs:
        if not dst.name.endswith((".nii.gz", ".nii")) and not dst.is_dir():
            raise UserError(f"output {dst} must end in .nii.gz (or .nii): predict writes NIfTI masks")
    check_output_rule(
        outputs,
        reads=[*inputs, *protected],
        sources=inputs,
        ours=is_our_mask,
        kind="a mask written by arenaseg predict",
    )


def predict_inputs(folder: Path) -> list[Path]:
    """The scans of a predict folder, nnU-Net's way: ``CASE_0000.nii.gz`` (or a name without a channel suffix).
    Anything that looks like a scan but cannot be read as one, and a second channel (our models take one), is
    refused before any mask is written."""
    names = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    for path in names:
        if not path.is_file():
            why = "a folder" if path.is_dir() else "a broken symbolic link or a symlink loop"
            raise UserError(f"{path} is {why}, not a NIfTI file; remove it or move it out of {folder}")
        if re.search(r"_(\d{4})\.nii(\.gz)?$", path.name) and not re.search(r"_0000\.nii(\.gz)?$", path.name):
            raise UserError(
                f"{path} is a channel other than _0000 (nnU-Net's naming): arenaseg models take one channel "
                f"(a CT or MRI scan); move the other channels out of {folder}"
            )
    return names
