"""Run by tests/test_pretrain.py under torchrun: pretrain a tiny model and record this rank's weights digest."""

import hashlib
import sys
from pathlib import Path

import torch

from arenaseg.data.datasets import open_dataset
from arenaseg.train.pretrain import PretrainSettings, pretrain

data_dir, out, digest_dir = sys.argv[1:4]
torch.set_num_threads(1)
settings = PretrainSettings(steps=2, patches_per_step=1, warmup_steps=1, checkpoint_every=1)
data = open_dataset(data_dir)
result = pretrain(data, data.case_ids[:2], ["liver", "spleen"], out, settings)
h = hashlib.sha256()
for name, tensor in sorted(result.model.state_dict().items()):
    h.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
Path(digest_dir, f"rank{result.rank}.txt").write_text(f"{h.hexdigest()} {result.path}\n")
