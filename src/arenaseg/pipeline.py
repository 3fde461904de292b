"""The adapt / predict / evaluate jobs behind the CLI: a run folder in, artifacts out, nothing half-written.

Run folder contract (RUN_DIR): ``checkpoint.pt`` while training (resume point), then ``adapter.safetensors`` +
``adapter_config.json``, ``metrics.json`` (when test cases were evaluated) and last ``run.json``, whose presence
marks a finished run.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from arenaseg.data.datasets import Dataset, open_dataset
from arenaseg.data.preprocess import PreprocessSettings, case_item, file_digest, load_all, preprocessed_dataset
from arenaseg.data.sampling import PatchSampler
from arenaseg.data.splits import BTCV_FS, SupportDraw, draw_support
from arenaseg.evaluate.inference import predict_volume, write_like
from arenaseg.evaluate.metrics import case_metrics, summarise
from arenaseg.models.swin_unetr import replace_with_binary_head
from arenaseg.train.loop import TrainSettings, train_adapter
from arenaseg.train.pretrain import git_commit
from arenaseg.utils.atomic import write_json
from arenaseg.utils.device import device_name, resolve_device

RUN_FILE, METRICS_FILE, CHECKPOINT_FILE = "run.json", "metrics.json", "checkpoint.pt"


@dataclass
class AdaptJob:
    """Everything `arenaseg adapt` needs; ``test_cases`` is "auto", "none" or a list of case ids."""

    data: str
    organ: str
    shots: int
    seed: int
    method: str
    out: str
    model: str = "btcv-fs"
    rank: int = 16
    lam: float | None = None
    test_cases: str | list[str] = "auto"
    support_cases: list[str] | None = None  # explicit support set (e.g. FSEFT lists) instead of a seeded draw
    train: TrainSettings = field(default_factory=TrainSettings)
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)
    cache_dir: str | None = None
    device: str = "auto"  # where it runs; not part of a result's settings (see bench.runner.job_signature)
    overwrite: bool = False
    resume: bool = False


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
    for cid in test_cases:
        data.case(cid)
    return list(test_cases)


def support_pool(data: Dataset, test_cases: Sequence[str]) -> list[str]:
    split = benchmark_split(data)
    pool = list(split.support_pool) if split else [c for c in data.case_ids if c not in set(test_cases)]
    labelled = [c for c in pool if data.layout != "nnunet" or data.case(c).label is not None]
    return [c for c in labelled if c not in set(test_cases)]


def prepare_run_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber a finished run or silently restart an unfinished one; check writability up front."""
    if (out / RUN_FILE).exists():
        if not overwrite:
            raise FileExistsError(f"{out} holds a finished run ({RUN_FILE}); pass --overwrite to replace it")
        for name in (RUN_FILE, METRICS_FILE, CHECKPOINT_FILE, "adapter.safetensors", "adapter_config.json"):
            (out / name).unlink(missing_ok=True)
    elif (out / CHECKPOINT_FILE).exists() and not resume:
        if not overwrite:
            raise FileExistsError(f"{out} holds an unfinished run ({CHECKPOINT_FILE}); pass --resume to continue it")
        (out / CHECKPOINT_FILE).unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"run folder {out} is not writable: {err}") from err


def build_adapted(
    model_name: str, organ: str, method: str, rank: int, lam: float | None, total_steps: int, seed: int, **options
):
    """Foundation model + binary head (zero-shot init when the organ is one of its classes) + method; ``options``
    override further `AdaptOptions` fields."""
    from arenaseg.adapters import AdaptOptions, adapt_model
    from arenaseg.models.registry import class_row, load_model

    torch.manual_seed(seed)
    loaded = load_model(model_name)
    row = class_row(loaded, organ)
    replace_with_binary_head(loaded.model, *(row if row else (None, None)))
    if lam is not None:
        options["lam"] = lam
    options = AdaptOptions(rank=rank, total_steps=total_steps, **options)
    return loaded, adapt_model(loaded.model, method, options), options, row


def run_adapt(job: AdaptJob) -> dict:
    """Adapt, save the adapter, evaluate, and write run.json (returned)."""
    from arenaseg.adapters import save_adapter

    out = Path(job.out)
    device = resolve_device(job.device)
    data = open_dataset(job.data)
    organ = data.check_organ(job.organ)
    if job.shots <= 0:
        raise ValueError(f"--shots must be >= 1, got {job.shots}")
    tests = resolve_test_cases(data, job.test_cases)
    if job.support_cases is not None:
        overlap = sorted(set(job.support_cases) & set(tests))
        if overlap:
            raise ValueError(f"support cases {overlap} are also test cases")
        draw = SupportDraw(tuple(data.case(c).case_id for c in job.support_cases))
    else:
        pool = support_pool(data, tests)
        draw = draw_support(pool, lambda c: data.has_organ(c, organ), job.shots, job.seed, organ=organ)
    if draw.note:
        print(f"note: {draw.note}")
    prepare_run_dir(out, job.overwrite, job.resume)

    settings = TrainSettings(**{**asdict(job.train), "seed": job.seed})
    loaded, adapted, options, row = build_adapted(
        job.model, organ, job.method, job.rank, job.lam, settings.steps, job.seed
    )
    adapted.model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # one process may run many bench cells
    label_values = {organ: 1}
    mapping = {data.labels[organ]: 1} if data.layout == "nnunet" else None
    cached = preprocessed_dataset(
        [case_item(data.case(c), label_values) for c in draw.cases], job.preprocess, mapping, job.cache_dir
    )
    volumes = load_all(cached)
    sampler = PatchSampler(volumes, job.preprocess, settings.patches_per_step, settings.seed)

    result = train_adapter(adapted, sampler, settings, out / CHECKPOINT_FILE, status=_status(adapted))
    trainable_while_training = adapted.trainable_params
    if job.method == "arena":
        from arenaseg.adapters.arena import prune_arena

        prune_arena(adapted.model)
    save_adapter(adapted, out)
    report = adapted.rank_report()

    record = {
        "method": job.method,
        "organ": organ,
        "shots": job.shots,
        "seed": job.seed,
        "support_cases": list(draw.cases),
        "support_note": draw.note,
        "test_cases": tests,
        "model": job.model,
        "model_sha256": file_digest(loaded.source),  # a name like btcv-fs can be retrained: this pins the weights
        "zero_shot_head_row": row[0] if row else None,
        "settings": {
            "train": asdict(settings),
            "preprocess": job.preprocess.to_dict(),
            "options": asdict(options),
        },
        "data": str(data.root),
        "trainable_params": trainable_while_training,
        "active_params": adapted.trainable_params,  # after ARENA's pruning; equal for the other methods
        "total_params": adapted.total_params,
        "steps_done": result.steps_done,
        "stopped_early": result.stopped_early,
        "final_loss": result.final_loss,
        "seconds_per_step": result.seconds_per_step,
        "train_seconds": round(result.train_seconds, 1),
        "peak_mem_mb": peak_memory_mb(device),
        "device": device_name(device),
        "git_commit": git_commit(),
        "adapter_bytes": (out / "adapter.safetensors").stat().st_size,
        "rank_report": report,
    }
    if job.method == "arena":
        record["ranks"] = {
            name: {"initial": e["initial_rank"], "active": e["active_rank"]} for name, e in report["layers"].items()
        }
        record["active_rank_total"] = report["totals"]["active_rank"]
    if tests:
        t0 = time.time()
        metrics = evaluate_cases(adapted.model, data, organ, tests, job.preprocess)
        write_json(out / METRICS_FILE, metrics)
        record["mean_dice"], record["mean_hd95"] = metrics["mean_dice"], metrics["mean_hd95"]
        record["eval_seconds"] = round(time.time() - t0, 1)
    write_json(out / RUN_FILE, record)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return record


def _status(adapted):
    if adapted.method != "arena":
        return None
    from arenaseg.adapters.arena import active_ranks

    return lambda: {"rank": sum(a for _, a in active_ranks(adapted.model).values())}


def peak_memory_mb(device: torch.device) -> float:
    """GPU: the peak of torch's allocations since the run began; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def reference_mask(data: Dataset, case_id: str, organ: str) -> tuple[np.ndarray, tuple[float, ...]]:
    case = data.case(case_id)
    path = case.label if case.label is not None else case.structure_files[organ]
    img = nib.load(str(path))
    ref = np.asarray(img.dataobj)
    mask = ref == data.labels[organ] if case.label is not None else ref > 0
    return mask, tuple(float(z) for z in img.header.get_zooms()[:3])


def evaluate_cases(model, data: Dataset, organ: str, case_ids: Sequence[str], preprocess: PreprocessSettings) -> dict:
    cases = {}
    for cid in case_ids:
        pred = predict_volume(model, data.case(cid).image, preprocess, head="sigmoid")
        ref, spacing = reference_mask(data, cid, organ)
        cases[cid] = case_metrics(pred > 0, ref, spacing)
    return summarise(cases)


def load_run(run_dir: str | Path, device: str = "cpu"):
    """Rebuild the adapted model of a finished run (base model from run.json + saved adapter) on ``device``."""
    import json

    from arenaseg.adapters import load_adapter
    from arenaseg.models.registry import load_model

    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run folder (no {RUN_FILE})")
    record = json.loads((run_dir / RUN_FILE).read_text())
    loaded = load_model(record["model"])
    replace_with_binary_head(loaded.model)
    adapted = load_adapter(loaded.model, run_dir)
    adapted.model.to(resolve_device(device))
    return adapted, record


def run_predict(
    run_dir: str | Path, inputs: Sequence[Path], outputs: Sequence[Path], device: str = "auto"
) -> list[Path]:
    adapted, record = load_run(run_dir, device)
    preprocess = PreprocessSettings(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in record["settings"]["preprocess"].items()}
    )
    written = []
    for src, dst in zip(inputs, outputs, strict=True):
        labels = predict_volume(adapted.model, src, preprocess, head="sigmoid")
        written.append(write_like(src, labels, dst))
    return written


def _label_value(ref: Path, organ: str) -> int:
    """The organ's value in a multi-class reference, from the dataset.json of the folder it belongs to."""
    import json

    for folder in (ref.parent, ref.parent.parent):
        meta = folder / "dataset.json"
        if meta.is_file():
            labels = json.loads(meta.read_text())["labels"]
            if organ not in labels or organ == "background":
                valid = ", ".join(k for k in labels if k != "background")
                raise ValueError(f"organ {organ!r} not in {meta}; valid: {valid}")
            return int(labels[organ])
    raise FileNotFoundError(f"--organ needs a dataset.json beside {ref} or one folder up to map the organ to a label")


def evaluate_files(pred: Path, ref: Path, organ: str | None, out: Path | None) -> dict:
    """Metrics of prediction file(s) against reference file(s) on the reference grid; writes metrics.json."""
    for path in (pred, ref):
        if not path.exists():
            raise FileNotFoundError(f"not found: {path}")
    if pred.is_dir() != ref.is_dir():
        raise ValueError("--pred and --ref must both be files or both be folders")
    if pred.is_dir():
        names = sorted(p.name for p in pred.iterdir() if p.name.endswith((".nii.gz", ".nii")))
        missing = [n for n in names if not (ref / n).is_file()]
        if not names or missing:
            raise ValueError(f"references missing in {ref} for {missing[:5] or 'every prediction (none found)'}")
        pairs = [(pred / n, ref / n) for n in names]
    else:
        pairs = [(pred, ref)]
    cases = {}
    for p, r in pairs:
        ref_img, pred_img = nib.load(str(r)), nib.load(str(p))
        if pred_img.shape != ref_img.shape:
            raise ValueError(f"{p} has shape {pred_img.shape}, reference {r} has {ref_img.shape}")
        ref_arr = np.asarray(ref_img.dataobj)
        ref_mask = ref_arr == _label_value(r, organ) if organ else ref_arr > 0
        spacing = tuple(float(z) for z in ref_img.header.get_zooms()[:3])
        cases[r.name.split(".nii")[0]] = case_metrics(np.asarray(pred_img.dataobj) > 0, ref_mask, spacing)
    metrics = summarise(cases)
    target = out or (pred if pred.is_dir() else pred.parent) / METRICS_FILE
    write_json(target, metrics)
    return metrics
