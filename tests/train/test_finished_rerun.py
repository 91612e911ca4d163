"""Training that finished is not redone: the same command on the same output returns its summary without loading the
base model or building (compiling) the train step."""
from __future__ import annotations

import json

from runs import IN_PROCESS_STEP, make_config
from synthetic import write_encoded


def test_rerun_of_a_finished_training_returns_at_once(base, tmp_path, monkeypatch, capsys):
    from cnpipe import cli
    from components.controlnet_train import model, stage

    encoded = write_encoded(str(tmp_path / "encoded"), rows=6, heldout_rows=2)
    config = make_config(base, max_steps=2, **IN_PROCESS_STEP)
    argv = ["--config-json", config.to_json(), "--input", f"encoded={encoded.uri}", "--output", str(tmp_path / "train")]
    assert cli.main("controlnet_train", stage.run, argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["steps"] == 2

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished training was started again")

    monkeypatch.setattr(stage, "build_training", must_not_run)
    monkeypatch.setattr(model, "load_base", must_not_run)
    assert cli.main("controlnet_train", stage.run, argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again == first

    # one more step asked for: it trains again (from its last checkpoint), so the stand-ins are reached
    longer = make_config(base, max_steps=3, **IN_PROCESS_STEP)
    argv[1] = longer.to_json()
    try:
        cli.main("controlnet_train", stage.run, argv)
    except AssertionError as err:
        assert "started again" in str(err)
    else:
        raise AssertionError("a training with other settings was not run")
