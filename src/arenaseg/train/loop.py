"""The adaptation training loop (one readable loop for every method).

Batches depend only on (seed, step), trainable tensors and optimizer state are checkpointed atomically, so a
killed run resumed from its checkpoint reaches exactly the tensors an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from monai.losses import DiceCELoss, DiceLoss
from tqdm import tqdm

from arenaseg.adapters.config import OptimizerSettings
from arenaseg.adapters.tuners import AdaptedModel
from arenaseg.data.sampling import PatchSampler
from arenaseg.train.schedule import warmup_cosine
from arenaseg.utils.atomic import atomic_path
from arenaseg.utils.differences import first_difference
from arenaseg.utils.errors import UserError
from arenaseg.utils.precision import (
    DEFAULT_PRECISION,
    PRECISION_HELP,
    PRECISIONS,
    autocast,
    check_precision,
    grad_scaler,
)
from arenaseg.utils.settings import Config, choice, flag, integer, number, same_as


@dataclass(frozen=True)
class TrainSettings(Config):
    """One global default for every method, organ and k (BENCHMARK.md forbids per-task tuning); checked by the
    settings' one validator (``arenaseg.utils.settings``), as a UserError: these come from the command line."""

    error = UserError

    steps: int = integer(300, 1, help="optimizer steps")  # protocol v2's probe choice: benchmarks/results/probe/
    patches_per_step: int = integer(2, 1, help="patches per step")
    lr: float = same_as(OptimizerSettings, "lr")
    head_lr_scale: float = same_as(OptimizerSettings, "head_lr_scale")
    weight_decay: float = same_as(OptimizerSettings, "weight_decay")
    warmup_steps: int = integer(10, 0, help="warm-up steps before cosine decay", flag="--warmup")
    # Dice + CE keeps a new organ's logits < 0: benchmarks/results/step_budget_v3_*.md
    cross_entropy: bool = flag(
        False,
        help="add binary cross-entropy to the Dice loss (nnU-Net's loss); within 100 steps on a small new organ it "
        "keeps every logit below 0, so the default trains on Dice alone",
    )
    checkpoint_every: int = integer(25, 1, help="steps between resume checkpoints")
    stop_patience: int = integer(
        0,
        0,
        help="stop once the smoothed training loss has not improved for this many steps; 0 = the step cap alone",
    )
    stop_min_delta: float = number(1e-3, 0.0, help="the improvement that --stop-patience counts")
    seed: int = 0
    precision: str = choice(DEFAULT_PRECISION, PRECISIONS, help=PRECISION_HELP)


class PlateauStop:
    """Validation-free stopping: stop once the smoothed training loss has not improved by ``min_delta`` for
    ``patience`` steps (there is no validation data in the few-shot setting). patience 0 disables it."""

    def __init__(self, patience: int, min_delta: float, smoothing: float = 0.9) -> None:
        self.patience, self.min_delta, self.smoothing = patience, min_delta, smoothing
        self.ema: float | None = None
        self.best = float("inf")
        self.since_best = 0

    def update(self, loss: float) -> bool:
        self.ema = loss if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * loss
        if self.ema < self.best - self.min_delta:
            self.best, self.since_best = self.ema, 0
        else:
            self.since_best += 1
        return self.patience > 0 and self.since_best >= self.patience

    def state_dict(self) -> dict:
        return {"ema": self.ema, "best": self.best, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.best, self.since_best = state["ema"], state["best"], state["since_best"]


@dataclass
class TrainResult:
    steps_done: int
    stopped_early: bool
    final_loss: float | None  # None: nothing was trained (a zero-shot run)
    seconds_per_step: float | None  # median over every session of a resumed run (also one killed after its last step)
    train_seconds: float  # summed over every session of a resumed run


def train_adapter(
    adapted: AdaptedModel,
    sampler: PatchSampler,
    settings: TrainSettings,
    checkpoint: Path,
    on_step: Callable[[int, float], None] | None = None,
    identity: dict | None = None,
) -> TrainResult:
    """Run (or resume) the loop; the progress bar shows the loss and the method's ``progress()`` fields.
    ``on_step(steps_done, loss)`` runs after every step, before its checkpoint (e.g. a probe's measurements).
    ``identity`` (JSON-able; default: the training settings and method options, keys ``train`` and ``options``) is
    stored in the checkpoint, which resumes only under the same."""
    identity = _plain(identity or {"train": asdict(settings), "options": adapted.options.to_dict()})
    model = adapted.model
    device = next(model.parameters()).device
    check_precision(settings.precision, device)
    loss_fn = loss_function(settings.cross_entropy)
    optimizer = adapted.make_optimizer(settings.lr, settings.weight_decay, settings.head_lr_scale)
    scheduler = warmup_cosine(optimizer, settings.steps, settings.warmup_steps)
    scaler = grad_scaler(settings.precision, device)
    stopper = PlateauStop(settings.stop_patience, settings.stop_min_delta)
    start, step_times, loss_value, stopped, earlier_times = 0, [], float("nan"), False, []
    if checkpoint.exists():
        start, loss_value, earlier_times = _load_checkpoint(
            checkpoint, adapted, optimizer, scheduler, stopper, identity, scaler
        )
    model.train()
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc=f"adapt {adapted.method}")
    for step in bar:
        t0 = time.perf_counter()
        images, labels = sampler.batch(step)
        loss = training_step(adapted, optimizer, scaler, images.to(device), labels.to(device), loss_fn, settings, step)
        scheduler.step()
        step_times.append(time.perf_counter() - t0)
        loss_value = loss.item()
        check_finite(loss_value, model, step + 1, settings)  # before the checkpoint: never save a diverged state
        stopped = stopper.update(loss_value)
        bar.set_postfix(loss=f"{loss_value:.3f}", **adapted.progress())
        done = step + 1
        if on_step is not None:
            on_step(done, loss_value)
        if stopped or done % settings.checkpoint_every == 0 or done == settings.steps:
            times = earlier_times + step_times
            at = settings.steps if stopped else done  # a stopped run resumes as finished
            _save_checkpoint(
                checkpoint, adapted, optimizer, scheduler, stopper, identity, at, loss_value, times, scaler
            )
        if stopped:
            bar.write(f"stopping at step {done}: training loss plateaued for {settings.stop_patience} steps")
            break
    times = earlier_times + step_times
    return TrainResult(
        steps_done=(step + 1) if step_times else start,
        stopped_early=stopped,
        final_loss=loss_value,
        seconds_per_step=statistics.median(times) if times else float("nan"),
        train_seconds=sum(times),
    )


def check_finite(loss: float, model: torch.nn.Module, steps_done: int, settings: TrainSettings) -> None:
    """The numeric guard of training: a loss or trainable weight that is NaN or infinite ends the run with a
    UserError (exit 2) before anything is saved. A Dice loss stays below 1 while the weights blow up (--lr 1e9
    reaches 1e10 in one step and NaN in the next), so the weights are checked too."""
    trained = [torch.isfinite(p).all() for p in model.parameters() if p.requires_grad]
    weights_finite = bool(torch.stack(trained).all()) if trained else True  # one device sync, not one per tensor
    if math.isfinite(loss) and weights_finite:
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else "the weights hold NaN or infinite values"
    raise UserError(
        f"training diverged at step {steps_done}: {what}; lower --lr (now {settings.lr}) or --head-lr-scale "
        f"(now {settings.head_lr_scale}). No adapter was written"
    )


# Batches the support loss averages over: one step's loss is one batch of a few patches and moves by up to 0.5.
SUPPORT_LOSS_STEPS = 25


@torch.no_grad()
def support_loss(
    model: torch.nn.Module,
    sampler: PatchSampler,
    steps_done: int,
    settings: TrainSettings,
    last: int = SUPPORT_LOSS_STEPS,
) -> float:
    """How well the final model fits its support scans: its mean training loss (without a method's own terms) on
    the batches of the last ``last`` steps, in eval mode. Batches depend only on (seed, step), so a finished run's
    saved adapter gives the same number again; nothing here draws from a global random generator."""
    device = next(model.parameters()).device
    loss_fn = loss_function(settings.cross_entropy)
    was_training = model.training
    model.eval()
    losses = []
    for step in range(max(0, steps_done - last), steps_done):
        images, labels = sampler.batch(step)
        with autocast(settings.precision, device):
            losses.append(loss_fn(model(images.to(device)), labels.to(device)).item())
    model.train(was_training)
    return statistics.fmean(losses)


def loss_function(cross_entropy: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Dice (+ CE) on float32 logits: under bf16/fp16 autocast the logits come in 16 bits, and Dice's sums over
    whole patches would keep only 8 or 11 significant bits."""
    loss = DiceCELoss(sigmoid=True, squared_pred=False) if cross_entropy else DiceLoss(sigmoid=True, squared_pred=False)
    return lambda logits, labels: loss(logits.float(), labels)


def training_step(adapted, optimizer, scaler, images, labels, loss_fn, settings: TrainSettings, step: int):
    """One optimizer step of the loop (benchmarks/step_time.py times this very function): forward and loss under
    the precision's autocast, backward (loss-scaled for fp16), the optimizer step on unscaled float32 gradients,
    the method's after-step hook. Returns the loss."""
    with autocast(settings.precision, images.device):
        loss = adapted.training_loss(images, labels, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
    scaler.update()
    adapted.after_step(step)
    return loss


def recorded_settings(recorded: dict) -> dict:
    """Settings (TrainSettings, PretrainSettings) as a checkpoint or record stored them, in today's fields: runs
    recorded before ``precision`` existed trained in fp32."""
    return {"precision": "fp32", **recorded}


def _plain(value):
    """The JSON view of a value (tuples become lists), as a checkpoint stores it."""
    return json.loads(json.dumps(value))


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path, adapted, optimizer, scheduler, stopper, identity, step, loss, step_seconds, scaler) -> None:
    state = {
        "trainable": trainable_tensors(adapted.model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "stopper": stopper.state_dict(),
        "grad_scaler": scaler.state_dict(),  # fp16's loss scale; empty otherwise
        "method_state": adapted.extra_state(),
        "identity": identity,
        "step": step,
        "loss": loss,
        "step_seconds": list(step_seconds),  # every step's time so far, so that a resumed run reports them all
        "train_seconds": sum(step_seconds),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: Path, identity: dict) -> dict:
    """A resume checkpoint's state, refused unless it was written under ``identity`` (compared on the keys it
    stored: one written before checkpoints held an identity stored its training settings and method options)."""
    from arenaseg.models.checkpoints import load_torch_file

    state = load_torch_file(path)
    if not isinstance(state, dict) or not ("identity" in state or "settings" in state):
        raise UserError(f"{path} is not a resume checkpoint of arenaseg adapt; remove it or pass --overwrite")
    saved = state.get("identity") or {"train": state["settings"], "options": state.get("options")}
    saved = {**saved, "train": recorded_settings(saved["train"])}
    change = first_difference(saved, {key: identity.get(key) for key in saved})
    if change:
        raise UserError(
            f"{path} belongs to a run started with other settings ({change}); resume it with the settings it "
            "started with, or pass --overwrite to start anew"
        )
    return state


def _load_checkpoint(path, adapted, optimizer, scheduler, stopper, identity, scaler) -> tuple[int, float, list[float]]:
    state = read_checkpoint(path, identity)
    params = dict(adapted.model.named_parameters())
    missing = sorted(set(state["trainable"]) ^ {n for n, p in params.items() if p.requires_grad})
    if missing:
        raise UserError(f"{path} does not fit this model's trainable tensors, e.g. {missing[0]!r}")
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stopper.load_state_dict(state["stopper"])
    scaler.load_state_dict(state.get("grad_scaler", {}))  # absent before precision existed (fp32: nothing to load)
    adapted.load_extra_state(state["method_state"])
    return state["step"], state["loss"], list(state.get("step_seconds", []))  # absent before 2026-11-27
