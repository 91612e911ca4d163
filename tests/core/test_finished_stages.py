"""A finished training or evaluation is not redone: its summary records a hash of its settings and inputs, and a rerun
that finds the same hash returns it without running the stage (cnpipe.cli, cnpipe.kfp_bridge)."""
from __future__ import annotations

import json
import types

import pyarrow as pa
import pytest

import pipeline_configs
from cnpipe import cli, kfp_bridge
from components import registry
from cnpipe.dataset import ShardedOutput, ShardResult

SCHEMA = pa.schema([("id", pa.string())])


def dataset(uri: str, rows: int, config_hash: str = "enc") -> str:
    out = ShardedOutput(uri, "encode", config_hash, SCHEMA)
    out.commit("s0", ShardResult(pa.table({"id": [f"r{i}" for i in range(rows)]}, schema=SCHEMA)), rows_in=rows)
    out.finalize(["s0"], inputs=[])
    return uri


class Stage:
    """A stand-in for a stage's `run`: counts its calls, returns a summary like training's."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = 0, fail

    def __call__(self, config, inputs, output_uri):
        self.calls += 1
        if self.fail:
            raise RuntimeError("the stage ran")
        return {"output": output_uri, "steps": config.train.max_steps, "final_loss": 0.5}


def run_cli(stage_run, config, output, stage="controlnet_train", **inputs) -> int:
    argv = ["--config-json", config.to_json(), "--output", output, *[f"--input={k}={v}" for k, v in inputs.items()]]
    return cli.main(stage, stage_run, argv)


@pytest.fixture
def config():
    return pipeline_configs.embedded("/assets")


def test_a_finished_stage_is_not_run_again(tmp_path, config, capsys):
    encoded, out = dataset(str(tmp_path / "encoded"), 4), str(tmp_path / "train")
    first = Stage()
    assert run_cli(first, config, out, encoded=encoded) == 0 and first.calls == 1
    written = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert written["config_hash"] and written["steps"] == config.train.max_steps
    capsys.readouterr()

    again = Stage(fail=True)
    assert run_cli(again, config, out, encoded=encoded) == 0
    assert again.calls == 0
    captured = capsys.readouterr()
    assert "already finished" in captured.err
    assert json.loads(captured.out) == {"stage": "controlnet_train", **written}


def test_other_settings_or_other_inputs_run_it_again(tmp_path, config):
    encoded, out = dataset(str(tmp_path / "encoded"), 4), str(tmp_path / "train")
    assert run_cli(Stage(), config, out, encoded=encoded) == 0
    longer = pipeline_configs.with_overrides(config, ["train.max_steps=31"])
    stage = Stage()
    assert run_cli(stage, longer, out, encoded=encoded) == 0 and stage.calls == 1
    other_data = dataset(str(tmp_path / "encoded2"), 5)
    stage = Stage()
    assert run_cli(stage, longer, out, encoded=other_data) == 0 and stage.calls == 1
    # settings of other stages (the report's) do not make training start over
    stage = Stage()
    assert run_cli(stage, pipeline_configs.with_overrides(longer, ["report.sample_rows=3"]), out, encoded=other_data) == 0
    assert stage.calls == 0


def test_a_stage_that_runs_again_first_forgets_its_old_summary(tmp_path, config):
    """Killed midway through the redo, the output must not look finished with the old summary."""
    encoded, out = dataset(str(tmp_path / "encoded"), 4), str(tmp_path / "train")
    assert run_cli(Stage(), config, out, encoded=encoded) == 0
    with pytest.raises(RuntimeError, match="the stage ran"):
        run_cli(Stage(fail=True), pipeline_configs.with_overrides(config, ["train.max_steps=31"]), out, encoded=encoded)
    assert not (tmp_path / "train" / "summary.json").exists()


def test_evaluate_runs_again_when_training_did(tmp_path, config):
    encoded, trained, evaluated = dataset(str(tmp_path / "encoded"), 4), str(tmp_path / "train"), str(tmp_path / "eval")
    conditioning = dataset(str(tmp_path / "cond"), 4, "cond")
    assert run_cli(Stage(), config, trained, encoded=encoded) == 0
    assert run_cli(Stage(), config, evaluated, "evaluate", trained=trained, conditioning=conditioning) == 0
    stage = Stage()
    assert run_cli(stage, config, evaluated, "evaluate", trained=trained, conditioning=conditioning) == 0 and stage.calls == 0
    longer = pipeline_configs.with_overrides(config, ["train.max_steps=31"])
    assert run_cli(Stage(), longer, trained, encoded=encoded) == 0  # trained again: a new model
    assert run_cli(stage, config, evaluated, "evaluate", trained=trained, conditioning=conditioning) == 0 and stage.calls == 1


def test_the_kfp_task_of_a_finished_stage_starts_no_interpreter(tmp_path, config, monkeypatch):
    config = pipeline_configs.with_overrides(config, [f"storage.root={tmp_path}"])
    encoded = dataset(str(tmp_path / "encoded"), 4)
    assert run_cli(Stage(), config, str(tmp_path / "run1" / "controlnet_train"), encoded=encoded) == 0

    def no_interpreter(*args, **kwargs):
        raise AssertionError("the stage's interpreter was started")

    monkeypatch.setattr(kfp_bridge, "run_stage", no_interpreter)
    artifact = types.SimpleNamespace(name="encoded", metadata={"dataset_uri": encoded})
    output = types.SimpleNamespace(metadata={}, path=str(tmp_path / "artifact.json"))
    summary = registry.run_component("controlnet_train", config.to_json(), "run1", {"encoded": artifact}, output)
    assert summary["steps"] == config.train.max_steps and output.metadata["config_hash"] == summary["config_hash"]
    # another config: the stage runs (here: the stand-in refuses, proving it was asked)
    with pytest.raises(AssertionError, match="interpreter was started"):
        registry.run_component("controlnet_train", pipeline_configs.with_overrides(config, ["train.seed=1"]).to_json(),
                                 "run1", {"encoded": artifact}, output)
