"""Running a training stage with Lightning: one run directory per run, resume from its last
checkpoint, TensorBoard logs, time/step budgets, precision and any number of devices/nodes (DDP).

Both stages call `build_trainer`; their LightningModules hold the model-specific logic.

Checkpoints survive a kill at any moment: each is written to a temporary file in its own folder,
fsynced and renamed (Lightning's own writer goes through a temporary file under ``TMPDIR``, which on
another filesystem becomes a copy that a kill truncates); the checkpoint before the last is kept
(``previous.ckpt``), and a run resumes from the newest one that loads, with a warning when that is
not ``last.ckpt``. Temporary files of a killed run are removed when the run starts again.
"""

from __future__ import annotations

import atexit
import datetime
import io
import logging
import os
import random
import time
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from medlsdm.config import load_yaml, save_config
from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.files import atomic_output, claim_output, remove_stale_temps

log = logging.getLogger(__name__)

TRAINER_DEFAULTS = {
    "max_steps": 1000,
    "max_minutes": None,          # wall-clock budget of one invocation; training stops cleanly (and checkpoints) when it runs out
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

# Keys that may change between a run and its resumption: a longer budget, other hardware, other
# bookkeeping intervals, and the precision (the way out of an fp16 overflow is to resume in fp32).
RESUMABLE_KEYS = {"max_steps", "max_minutes", "devices", "num_nodes", "strategy", "accelerator", "precision",
                  "num_workers", "progress_bar", "preview_every_n_steps", "log_every_n_steps",
                  "checkpoint_every_n_steps", "val_every_n_steps"}

LAST_CHECKPOINT = "last.ckpt"
PREVIOUS_CHECKPOINT = "previous.ckpt"  # the last checkpoint before last.ckpt, kept as a fallback


class NonFiniteLossError(MedlsdmError):
    """Raised when a loss is NaN or Inf: the run stops and its last good checkpoint stays intact."""


def check_finite(loss: torch.Tensor, step: int, name: str = "loss", strategy=None) -> None:
    """Stop the run on a NaN/Inf loss, naming the step.

    With a `strategy` (DDP) every rank learns whether any rank saw a non-finite loss, so all
    of them stop together instead of the healthy ranks waiting forever in the next all-reduce.
    """
    finite = bool(torch.isfinite(loss.detach()).all())
    if strategy is not None:
        finite = bool(strategy.reduce_boolean_decision(finite, all=True))
    if not finite:
        value = loss.detach().float()
        shown = value.item() if value.numel() == 1 else "non-finite"
        raise NonFiniteLossError(
            f"{name} became {shown} at step {step}; training stopped and the last good checkpoint is kept "
            "(re-run with --set trainer.precision=32-true to resume from it, or start a new run with a lower learning rate)"
        )


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return str(precision)
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"  # CPU: bf16 has no fast kernels on most CPUs (hundreds of times slower here)


# Options added since runs were first saved whose absence means a value other than None: the
# architecture those runs were built with (a new run gets the new default).
ABSENT_MEANS = {"model.upsample": "transposed"}


def _diff_configs(old: Mapping, new: Mapping, where: str = "") -> list[str]:
    """The settings that differ between a saved run configuration and a new one. An option
    missing from the old one and None in the new one (added since, at its 'as before' default),
    or set to what its absence meant (`ABSENT_MEANS`), is no difference, so runs made by an
    older version still resume."""
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{where}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a == "<absent>" and (b is None or (name in ABSENT_MEANS and b == ABSENT_MEANS[name])):
            continue
        if a == "<absent>" and name in ABSENT_MEANS:
            out.append(f"{name}: absent (= {ABSENT_MEANS[name]!r}) -> {b!r}, resume with --set "
                       f"{name}={ABSENT_MEANS[name]}")
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff_configs(a, b, f"{name}.")
        elif a != b and not (where.endswith("trainer.") and key in RESUMABLE_KEYS):
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


_RUN_LOCKS: dict[Path, object] = {}  # run dirs this process writes to, locked until it exits


def _is_rank_zero() -> bool:
    """False in the extra processes of a multi-process (DDP) run, which re-run the command
    (started by Lightning, torchrun or SLURM's srun)."""
    names = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")
    return all(int(os.environ.get(name, 0) or 0) == 0 for name in names)


def _lock_run_dir(run_dir: Path, inputs, overwrite: bool) -> None:
    """Claim the run directory (files.claim_output): new, empty, or a run of ours (a marker, or the
    config.yaml of a run made before markers); locked, so a second concurrent run into it fails at once."""
    key = Path(run_dir).resolve()
    if key in _RUN_LOCKS:
        return
    _RUN_LOCKS[key] = claim_output(run_dir, "train", inputs, overwrite,
                                   recognise=lambda folder: (folder / "config.yaml").is_file())
    atexit.register(release_run_dir, key)  # a normal exit also removes the lock file


def release_run_dir(run_dir: str | Path) -> None:
    """Release the lock `prepare_run_dir` took (it is released anyway when the process ends)."""
    lock = _RUN_LOCKS.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.release()


def prepare_run_dir(run_dir: str | Path, cfg: Mapping, overwrite: bool = False) -> tuple[Path, Path | None]:
    """Create the run directory or check that an existing one holds the same run.

    Returns (run_dir, checkpoint to resume from or None). Re-running the same command resumes;
    a different configuration is refused rather than silently starting over. The run directory
    is claimed and locked for this process (see `files.claim_output`; the data and autoencoder
    folders named in `cfg` are its inputs), and temporary files of a killed run are removed.
    """
    run_dir = Path(run_dir)
    if _is_rank_zero():
        _lock_run_dir(run_dir, [cfg.get("data_dir"), cfg.get("autoencoder_dir")], overwrite)
    cfg_path = run_dir / "config.yaml"
    ckpt_dir = run_dir / "checkpoints"
    if cfg_path.exists():
        changed = _diff_configs(load_yaml(cfg_path), cfg)
        if changed:
            raise ConfigError(
                f"{run_dir} holds a run with a different configuration ({'; '.join(changed[:3])}"
                f"{' ...' if len(changed) > 3 else ''}); use another --out, or the same settings to resume"
            )
    elif any((ckpt_dir / name).exists() for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT)):
        raise ConfigError(f"{run_dir} holds a checkpoint but no config.yaml; use another --out")
    if _is_rank_zero():
        remove_stale_temps(ckpt_dir)
        save_config(cfg, cfg_path)
    return run_dir, resume_checkpoint(ckpt_dir)


def _checkpoint_step(path: Path) -> int:
    """The global step stored in a checkpoint; any failure to read it as plain data (truncated,
    corrupt, or a pickle that would run code) raises. Memory-mapped: the tensors are not read."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or "global_step" not in state:
        raise ValueError("not a training checkpoint (no global_step)")
    return int(state["global_step"])


def _why(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "weights_only" in str(exc) or "Unsupported global" in str(exc):
        text = "it holds Python objects, refused (a checkpoint must be plain data)"
    return text[:200]


def resume_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``last.ckpt``, or ``previous.ckpt`` with a warning when
    the last one cannot be read (it is then moved aside to ``last.corrupt.ckpt``, so the next
    checkpoint does not push the good one out). None when there is none; a one-line error when
    none can be read."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir / n for n in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT) if (ckpt_dir / n).is_file()]
    problems = []
    for path in candidates:
        try:
            step = _checkpoint_step(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read means "not usable"
            problems.append(f"{path} cannot be read ({_why(exc)})")
            continue
        if problems:
            log.warning("%s; resuming from %s (step %d) instead", problems[0], path.name, step)
            if _is_rank_zero() and (ckpt_dir / LAST_CHECKPOINT).exists():
                os.replace(ckpt_dir / LAST_CHECKPOINT, ckpt_dir / "last.corrupt.ckpt")
            if path.name != LAST_CHECKPOINT and _is_rank_zero():
                os.replace(path, ckpt_dir / LAST_CHECKPOINT)
                path = ckpt_dir / LAST_CHECKPOINT
        log.info("resuming from %s (step %d)", path, step)
        return path
    if problems:
        raise MedlsdmError(f"{problems[0]} and there is no earlier good checkpoint; "
                           "move the checkpoints folder aside to start again")
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, fsyncs and renames it; before
    ``last.ckpt`` is replaced, it becomes ``previous.ckpt`` (so two good ones exist)."""

    write_delay: float = 0.0  # test hook: seconds to pause halfway through writing the bytes

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported by AtomicCheckpointIO")
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(data[: len(data) // 2])
                if self.write_delay:
                    fh.flush()
                    time.sleep(self.write_delay)
                fh.write(data[len(data) // 2:])
            if path.name == LAST_CHECKPOINT and path.exists():
                os.replace(path, path.with_name(PREVIOUS_CHECKPOINT))


class RNGStateCallback(Callback):
    """Stores Python, NumPy and torch RNG states in each checkpoint and restores them on resume,
    so a resumed run continues the same random sequence (Lightning does not save them).

    Everything is stored as tensors, ints, strings and tuples: torch >= 2.6 loads checkpoints with
    ``weights_only=True``, which refuses the NumPy arrays of ``np.random.get_state()``.
    """

    def state_dict(self):
        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state):
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class LastCheckpoint(ModelCheckpoint):
    """checkpoints/last.ckpt every N steps and when training ends normally (step budget reached,
    time budget spent): Lightning's ModelCheckpoint writes it at the end only once per process,
    and not at all when another checkpoint (best.ckpt) was written at that step. Not called on an
    exception, so a failed run keeps its last good checkpoint."""

    def __init__(self, dirpath: Path, every_n_train_steps: int):
        super().__init__(dirpath=dirpath, filename="step{step}", save_last=True, save_top_k=0,
                         every_n_train_steps=every_n_train_steps, auto_insert_metric_name=False,
                         enable_version_counter=False)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class BudgetTimer(Timer):
    """Lightning's Timer, but the budget is per invocation: a resumed run gets the full
    `max_minutes` again (a job on a time-limited cluster slot re-runs the same command)."""

    def load_state_dict(self, state_dict):
        self._offset = 0


class StepProgressBar(TQDMProgressBar):
    """One bar over the whole run: global step / max_steps, in steps per second, with the
    metrics logged with ``prog_bar=True`` (Lightning's default bar restarts every epoch, which
    for a few training volumes means every few steps)."""

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.unit = "step"
        return bar

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # a resumed run: the rate counts this run's steps
        bar.set_description("training")

    def on_train_epoch_start(self, trainer, *_):
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and self._should_update(trainer.global_step, bar.total or 0):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def on_train_epoch_end(self, trainer, pl_module):
        pass


def world_size(tcfg: Mapping) -> int:
    """Processes the configuration asks for (devices per node x nodes)."""
    devices, accelerator = tcfg["devices"], str(tcfg["accelerator"])
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, str) and "," in devices:
        per_node = len([d for d in devices.split(",") if d.strip()])
    elif str(devices) in ("auto", "-1"):
        gpus = torch.cuda.device_count() if accelerator != "cpu" and torch.cuda.is_available() else 0
        per_node = max(1, gpus)
    else:
        try:
            per_node = int(devices)
        except ValueError:
            raise ConfigError(f"trainer.devices must be a number, a list or 'auto', not {devices!r}") from None
    return per_node * int(tcfg["num_nodes"])


def _strategy(tcfg: Mapping, find_unused_parameters: bool):
    strategy = tcfg["strategy"]
    if strategy == "auto" and world_size(tcfg) > 1:
        strategy = "ddp"
    start_methods = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}
    if find_unused_parameters and strategy in start_methods:
        # A GAN step runs two backward passes, each reaching only part of the parameters (the
        # generator's, then the discriminators'): DDP must be told that some get no gradient.
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method=start_methods[strategy], find_unused_parameters=True)
    return strategy


def fit(trainer, module, train_loader, val_loader=None, resume: Path | None = None, ignore: Iterable[str] = ()) -> None:
    """`trainer.fit`, resuming from `resume` when given, without the warnings a resumed run of
    ours always raises (plus the messages in `ignore`): the checkpoint folder is ours, and
    training is counted in steps over a reshuffled loader, so restarting it mid-epoch is expected."""
    if resume:
        log.info("resuming from %s", resume)
    with warnings.catch_warnings():
        for message in ("Checkpoint directory .* exists and is not empty",
                        "You're resuming from a checkpoint that ended before the epoch", *ignore):
            warnings.filterwarnings("ignore", message=message)
        # weights_only: a checkpoint is data, never code (our own states are tensors and plain types).
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume) if resume else None, weights_only=True)


def build_trainer(run_dir: Path, tcfg: Mapping, callbacks: Iterable = (), monitor: str | None = None,
                  gradient_clip_val: float | None = None, accumulate_grad_batches: int = 1,
                  find_unused_parameters: bool = False):
    """A Lightning Trainer writing checkpoints and TensorBoard logs into `run_dir`.

    checkpoints/last.ckpt is written every `checkpoint_every_n_steps` and at the end of training;
    with `monitor`, checkpoints/best.ckpt keeps the best validation value (lower is better).
    Gradient clipping and accumulation are given here for automatic optimisation only; a module
    with manual optimisation (the GAN of stage 1) clips its own gradients.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    ckpt_dir = Path(run_dir) / "checkpoints"
    cbs = [
        LastCheckpoint(ckpt_dir, every_n_train_steps=int(tcfg["checkpoint_every_n_steps"])),
        RNGStateCallback(),
        *callbacks,
    ]
    if monitor:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="min",
                                   save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False))
    if tcfg["progress_bar"]:
        cbs.append(StepProgressBar(refresh_rate=1))
    if tcfg["max_minutes"]:
        cbs.append(BudgetTimer(duration=datetime.timedelta(minutes=float(tcfg["max_minutes"])), interval="step"))
    try:
        return pl.Trainer(
            default_root_dir=str(run_dir),
            max_steps=int(tcfg["max_steps"]),
            max_epochs=-1,
            accelerator=tcfg["accelerator"],
            devices=tcfg["devices"],
            num_nodes=int(tcfg["num_nodes"]),
            strategy=_strategy(tcfg, find_unused_parameters),
            precision=resolve_precision(tcfg["precision"]),
            callbacks=cbs,
            plugins=[AtomicCheckpointIO()],
            logger=TensorBoardLogger(str(run_dir), name="logs", version="", default_hp_metric=False),
            log_every_n_steps=int(tcfg["log_every_n_steps"]),
            val_check_interval=int(tcfg["val_every_n_steps"]),
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            enable_progress_bar=bool(tcfg["progress_bar"]),
            enable_model_summary=False,
            use_distributed_sampler=True,
            gradient_clip_val=gradient_clip_val or None,
            accumulate_grad_batches=int(accumulate_grad_batches),
        )
    except (MisconfigurationException, ValueError, RuntimeError) as exc:
        # Lightning's messages are clear but come with a traceback; name our options instead.
        raise ConfigError(f"trainer settings (precision/accelerator/devices/strategy): {exc}") from None
