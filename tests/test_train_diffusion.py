"""Stage-2 training end to end through the command line: run directory contents, cached latents
(eval-mode autoencoder, flipped copies), EMA export and resume, NaN stop, the three model
families (Med-LSDM latent semantic, medicaldiffusion unconditional latent, Med-DDPM pixel
space), and DDP on 2 CPU processes. Sampling from these runs is tested in test_sample.py."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffusion_runs import EMA_NOW, INTENSITY, PIXEL, TINY, UNCOND, make_dataset, sets, train_ae, train_dm
from medlsdm.models import autoencoder as ae_models
from medlsdm.training import diffusion as dm


def ckpt(run):
    return torch.load(Path(run) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def scalars(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run) / "logs"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def exported(run):
    from medlsdm.weights import load_weights

    return load_weights(Path(run) / "diffusion.safetensors")


def denoiser_state(state_dict):
    return {k[len("denoiser."):]: v for k, v in state_dict.items() if k.startswith("denoiser.")}


def differs(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def ae_run(data, tmp_path_factory):
    return train_ae(data, tmp_path_factory.mktemp("ae") / "run")


def test_latent_semantic_run_dir_cache_ema_and_eval_autoencoder(data, ae_run, tmp_path, monkeypatch):
    modes = {"encode": [], "decode": []}
    for name in modes:
        original = getattr(ae_models.VQGAN, name)

        def record(self, *args, _name=name, _original=original, **kwargs):
            modes[_name].append(self.training)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(ae_models.VQGAN, name, record)
    run = tmp_path / "run"
    assert train_dm(data, run, "trainer.max_steps=4", *EMA_NOW, autoencoder=ae_run) == 0
    # the autoencoder only ever ran in eval mode: encoding the cache, decoding the previews
    assert modes["encode"] and modes["decode"] and not any(modes["encode"] + modes["decode"])
    for name in ("config.yaml", "checkpoints/last.ckpt", "diffusion.safetensors", "diffusion.json",
                 "autoencoder.safetensors", "autoencoder.json", "latents_train.safetensors"):
        assert (run / name).is_file(), name
    # self-contained: an identical copy of the autoencoder (its codebook untouched)
    assert (run / "autoencoder.safetensors").read_bytes() == (ae_run / "autoencoder.safetensors").read_bytes()
    assert sorted(p.name for p in (run / "previews").glob("*.png")) == ["step0000002.png", "step0000004.png"]
    assert [s for s, _ in scalars(run, "train/loss")] == [0, 1, 2, 3]

    # latents cached once, with a flipped copy of each of the 3 training cases
    from safetensors.torch import load_file

    from medlsdm.data.dataset import PreparedDataset
    from medlsdm.inference import load_autoencoder

    cache = load_file(str(run / "latents_train.safetensors"))
    assert sorted(cache) == sorted(f"case00{i}{s}" for i in range(3) for s in ("", ":flip"))
    model, _ = load_autoencoder(ae_run)
    image = PreparedDataset(data, split="train")[0]["image"][None]
    with torch.no_grad():
        assert torch.allclose(cache["case000"], model.encode(image)[0], atol=1e-5)
        assert torch.allclose(cache["case000:flip"], model.encode(image.flip(-1))[0], atol=1e-5)
    assert cache["case000"].shape == (8, 4, 4, 4)

    # exported = the EMA weights of the checkpoint, which differ from the raw weights (decay 0.9)
    weights, sidecar = exported(run)
    state = ckpt(run)
    assert state["global_step"] == 4 and sidecar["steps"] == 4
    ema, raw = denoiser_state(state["state_dict"]), denoiser_state(state["current_model_state"])
    assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)
    assert differs(ema, raw)
    assert int(state["averaging_state"]["n_averaged"]) == 4
    assert sidecar["denoiser"]["num_classes"] == 3 and sidecar["denoiser"]["label_downsample"] == [4, 4, 4]
    assert sidecar["image_shape"] == [16, 16, 16] and sidecar["intensity"] == INTENSITY
    assert sidecar["scaler"]["mode"] == "std" and len(sidecar["scaler"]["mean"]) == 8


class _Recording(dm.DiffusionModule):
    """Records the step and raw weights seen before the first training step of a run."""

    first = None

    def on_train_batch_start(self, batch, batch_idx):
        if _Recording.first is None:
            _Recording.first = (self.global_step, {k: v.clone() for k, v in self.denoiser.state_dict().items()})


def test_resume_continues_steps_raw_weights_ema_and_optimizer(data, ae_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    # No periodic checkpoint: last.ckpt is written at the end of training, where Lightning's own
    # EMA callback would already have copied the averaged weights into the model.
    keep = ["trainer.checkpoint_every_n_steps=100", *EMA_NOW]
    assert train_dm(data, run, "trainer.max_steps=3", *keep, autoencoder=ae_run) == 0
    before = ckpt(run)
    monkeypatch.setattr(dm, "DiffusionModule", _Recording)
    _Recording.first = None
    assert train_dm(data, run, "trainer.max_steps=5", *keep, autoencoder=ae_run) == 0
    step, weights = _Recording.first
    assert step == 3
    # training continues from the raw weights, not from the EMA weights
    raw, ema = denoiser_state(before["current_model_state"]), denoiser_state(before["state_dict"])
    assert all(torch.equal(weights[k], raw[k]) for k in raw) and differs(weights, ema)
    after = ckpt(run)
    assert after["global_step"] == 5
    assert int(after["averaging_state"]["n_averaged"]) == 5          # the EMA continued its count
    assert after["optimizer_states"][0]["state"][0]["step"] == before["optimizer_states"][0]["state"][0]["step"] + 2
    assert [s for s, _ in scalars(run, "train/loss")] == [0, 1, 2, 3, 4]
    assert exported(run)[1]["steps"] == 5
    # a changed model is refused, naming the option; the run is left as it was
    assert train_dm(data, run, "trainer.max_steps=6", *keep, "denoiser.base_channels=16", autoencoder=ae_run) == 2
    assert ckpt(run)["global_step"] == 5


class _NaNAtStep1(dm.DiffusionModule):
    def training_step(self, batch, batch_idx):
        if self.global_step == 1:
            batch = {**batch, "image": batch["image"] * float("nan")}
        return super().training_step(batch, batch_idx)


def test_nan_loss_stops_with_message(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dm, "DiffusionModule", _NaNAtStep1)
    run = tmp_path / "run"
    assert train_dm(data, run, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=1", *PIXEL) == 2
    assert "loss became nan at step 1" in capsys.readouterr().err
    assert ckpt(run)["global_step"] == 1 and not (run / "diffusion.safetensors").exists()


def test_med_ddpm_pixel_space_trains_without_autoencoder(data, tmp_path):
    run = tmp_path / "run"
    assert train_dm(data, run, "trainer.max_steps=2", *PIXEL) == 0
    assert not (run / "autoencoder.safetensors").exists() and not (run / "latents_train.safetensors").exists()
    weights, sidecar = exported(run)
    assert sidecar["space"] == "pixel" and sidecar["denoiser"]["kind"] == "concat" and sidecar["scaler"] is None
    # the concat U-Net sees x_t (1 channel) and the mask without background (2 channels)
    assert weights["conv_in.weight"].shape[1] == 1 + 2
    # EMA starts at step 2000: a shorter run exports the raw trained weights, not its initialisation
    state = ckpt(run)
    raw = denoiser_state(state["current_model_state"])
    assert all(torch.equal(weights[k], raw[k]) for k in raw)
    assert (run / "previews" / "step0000002.png").is_file()


def test_unconditional_latent_model_trains(data, ae_run, tmp_path):
    run = tmp_path / "run"
    assert train_dm(data, run, "trainer.max_steps=2", *UNCOND, autoencoder=ae_run) == 0
    weights, sidecar = exported(run)
    assert sidecar["denoiser"]["kind"] == "unconditional" and not any(k.startswith("label_encoder") for k in weights)


def test_wrong_space_and_autoencoder_combinations_are_refused(data, ae_run, tmp_path, capsys):
    assert train_dm(data, tmp_path / "a", *PIXEL, autoencoder=ae_run) == 2
    assert "takes no --autoencoder" in capsys.readouterr().err
    assert train_dm(data, tmp_path / "b") == 2
    assert "needs --autoencoder" in capsys.readouterr().err
    assert train_dm(data, tmp_path / "c", "space=pixel") == 2
    assert "denoiser.kind 'concat'" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


DRIVER = """
import sys
import torch
from medlsdm import cli
from medlsdm.training import diffusion as dm

class Recording(dm.DiffusionModule):
    def on_train_end(self):
        torch.save({k: v.cpu() for k, v in self.denoiser.state_dict().items()},
                   sys.argv[sys.argv.index("--out") + 1] + f"/denoiser_rank{self.global_rank}.pt")

dm.DiffusionModule = Recording
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes(data, ae_run, tmp_path):
    # Lightning's "ddp" re-launches the running script for the other rank: a driver script in a
    # subprocess (inside pytest it would re-launch pytest). It records each rank's weights.
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER), encoding="utf-8")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    argv = [sys.executable, str(driver), "train", "diffusion", "--data", str(data), "--out", str(run),
            "--autoencoder", str(ae_run),
            *sets(*TINY, *EMA_NOW, "trainer.max_steps=3", "trainer.devices=2", "trainer.accelerator=cpu",
                  "trainer.strategy=ddp")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = (torch.load(run / f"denoiser_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)   # gradients were all-reduced
    state = ckpt(run)
    assert state["global_step"] == 3 and int(state["averaging_state"]["n_averaged"]) == 3
    assert all(torch.equal(w0[k], v) for k, v in denoiser_state(state["current_model_state"]).items())
    weights, sidecar = exported(run)
    assert sidecar["steps"] == 3 and differs(weights, w0)   # EMA exported, not the raw weights
