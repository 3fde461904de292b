"""Overlay pictures: people judge a segmentation faster by looking at it than by reading a Dice."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from arenaseg.utils.atomic import atomic_path  # noqa: E402


def overlay_png(
    image: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    output: str | Path,
    title: str = "",
    n_slices: int = 4,
    window: tuple[float, float] = (-125.0, 275.0),
) -> Path:
    """Axial slices through the reference organ: image, image + truth (green), image + prediction (red)."""
    zs = np.flatnonzero(truth.any(axis=(0, 1)))
    if zs.size == 0:
        zs = np.flatnonzero(prediction.any(axis=(0, 1)))
    if zs.size == 0:
        zs = np.arange(image.shape[2])
    picks = np.unique(np.linspace(zs[0], zs[-1], n_slices + 2).round().astype(int)[1:-1])
    fig, axes = plt.subplots(3, len(picks), figsize=(2.6 * len(picks), 8), squeeze=False)
    for col, z in enumerate(picks):
        sl = np.rot90(image[:, :, z])
        for row, (mask, colour, name) in enumerate(
            [(None, None, "image"), (truth, "Greens", "truth"), (prediction, "Reds", "prediction")]
        ):
            ax = axes[row, col]
            ax.imshow(sl, cmap="gray", vmin=window[0], vmax=window[1])
            if mask is not None:
                m = np.rot90(mask[:, :, z]).astype(float)
                ax.imshow(np.ma.masked_where(m == 0, m), cmap=colour, alpha=0.6, vmin=0, vmax=1)
            ax.set_axis_off()
            if col == 0:
                ax.set_title(name, loc="left", fontsize=9)
        axes[0, col].set_title(f"slice {z}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return output
