import json

import pytest
import torch

from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.training.runner import TRAINER_DEFAULTS, NonFiniteLossError, check_finite, prepare_run_dir
from medlsdm.weights import load_weights, save_weights


def _cfg(**trainer):
    return {"model": {"width": 8}, "trainer": {**TRAINER_DEFAULTS, **trainer}}


def test_run_dir_resumes_same_config_and_refuses_other(tmp_path):
    run, resume = prepare_run_dir(tmp_path / "run", _cfg())
    assert resume is None and (run / "config.yaml").exists()
    (run / "checkpoints").mkdir()
    torch.save({"global_step": 3}, run / "checkpoints" / "last.ckpt")
    # a longer budget is a resumption of the same run
    _, resume = prepare_run_dir(run, _cfg(max_steps=5000))
    assert resume == run / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"model.width: 8 -> 16"):
        prepare_run_dir(run, {**_cfg(), "model": {"width": 16}})


def test_check_finite_names_step():
    check_finite(torch.tensor(1.0), 3)
    with pytest.raises(NonFiniteLossError, match="step 7"):
        check_finite(torch.tensor(float("nan")), 7)


def test_weights_round_trip_and_errors(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    path = save_weights(tmp_path / "m.safetensors", state, {"kind": "test", "label_table": {"0": "bg"}})
    loaded, sidecar = load_weights(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert sidecar["kind"] == "test" and "torch" in sidecar["versions"]
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "bad.json").write_text(json.dumps({}), encoding="utf-8")
    with pytest.raises(MedlsdmError, match="bad.safetensors"):
        load_weights(tmp_path / "bad.safetensors")
    with pytest.raises(MedlsdmError, match="not found"):
        load_weights(tmp_path / "missing.safetensors")


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    import os

    from medlsdm.files import atomic_directory, atomic_output

    with atomic_output(tmp_path / "a.txt") as tmp:
        tmp.write_text("x", encoding="utf-8")
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f").write_text("y", encoding="utf-8")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask
    assert not list(tmp_path.glob(".tmp-*"))
