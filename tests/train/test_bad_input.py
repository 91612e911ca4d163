"""Bad input stops the run with a clear message before any compute; so does a diverging loss,
naming the step and the last good checkpoint; and a checkpoint of another model is refused."""
from __future__ import annotations

import pytest

from runs import IN_PROCESS_STEP, make_config
from synthetic import write_encoded


def _run(config, encoded, output):
    from components.controlnet_train.stage import run

    return run(config, {"encoded": encoded}, str(output))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    return write_encoded(str(tmp_path_factory.mktemp("enc") / "encoded"), rows=12, rows_per_shard=4, holdout_fraction=0.0)


def test_resolution_not_divisible_by_8(base, encoded, tmp_path):
    from components.controlnet_train.checks import TrainInputError

    config = make_config(base)
    config.encode.resolution = 60
    with pytest.raises(TrainInputError, match=r"encode.resolution=60 is not divisible by 8"):
        _run(config, encoded, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dataset_smaller_than_one_global_batch(base, tmp_path):
    from components.controlnet_train.checks import TrainInputError

    small = write_encoded(str(tmp_path / "small"), rows=3, holdout_fraction=0.0)
    with pytest.raises(TrainInputError, match=r"3 training rows .* fewer than one global batch \(train.global_batch_size=4\)"):
        _run(make_config(base, global_batch_size=4), small, tmp_path / "out")


def test_global_batch_not_divisible_by_devices(base, encoded, tmp_path):
    from components.controlnet_train.checks import TrainInputError, check_devices

    with pytest.raises(TrainInputError, match=r"global_batch_size=6 .* not divisible by the 4 devices"):
        check_devices(make_config(base, global_batch_size=6), device_count=4)
    with pytest.raises(TrainInputError, match=r"3 per micro-batch with grad_accum_steps=2\) is not divisible by the 2 devices"):
        check_devices(make_config(base, global_batch_size=6, grad_accum_steps=2), device_count=2)
    with pytest.raises(TrainInputError, match=r"global_batch_size=5 is not divisible by train.grad_accum_steps=2"):
        _run(make_config(base, global_batch_size=5, grad_accum_steps=2), encoded, tmp_path / "out")


def test_latent_and_control_shapes_disagree(base, tmp_path):
    from components.controlnet_train.checks import TrainInputError

    wrong = write_encoded(str(tmp_path / "wrong"), rows=8, latent_shape=(4, 16, 16), holdout_fraction=0.0)
    with pytest.raises(TrainInputError, match=r"latents are \[4, 16, 16\] and control images 32x32.*needs latents \[4, 4, 4\]"):
        _run(make_config(base), wrong, tmp_path / "out")
    other = write_encoded(str(tmp_path / "other"), rows=8, control_size=128, holdout_fraction=0.0)
    with pytest.raises(TrainInputError, match=r"latents are \[4, 4, 4\] and control images 128x128"):
        _run(make_config(base), other, tmp_path / "out")


def test_nan_loss_stops_naming_step_and_last_good_checkpoint_and_other_model_is_refused(base, encoded, tmp_path):
    from components.controlnet_train.checkpoint import ResumeError
    from components.controlnet_train.stage import TrainingDiverged

    output = tmp_path / "out"
    config = make_config(base, max_steps=2, checkpoint_every=2, **IN_PROCESS_STEP)
    _run(config, encoded, output)

    # Same output, another ControlNet architecture: refused before any weight is loaded, naming the field.
    other = make_config(base, max_steps=4, checkpoint_every=2, conditioning_embedding_out_channels=[8, 8, 16, 32])
    with pytest.raises(ResumeError, match=r"controlnet.conditioning_embedding_out_channels: \[8, 8, 16, 16\] \(checkpoint\) != \[8, 8, 16, 32\] \(now\)"):
        _run(other, encoded, output)

    # Resumed on data whose latents are NaN: step 3 diverges; the run stops at its next log step.
    poisoned = write_encoded(str(tmp_path / "poisoned"), rows=12, rows_per_shard=4, holdout_fraction=0.0, nan_latents=True)
    longer = make_config(base, max_steps=6, checkpoint_every=2, **IN_PROCESS_STEP)
    with pytest.raises(TrainingDiverged, match=r"NaN/inf at step 3 .*Last good checkpoint: step 2 at .*checkpoints/2"):
        _run(longer, poisoned, output)
    assert sorted(p.name for p in (output / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
