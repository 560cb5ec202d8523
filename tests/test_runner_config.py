"""Resuming checks the configuration: what counts as a different run."""

from medlsdm.training.runner import _diff_configs


def test_changed_values_and_keys_are_differences():
    old = {"model": {"channels": [16, 32]}, "optim": {"lr": 1e-4}}
    assert _diff_configs(old, {"model": {"channels": [16, 64]}, "optim": {"lr": 1e-4}}) == \
        ["model.channels: [16, 32] -> [16, 64]"]
    assert _diff_configs(old, {"model": {"channels": [16, 32]}, "optim": {"lr": 1e-4, "beta": 0.9}}) == \
        ["optim.beta: '<absent>' -> 0.9"]


def test_an_option_added_since_at_its_none_default_is_no_difference():
    old = {"sampling": {"steps": 25}}
    assert _diff_configs(old, {"sampling": {"steps": 25, "clip_x0": None}}) == []
    assert _diff_configs(old, {"sampling": {"steps": 25, "clip_x0": 3.0}}) == ["sampling.clip_x0: '<absent>' -> 3.0"]


def test_resumable_trainer_settings_may_change():
    old = {"trainer": {"max_steps": 100, "max_minutes": 5, "batch_size": 2}}
    new = {"trainer": {"max_steps": 500, "max_minutes": 30, "batch_size": 2}}
    assert _diff_configs(old, new) == []
    assert _diff_configs(old, {"trainer": {**new["trainer"], "batch_size": 4}}) == ["trainer.batch_size: 2 -> 4"]


def test_a_run_saved_before_model_upsample_resumes_as_transposed():
    """Runs saved before `model.upsample` existed have transposed-convolution decoders: the new
    default (interpolate) is refused with the setting that resumes them, which is accepted."""
    old = {"model": {"channels": [16, 32], "decoder": "spade"}}
    refused = _diff_configs(old, {"model": {"channels": [16, 32], "decoder": "spade", "upsample": "interpolate"}})
    assert refused == ["model.upsample: absent (= 'transposed') -> 'interpolate', resume with --set "
                       "model.upsample=transposed"]
    assert _diff_configs(old, {"model": {"channels": [16, 32], "decoder": "spade", "upsample": "transposed"}}) == []
