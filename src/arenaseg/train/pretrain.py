"""Supervised multi-organ pretraining of a Swin-UNETR foundation model (one process, or many under torchrun).

Batches depend only on (seed, step, rank), so `--resume` after a kill reaches the same weights; only rank 0
writes files, always atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from arenaseg.data.datasets import Dataset
from arenaseg.data.preprocess import (
    PreprocessSettings,
    class_balanced_patch_transform,
    file_digest,
    load_cases,
)
from arenaseg.data.sampling import PatchSampler
from arenaseg.models.checkpoints import load_torch_file
from arenaseg.models.foundation import load_state_strict, save_foundation
from arenaseg.models.registry import load_model
from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr
from arenaseg.train.distributed import DistInfo, barrier, init_distributed, shutdown
from arenaseg.train.loop import TrainSettings, recorded_settings
from arenaseg.train.schedule import warmup_cosine
from arenaseg.utils.atomic import atomic_path
from arenaseg.utils.errors import UserError
from arenaseg.utils.precision import DEFAULT_PRECISION, autocast, check_precision, grad_scaler
from arenaseg.utils.provenance import device_name, git_commit
from arenaseg.utils.settings import Config, choice, described, integer, number, same_as


@dataclass
class PretrainResult:
    path: Path | None  # the weights file; None on ranks other than 0
    model: torch.nn.Module
    rank: int


SAMPLINGS = ("class-balanced", "pos-neg")


@dataclass(frozen=True)
class PretrainSettings(Config):
    """Checked by the settings' one validator (``arenaseg.utils.settings``), as a UserError."""

    error = UserError

    steps: int = integer(1500, 1, help="optimizer steps")
    patches_per_step: int = integer(2, 1, help="patches per step per process")
    lr: float = number(5e-4, 0.0, above=True, help="AdamW peak learning rate")
    weight_decay: float = number(1e-5, 0.0, help="AdamW weight decay")
    warmup_steps: int = integer(50, 0, help="linear warm-up steps before cosine decay", flag="--warmup")
    checkpoint_every: int = integer(50, 1, help="steps between atomic resume checkpoints")
    seed: int = integer(0, 0, help="seed for initialisation and patch sampling")
    feature_size: int = integer(12, 1, help="Swin-UNETR feature size (the default is the CPU preset)")
    save_dtype: str = choice(
        "float32",
        ("float32", "float16"),
        help="dtype of the stored weights; float16 halves the file, loading casts back",
    )
    sampling: str = choice(
        "class-balanced",
        SAMPLINGS,
        help="patch centres: class-balanced = half background, half shared equally by the organs; pos-neg = "
        "foreground:background 1:1, so large organs dominate",
    )
    init: str = described(
        "",
        help="continue pretraining from this model (built-in name or our .safetensors; same classes and "
        "architecture), with a fresh schedule; empty = random initialisation",
        default_text="empty",
    )
    precision: str = same_as(TrainSettings, "precision")


def label_classes(data: Dataset, organs: Sequence[str]) -> dict[str, int]:
    """organ -> class index 1..n; every organ must exist in the label map and in at least one case."""
    names = [data.check_organ(o) for o in organs]
    if len(set(names)) != len(names):
        raise UserError(f"organ list has duplicates: {organs}")
    return {name: i + 1 for i, name in enumerate(names)}


def pretrain(
    data: Dataset,
    train_cases: Sequence[str],
    organs: Sequence[str],
    out: str | Path,
    settings: PretrainSettings = PretrainSettings(),
    preprocess: PreprocessSettings = PreprocessSettings(),
    eval_cases: Sequence[str] = (),
    cache_dir: str | Path | None = None,
    resume: bool = False,
    command: str = "",
) -> PretrainResult:
    """Train, checkpoint, and write ``out``.safetensors + card (rank 0 only)."""
    dist_info = init_distributed()
    try:
        return _pretrain(
            dist_info,
            data,
            train_cases,
            organs,
            Path(out),
            settings,
            preprocess,
            eval_cases,
            cache_dir,
            resume,
            command,
        )
    finally:
        shutdown(dist_info)


def _pretrain(
    dist_info: DistInfo,
    data,
    train_cases,
    organs,
    out,
    settings,
    preprocess,
    eval_cases,
    cache_dir,
    resume,
    command,
):
    classes = label_classes(data, organs)
    absent = [o for o in classes if not any(data.has_organ(c, o) for c in train_cases)]
    if absent:
        raise UserError(f"organs {absent} are absent from every training case")
    weights, state_path = out.with_suffix(".safetensors"), out.with_suffix(".state.pt")
    if weights.exists() and not resume:
        raise FileExistsError(f"{weights} exists: choose another --out or delete it")
    if weights.exists() and not state_path.exists():  # --resume of a finished run: it would retrain from step 0
        raise UserError(f"{weights} is a finished run, there is nothing to resume: choose another --out or delete it")
    if state_path.exists() and not resume:
        raise FileExistsError(f"{state_path} holds an unfinished run: add --resume to continue it")
    device = (
        torch.device("cuda", dist_info.rank % torch.cuda.device_count())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    torch.manual_seed(settings.seed)
    config = ModelConfig(
        out_channels=len(classes) + 1,
        feature_size=settings.feature_size,
        class_names=("background", *classes),
    )
    model = build_swin_unetr(config)
    init_info = initialise_from(model, config, settings.init) if settings.init else {}
    model.to(device)
    volumes = load_cases(data, train_cases, classes, preprocess, cache_dir, progress=True)
    balanced = settings.sampling == "class-balanced"
    crop = class_balanced_patch_transform(preprocess, len(classes) + 1) if balanced else None
    sampler = PatchSampler(volumes, preprocess, settings.patches_per_step, settings.seed, crop)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = warmup_cosine(optimizer, settings.steps, settings.warmup_steps)
    check_precision(settings.precision, device)
    scaler = grad_scaler(settings.precision, device)
    start = 0
    if resume and state_path.exists():
        state = load_torch_file(state_path, map_location=device)
        if not isinstance(state, dict) or "settings" not in state:
            raise UserError(f"{state_path} is not a resume state of arenaseg pretrain; remove it to start anew")
        if recorded_settings(state["settings"]) != asdict(settings):
            raise UserError(f"{state_path} was written with other settings {state['settings']}; cannot resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state.get("grad_scaler", {}))  # absent before precision existed (fp32)
        start = state["step"]
    net = DistributedDataParallel(model) if dist_info.world_size > 1 else model
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    t0 = time.time()
    bar = tqdm(
        range(start, settings.steps),
        initial=start,
        total=settings.steps,
        desc="pretrain",
        disable=not dist_info.is_main,
    )
    for step in bar:
        images, labels = sampler.batch(step, dist_info.rank)
        with autocast(settings.precision, device):  # the loss on float32 logits, as in the adaptation loop
            loss = loss_fn(net(images.to(device)).float(), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        done = step + 1
        if dist_info.is_main and (done % settings.checkpoint_every == 0 or done == settings.steps):
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "grad_scaler": scaler.state_dict(),
                "step": done,
                "settings": asdict(settings),
            }
            with atomic_path(state_path) as tmp:
                torch.save(state, tmp)
    train_seconds = time.time() - t0
    barrier(dist_info)
    if not dist_info.is_main:
        return PretrainResult(None, model, dist_info.rank)
    card = {
        "name": out.name,
        "architecture": config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": str(data.root),
        "train_cases": list(train_cases),
        "classes": ["background", *classes],
        "preprocessing": preprocess.to_dict(),
        "settings": asdict(settings),
        **({"init": init_info} if init_info else {}),
        "processes": dist_info.world_size,
        "train_seconds_this_session": round(train_seconds, 1),
        "device": device_name(device),
        "git_commit": git_commit(),
        "command": command,
    }
    if eval_cases:
        card["eval"] = evaluate_classes(model, data, eval_cases, classes, preprocess, settings.precision)
    path = save_foundation(out, model, config, card, dtype=getattr(torch, settings.save_dtype))
    state_path.unlink(missing_ok=True)
    return PretrainResult(path, model, dist_info.rank)


def initialise_from(model: torch.nn.Module, config: ModelConfig, name_or_path: str) -> dict:
    """Load a previous foundation model's weights (continued pretraining); its architecture and classes must be
    the ones this run trains. Returns what the card records about it."""
    loaded = load_model(name_or_path)
    if loaded.config.to_dict() != config.to_dict():
        raise UserError(
            f"--init {name_or_path}: its architecture/classes {loaded.config.to_dict()} differ from this run's "
            f"{config.to_dict()}"
        )
    load_state_strict(model, loaded.model.state_dict(), source=name_or_path)
    path = Path(loaded.source)
    card = path.with_suffix(".json")
    previous = json.loads(card.read_text()) if card.is_file() else {}
    return {
        "model": name_or_path,
        "sha256": file_digest(path),
        "git_commit": previous.get("git_commit", "unknown"),
        "steps": previous.get("settings", {}).get("steps"),
        "sampling": previous.get("settings", {}).get("sampling", "pos-neg"),
    }


def evaluate_classes(
    model,
    data: Dataset,
    case_ids: Sequence[str],
    classes: dict[str, int],
    preprocess,
    precision: str = DEFAULT_PRECISION,
) -> dict:
    """Per-class Dice (%) and HD95 (mm) on the cases' original grids, plus the mean Dice over classes."""
    import numpy as np

    from arenaseg.evaluate.inference import predict_volume, read_label
    from arenaseg.evaluate.metrics import case_metrics

    per_class: dict[str, list[float]] = {o: [] for o in classes}
    per_case = {}
    for cid in tqdm(case_ids, desc="evaluate", leave=False):
        case = data.case(cid)
        pred = predict_volume(model, case.image, preprocess, head="softmax", precision=precision)
        ref, spacing = read_label(case.label)
        per_case[cid] = {}
        for organ, c in classes.items():
            m = case_metrics(pred == c, ref == data.labels[organ], spacing)
            per_case[cid][organ] = m
            per_class[organ].append(m["dice"])
    mean_per_class = {o: round(float(np.mean(v)), 2) for o, v in per_class.items()}
    return {
        "cases": list(case_ids),
        "dice_per_class": mean_per_class,
        "mean_dice": round(float(np.mean(list(mean_per_class.values()))), 2),
        "per_case": per_case,
    }
