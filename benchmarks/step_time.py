"""Training-step time and memory of ARENA vs PEFT LoRA (ranks 4, 16, 64) vs full fine-tuning, and the inference time
of a merged ARENA model vs its base, on the CPU-preset Swin-UNETR (feature size 12, binary head). Not a test.

    .venv/bin/python benchmarks/step_time.py            # ranks 4 16 64, 7 timed repeats after 1 warm-up
    .venv/bin/python benchmarks/step_time.py --quick    # smoke run: rank 4, 2 repeats

A training step is forward + backward + optimizer step (+ the method's after-step hook) on a batch of 2 patches of
64^3; inference is one 64^3 patch without gradients. All models are built first and the cases are timed
interleaved, round after round (the starting case rotates each round), so that drifts in machine load hit every
case alike; the table reports medians.

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
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from torch import nn

from arenaseg.adapters import AdaptOptions, adapt_model, arena_layers, merge_arena
from arenaseg.models.swin_unetr import ModelConfig, build_swin_unetr, replace_with_binary_head
from arenaseg.train.pretrain import device_name, git_commit
from arenaseg.utils.atomic import write_text

RESULTS = Path(__file__).parent / "results" / "step_time.md"
PATCH = 64
BATCH = 2


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
    seconds: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    step_mib: list[float] = field(default_factory=list)


def base_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = build_swin_unetr(ModelConfig.cpu_preset(out_channels=14))
    replace_with_binary_head(model)
    return model.to(device)


def training_case(method: str, rank: int, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> Case:
    adapted = adapt_model(base_model(device), method, AdaptOptions(rank=rank))
    adapted.model.train()
    optimizer = adapted.make_optimizer()
    loss_fn = DiceCELoss(sigmoid=True)

    def step() -> None:
        loss = adapted.training_loss(*batch, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        adapted.after_optimizer_step(0)

    name = "fft" if method == "fft" else f"{method} r={rank}"
    return Case(name, step, adapted.trainable_params)


def inference_cases(rank: int, image: torch.Tensor, device: torch.device) -> list[Case]:
    """The base, ARENA with every gate open, and the same ARENA merged into plain layers."""
    base = base_model(device).eval()
    arena = adapt_model(base_model(device), "arena", AdaptOptions(rank=rank)).network.eval()
    with torch.no_grad():
        for layer in arena_layers(arena).values():
            layer.arena_v.normal_(std=0.1)
    merged = merge_arena(copy.deepcopy(arena))

    def infer(model: nn.Module) -> Callable[[], object]:
        return lambda: model(image)

    return [
        Case("base", infer(base), 0),
        Case(f"arena r={rank} (unmerged)", infer(arena), 0),
        Case(f"arena r={rank} merged", infer(merged), 0),
    ]


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
            print(f"  round {round_ + 1}/{warmup + repeats} {case.name}: {seconds:.3f} s", file=sys.stderr)


def table(cases: list[Case], with_params: bool) -> str:
    head = "| case | " + ("trainable params | " if with_params else "") + "median s | min s | peak MiB | step MiB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cases:
        params = f"{c.params:,} | " if with_params else ""
        lines.append(
            f"| {c.name} | {params}{statistics.median(c.seconds):.3f} | {min(c.seconds):.3f} | "
            f"{max(c.peak_mib):.0f} | {max(c.step_mib):.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: rank 4 only, 2 repeats")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.repeats = [4], 2
    if args.repeats < 1 or args.warmup < 0 or any(r < 1 for r in args.ranks):
        parser.error("--repeats >= 1, --warmup >= 0 and ranks >= 1 needed")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory = PeakMemory(device)

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 1, PATCH, PATCH, PATCH, generator=gen).to(device)
    labels = (torch.rand(BATCH, 1, PATCH, PATCH, PATCH, generator=gen) > 0.8).float().to(device)
    train = [training_case(m, r, (images, labels), device) for r in args.ranks for m in ("arena", "lora")]
    train.append(training_case("fft", args.ranks[0], (images, labels), device))
    infer = inference_cases(args.ranks[-1], images[:1], device)
    for case in train:
        print(f"{case.name}: {case.params:,} trainable parameters", file=sys.stderr)

    run_interleaved(train, args.warmup, args.repeats, memory, grad=True)
    run_interleaved(infer, args.warmup, args.repeats, memory, grad=False)

    command = "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join(
        [
            "# Training-step and inference time: ARENA vs PEFT LoRA vs full fine-tuning",
            "",
            *(["**Quick smoke run (--quick): not for reporting.**", ""] if args.quick else []),
            f"- command: `{command.strip()}`",
            f"- git commit: {git_commit()}",
            f"- device: {device_name(device)}",
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- torch {torch.__version__}; model: Swin-UNETR cpu_preset (feature size 12), binary head",
            f"- {args.repeats} timed rounds after {args.warmup} warm-up, cases interleaved; medians",
            "- memory: "
            + ("CUDA allocator peak" if device.type == "cuda" else "peak RSS (VmHWM reset per step)")
            + "; 'step MiB' = peak minus usage before the step (see the script's docstring)",
            "",
            f"## Training step (batch {BATCH} x {PATCH}^3: forward + backward + optimizer step)",
            "",
            table(train, with_params=True),
            "",
            f"## Inference (one {PATCH}^3 patch, no grad)",
            "",
            table(infer, with_params=False),
            "",
        ]
    )
    print(report)
    write_text(args.out, report)


if __name__ == "__main__":
    main()
