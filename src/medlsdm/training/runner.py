"""Running a training stage with Lightning: one run directory per run, resume from its last
checkpoint, TensorBoard logs, time/step budgets, precision and any number of devices/nodes (DDP).

Both stages call `fit`; their LightningModules hold the model-specific logic.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Iterable, Mapping

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from medlsdm.config import load_yaml, save_config
from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.files import ensure_writable_dir

log = logging.getLogger(__name__)

TRAINER_DEFAULTS = {
    "max_steps": 1000,
    "max_minutes": None,          # wall-clock budget; training stops cleanly (and checkpoints) when it runs out
    "precision": "auto",          # auto: 32-true on CPU, bf16-mixed on GPUs that support it; or 32-true, 16-mixed, bf16-mixed
    "accelerator": "auto",
    "devices": 1,                 # GPUs (or CPU processes) per node; > 1 uses DDP
    "num_nodes": 1,
    "strategy": "auto",           # auto: ddp when devices * num_nodes > 1
    "batch_size": 1,
    "num_workers": 0,
    "accumulate_grad_batches": 1,
    "gradient_clip": 1.0,
    "checkpoint_every_n_steps": 200,
    "val_every_n_steps": 200,
    "log_every_n_steps": 10,
    "preview_every_n_steps": 500,
    "seed": 0,
    "progress_bar": True,
}

# Keys that may change between a run and its resumption (a longer budget, other hardware).
RESUMABLE_KEYS = {"max_steps", "max_minutes", "devices", "num_nodes", "strategy", "accelerator",
                  "num_workers", "progress_bar", "preview_every_n_steps", "log_every_n_steps"}


class NonFiniteLossError(MedlsdmError):
    """Raised when a loss is NaN or Inf: the run stops and its last good checkpoint stays intact."""


def check_finite(loss: torch.Tensor, step: int, name: str = "loss") -> None:
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(
            f"{name} became {loss.detach().float().item()} at step {step}; training stopped "
            "(the last good checkpoint is kept: lower the learning rate or use precision 32-true, then re-run to resume)"
        )


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"  # CPU: bf16 has no fast kernels on most CPUs (hundreds of times slower here)


def _diff_configs(old: Mapping, new: Mapping, where: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{where}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff_configs(a, b, f"{name}.")
        elif a != b and not (where.endswith("trainer.") and key in RESUMABLE_KEYS):
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def prepare_run_dir(run_dir: str | Path, cfg: Mapping) -> tuple[Path, Path | None]:
    """Create the run directory or check that an existing one holds the same run.

    Returns (run_dir, checkpoint to resume from or None). Re-running the same command resumes;
    a different configuration is refused rather than silently starting over.
    """
    run_dir = ensure_writable_dir(run_dir)
    cfg_path = run_dir / "config.yaml"
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg_path.exists():
        changed = _diff_configs(load_yaml(cfg_path), cfg)
        if changed:
            raise ConfigError(
                f"{run_dir} holds a run with a different configuration ({'; '.join(changed[:3])}"
                f"{' ...' if len(changed) > 3 else ''}); use another --out, or the same settings to resume"
            )
    save_config(cfg, cfg_path)
    return run_dir, (last if last.exists() else None)


class RNGStateCallback(Callback):
    """Stores Python, NumPy and torch RNG states in each checkpoint and restores them on resume,
    so a resumed run continues the same random sequence (Lightning does not save them)."""

    def state_dict(self):
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state):
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def build_trainer(run_dir: Path, tcfg: Mapping, callbacks: Iterable = (), monitor: str | None = None):
    """A Lightning Trainer writing checkpoints and TensorBoard logs into `run_dir`."""
    import datetime

    ckpt_dir = run_dir / "checkpoints"
    cbs = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", save_last=True, save_top_k=0,
                        every_n_train_steps=tcfg["checkpoint_every_n_steps"], auto_insert_metric_name=False),
        RNGStateCallback(),
        *callbacks,
    ]
    if monitor:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="min",
                                   save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False))
    if tcfg["progress_bar"]:
        cbs.append(TQDMProgressBar(refresh_rate=1))
    world = int(tcfg["devices"] if isinstance(tcfg["devices"], int) else 1) * int(tcfg["num_nodes"])
    strategy = tcfg["strategy"]
    if strategy == "auto" and world > 1:
        strategy = "ddp"
    max_time = (datetime.timedelta(minutes=float(tcfg["max_minutes"]))
                if tcfg["max_minutes"] else None)
    return pl.Trainer(
        default_root_dir=str(run_dir),
        max_steps=int(tcfg["max_steps"]),
        max_epochs=-1,
        max_time=max_time,
        accelerator=tcfg["accelerator"],
        devices=tcfg["devices"],
        num_nodes=tcfg["num_nodes"],
        strategy=strategy,
        precision=resolve_precision(tcfg["precision"]),
        callbacks=cbs,
        logger=TensorBoardLogger(str(run_dir), name="logs", version=""),
        log_every_n_steps=int(tcfg["log_every_n_steps"]),
        val_check_interval=int(tcfg["val_every_n_steps"]),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_progress_bar=bool(tcfg["progress_bar"]),
        enable_model_summary=False,
        use_distributed_sampler=True,
    )
