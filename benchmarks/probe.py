"""The protocol-v2 probe: adapt on pretrain-split cases, measure on other pretrain-split cases (BENCHMARK.md).

Every global choice of the benchmark (decoder policy, step budget and stopping rule, learning rates, ARENA's lambda
and rho) is made from the output of this script, never from the support pool or the test cases. One run adapts
on the first ``--shots`` BTCV-FS pretrain cases that contain the organ and records:

- the training loss of every step (so that a stopping rule can be replayed on it afterwards: `probe_report.py`);
- Dice on fixed held-in patches of 3 other pretrain cases every ``--every`` steps;
- Dice on the 3 held-in whole volumes (sliding window, original grid) at the start and at the end;
- for ARENA the total active rank at every probe point.

The JSON is rewritten after every probe point, so a killed run leaves what it measured. Not a test.
Usage: python benchmarks/probe.py --organ right_kidney --method lora-r64 --steps 300 --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from arenaseg.adapters import AdaptOptions
from arenaseg.adapters.arena import active_ranks
from arenaseg.adapters.io import ADAPTER_WEIGHTS, save_adapter
from arenaseg.bench.grid import parse_method
from arenaseg.data.datasets import open_dataset
from arenaseg.data.preprocess import PreprocessSettings, file_digest, load_cases
from arenaseg.data.sampling import PatchSampler
from arenaseg.data.splits import BTCV_FS
from arenaseg.models.registry import model_file
from arenaseg.pipeline import build_adapted, evaluate_cases
from arenaseg.train.loop import TrainSettings, train_adapter
from arenaseg.utils.atomic import write_json
from arenaseg.utils.device import resolve_device
from arenaseg.utils.provenance import device_name, git_commit


def patch_dice(model: torch.nn.Module, sampler: PatchSampler) -> float:
    """Hard Dice (%) pooled over 6 fixed held-in patches (3 batches of 2)."""
    was_training = model.training
    model.eval()
    inter = total = 0.0
    with torch.no_grad():
        for step in range(10_000, 10_003):
            images, labels = sampler.batch(step)
            device = next(model.parameters()).device
            pred, fg = model(images.to(device)).cpu() > 0, labels > 0
            inter += (pred & fg).sum().item()
            total += pred.sum().item() + fg.sum().item()
    model.train(was_training)
    return 200 * inter / max(total, 1.0)


def _plain(value):
    return json.loads(json.dumps(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainSettings()
    parser.add_argument("--data", default="../shared/data/btcv30", help="btcv30 folder (default: %(default)s)")
    parser.add_argument("--model", default="btcv-fs", help="foundation model (default: %(default)s)")
    parser.add_argument("--organ", default="right_kidney", help="(default: %(default)s)")
    parser.add_argument(
        "--method", default="arena-r16", help="grid method name, e.g. lp, fft, lora-r64 (default: %(default)s)"
    )
    parser.add_argument("--shots", type=int, default=5, help="pretrain cases to adapt on (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="step cap; the schedule spans it (default: %(default)s)")
    parser.add_argument("--every", type=int, default=50, help="patch-Dice interval in steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="(default: %(default)s)")
    parser.add_argument("--head-lr-scale", type=float, default=defaults.head_lr_scale, help="(default: %(default)s)")
    parser.add_argument("--lam", type=float, default=None, help="ARENA lambda (default: the library's)")
    parser.add_argument("--rho", type=float, default=None, help="ARENA rho (default: the library's)")
    parser.add_argument(
        "--freeze-tail", type=float, default=None, help="ARENA freeze_tail, a fraction (default: the library's)"
    )
    parser.add_argument("--decoder", default=None, help="decoder policy of low-rank methods (default: frozen)")
    parser.add_argument("--decoder-lr-scale", type=float, default=None, help="decoder lr / lr (default: 1)")
    parser.add_argument("--track", default="auto", help="auto, base or novel head start (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/probe", help="output folder (default: %(default)s)")
    parser.add_argument("--tag", default="", help="suffix of the output file name (default: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    method, rank = parse_method(args.method)

    data, preprocess = open_dataset(args.data), PreprocessSettings()
    organ = data.check_organ(args.organ)
    cases = [c for c in BTCV_FS.pretrain if data.has_organ(c, organ)]
    train_cases, held_in = cases[: args.shots], cases[args.shots : args.shots + 3]
    if len(held_in) < 3:
        raise SystemExit(f"only {len(cases)} pretrain cases contain {organ}: too few for {args.shots} + 3")

    def volumes(ids):
        return load_cases(data, ids, {organ: 1}, preprocess)

    settings = TrainSettings(steps=args.steps, lr=args.lr, head_lr_scale=args.head_lr_scale)
    given = {"rank": rank, "lam": args.lam, "rho": args.rho, "freeze_tail": args.freeze_tail, "decoder": args.decoder}
    given["decoder_lr_scale"] = args.decoder_lr_scale
    options = AdaptOptions(total_steps=settings.steps, **{k: v for k, v in given.items() if v is not None})
    name = f"{organ}-{args.method}" + (f"-lam{options.lam:g}" if method == "arena" else "")
    name += f"-tail{options.freeze_tail:g}" if method == "arena" and options.freeze_tail else ""
    name += f"-dec{options.decoder}" if options.decoder != "frozen" else ""
    name += f"-lr{settings.lr:g}" if settings.lr != defaults.lr else ""
    name += f"-head{settings.head_lr_scale:g}" if settings.head_lr_scale != defaults.head_lr_scale else ""
    name += args.tag
    out = Path(args.out) / f"{name}.json"
    checkpoint = out.with_suffix(".checkpoint.pt")  # beside the JSON, ignored by git: a killed probe resumes
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_suffix(".lock").open("w")  # held while this process lives: two on one run corrupt its checkpoint
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"{out} is being run by another process: nothing to do") from None
    earlier = json.loads(out.read_text()) if out.is_file() else None
    if earlier and "finished" in earlier:
        if any(earlier["train"][key] != getattr(settings, key) for key in ("steps", "lr", "head_lr_scale")):
            raise SystemExit(f"{out} was finished with other settings: delete it to run it anew")
        raise SystemExit(f"{out} is finished already: nothing to do")
    _, adapted, options, row = build_adapted(args.model, organ, method, options, 0, args.track)
    adapted.model.to(resolve_device(args.device))
    sampler = PatchSampler(volumes(train_cases), preprocess, settings.patches_per_step, settings.seed)
    held_in_patches = PatchSampler(volumes(held_in), preprocess, 2, seed=1)

    # ARENA's lambda and rho as resolved: the library's defaults may change after the run
    resolved = {"lam": options.lam, "rho": options.rho, "freeze_tail": options.freeze_tail}
    given_args = {**vars(args), **(resolved if method == "arena" else {})}
    record = {
        "command": "python benchmarks/probe.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given_args.items() if v is not None),
        "git_commit": git_commit(),
        "model": args.model,
        "model_sha256": file_digest(model_file(args.model))[:12],
        "device": device_name(resolve_device(args.device)),
        "started": f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
        "organ": organ,
        "track": "base" if row else "novel",
        "method": args.method,
        "options": options.to_dict(),
        "train": asdict(settings),
        "train_cases": train_cases,
        "held_in_cases": held_in,
        "trainable_params": adapted.trainable_params,
        "loss": [],
        "patch_dice": [],
        "active_rank": [],
        "rank_trace": [],  # ARENA: the active rank after every step (how steady the active set is)
        "volume_dice": {},
    }

    def active_rank() -> int | None:
        return sum(a for _, a in active_ranks(adapted.model).values()) if method == "arena" else None

    def volume_dice(step: int) -> None:
        metrics = evaluate_cases(adapted.model, data, organ, held_in, preprocess)
        means = {k.removeprefix("mean_"): v for k, v in metrics.items() if k.startswith("mean_")}
        record["volume_dice"][str(step)] = {"mean": metrics["mean_dice"], **means, **metrics["cases"]}
        print(f"step {step}: held-in volume Dice {metrics['mean_dice']:.1f}", flush=True)

    def probe_point(step: int) -> None:
        record["patch_dice"].append([step, patch_dice(adapted.model, held_in_patches)])
        record["active_rank"].append([step, active_rank()])
        print(f"step {step}: held-in patch Dice {record['patch_dice'][-1][1]:.1f}", flush=True)
        write_json(out, record)

    if earlier and checkpoint.is_file():
        if (earlier["options"], earlier["train"]) != (_plain(record["options"]), _plain(record["train"])):
            raise SystemExit(f"{out} was started with other settings: delete it and {checkpoint.name} to start anew")
        step = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
        record = {**earlier, "loss": earlier["loss"][:step], "rank_trace": earlier.get("rank_trace", [])[:step]}
        for key in ("patch_dice", "active_rank"):
            record[key] = [entry for entry in earlier[key] if entry[0] <= step]
        print(f"resuming {out.name} at step {step}", flush=True)
    else:
        if row:
            volume_dice(0)
        probe_point(0)

    def on_step(steps: int, loss: float) -> None:
        record["loss"].append(round(loss, 5))
        if method == "arena":
            record["rank_trace"].append(active_rank())
        if steps % args.every == 0:
            probe_point(steps)
        elif steps % settings.checkpoint_every == 0:
            write_json(out, record)  # the losses up to the checkpoint that the loop writes next

    t0 = time.time()
    result = train_adapter(adapted, sampler, settings, checkpoint, on_step=on_step)
    record["train_seconds"] = round(time.time() - t0, 1)  # this session's
    record["seconds_per_step"] = result.seconds_per_step
    volume_dice(result.steps_done)
    record["rank_report"] = adapted.rank_report()  # per layer: initial, active and full rank, active parameters
    if method == "arena":  # how large the kept gates are: a gate switched on by the last batches is tiny
        gates = torch.cat([v.detach().abs().flatten() for v in adapted.gates()])
        kept = gates[gates > 0]
        record["gate_quantiles"] = {
            str(q): kept.quantile(q).item() if kept.numel() else None for q in (0.1, 0.25, 0.5, 0.75, 0.9)
        }
    adapted.finalize()  # ARENA drops its switched-off components: the adapter as it ships
    with tempfile.TemporaryDirectory() as folder:
        record["adapter_bytes"] = (save_adapter(adapted, folder) / ADAPTER_WEIGHTS).stat().st_size
    record["finished"] = f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    write_json(out, record)
    checkpoint.unlink()
    print(json.dumps({k: record[k] for k in ("patch_dice", "volume_dice")}))


if __name__ == "__main__":
    main()
