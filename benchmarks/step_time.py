"""Training-step time of ARENA vs PEFT LoRA (ranks 4, 16, 64) per precision, and P7: what the training path adds to a
bare forward + backward, on the CPU-preset Swin-UNETR (feature size 12, binary head). Not a test.

    .venv/bin/python benchmarks/step_time.py --threads 1 --precisions fp32 bf16        # CPU
    .venv/bin/python benchmarks/step_time.py --threads 1 --batch 1 --lowered-ranks 16  # CPU, shorter
    .venv/bin/python benchmarks/step_time.py --device cuda --precisions fp32 bf16       # GPU: ARENA and LoRA only
    .venv/bin/python benchmarks/step_time.py --quick                                    # smoke run
    .venv/bin/python benchmarks/step_time.py --threads 1 --ranks 16 --attention both    # fused vs MONAI attention
    .venv/bin/python benchmarks/step_time.py --threads 2 --ranks 16 --precisions fp32 bf16 \
        --levers compile,bf16-weights,channels-last --model btcv-fs                     # speed levers side by side

A training step is `arenaseg.train.loop.training_step` (the loop's own function: forward and loss under the
precision's autocast, backward, optimizer step, after-step hook) plus the scheduler step, on one fixed batch of
``--batch`` (default 2, the loop's) patches of 64^3. P7 (CPU, at the first ``--precisions`` entry) compares, on one
ARENA model: the loop's timed span (the sampler drawing the patches from in-memory volumes of an abdomen CT's size
at 3 mm, `training_step`, the scheduler step: what `train_adapter` reports as seconds per step) against a bare
forward + loss + backward of the same model on one such batch, under the same autocast. The GPU mode times the
ARENA and LoRA steps only and records which other processes used the GPU (there should be none). ``--fft`` and
``--inference`` add full fine-tuning and merged-ARENA inference cases. ``--attention both`` times every training and
inference case twice, with our fused window attention (`arenaseg.models.attention`, what the package runs) and with
MONAI's own reference path (cases marked "[MONAI attention]"); P7 uses the first ``--attention`` choice.

Levers (``--levers``, comma-separated; ``a+b`` combines levers in one case): each adds, per ARENA/LoRA training case
at ``--ranks`` and the first ``--precisions`` entry, the same case with a speed lever (marked "[lever]"):
``compile`` (``torch.compile`` of the network, mode ``--compile-mode``; the first call, which compiles the forward
and the backward, is reported apart and never timed), ``bf16-weights`` (bf16 autocast with the frozen Linear/Conv
weights stored in bf16, so that autocast stops casting them every call; adapter parameters, the head and the norms
stay float32), ``channels-last`` (model and input in ``torch.channels_last_3d``). A lever that fails (e.g. inductor
without a C++ compiler) is reported with its error line instead of times. Every case of one method and rank starts
from the same weights and steps on the same batch, so the levers' losses, step by step, are compared with the
baseline's (fp32; for bf16-weights also bf16 autocast alone): the parity column.

Throughput: each case's floating-point operations per step are counted once, untimed, with torch's FlopCounterMode
(matmuls and convolutions only; attention through torch's composite SDPA path while counting, so that the fused and the
MONAI cases count the same work), and reported as GFLOP/s at the median time and as a share of this machine's peak,
measured in the same run as the best of a few large fp32 matmuls at the same thread count.

All models are built first and the cases are timed interleaved, round after round (the starting case rotates each
round), so that drifts in machine load hit every case alike; the tables report medians.

Memory: on CUDA, the peak of ``torch.cuda.max_memory_allocated`` over a step minus the allocation before it (exact).
On CPU (Linux, glibc), the process's peak resident set size during the step (VmHWM, reset through
/proc/self/clear_refs after ``malloc_trim`` has returned the freed heap to the system) minus the resident size
before it. Every model lives in the one process, so the absolute peak includes all of them; the per-step increase
is the step's working memory (activations, gradients, optimizer state created by the first step).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from arenaseg.adapters import AdaptOptions, adapt_model, arena_layers, merge_arena
from arenaseg.data.preprocess import PreprocessSettings
from arenaseg.data.sampling import PatchSampler
from arenaseg.models.attention import FusedWindowAttention
from arenaseg.models.registry import class_row, load_model
from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr, replace_with_binary_head
from arenaseg.train.loop import TrainSettings, loss_function, training_step
from arenaseg.train.schedule import warmup_cosine
from arenaseg.utils.atomic import write_text
from arenaseg.utils.precision import PRECISIONS, autocast, grad_scaler
from arenaseg.utils.provenance import device_name, git_commit

RESULTS = Path(__file__).parent / "results" / "step_time.md"
PATCH = 64
VOLUME = (116, 116, 218)  # btcv_0026 (128 x 128 x 131 voxels of 2.73 x 2.73 x 5 mm) resampled to 3 mm
P7_METHOD = ("arena", 16)
ATTENTION = ("fused", "monai")
MONAI_MARK = " [MONAI attention]"
PEAK_MATMUL = 4096
LEVERS = ("compile", "bf16-weights", "channels-last")
LOW_PRECISION_CONVS = (nn.Linear, nn.Conv3d, nn.ConvTranspose3d)  # autocast lowers these
HEAD_ORGAN = "liver"  # a --model's binary head starts from this class's log-odds, when it has one


class PeakMemory:
    """Per-step peak memory in MiB: CUDA allocator statistics, or Linux's resettable peak RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type != "cuda":
            self._malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc

    def _status_kib(self, key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {key} in /proc/self/status")

    def reset(self) -> float:
        """Restart the peak; returns the current usage."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / 2**20
        self._malloc_trim(0)  # hand freed heap pages back, else the previous case's memory hides this one's
        Path("/proc/self/clear_refs").write_text("5")
        return self._status_kib("VmRSS") / 1024

    def peak(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self._status_kib("VmHWM") / 1024


@dataclass
class Case:
    name: str
    run: Callable[[], object]
    params: int
    precision: str = "fp32"
    flops: int = 0
    lever: str = ""  # "" for the plain cases
    reference: Case | None = None  # the plain case a lever case is compared with (same method, rank, attention)
    first_s: float = float("nan")  # a lever case's first, untimed call (compile cases: compiling included)
    error: str = ""  # a lever that failed: its error line
    losses: list[float] = field(default_factory=list)  # the training loss of every call, in order
    seconds: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    step_mib: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def base_model(device: torch.device, attention: str, model_name: str | None = None) -> nn.Module:
    """The CPU preset with random weights, or ``model_name`` (a built-in name or a file) with a binary head started
    from its ``HEAD_ORGAN`` class."""
    torch.manual_seed(0)
    if model_name is None:
        model, head = build_swin_unetr(ModelConfig.cpu_preset(out_channels=14)), ()
    else:
        loaded = load_model(model_name)
        model, head = loaded.model, class_row(loaded, HEAD_ORGAN) or ()
    if attention == "monai":  # back to MONAI's own class, whose reference path runs (use_flash_attention is off)
        for module in model.modules():
            if isinstance(module, FusedWindowAttention):
                module.__class__ = WindowAttention
    replace_with_binary_head(model, *head)
    return model.to(device)


def marked(name: str, attention: str) -> str:
    return name + (MONAI_MARK if attention == "monai" else "")


def frozen_weights_to_bf16(network: nn.Module) -> int:
    """Store the weights of every fully frozen Linear/Conv (the adapters' base layers and the untargeted ones) in
    bf16, so that bf16 autocast finds them already lowered; trainable parameters, norms and biases of trainable
    layers stay float32. Returns how many modules changed."""
    changed = 0
    for module in network.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, LOW_PRECISION_CONVS) and params and not any(p.requires_grad for p in params):
            module.to(torch.bfloat16)
            changed += 1
    return changed


def apply_levers(adapted, levers: frozenset[str], compile_mode: str) -> None:
    """Turn the levers on for one adapted model, in place (before its optimizer is built)."""
    if "bf16-weights" in levers:
        frozen_weights_to_bf16(adapted.network)
    if "channels-last" in levers:
        adapted.network.to(memory_format=torch.channels_last_3d)
    if "compile" in levers:  # in place: parameter names, PEFT's wrapper and the adapters' hooks stay as they are
        adapted.network.compile(mode=None if compile_mode == "default" else compile_mode)


class Trainer:
    """One adapted model with the loop's optimizer, schedule, loss and loss scaler for ``precision``."""

    def __init__(
        self,
        method: str,
        rank: int,
        precision: str,
        device: torch.device,
        attention: str,
        lever: str = "",
        model_name: str | None = None,
        compile_mode: str = "default",
    ) -> None:
        schedule = 10**6  # steps: a timing never reaches the schedule's end (or ARENA's settled tail)
        options = AdaptOptions(rank=rank, total_steps=schedule)
        self.adapted = adapt_model(base_model(device, attention, model_name), method, options)
        self.adapted.model.train()
        self.levers = frozenset(lever.split("+")) - {""}
        self.channels_last = "channels-last" in self.levers
        apply_levers(self.adapted, self.levers, compile_mode)
        self.settings = TrainSettings(precision=precision)
        s = self.settings
        self.optimizer = self.adapted.make_optimizer(s.lr, s.weight_decay, s.head_lr_scale)
        self.scheduler = warmup_cosine(self.optimizer, schedule, s.warmup_steps)
        self.scaler = grad_scaler(precision, device)
        self.loss_fn = loss_function(s.cross_entropy)
        self.steps = itertools.count()
        self.name = marked("fft" if method == "fft" else f"{method} r={rank}", attention)
        self.name += f" [{lever}]" if lever else ""

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What the loop does per step after drawing the batch; returns the loss."""
        step = next(self.steps)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        loss = training_step(
            self.adapted, self.optimizer, self.scaler, images, labels, self.loss_fn, self.settings, step
        )
        self.scheduler.step()
        return loss


def training_case(
    method: str, rank: int, precision: str, batch, device: torch.device, attention: str, **options
) -> Case:
    trainer = Trainer(method, rank, precision, device, attention, **options)
    case = Case(trainer.name, lambda: trainer.step(*batch), trainer.adapted.trainable_params, precision)
    case.lever = options.get("lever", "")
    return case


def lever_precision(lever: str, precisions: list[str]) -> str:
    return "bf16" if "bf16-weights" in lever.split("+") else precisions[0]


def synthetic_volumes(count: int = 3) -> list[dict]:
    """In-memory volumes of an abdomen CT's size with one organ-sized foreground blob each, as the sampler gets them
    from the preprocessing cache (MetaTensors)."""
    gen = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in VOLUME), indexing="ij"))
    volumes = []
    for i in range(count):
        centre = torch.tensor([n // 2 + 10 * (i - 1) for n in VOLUME]).view(3, 1, 1, 1)
        label = ((grid - centre).float().norm(dim=0) < 12).float()[None]
        volumes.append({"image": MetaTensor(torch.rand(1, *VOLUME, generator=gen)), "label": MetaTensor(label)})
    return volumes


def p7_cases(precision: str, sampler: PatchSampler, device: torch.device, attention: str) -> list[Case]:
    """The loop's timed span and a bare forward + backward, on one shared ARENA model."""
    trainer = Trainer(*P7_METHOD, precision, device, attention)
    model, loss_fn = trainer.adapted.model, trainer.loss_fn
    steps = itertools.count()

    def loop_span() -> None:
        images, labels = sampler.batch(next(steps))
        trainer.step(images.to(device), labels.to(device))

    images, labels = (t.to(device) for t in sampler.batch(0))

    def bare() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = loss_fn(model(images), labels)
        loss.backward()

    params = trainer.adapted.trainable_params
    return [
        Case(f"P7 {trainer.name}: loop step (sampler + training_step)", loop_span, params, precision),
        Case(f"P7 {trainer.name}: bare forward + backward", bare, params, precision),
    ]


def inference_cases(rank: int, image: torch.Tensor, device: torch.device, attention: str) -> list[Case]:
    """The base, ARENA with every gate open, and the same ARENA merged into plain layers."""
    base = base_model(device, attention).eval()
    arena = adapt_model(base_model(device, attention), "arena", AdaptOptions(rank=rank)).network.eval()
    with torch.no_grad():
        for layer in arena_layers(arena).values():
            layer.arena_v.normal_(std=0.1)
    merged = merge_arena(copy.deepcopy(arena))

    def infer(model: nn.Module) -> Callable[[], object]:
        return lambda: model(image)

    return [
        Case(marked("base", attention), infer(base), 0),
        Case(marked(f"arena r={rank} (unmerged)", attention), infer(arena), 0),
        Case(marked(f"arena r={rank} merged", attention), infer(merged), 0),
    ]


def count_flops(cases: list[Case], grad: bool) -> None:
    """One untimed run of each case under FlopCounterMode. Torch counts no FLOPs for its fused CPU attention
    kernels, so attention runs through SDPA's composite (matmul) path here, as MONAI's reference path does."""
    for case in cases:
        if case.reference is not None:
            continue
        counter = FlopCounterMode(display=False)
        with torch.set_grad_enabled(grad), sdpa_kernel(SDPBackend.MATH), counter:
            record_loss(case, case.run())
        case.flops = counter.get_total_flops()
    for case in cases:
        if case.reference is not None:
            prime(case, grad)
            case.flops = case.reference.flops


def prime(case: Case, grad: bool) -> None:
    """A lever case's first call, untimed in the results (with torch.compile it compiles): the step every other case
    spends counting FLOPs, with the same attention kernel (SDPA's composite path) so that the losses stay comparable
    step by step; compiled cases use the default kernel (a kernel context while compiling would be compiled in and
    trigger a recompile). A failure (inductor without a compiler, an unsupported memory format) is recorded as the
    case's error line and the case is dropped from the timing."""
    compiled = "compile" in case.lever.split("+")
    t0 = time.perf_counter()
    try:
        with torch.set_grad_enabled(grad), contextlib.nullcontext() if compiled else sdpa_kernel(SDPBackend.MATH):
            record_loss(case, case.run())
    except Exception as err:  # report whatever the lever raised, keep timing the others
        lines = [line for line in str(err).splitlines() if line.strip()]
        case.error = f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]
        print(f"{case.name}: failed: {case.error}", file=sys.stderr)
        return
    case.first_s = time.perf_counter() - t0
    print(f"  first call {case.name} {case.precision}: {case.first_s:.1f} s", file=sys.stderr)


def record_loss(case: Case, out: object) -> None:
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        case.losses.append(out.item())


def peak_gflops(device: torch.device, repeats: int = 3) -> float:
    """This machine's fp32 matmul throughput at the current thread count: the best of a few large products."""
    a, b = (torch.randn(PEAK_MATMUL, PEAK_MATMUL, device=device) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * PEAK_MATMUL**3 / best / 1e9


def run_interleaved(cases: list[Case], warmup: int, repeats: int, memory: PeakMemory, grad: bool) -> None:
    cases = [case for case in cases if not case.error]
    for round_ in range(warmup + repeats):
        shift = round_ % len(cases)
        for case in cases[shift:] + cases[:shift]:
            before = memory.reset()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(grad):
                out = case.run()
            if memory.device.type == "cuda":
                torch.cuda.synchronize(memory.device)
            seconds = time.perf_counter() - t0
            peak = memory.peak()
            record_loss(case, out)
            if round_ >= warmup:
                case.seconds.append(seconds)
                case.peak_mib.append(peak)
                case.step_mib.append(peak - before)
            print(
                f"  round {round_ + 1}/{warmup + repeats} {case.name} {case.precision}: {seconds:.3f} s",
                file=sys.stderr,
            )


def table(cases: list[Case], with_params: bool, peak: float) -> str:
    head = "| case | precision | " + ("trainable params | " if with_params else "")
    head += "median s | min s | peak MiB | step MiB | GFLOP | GFLOP/s | of peak |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in (c for c in cases if not c.error):
        params = f"{c.params:,} | " if with_params else ""
        rate = c.flops / c.median / 1e9
        lines.append(
            f"| {c.name} | {c.precision} | {params}{c.median:.3f} | {min(c.seconds):.3f} | "
            f"{max(c.peak_mib):.0f} | {max(c.step_mib):.0f} | {c.flops / 1e9:.1f} | {rate:.2f} | {rate / peak:.1%} |"
        )
    return "\n".join(lines)


def ratios(train: list[Case], p7: list[Case]) -> list[str]:
    """The issue's ratios of medians: each lowered precision over fp32, ARENA over LoRA (P5), loop over bare (P7)."""
    median = {(c.name, c.precision): c.median for c in train if not c.error}
    lines = ["| ratio | value | target |", "|---|---|---|"]
    for (name, precision), value in median.items():
        if precision != "fp32" and (name, "fp32") in median:
            lines.append(f"| {name}: {precision} / fp32 | {value / median[(name, 'fp32')]:.3f} | <= 0.7 (r=16) |")
    for (name, precision), value in median.items():
        lora = ("lora" + name.removeprefix("arena"), precision)
        if name.startswith("arena") and lora in median:
            lines.append(f"| P5 {name} / LoRA, {precision} | {value / median[lora]:.3f} | <= 1.05 |")
    for (name, precision), value in median.items():
        monai = (name + MONAI_MARK, precision)
        if monai in median:
            lines.append(f"| {name}, {precision}: fused / MONAI attention | {value / median[monai]:.3f} | < 1 |")
    for loop, bare in zip(p7[::2], p7[1::2], strict=True):
        lines.append(f"| P7 loop step / bare fwd+bwd, {loop.precision} | {loop.median / bare.median:.3f} | <= 1.10 |")
    return lines


def lever_table(train: list[Case]) -> list[str]:
    """Each lever case against its plain case (the first --precisions entry) and, for bf16-weights, against bf16
    autocast alone: ratio of medians, the first call (compile time), and the largest loss difference over the
    steps both made (same weights, same batch, same step sequence)."""
    plain = {(c.name, c.precision): c for c in train if not c.lever and not c.error}
    lines = [
        "| case | precision | median s | / baseline | / bf16 autocast | first call s | "
        "max abs loss diff vs baseline | vs bf16 autocast | steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in (c for c in train if c.lever):
        ref = c.reference
        if c.error:
            lines.append(f"| {c.name} | {c.precision} | failed: {c.error} | | | | | | |")
            continue
        autocast_alone = plain.get((ref.name, "bf16")) if c.precision == "bf16" else None
        cells = [
            f"{c.median:.3f}",
            f"{c.median / ref.median:.3f}",
            f"{c.median / autocast_alone.median:.3f}" if autocast_alone else "",
            f"{c.first_s:.1f}",
            loss_diff(c, ref),
            loss_diff(c, autocast_alone) if autocast_alone else "",
            str(len(c.losses)),
        ]
        lines.append(f"| {c.name} | {c.precision} | " + " | ".join(cells) + " |")
    return lines


def loss_diff(case: Case, other: Case) -> str:
    pairs = list(zip(case.losses, other.losses, strict=False))
    return f"{max(abs(a - b) for a, b in pairs):.2e}" if pairs else ""


def other_gpu_processes() -> str:
    """Other processes' use of the GPUs, from nvidia-smi (the GPU mode is meant to run alone)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        return f"unknown (nvidia-smi: {err})"
    mine = str(os.getpid())
    others = [line.strip() for line in out.splitlines() if line.strip() and line.split(",")[0].strip() != mine]
    return "; ".join(others) if others else "none"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: rank 4 only, 1 repeat, no warm-up")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64], help="(default: %(default)s)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=PRECISIONS)
    parser.add_argument(
        "--lowered-ranks", type=int, nargs="+", default=None, help="ranks timed in bf16/fp16 (default: --ranks)"
    )
    parser.add_argument(
        "--batch", type=int, default=TrainSettings.patches_per_step, help="patches per step (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fft", action="store_true", help="add full fine-tuning at each precision")
    parser.add_argument("--inference", action="store_true", help="add base / unmerged / merged ARENA inference")
    parser.add_argument(
        "--attention",
        choices=(*ATTENTION, "both"),
        default="fused",
        help="window attention: ours (fused), MONAI's reference path, or both side by side (default: %(default)s)",
    )
    parser.add_argument(
        "--levers",
        type=lambda text: [lever for lever in text.split(",") if lever],
        default=[],
        help=f"speed levers timed beside the plain cases, comma-separated, a+b combined: {', '.join(LEVERS)} "
        "(default: none)",
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (default: %(default)s)")
    parser.add_argument(
        "--model", default=None, help="built-in name or file to adapt (default: the CPU preset, random weights)"
    )
    parser.add_argument(
        "--patch", type=int, default=PATCH, help="patch edge, a multiple of 32 >= 64 (default: %(default)s)"
    )
    parser.add_argument("--no-p7", action="store_true", help="skip P7 (the loop's span vs a bare forward + backward)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    unknown = {part for lever in args.levers for part in lever.split("+")} - set(LEVERS)
    if unknown:
        parser.error(f"unknown lever(s) {', '.join(sorted(unknown))}; choose from {', '.join(LEVERS)}")
    if args.patch < 64 or args.patch % 32:  # 32 leaves the bottleneck 1 voxel, which instance norm refuses
        parser.error("--patch must be a multiple of 32, at least 64")
    if args.quick:
        args.ranks, args.repeats, args.warmup = [4], 1, 0
    lowered_ranks = args.ranks if args.lowered_ranks is None or args.quick else args.lowered_ranks
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or any(r < 1 for r in args.ranks + lowered_ranks):
        parser.error("--repeats >= 1, --warmup >= 0, --batch >= 1 and ranks >= 1 needed")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    memory = PeakMemory(device)
    attentions = ATTENTION if args.attention == "both" else (args.attention,)

    gen = torch.Generator().manual_seed(0)
    patch = (args.batch, 1, args.patch, args.patch, args.patch)
    images = torch.randn(*patch, generator=gen).to(device)
    labels = (torch.rand(*patch, generator=gen) > 0.8).float().to(device)
    model_args = {"model_name": args.model, "compile_mode": args.compile_mode}
    train = [
        training_case(method, rank, precision, (images, labels), device, attention, **model_args)
        for attention in attentions
        for precision in args.precisions
        for rank in (args.ranks if precision == "fp32" else lowered_ranks)
        for method in ("arena", "lora")
    ]
    levered = []
    for lever in args.levers:
        precision = lever_precision(lever, args.precisions)
        for rank in args.ranks:
            for method in ("arena", "lora"):
                case = training_case(
                    method, rank, precision, (images, labels), device, attentions[0], lever=lever, **model_args
                )
                plain = [c for c in train if c.name == marked(f"{method} r={rank}", attentions[0])]
                case.reference = next((c for c in plain if c.precision == args.precisions[0]), None)
                if case.reference is None:
                    parser.error(f"lever {lever}: no plain {method} r={rank} case at {args.precisions[0]}")
                levered.append(case)
    train += levered
    if args.fft and not gpu:
        train += [
            training_case("fft", 1, precision, (images, labels), device, attention, **model_args)
            for attention in attentions
            for precision in args.precisions
        ]
    p7: list[Case] = []
    if not gpu and not args.no_p7:
        preprocess = PreprocessSettings(patch_size=(args.patch,) * 3)
        sampler = PatchSampler(synthetic_volumes(), preprocess, args.batch, seed=0)
        p7 = p7_cases(args.precisions[0], sampler, device, attentions[0])
    for case in train:
        print(f"{case.name} {case.precision}: {case.params:,} trainable parameters", file=sys.stderr)

    peak = peak_gflops(device)
    count_flops(train + p7, grad=True)
    run_interleaved(train + p7, args.warmup, args.repeats, memory, grad=True)
    infer = []
    if args.inference and not gpu:
        infer = [
            case for attention in attentions for case in inference_cases(args.ranks[-1], images[:1], device, attention)
        ]
        count_flops(infer, grad=False)
        run_interleaved(infer, args.warmup, args.repeats, memory, grad=False)

    command = "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = [
        "# Training-step time: ARENA vs PEFT LoRA per precision, and the training path's overhead (P7)",
        "",
        *(["**Quick smoke run (--quick): not for reporting.**", ""] if args.quick else []),
        f"- command: `{command.strip()}`",
        f"- git commit: {git_commit()}",
        f"- device: {device_name(device)}",
        *([f"- other processes on the GPU: {other_gpu_processes()}"] if gpu else []),
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}; model: "
        + (f"{args.model}, {HEAD_ORGAN}" if args.model else "Swin-UNETR cpu_preset (feature size 12, random weights),")
        + " binary head",
        f"- {args.repeats} timed rounds after {args.warmup} warm-up, all cases interleaved; medians",
        f"- window attention: {', '.join(attentions)} (fused: arenaseg.models.attention; monai: MONAI's own path)",
        f"- peak: {peak:.1f} GFLOP/s, the best fp32 {PEAK_MATMUL}^2 matmul at {torch.get_num_threads()} thread(s); "
        "GFLOP per step counted by FlopCounterMode (matmuls and convolutions)",
        "- memory: "
        + ("CUDA allocator peak" if gpu else "peak RSS (VmHWM reset per step)")
        + "; 'step MiB' = peak minus usage before the step (see the script's docstring)",
        "",
        f"## Training step (batch {args.batch} x {args.patch}^3: training_step + scheduler step)",
        "",
        table(train, with_params=True, peak=peak),
        "",
    ]
    if p7:
        report += [
            f"## P7: the loop's timed span vs a bare forward + backward ({P7_METHOD[0]} r={P7_METHOD[1]})",
            "",
            f"The loop step draws its {args.batch} patches from in-memory {'x'.join(map(str, VOLUME))} volumes.",
            "",
            table(p7, with_params=False, peak=peak),
            "",
        ]
    report += ["## Ratios of medians", "", *ratios(train, p7), ""]
    if levered:
        report += [
            f"## Levers ({', '.join(args.levers)}; compile mode {args.compile_mode})",
            "",
            "Lever cases against their plain case (same method and rank, first --precisions entry). 'first call': "
            "the untimed first step (compile cases: compiling the forward and the backward). Loss differences: the "
            "largest over the steps both cases made from the same weights on the same batch.",
            "",
            *lever_table(train),
            "",
        ]
    if infer:
        report += [
            f"## Inference (one {args.patch}^3 patch, no grad, fp32)",
            "",
            table(infer, with_params=False, peak=peak),
            "",
        ]
    text = "\n".join(report)
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
