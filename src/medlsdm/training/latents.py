"""Latents of a prepared dataset, encoded once by the frozen autoencoder (eval mode: the codebook
is never touched) and cached in the run directory, so that stage 2 never runs the autoencoder."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


class LatentDataset(Dataset):
    """Cached latents with their full-resolution label maps (the label encoder downsamples)."""

    def __init__(self, latents: list[torch.Tensor], labels: list[torch.Tensor], case_ids: list[str]):
        self.latents, self.labels, self.case_ids = latents, labels, case_ids

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"image": self.latents[i], "label": self.labels[i], "case_id": self.case_ids[i]}


@torch.no_grad()
def cache_latents(autoencoder, data: str | Path, split: str, flip: bool, cache: Path) -> LatentDataset:
    """Encode a split once and keep it in `cache` (safetensors; reused on resume).

    The autoencoder runs in eval mode under no_grad: its codebook (EMA-updated in train mode)
    is never touched. With `flip`, a left-right flipped copy of every case is encoded too: an
    encoder is not equivariant to flips, so flipping a cached latent would not be the latent
    of the flipped image.
    """
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from medlsdm.data.dataset import PreparedDataset
    from medlsdm.files import atomic_output

    dataset = PreparedDataset(data, split=split)
    if cache.exists():
        stored = load_file(str(cache))
    else:
        stored = {}
        autoencoder.eval()
        device = next(autoencoder.parameters()).device
        for item in tqdm(dataset, desc=f"encoding {split} latents", unit="case"):
            x = item["image"][None].to(device)
            variants = {"": x, ":flip": torch.flip(x, dims=[-1])} if flip else {"": x}
            for suffix, v in variants.items():
                stored[item["case_id"] + suffix] = autoencoder.encode(v)[0].float().cpu().contiguous()
        with atomic_output(cache) as tmp:
            save_file(stored, str(tmp))
    latents, labels, ids = [], [], []
    for item in dataset:
        cid = item["case_id"]
        for suffix in ("", ":flip"):
            if cid + suffix in stored:
                latents.append(stored[cid + suffix])
                labels.append(torch.flip(item["label"], dims=[-1]) if suffix else item["label"])
                ids.append(cid + suffix)
    return LatentDataset(latents, labels, ids)
