"""Stage-1 training end to end through the command line: run directory contents, resume
(step, codebook, logged curve), refusal of a changed configuration, NaN stop with the last
good checkpoint intact, time budget, SPADE decoder, LPIPS on and off, and DDP on 2 CPU processes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medlsdm import cli
from medlsdm.models import perceptual
from medlsdm.training import autoencoder as ae
from medlsdm.inference import load_autoencoder
from prepared_data import make_prepared_dataset

# 16^3 volumes, latent 4^3 with 32 codes; discriminators with 2 layers fit 16 voxels (need 12).
TINY = ["model.channels=[4,8,8]", "model.num_codes=32", "model.spade_hidden=8", "loss.disc_layers=2",
        "loss.disc_channels=8", "loss.disc_start=2", "trainer.log_every_n_steps=1", "trainer.progress_bar=false",
        "trainer.val_every_n_steps=3", "trainer.checkpoint_every_n_steps=2", "trainer.preview_every_n_steps=2"]


def _sets(*items):
    return [a for item in (*TINY, *items) for a in ("--set", item)]


def _train(data, out, *items, config=None):
    argv = ["train", "autoencoder", "--data", str(data), "--out", str(out), *_sets(*items)]
    return cli.main(argv + (["--config", str(config)] if config else []))


def _ckpt(run):
    return torch.load(Path(run) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _scalars(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run) / "logs"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.fixture(autouse=True)
def _no_lpips_weights(monkeypatch, tmp_path):
    # Hermetic: no LPIPS weights from the machine's caches or an installed lpips package.
    monkeypatch.setattr("medlsdm.pretrained._lpips_package_dir", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_prepared_dataset(tmp_path_factory.mktemp("prepared"), n_train=3, n_val=1)


class _Recording(ae.AutoencoderModule):
    """Records the step and codebook seen before the first training step of a run."""

    first = None

    def on_train_batch_start(self, batch, batch_idx):
        if _Recording.first is None:
            quantizer = self.autoencoder.quantizer
            _Recording.first = (self.global_step, quantizer.codebook.detach().clone(), bool(quantizer.initialized))


def test_end_to_end_run_dir_and_export(data, tmp_path):
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="without the perceptual"):
        assert _train(data, run, "trainer.max_steps=4") == 0
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "checkpoints" / "best.ckpt").is_file()  # validated at step 3
    assert sorted(p.name for p in (run / "previews").glob("*.png")) == ["step0000002.png", "step0000004.png"]
    assert _ckpt(run)["global_step"] == 4
    # the GAN path ran (disc_start 2) and validation logged its metrics
    assert [s for s, _ in _scalars(run, "train/d_loss")] and not _scalars(run, "train/lpips")
    for tag in ("val/l1", "val/psnr", "val/ssim", "val/perplexity", "val/code_usage"):
        assert len(_scalars(run, tag)) == 1, tag
    model, sidecar = load_autoencoder(run)
    stats = sidecar["latent_statistics"]
    assert sidecar["steps"] == 4 and len(stats["mean"]) == 8 and stats["codebook_min"] < stats["codebook_max"]
    assert len(stats["std"]) == 8 and stats["min"] < stats["max"] and stats["volumes"] == 3
    assert sidecar["label_table"]["0"] == "background" and sidecar["prepare_spec"]["target_shape"] == [16, 16, 16]
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        rec, _, _ = model(x)
    assert rec.shape == x.shape
    # the exported codebook is the trained one of the checkpoint (initialised from data, not random)
    assert torch.equal(model.quantizer.codebook, _ckpt(run)["state_dict"]["autoencoder.quantizer.codebook"])
    assert bool(model.quantizer.initialized)


def test_resume_continues_step_codebook_and_curve(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert _train(data, run, "trainer.max_steps=4", "loss.perceptual=0") == 0
    before = _ckpt(run)
    steps_first = [s for s, _ in _scalars(run, "train/l1")]
    monkeypatch.setattr(ae, "AutoencoderModule", _Recording)
    _Recording.first = None
    assert _train(data, run, "trainer.max_steps=8", "loss.perceptual=0") == 0
    step, codebook, initialized = _Recording.first
    assert step == 4  # continues from 4, not 0
    # the checkpoint's codebook, marked initialised so the first batch does not re-initialise it
    assert torch.equal(codebook, before["state_dict"]["autoencoder.quantizer.codebook"]) and initialized
    after = _ckpt(run)
    assert after["global_step"] == 8
    # optimiser state restored: Adam's step counter continued from the first run's
    assert after["optimizer_states"][0]["state"][0]["step"] == before["optimizer_states"][0]["state"][0]["step"] + 4
    steps = [s for s, _ in _scalars(run, "train/l1")]
    assert steps_first == [0, 1, 2, 3] and steps == list(range(8))  # one curve, no restart at 0
    assert (run / "previews" / "step0000008.png").is_file()
    # a changed model is refused, naming the option; the run is left as it was
    assert _train(data, run, "trainer.max_steps=8", "loss.perceptual=0", "model.num_codes=64") == 2
    assert _ckpt(run)["global_step"] == 8


def test_changed_config_error_message(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(data, run, "trainer.max_steps=1", "loss.perceptual=0") == 0
    capsys.readouterr()
    assert _train(data, run, "trainer.max_steps=1", "loss.perceptual=0", "model.latent_channels=4") == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "model.latent_channels: 8 -> 4" in err


def test_rng_state_survives_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from medlsdm.training.runner import RNGStateCallback

    callback = RNGStateCallback()
    torch.save({"rng": callback.state_dict()}, tmp_path / "state.ckpt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    callback.load_state_dict(torch.load(tmp_path / "state.ckpt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


class _NaNAtStep3(ae.AutoencoderModule):
    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            batch = {**batch, "image": batch["image"] * float("nan")}
        return super().training_step(batch, batch_idx)


def test_nan_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setattr(ae, "AutoencoderModule", _NaNAtStep3)
    assert _train(data, run, "trainer.max_steps=6", "loss.perceptual=0") == 2
    err = capsys.readouterr().err
    assert "generator loss became nan at step 3" in err
    ckpt = _ckpt(run)  # still loads (weights_only) and is the step-2 checkpoint
    assert ckpt["global_step"] == 2
    assert torch.isfinite(ckpt["state_dict"]["autoencoder.quantizer.codebook"]).all()
    assert not (run / "autoencoder.safetensors").exists()


def test_too_small_for_discriminators_or_lpips_is_a_clear_error(data, tmp_path, capsys):
    assert _train(data, tmp_path / "run", "loss.disc_layers=3") == 2
    err = capsys.readouterr().err
    assert "loss.disc_layers=3" in err and ">= 24 voxels" in err
    assert _train(data, tmp_path / "run2", "loss.perceptual_net=alex") == 2
    assert "loss.perceptual_net=alex" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before creating the run directory


def test_time_budget_stops_with_checkpoint_and_export(data, tmp_path):
    run = tmp_path / "run"
    assert _train(data, run, "trainer.max_steps=100000", "trainer.max_minutes=0.02", "loss.perceptual=0") == 0
    step = _ckpt(run)["global_step"]
    assert 0 < step < 100000
    assert load_autoencoder(run)[1]["steps"] == step


def test_bf16_mixed_precision_trains(data, tmp_path):
    # Generator only: on CPU, bf16 autocast gives sporadic NaN weight gradients in the 3D
    # discriminator's last convolution (a CPU kernel issue: 2 of 200 backward passes of the bare
    # discriminator); bf16 is meant for GPUs, and "auto" precision is fp32 on CPU. (Lightning
    # turns 16-mixed into bf16-mixed on CPU, so fp16 loss scaling cannot be tested here.)
    run = tmp_path / "run"
    assert _train(data, run, "trainer.max_steps=3", "loss.perceptual=0", "loss.disc_start=1000",
                  "trainer.precision=bf16-mixed") == 0
    norms = [v for _, v in _scalars(run, "train/grad_norm_generator")]
    assert len(norms) == 3 and all(0 < v < 100 for v in norms), norms
    model, sidecar = load_autoencoder(run)
    assert sidecar["steps"] == 3 and model.quantizer.codebook.dtype == torch.float32


def _write_lpips(folder):
    """Random LPIPS-VGG weights in the published file formats (see test_perceptual.py)."""
    backbone = perceptual.Backbone("vgg")
    heads = {k: v.abs() for k, v in perceptual.Heads(backbone.channels).state_dict().items()}
    torch.save(dict(backbone.state_dict()), folder / "vgg.pth")
    torch.save(heads, folder / "vgg_heads.pth")
    return folder / "vgg.pth", folder / "vgg_heads.pth"


def test_spade_decoder_with_lpips_trains(data, tmp_path):
    backbone, heads = _write_lpips(tmp_path)
    run = tmp_path / "run"
    assert _train(data, run, "trainer.max_steps=3", "model.decoder=spade",
                  f"loss.lpips_backbone={backbone}", f"loss.lpips_heads={heads}") == 0
    assert len(_scalars(run, "train/lpips")) == 3 and _scalars(run, "train/d_loss")
    state = _ckpt(run)["state_dict"]
    assert not any(k.startswith("_lpips") or "lpips" in k for k in state)  # frozen LPIPS is not saved
    model, sidecar = load_autoencoder(run)
    assert sidecar["model"]["decoder"] == "spade"
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    labels = torch.randint(0, 3, (1, 16, 16, 16))
    onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 4, 1, 2, 3).float()
    with torch.no_grad():
        z_q, _, _ = model.quantize(model.encode(x))
        a, b = model.decode(z_q, onehot), model.decode(z_q, onehot.roll(1, dims=1))
    assert a.shape == x.shape and not torch.allclose(a, b)  # the label map conditions the decoder


DRIVER = """
import sys
import torch
from medlsdm import cli
from medlsdm.training import autoencoder as ae

class Recording(ae.AutoencoderModule):
    def on_train_end(self):
        torch.save(self.autoencoder.quantizer.codebook.cpu(), sys.argv[sys.argv.index("--out") + 1]
                   + f"/codebook_rank{self.global_rank}.pt")

ae.AutoencoderModule = Recording
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_codebooks_identical(data, tmp_path):
    # Lightning's "ddp" re-launches the running script for the other ranks, which inside pytest
    # would be pytest itself: run a small driver script in a subprocess instead (it records each
    # rank's final codebook).
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER), encoding="utf-8")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    argv = [sys.executable, str(driver), "train", "autoencoder", "--data", str(data), "--out", str(run),
            *_sets("trainer.max_steps=3", "loss.perceptual=0", "trainer.devices=2", "trainer.accelerator=cpu",
                   "trainer.strategy=ddp", "loss.disc_start=1")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cb0, cb1 = (torch.load(run / f"codebook_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(cb0, cb1)
    model, sidecar = load_autoencoder(run)
    assert torch.equal(model.quantizer.codebook, cb0) and sidecar["steps"] == 3
    assert _ckpt(run)["global_step"] == 3


def test_init_from_with_frozen_encoder_keeps_the_latents(data, tmp_path):
    """A SPADE decoder trained after the fact on a trained encoder: encoder and codebook are
    copied and stay fixed (same latents, so a diffusion model trained on them still fits), the
    decoder's convolutions start from the plain decoder's, and the export is a SPADE autoencoder."""
    from medlsdm.errors import ConfigError

    assert _train(data, tmp_path / "plain", "trainer.max_steps=3") == 0
    assert _train(data, tmp_path / "spade", "trainer.max_steps=3", "model.decoder=spade",
                  f"init.from={tmp_path / 'plain'}", "init.freeze_encoder=true", "loss.disc_start=100") == 0
    plain, _ = load_autoencoder(tmp_path / "plain")
    spade, sidecar = load_autoencoder(tmp_path / "spade")
    assert sidecar["model"]["decoder"] == "spade" and spade.decoder_kind == "spade"
    theirs, ours = plain.state_dict(), spade.state_dict()
    for key in theirs:
        if key.startswith(("encoder.", "quantizer.")):
            assert torch.equal(theirs[key], ours[key]), key
    convs = [k for k in theirs if k.startswith("decoder.") and k in ours and ours[k].shape == theirs[k].shape]
    assert convs and any(not torch.equal(theirs[k], ours[k]) for k in convs)   # the decoder did train
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(plain.encode(x), spade.encode(x))
    assert _train(data, tmp_path / "bad", "model.num_codes=16", f"init.from={tmp_path / 'plain'}") == 2
    assert _train(data, tmp_path / "bad2", "init.freeze_encoder=true") == 2
    with pytest.raises(ConfigError, match="needs init.from"):
        ae.AutoencoderModule({**ae.AUTOENCODER_DEFAULTS, "init": {"from": None, "freeze_encoder": True}},
                             in_channels=1, label_table={"0": "background", "1": "a"})


def test_two_optimizer_states_merge_into_the_one_optimizer_and_step_alike():
    """Checkpoints written with separate generator and discriminator optimizers resume into the
    one optimizer with two groups; its next step equals the two optimizers' steps."""
    import copy

    import torch

    from medlsdm.training.autoencoder import merge_optimizer_states

    torch.manual_seed(0)
    gen, disc = torch.nn.Linear(3, 4), torch.nn.Linear(5, 2)
    old = [torch.optim.Adam(gen.parameters(), lr=1e-2, betas=(0.5, 0.9)),
           torch.optim.Adam(disc.parameters(), lr=3e-2, betas=(0.5, 0.9))]

    def grads(seed):
        g = torch.Generator().manual_seed(seed)
        for p in [*gen.parameters(), *disc.parameters()]:
            p.grad = torch.randn(p.shape, generator=g)

    for seed in (1, 2):                                  # some optimizer state to carry over
        grads(seed)
        for opt in old:
            opt.step()
    merged = copy.deepcopy(merge_optimizer_states(old[0].state_dict(), old[1].state_dict()))  # state_dict shares tensors
    start = [p.detach().clone() for p in [*gen.parameters(), *disc.parameters()]]
    grads(3)
    for opt in old:
        opt.step()
    expected = [p.detach().clone() for p in [*gen.parameters(), *disc.parameters()]]
    with torch.no_grad():
        for p, s in zip([*gen.parameters(), *disc.parameters()], start):
            p.copy_(s)
    new = torch.optim.Adam([{"params": list(gen.parameters())}, {"params": list(disc.parameters())}], lr=0.0)
    new.load_state_dict(merged)
    assert [g["lr"] for g in new.param_groups] == [1e-2, 3e-2]
    grads(3)
    new.step()
    for p, e in zip([*gen.parameters(), *disc.parameters()], expected):
        torch.testing.assert_close(p.detach(), e)


def test_compile_switch_keeps_weight_names():
    """trainer.compile wraps the networks in place: checkpoints and exported weights keep their keys."""
    from medlsdm.config import merge
    from medlsdm.training.autoencoder import AUTOENCODER_DEFAULTS, AutoencoderModule

    table = {"0": "background", "1": "a", "2": "b"}
    small = {"model": {"channels": [4, 8, 8], "num_codes": 16, "decoder": "spade", "spade_hidden": 4},
             "loss": {"perceptual": 0, "disc_channels": 4, "disc_layers": 1}}
    plain = AutoencoderModule(merge(AUTOENCODER_DEFAULTS, small), 1, table)
    compiled = AutoencoderModule(merge(AUTOENCODER_DEFAULTS, {**small, "trainer": {"compile": True}}), 1, table)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert compiled.autoencoder.decoder._compiled_call_impl is not None
    assert plain.autoencoder.decoder._compiled_call_impl is None
