"""What a mask's connected components cover: where a cell's raw Dice is far below its largest-component Dice, the
stray components say which anatomy the adapted model still marks as the organ.

Reads masks written by `arenaseg predict --no-largest-component` and the case's reference label map, prints a
Markdown table of each mask's largest components and the reference labels under them (names from dataset.json).
Usage: python benchmarks/stray_components.py --reference LABELS.nii.gz --dataset dataset.json MASK.nii.gz [...]
Not a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("masks", nargs="+", help="binary masks on the reference's grid")
    parser.add_argument("--reference", required=True, help="the case's label map")
    parser.add_argument("--dataset", required=True, help="dataset.json naming the label values")
    parser.add_argument("--top", type=int, default=6, help="components listed per mask (default: %(default)s)")
    args = parser.parse_args()
    names = {value: name for name, value in json.loads(Path(args.dataset).read_text())["labels"].items()}
    reference = np.asarray(nib.load(args.reference).dataobj).astype(np.int64)
    print("| mask | components | voxels | component | voxels | reference labels under it (voxels) |")
    print("|---|---|---|---|---|---|")
    for path in args.masks:
        mask = np.asarray(nib.load(path).dataobj) > 0
        if mask.shape != reference.shape:
            raise SystemExit(f"{path}: shape {mask.shape} is not the reference's {reference.shape}")
        components, count = ndimage.label(mask)
        sizes = np.bincount(components.ravel())[1:]
        for rank, index in enumerate(np.argsort(-sizes)[: args.top]):
            under = np.bincount(reference[components == index + 1])
            labels = ", ".join(
                f"{names.get(value, value)} {int(n)}" for value, n in sorted(enumerate(under), key=lambda t: -t[1]) if n
            )
            lead = f"{Path(path).name} | {count} | {int(mask.sum())}" if rank == 0 else " | | "
            print(f"| {lead} | {rank + 1} | {int(sizes[index])} | {labels} |")


if __name__ == "__main__":
    main()
