"""Training-step time of ARENA vs PEFT LoRA (ranks 4, 16, 64) per precision, and P7: what the training path adds to a
bare forward + backward, on the CPU-preset Swin-UNETR (feature size 12, binary head). Not a test.

    .venv/bin/python benchmarks/step_time.py --threads 1 --precisions fp32 bf16        # CPU
    .venv/bin/python benchmarks/step_time.py --threads 1 --batch 1 --lowered-ranks 16  # CPU, shorter
    .venv/bin/python benchmarks/step_time.py --device cuda --precisions fp32 bf16       # GPU: ARENA and LoRA only
    .venv/bin/python benchmarks/step_time.py --quick                                    # smoke run
    .venv/bin/python benchmarks/step_time.py --threads 1 --ranks 16 --attention both    # fused vs MONAI attention

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
    seconds: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    step_mib: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def base_model(device: torch.device, attention: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_swin_unetr(ModelConfig.cpu_preset(out_channels=14))
    if attention == "monai":  # back to MONAI's own class, whose reference path runs (use_flash_attention is off)
        for module in model.modules():
            if isinstance(module, FusedWindowAttention):
                module.__class__ = WindowAttention
    replace_with_binary_head(model)
    return model.to(device)


def marked(name: str, attention: str) -> str:
    return name + (MONAI_MARK if attention == "monai" else "")


class Trainer:
    """One adapted model with the loop's optimizer, schedule, loss and loss scaler for ``precision``."""

    def __init__(self, method: str, rank: int, precision: str, device: torch.device, attention: str) -> None:
        self.adapted = adapt_model(base_model(device, attention), method, AdaptOptions(rank=rank))
        self.adapted.model.train()
        self.settings = TrainSettings(precision=precision)
        s = self.settings
        self.optimizer = self.adapted.make_optimizer(s.lr, s.weight_decay, s.head_lr_scale)
        self.scheduler = warmup_cosine(self.optimizer, 10**6, s.warmup_steps)
        self.scaler = grad_scaler(precision, device)
        self.loss_fn = loss_function(s.cross_entropy)
        self.steps = itertools.count()
        self.name = marked("fft" if method == "fft" else f"{method} r={rank}", attention)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """What the loop does per step after drawing the batch."""
        step = next(self.steps)
        training_step(self.adapted, self.optimizer, self.scaler, images, labels, self.loss_fn, self.settings, step)
        self.scheduler.step()


def training_case(method: str, rank: int, precision: str, batch, device: torch.device, attention: str) -> Case:
    trainer = Trainer(method, rank, precision, device, attention)
    return Case(trainer.name, lambda: trainer.step(*batch), trainer.adapted.trainable_params, precision)


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
        counter = FlopCounterMode(display=False)
        with torch.set_grad_enabled(grad), sdpa_kernel(SDPBackend.MATH), counter:
            case.run()
        case.flops = counter.get_total_flops()


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
    for round_ in range(warmup + repeats):
        shift = round_ % len(cases)
        for case in cases[shift:] + cases[:shift]:
            before = memory.reset()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(grad):
                case.run()
            if memory.device.type == "cuda":
                torch.cuda.synchronize(memory.device)
            seconds = time.perf_counter() - t0
            peak = memory.peak()
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
    for c in cases:
        params = f"{c.params:,} | " if with_params else ""
        rate = c.flops / c.median / 1e9
        lines.append(
            f"| {c.name} | {c.precision} | {params}{c.median:.3f} | {min(c.seconds):.3f} | "
            f"{max(c.peak_mib):.0f} | {max(c.step_mib):.0f} | {c.flops / 1e9:.1f} | {rate:.2f} | {rate / peak:.1%} |"
        )
    return "\n".join(lines)


def ratios(train: list[Case], p7: list[Case]) -> list[str]:
    """The issue's ratios of medians: each lowered precision over fp32, ARENA over LoRA (P5), loop over bare (P7)."""
    median = {(c.name, c.precision): c.median for c in train}
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
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
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
    images = torch.randn(args.batch, 1, PATCH, PATCH, PATCH, generator=gen).to(device)
    labels = (torch.rand(args.batch, 1, PATCH, PATCH, PATCH, generator=gen) > 0.8).float().to(device)
    train = [
        training_case(method, rank, precision, (images, labels), device, attention)
        for attention in attentions
        for precision in args.precisions
        for rank in (args.ranks if precision == "fp32" else lowered_ranks)
        for method in ("arena", "lora")
    ]
    if args.fft and not gpu:
        train += [
            training_case("fft", 1, precision, (images, labels), device, attention)
            for attention in attentions
            for precision in args.precisions
        ]
    p7: list[Case] = []
    if not gpu:
        sampler = PatchSampler(synthetic_volumes(), PreprocessSettings(), args.batch, seed=0)
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
        f"- torch {torch.__version__}; model: Swin-UNETR cpu_preset (feature size 12), binary head",
        f"- {args.repeats} timed rounds after {args.warmup} warm-up, all cases interleaved; medians",
        f"- window attention: {', '.join(attentions)} (fused: arenaseg.models.attention; monai: MONAI's own path)",
        f"- peak: {peak:.1f} GFLOP/s, the best fp32 {PEAK_MATMUL}^2 matmul at {torch.get_num_threads()} thread(s); "
        "GFLOP per step counted by FlopCounterMode (matmuls and convolutions)",
        "- memory: "
        + ("CUDA allocator peak" if gpu else "peak RSS (VmHWM reset per step)")
        + "; 'step MiB' = peak minus usage before the step (see the script's docstring)",
        "",
        f"## Training step (batch {args.batch} x {PATCH}^3: training_step + scheduler step)",
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
    if infer:
        report += [
            f"## Inference (one {PATCH}^3 patch, no grad, fp32)",
            "",
            table(infer, with_params=False, peak=peak),
            "",
        ]
    text = "\n".join(report)
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
