"""How large the gates an ARENA adapter keeps are: a gate switched on by the last few batches is orders of magnitude
smaller than one that carried a component through training, so the kept count alone can count noise.

Reads adapter.safetensors files (a grid cell's folder under its bench --out holds one), prints a Markdown table.
Usage: python benchmarks/gate_magnitudes.py runs/cpu-grid-lam0.7/*/cells/base/arena-r64/*/k5/seed0 > OUT.md
Not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from arenaseg.adapters.arena import is_arena_v
from arenaseg.adapters.io import ADAPTER_WEIGHTS

BOUNDS = (1e-4, 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="folders holding an ARENA adapter.safetensors")
    args = parser.parse_args()
    header = ["adapter", "gates kept", *(f"of them |v| < {b:g}" for b in BOUNDS), "median |v|", "90th pct |v|"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for folder in map(Path, args.folders):
        weights = load_file(folder / ADAPTER_WEIGHTS)
        gates = torch.cat([t.abs().flatten() for name, t in weights.items() if is_arena_v(name)])
        kept = gates[gates > 0]
        small = [str(int((kept < bound).sum())) for bound in BOUNDS]
        quantiles = [f"{kept.quantile(q).item():.1e}" if kept.numel() else "–" for q in (0.5, 0.9)]
        print("| " + " | ".join([str(folder), str(kept.numel()), *small, *quantiles]) + " |")


if __name__ == "__main__":
    main()
