import numpy as np
import pytest

from medlsdm import config
from medlsdm.data.labels import LabelTable, one_hot, remap, validate_label_map
from medlsdm.errors import ConfigError, DataError


DEFAULTS = {"model": {"channels": [16, 32], "decoder": "plain"}, "training": {"max_steps": 10, "lr": 1e-4}}


def test_resolve_applies_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_steps: 50\n", encoding="utf-8")
    cfg = config.resolve(DEFAULTS, str(path), ["training.lr=0.5", "model.decoder=spade", "model.channels=[8, 8]"])
    assert cfg["training"] == {"max_steps": 50, "lr": 0.5}
    assert cfg["model"] == {"channels": [8, 8], "decoder": "spade"}
    assert DEFAULTS["training"]["max_steps"] == 10  # defaults untouched


def test_unknown_key_and_preset_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="training.max_stpes"):
        config.resolve(DEFAULTS, None, ["training.max_stpes=3"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        config.load_preset("nope")
    with pytest.raises(ConfigError, match="key=value"):
        config.parse_override("training.lr")


def test_save_config_round_trip(tmp_path):
    config.save_config(DEFAULTS, tmp_path / "run" / "config.yaml")
    assert config.load_yaml(tmp_path / "run" / "config.yaml") == DEFAULTS


def test_validate_label_map_errors():
    table = LabelTable({0: "background", 1: "a", 2: "b"})
    ok = validate_label_map(np.array([[0, 1], [2, 1]], dtype=np.float32), table, "x.nii")
    assert ok.dtype == np.uint8
    with pytest.raises(DataError, match="x.nii: label map has non-integer"):
        validate_label_map(np.array([0.5, 1.0]), table, "x.nii")
    with pytest.raises(DataError, match="negative"):
        validate_label_map(np.array([-1, 1]), table, "x.nii")
    with pytest.raises(DataError, match=r"label values \[7\]"):
        validate_label_map(np.array([0, 7]), table, "x.nii")
    with pytest.raises(DataError, match="NaN"):
        validate_label_map(np.array([0, np.nan]), table, "x.nii")


def test_remap_and_one_hot():
    import torch

    out = remap(np.array([0, 1, 2, 4]), {0: 0, 1: 1, 2: 2, 4: 3})
    assert out.tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match=r"\[4\]"):
        remap(np.array([0, 4]), {0: 0})
    labels = torch.tensor([0, 1, 2, 1]).reshape(1, 1, 1, 2, 2)
    oh = one_hot(labels, 3)
    assert oh.shape == (1, 3, 1, 2, 2) and torch.equal(oh.argmax(1), labels[:, 0])
    assert one_hot(labels, 3, drop_background=True).shape == (1, 2, 1, 2, 2)


def test_nnunet_table():
    t = LabelTable.from_nnunet({"background": 0, "tumour": 1})
    assert t.names == {0: "background", 1: "tumour"} and t.is_contiguous()
    with pytest.raises(DataError, match="region"):
        LabelTable.from_nnunet({"background": 0, "whole": [1, 2]})
