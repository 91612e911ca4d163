"""Configs are strict: unknown keys and wrong types fail before any work, naming the field; presets
survive JSON; a section's hash moves with that section only (it decides which shards a rerun reuses)."""
from __future__ import annotations

import dataclasses
import json
import subprocess

import pytest

import pipeline_configs
from cnpipe import cli as stage_cli
from pipeline_configs import ConfigError, PipelineConfig

SECTIONS = [name for name, value in PipelineConfig().to_dict().items() if isinstance(value, dict)]


def test_sections_are_the_stage_settings():
    assert {"hub_load", "clip_embed", "retrieval", "download", "caption", "conditioning", "report"} <= set(SECTIONS)
    assert all(isinstance(v, dict) for k, v in PipelineConfig().to_dict().items() if k in SECTIONS)


@pytest.mark.parametrize(
    "data, field",
    [
        ({"hub_laod": {}}, "hub_laod"),
        ({"hub_load": {"max_rowz": 3}}, "hub_load.max_rowz"),
        ({"retrieval": {"prompts": ["a"], "num_imgs": 4}}, "retrieval.num_imgs"),
        ({"download": {"allowed_network": ["127.0.0.0/8"]}}, "download.allowed_network"),
    ],
)
def test_unknown_key_names_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        pipeline_configs.from_dict(data)
    assert f"'{field}'" in str(err.value)
    assert "valid keys" in str(err.value)


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("download.threads=4", "download.thread_count"),
        ("downlod.thread_count=4", "downlod"),
        ("hub_load.rows_per_shrd=8", "hub_load.rows_per_shard"),
        ("train.max_step=8", "train.max_steps"),
    ],
)
def test_an_unknown_key_gets_the_nearest_valid_one(override, suggestion):
    with pytest.raises(ConfigError) as err:
        pipeline_configs.with_overrides(pipeline_configs.embedded("/assets"), [override])
    expected = "did you mean 'download'" if suggestion == "downlod" else f"did you mean '{suggestion}'"
    assert expected in str(err.value)


def test_a_key_close_to_nothing_gets_no_suggestion():
    with pytest.raises(ConfigError) as err:
        pipeline_configs.with_overrides(pipeline_configs.embedded("/assets"), ["download.zq=1"])
    assert "did you mean" not in str(err.value) and "valid keys of download" in str(err.value)


@pytest.mark.parametrize(
    "data, field",
    [
        ({"hub_load": {"rows_per_shard": "8"}}, "hub_load.rows_per_shard"),
        ({"hub_load": {"max_rows": True}}, "hub_load.max_rows"),  # a bool is not an int here
        ({"hub_load": {"streaming": "yes"}}, "hub_load.streaming"),
        ({"retrieval": {"prompts": "a cat"}}, "retrieval.prompts"),
        ({"retrieval": {"prompts": ["a cat", 3]}}, "retrieval.prompts[1]"),
        ({"retrieval": {"min_similarity": "0.2"}}, "retrieval.min_similarity"),
        ({"conditioning": {"types": [None]}}, "conditioning.types[0]"),
        ({"hub_load": 3}, "hub_load"),
        ({"name": 7}, "name"),
    ],
)
def test_wrong_type_names_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        pipeline_configs.from_dict(data)
    assert f"'{field}'" in str(err.value)


def test_an_int_is_accepted_where_a_float_is_expected_and_stored_as_float():
    config = pipeline_configs.from_dict({"retrieval": {"min_similarity": 1}})
    assert config.retrieval.min_similarity == 1.0 and isinstance(config.retrieval.min_similarity, float)


def test_missing_keys_take_their_defaults():
    config = pipeline_configs.from_dict({"hub_load": {"source": "x"}})
    assert config.hub_load.source == "x"
    assert config.hub_load.rows_per_shard == pipeline_configs.HubLoadConfig().rows_per_shard
    assert config.download == pipeline_configs.DownloadConfig()


def test_overrides_parse_json_values_and_keep_strings():
    base = pipeline_configs.embedded("/assets")
    config = pipeline_configs.with_overrides(
        base, ["hub_load.max_rows=5", 'retrieval.prompts=["a dog", "a cat"]', "hub_load.source=gs://bucket/seeds",
               "download.allow_file_urls=true", "retrieval.min_similarity=0.25"],
    )
    assert config.hub_load.max_rows == 5
    assert config.retrieval.prompts == ["a dog", "a cat"]
    assert config.hub_load.source == "gs://bucket/seeds"
    assert config.download.allow_file_urls is True
    assert config.retrieval.min_similarity == 0.25
    # everything not overridden is the base's, and the base is untouched
    assert config.clip_embed == base.clip_embed
    assert base.hub_load.max_rows == 0


@pytest.mark.parametrize(
    "override, needle",
    [
        ("hub_load.max_rowz=5", "hub_load.max_rowz"),
        ("hub_laod.max_rows=5", "hub_laod.max_rows"),
        ("hub_load.max_rows.deeper=5", "hub_load.max_rows.deeper"),
        ("hub_load.max_rows=five", "hub_load.max_rows"),  # not JSON: taken as a string, then refused as not an int
        ("hub_load.max_rows", "section.key=value"),
    ],
)
def test_bad_overrides_are_refused(override, needle):
    with pytest.raises(ConfigError) as err:
        pipeline_configs.with_overrides(pipeline_configs.embedded(), [override])
    assert needle in str(err.value)


@pytest.mark.parametrize("name", sorted(pipeline_configs.PRESETS))
def test_every_preset_round_trips_through_json(name):
    config = pipeline_configs.preset(name)
    text = config.to_json()
    again = pipeline_configs.from_json(text)
    assert again == config
    assert again.to_json() == text
    assert json.loads(text)["name"] == config.name


def test_unknown_preset_is_refused():
    with pytest.raises(ConfigError, match="unknown preset 'prod'"):
        pipeline_configs.preset("prod")


def _changed(value):
    """Another value of the same type (and element type, for lists)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, list):
        return value[:-1] if value else ["changed"]
    if isinstance(value, dict):  # a nested section: change its first field
        first = next(iter(value))
        return {**value, first: _changed(value[first])}
    raise AssertionError(f"no change rule for {value!r}")


@pytest.mark.parametrize("section", SECTIONS)
def test_section_hash_changes_only_with_its_section(section):
    base = pipeline_configs.embedded("/assets")
    hashes = {s: base.section_hash(s) for s in SECTIONS}
    data = base.to_dict()
    knobs = throughput_knobs(section)
    for key, value in data[section].items():  # every field of the section but its throughput knobs moves its hash
        changed = json.loads(json.dumps(data))
        changed[section][key] = _changed(value)
        other = pipeline_configs.from_dict(changed)
        if key in knobs:
            assert other.section_hash(section) == hashes[section], f"{section}.{key} is a throughput knob but changes the hash"
        else:
            assert other.section_hash(section) != hashes[section], f"{section}.{key} does not change its hash"
        assert {s: other.section_hash(s) for s in SECTIONS if s != section} == {
            s: h for s, h in hashes.items() if s != section
        }, f"{section}.{key} changed another section's hash"
    assert pipeline_configs.from_json(base.to_json()).section_hash(section) == hashes[section]


def throughput_knobs(section: str) -> set[str]:
    config = pipeline_configs.PipelineConfig()
    return {f.name for f in dataclasses.fields(getattr(config, section)) if f.metadata.get("throughput")}


def test_throughput_knobs_are_the_ones_that_only_change_speed():
    """A resume after lowering download.batch_rows or thread_count must not be refused; what a row becomes must be."""
    assert {"batch_rows", "thread_count", "processes_count", "distributor", "timeout_s", "retries"} <= throughput_knobs("download")
    assert {"image_size", "min_image_size", "encode_format", "max_body_bytes", "allowed_networks"}.isdisjoint(throughput_knobs("download"))
    assert {"batch_size", "device"} <= throughput_knobs("clip_embed") & throughput_knobs("caption") & throughput_knobs("encode")
    assert "workers" in throughput_knobs("conditioning") and "model" not in throughput_knobs("caption")


def test_section_hash_ignores_the_run_name():
    a, b = pipeline_configs.embedded("/assets"), pipeline_configs.embedded("/assets")
    b.name = "another-run"
    assert all(a.section_hash(s) == b.section_hash(s) for s in SECTIONS)


def test_cli_refuses_a_bad_config_before_running_the_stage(tmp_path, capsys):
    called = []
    code = stage_cli.main(
        "hub_load", lambda *args: called.append(args),
        ["--config-json", json.dumps({"hub_load": {"source": str(tmp_path), "sourse": "x"}}), "--output", str(tmp_path / "out")],
    )
    assert code == 2
    assert called == []
    assert "hub_load.sourse" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "hub_load, top, field",
    [
        ({"sourse": "seeds"}, {}, "hub_load.sourse"),
        ({"rows_per_shard": "4"}, {}, "hub_load.rows_per_shard"),
        ({}, {"hub_loader": {}}, "hub_loader"),
    ],
)
def test_hub_load_module_exits_2_naming_the_field_before_any_work(tmp_path, images, cli, hub_load, top, field):
    argv, env = cli
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "a.jpg").write_bytes(images.jpeg())
    data = {"hub_load": {"kind": "folder", "source": str(seeds), **hub_load}, **top}
    out = tmp_path / "out"
    done = subprocess.run(argv("hub_load", json.dumps(data), str(out)), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"'{field}'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "override, field",
    [
        ("hub_load.kind=parquet", "hub_load.kind"),
        ("hub_load.rows_per_shard=0", "hub_load.rows_per_shard"),
        ("download.distributor=dask", "download.distributor"),
        ("download.thread_count=0", "download.thread_count"),
        ('download.allowed_networks=["10.0.0.0/33"]', "download.allowed_networks"),
        ('conditioning.types=["canny","edges"]', "conditioning.types"),
        ("conditioning.caption_source=alt_text", "conditioning.caption_source"),
        ("encode.caption_source=alt_text", "encode.caption_source"),
        ("encode.holdout_fraction=1.5", "encode.holdout_fraction"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.lr_schedule=step", "train.lr_schedule"),
        ("evaluate.num_samples=0", "evaluate.num_samples"),
        ("encode.conditioning_type=pose", "encode.conditioning_type"),
    ],
)
def test_every_stage_settings_check_names_the_field(override, field):
    from components.registry import check_settings

    canny_only = 'conditioning.types=["canny"]'
    config = pipeline_configs.with_overrides(pipeline_configs.embedded("/assets"), [canny_only, override])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_settings(config)


@pytest.mark.parametrize("name", sorted(pipeline_configs.PRESETS))
def test_every_preset_passes_every_stage_settings_check(name):
    from components.registry import check_settings

    check_settings(pipeline_configs.preset(name))


@pytest.mark.parametrize("command", [["run", "--run-id", "bad"], ["compile", "-o", "never.yaml"]])
def test_driver_refuses_bad_settings_of_later_stages_before_any_task(tmp_path, command):
    """A value that only encode, download or training would trip on fails the whole run at once (not after the
    stages before it have run for hours), every problem listed with its field, and nothing is written."""
    import pathlib
    import sys

    repo = pathlib.Path(__file__).resolve().parents[2]
    argv = [sys.executable, "pipeline.py", *command, "--set", f"storage.root={tmp_path}", "--set", "encode.resolution=60",
            "--set", "download.thread_count=0", "--set", 'conditioning.types=["canny","edges"]']
    done = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    for field in ("encode.resolution", "download.thread_count", "'edges'"):
        assert field in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == [] and not (repo / "never.yaml").exists()
