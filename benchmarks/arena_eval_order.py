"""ARENA's two evaluation orders (issue 32): the factored adapter, the merged weight, and the automatic rule
(``ArenaLayer.merged_is_cheaper``), timed as a forward + loss + backward of the whole adapted btcv-fs network. Not a
test.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/arena_eval_order.py --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/arena_eval_order.py --quick   # smoke run

The built-in btcv-fs model gets a new binary head and ARENA on the Swin linears and the decoder convolutions
(``decoder='lowrank'``), one model per rank with random gates. Each model runs in three orders: every layer
factored, every layer merged, and each layer as the rule picks for its shapes; all cases are timed interleaved,
round after round (the starting case rotates), so that drifts in machine load hit every case alike. Then each
distinct adapted layer shape is timed alone in both orders, to show where the rule's pick is right.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from arenaseg.adapters import AdaptOptions, adapt_model, arena_layers
from arenaseg.models.registry import load_model
from arenaseg.models.swin_unetr import replace_with_binary_head
from arenaseg.train.loop import loss_function
from arenaseg.utils.atomic import write_text
from arenaseg.utils.provenance import device_name, git_commit

RESULTS = Path(__file__).parent / "results" / "arena_eval_order.md"
PATCH = 64
ORDERS = ("factored", "merged", "auto")


def adapted_network(rank: int) -> nn.Module:
    torch.manual_seed(0)
    model = load_model("btcv-fs").model
    replace_with_binary_head(model, None, None)  # the novel track's head
    network = adapt_model(model, "arena", AdaptOptions(rank=rank, decoder="lowrank")).network.train()
    with torch.no_grad():
        for layer in arena_layers(network).values():
            layer.arena_v.normal_(std=0.1)
    return network


def set_order(module: nn.Module, order: str) -> None:
    """Force the order of every ARENA layer in ``module`` (itself included), or restore the rule: an instance
    attribute shadows the method."""
    for layer in arena_layers(module).values():
        if order == "auto":
            layer.__dict__.pop("merged_is_cheaper", None)
        else:
            layer.merged_is_cheaper = lambda x, merged=order == "merged": merged


def record_calls(network: nn.Module) -> tuple[dict, list]:
    """Hooks that note each layer's input and the rule's pick on the next forward; returns (notes, handles)."""
    notes: dict[str, tuple] = {}

    def hook(name: str):
        def note(layer, args) -> None:
            x, kind = args[0], type(layer.base_layer).__name__
            n, m = layer.arena_A.shape[1:].numel(), layer.arena_B.shape[0]
            notes[name] = (kind, n, m, layer._positions(x), tuple(x.shape), x.requires_grad, layer.merged_is_cheaper(x))

        return note

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in arena_layers(network).items()]
    return notes, handles


def time_layer(layer: nn.Module, shape: tuple, input_grad: bool, order: str, repeats: int) -> float:
    """Best of ``repeats`` forward + backward seconds of one layer on a random input (after one untimed call)."""
    x = torch.randn(shape, requires_grad=input_grad)
    set_order(layer, order)
    times = []
    for _ in range(repeats + 1):
        layer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        layer(x).sum().backward()
        times.append(time.perf_counter() - t0)
    set_order(layer, "auto")
    return min(times[1:])


def layer_rows(network: nn.Module, calls: dict, rank: int, repeats: int) -> tuple[list[str], dict[str, float]]:
    """One table row per distinct layer shape, and the layers' summed seconds per order (and for the best pick)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, call in calls.items():
        groups[call].append(name)
    rows, totals = [], defaultdict(float)
    for (kind, n, m, positions, shape, input_grad, pick), names in sorted(groups.items()):
        layer = arena_layers(network)[names[0]]
        ms = {order: 1e3 * time_layer(layer, shape, input_grad, order, repeats) for order in ("factored", "merged")}
        ms["auto"], ms["best"] = ms["merged" if pick else "factored"], min(ms.values())
        for order, value in ms.items():
            totals[order] += len(names) * value / 1e3
        rows.append(
            f"| {rank} | {kind} | {n} | {m} | {positions} | {'yes' if input_grad else 'no'} | {len(names)} | "
            f"{ms['factored']:.1f} | {ms['merged']:.1f} | "
            f"{'merged' if pick else 'factored'} | {ms['auto'] / ms['best']:.2f} |"
        )
    return rows, totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64], help="(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="patches of 64^3 (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--layer-repeats", type=int, default=2, help="timed calls per layer (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: rank 4, batch 1, 1 round, no warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.batch, args.repeats, args.warmup = [4], 1, 1, 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), os.getloadavg()[0]

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 1, PATCH, PATCH, PATCH, generator=gen)
    labels = (torch.rand(args.batch, 1, PATCH, PATCH, PATCH, generator=gen) > 0.8).float()
    loss_fn = loss_function(cross_entropy=True)
    networks = {rank: adapted_network(rank) for rank in args.ranks}
    cases = [(rank, order) for rank in args.ranks for order in ORDERS]
    seconds: dict[tuple[int, str], list[float]] = defaultdict(list)
    calls: dict[int, dict] = {}

    for round_ in range(args.warmup + args.repeats):
        shift = round_ % len(cases)
        for rank, order in cases[shift:] + cases[:shift]:
            network = networks[rank]
            set_order(network, order)
            handles = []
            if order == "auto" and rank not in calls:
                calls[rank], handles = record_calls(network)
            network.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss_fn(network(images), labels).backward()
            elapsed = time.perf_counter() - t0
            for handle in handles:
                handle.remove()
            if round_ >= args.warmup:
                seconds[rank, order].append(elapsed)
            print(f"  round {round_ + 1} r={rank} {order}: {elapsed:.2f} s", file=sys.stderr)

    layer_lines = [
        "| rank | layer | in x kernel (n) | out (m) | positions | input grad | layers | factored ms | merged ms | "
        "rule's pick | pick / best |",
        "|" + "---|" * 11,
    ]
    layer_totals = {}
    for rank in args.ranks:
        rows, layer_totals[rank] = layer_rows(networks[rank], calls[rank], rank, args.layer_repeats)
        layer_lines += rows
        print(f"  layers at r={rank} timed", file=sys.stderr)

    lines = [
        "| rank | factored s | merged s | auto s | auto / factored | layers merged by the rule | "
        "layers alone: factored / merged / auto / best pick s |",
        "|---|---|---|---|---|---|---|",
    ]
    for rank in args.ranks:
        median = {order: statistics.median(seconds[rank, order]) for order in ORDERS}
        merged_layers = sum(pick for *_, pick in calls[rank].values())
        alone = " / ".join(f"{layer_totals[rank][order]:.2f}" for order in ("factored", "merged", "auto", "best"))
        lines.append(
            f"| {rank} | {median['factored']:.2f} | {median['merged']:.2f} | {median['auto']:.2f} | "
            f"{median['auto'] / median['factored']:.2f} | {merged_layers} of {len(calls[rank])} | {alone} |"
        )

    command = "OMP_NUM_THREADS=1 python benchmarks/arena_eval_order.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report = [
        "# ARENA evaluation order: factored adapter vs merged weight vs the rule (issue 32)",
        "",
        *(["**Quick smoke run (--quick): not for reporting.**", ""] if args.quick else []),
        f"- command: `{command.strip()}`",
        f"- git commit: {git_commit()}",
        f"- device: {device_name(torch.device('cpu'))}",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}; model: btcv-fs (feature size 12), binary head, ARENA with decoder='lowrank'",
        f"- forward + DiceCE loss + backward of batch {args.batch} x 1 x {PATCH}^3, fp32; {args.repeats} timed rounds "
        f"after {args.warmup} warm-up, all cases interleaved; medians",
        f"- whole script: {time.perf_counter() - start:.0f} s; 1-minute load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores, shared with other jobs)",
        "",
        "## Whole network",
        "",
        *lines,
        "",
        "## Each adapted layer shape alone",
        "",
        "Forward + backward (of the output's sum) of one layer of each shape, on a random input of the shape it gets "
        "in the network, with a gradient where it has one there ('input grad'); best of "
        f"{args.layer_repeats} after one untimed call. 'pick / best': the rule's pick's time over the faster order's. "
        "The whole network's table sums these times over its layers ('layers alone').",
        "",
        *layer_lines,
        "",
    ]
    text = "\n".join(report)
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
