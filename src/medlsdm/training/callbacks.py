"""Lightning callbacks of the two training stages: previews (one picture every few steps and at
the end of training) and the diffusion stage's EMA of the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from medlsdm.errors import ConfigError

PREVIEW_STEPS = 10   # DDIM steps of a diffusion preview: enough to see structure, cheap next to training


class PeriodicPreview(pl.Callback):
    """Every `every_n_steps` steps (0: never) and at the end of training, on rank 0, once per
    step: `save(FOLDER/stepNNNNNNN.png, module)`, which a subclass defines."""

    def __init__(self, folder: Path, every_n_steps: int):
        self.folder, self.every = Path(folder), int(every_n_steps)
        self._last = -1

    def save(self, path: Path, module) -> None:
        raise NotImplementedError

    def _save(self, trainer, module) -> None:
        if not trainer.is_global_zero or trainer.global_step == self._last:
            return
        self.save(self.folder / f"step{trainer.global_step:07d}.png", module)
        self._last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every > 0 and trainer.global_step % self.every == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step > 0:
            self._save(trainer, pl_module)


def save_preview(path: Path, image: torch.Tensor, recon: torch.Tensor, label: torch.Tensor) -> None:
    """Three orthogonal slices (first channel): input | reconstruction | label map."""
    from medlsdm.viz import montage, save_png, three_plane

    img, rec, lab = image[0].float().numpy(), recon[0].float().numpy(), label.numpy()
    rows = [[three_plane(img), three_plane(rec), three_plane(img, label=lab)]]
    save_png(path, montage(rows, titles=["input", "reconstruction", "label map"]))


class ReconstructionPreview(PeriodicPreview):
    """Stage 1: the reconstruction of one fixed case (the first validation case, else the first
    training case): input | reconstruction | label map."""

    def __init__(self, folder: Path, sample: Mapping, every_n_steps: int):
        super().__init__(folder, every_n_steps)
        self.sample = sample

    def save(self, path: Path, module) -> None:
        image = torch.as_tensor(self.sample["image"])[None].to(module.device)
        label = torch.as_tensor(self.sample["label"])[None].to(module.device)
        recon = module.reconstruct(image, label)
        save_preview(path, image[0].cpu(), recon[0].cpu(), label[0, 0].cpu())


class DiffusionEMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging, with two changes for this stage.

    - Lightning's averaged model starts as a copy of the initial weights and is only updated
      from `update_starting_at_step`; a run shorter than that would export (and, at train end,
      swap in) its initialisation. Here the average follows the raw weights until averaging
      starts.
    - Lightning copies the average into the model at the end of training, before the final
      checkpoint is written (checkpoint callbacks run last), so a resumed run would continue
      from the EMA weights instead of the raw ones. Here the model keeps its raw weights; the
      averaged weights are exported with :meth:`averaged_module`.

    The checkpoint holds both (Lightning: `state_dict` = average, `current_model_state` = raw,
    `averaging_state` = the number of averaged steps), and resuming restores both.
    """

    def __init__(self, decay: float, every_n_steps: int, start_step: int):
        if not 0.0 <= float(decay) < 1.0:
            raise ConfigError(f"ema.decay must be in [0, 1) (or null for no EMA), not {decay}")
        super().__init__(decay=float(decay), update_every_n_steps=max(1, int(every_n_steps)),
                         update_starting_at_step=int(start_step))

    @property
    def started(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def _follow_if_not_started(self, pl_module) -> None:
        if self._average_model is not None and not self.started:
            self._average_model.module.load_state_dict(pl_module.state_dict())

    def averaged_module(self, pl_module):
        """The module holding the weights to export (the average, or the raw weights if
        averaging has not started)."""
        self._follow_if_not_started(pl_module)
        return self._average_model.module

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._follow_if_not_started(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._follow_if_not_started(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._follow_if_not_started(pl_module)   # no copy into the model: it keeps its raw weights


class DiffusionPreview(PeriodicPreview):
    """Stage 2: a quick DDIM sample (`PREVIEW_STEPS` steps, fixed seed) of one held-out label
    map, decoded: label map | sample | real image. Uses the EMA weights once averaging has started."""

    def __init__(self, folder: Path, case: Mapping, every_n_steps: int, sidecar: Mapping,
                 autoencoder=None, ema: DiffusionEMA | None = None):
        super().__init__(folder, every_n_steps)
        self.case, self.sidecar, self.autoencoder, self.ema = case, dict(sidecar), autoencoder, ema

    @torch.no_grad()
    def make(self, module) -> np.ndarray:
        """(C, D, H, W) sample in [-1, 1] for the preview label map."""
        from medlsdm.inference.model import SynthesisModel
        from medlsdm.inference.synthesis import synthesize

        source = self.ema.averaged_module(module) if self.ema is not None and self.ema.started else module
        denoiser = source.denoiser
        was_training = denoiser.training
        if self.autoencoder is not None:
            self.autoencoder.to(module.device).eval()   # eval: the codebook is never updated
        model = SynthesisModel(denoiser=denoiser.eval(), schedule=module.schedule, sidecar=self.sidecar,
                               table=module.table, autoencoder=self.autoencoder, scaler=module.scaler,
                               device=module.device)
        label = self.case["label"][0].numpy()
        try:
            x = synthesize(model, label if module.conditional else None, n=1, sampler="ddim", steps=PREVIEW_STEPS,
                           guidance=self.sidecar["sampling"]["guidance"], seed=0, image_shape=label.shape,
                           progress=False)
        finally:
            denoiser.train(was_training)
        return x[0].float().cpu().numpy()

    def save(self, path: Path, module) -> None:
        from medlsdm.viz import label_picture, montage, save_png, three_plane

        sample = self.make(module)
        label = self.case["label"][0].numpy()
        real = self.case["image"].numpy()
        panels = [three_plane(sample, window=(-1, 1)), three_plane(real, window=(-1, 1))]
        titles = ["sample", "real image"]
        if module.conditional:
            panels, titles = [label_picture(label), *panels], ["label map", *titles]
        save_png(path, montage([panels], titles=titles))

