"""Training batches that depend only on (seed, step, rank): a resumed or distributed run draws exactly the
patches an uninterrupted single run would, without saving any random-number state."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Randomizable

from arenaseg.data.preprocess import PreprocessSettings, random_patch_transform


class PatchSampler:
    """Each patch: a case drawn uniformly, then a crop by ``crop`` (default: a 64^3 crop centred on foreground or
    background with odds 1:1)."""

    def __init__(
        self,
        volumes: Sequence[dict],
        settings: PreprocessSettings,
        patches_per_step: int,
        seed: int,
        crop: Randomizable | None = None,
    ) -> None:
        if not volumes:
            raise ValueError("no training volumes")
        self.volumes = list(volumes)
        self.patches_per_step = patches_per_step
        self.seed = seed
        self.crop = crop if crop is not None else random_patch_transform(settings, num_samples=1)

    def batch(self, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, rank])
        images, labels = [], []
        for _ in range(self.patches_per_step):
            volume = self.volumes[int(rng.integers(len(self.volumes)))]
            self.crop.set_random_state(seed=int(rng.integers(2**31 - 1)))
            patch = self.crop({"image": volume["image"], "label": volume["label"]})[0]
            images.append(torch.as_tensor(patch["image"]))
            labels.append(torch.as_tensor(patch["label"]))
        return torch.stack(images).float(), torch.stack(labels).float()
