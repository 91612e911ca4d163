"""The one place that names the stages: their module and the image family whose environment runs them.

A family is one locked environment (envs/<family>.lock.txt) and, in production, one image.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # run as `python -m <module>` in the family's interpreter
    family: str
    output_dir: str = ""  # under <root>/<run id>/; default: the stage's name
    # "module:function" that checks this stage's settings from the config alone; importable in any family
    # (no model libraries at import), so the driver runs every stage's check before the first task starts.
    settings_check: str = ""
    # "module:function" that may run a task elsewhere (multi-host training's JobSet); cnpipe.kfp_bridge calls it
    # first and runs the stage itself when it returns None.
    launcher: str = ""


STAGES = {
    s.name: s
    for s in [
        StageSpec("hub_load", "components.hub_load", "core", settings_check="components.hub_load.stage:check_settings"),
        StageSpec("clip_embed", "components.clip_embed", "vision"),
        StageSpec("laion_retrieval", "components.laion_retrieval", "core",
                  settings_check="components.laion_retrieval.stage:check_settings"),
        StageSpec("download", "components.download", "download", settings_check="components.download.stage:check_settings"),
        StageSpec("blip_caption", "components.blip_caption", "vision"),
        # curate (components/curate): keys per shard, one global dedup pass, then the filtered dataset. Dropped from
        # the pipeline by curate.enabled = false (conditioning then reads blip_caption's output).
        StageSpec("curate_keys", "components.curate.keys", "vision", output_dir="curate/keys",
                  settings_check="components.curate.settings:check_settings"),
        StageSpec("curate_dedup", "components.curate.dedup", "vision", output_dir="curate/dedup"),
        StageSpec("curate", "components.curate", "core"),
        StageSpec("conditioning", "components.conditioning", "conditioning",
                  settings_check="components.conditioning.stage:check_settings"),
        # When conditioning types span families, each family's task writes its types; this lists them all.
        StageSpec("conditioning_merge", "components.conditioning.merge", "core", output_dir="conditioning"),
        StageSpec("report", "components.report", "core"),
        StageSpec("encode", "components.encode", "vision", settings_check="components.encode.inputs:check_settings"),
        StageSpec("controlnet_train", "components.controlnet_train", "train",
                  settings_check="components.controlnet_train.checks:check_config",
                  launcher="components.controlnet_train.multihost:launch"),
        StageSpec("evaluate", "components.evaluate", "vision", settings_check="components.evaluate.stage:check_settings"),
    ]
}

# index: autofaiss's environment (it pins numpy<2), for the kNN index build (`pipeline.py index`, its own kfp
# pipeline: components/knn_index/component.py); no stage of the data/training pipeline runs in it.
FAMILIES = ("core", "vision", "download", "conditioning", "train", "index")


def run_component(stage: str, *args, **kwargs) -> dict:
    """A kfp component's body: run `stage` as one task (cnpipe.kfp_bridge), with what this registry knows of it."""
    from cnpipe import kfp_bridge

    return kfp_bridge.run_component(STAGES[stage], *args, **kwargs)


def run_stage(stage: str, *args, **kwargs):
    """Run `stage` in its family's interpreter (cnpipe.families.run_stage) and return what it left."""
    from cnpipe import families

    return families.run_stage(STAGES[stage], *args, **kwargs)


def stage_command(stage: str, *args, **kwargs) -> list[str]:
    """The command line that runs `stage` in its family's interpreter (cnpipe.families.stage_command)."""
    from cnpipe import families

    return families.stage_command(STAGES[stage], *args, **kwargs)


def check_settings(config) -> None:
    """Every stage's settings check, before any task runs: a bad value fails the run (or compile, or submit)
    at once, naming its field, instead of when its stage is reached hours later. All problems at once."""
    import importlib

    from pipeline_configs import ConfigError

    problems = []
    for spec in STAGES.values():
        if spec.settings_check:
            module, _, function = spec.settings_check.partition(":")
            try:
                getattr(importlib.import_module(module), function)(config)
            except ValueError as err:  # ConfigError and the train checks' TrainInputError
                if not any(p.endswith(f": {err}") for p in problems):  # evaluate repeats encode's check
                    problems.append(f"{spec.name}: {err}")
    wanted, made = config.encode.conditioning_type, list(config.conditioning.types)
    if made and wanted not in made:  # in the DAG, encode and evaluate read what conditioning made
        problems.append(f"encode: encode.conditioning_type={wanted!r} is not among conditioning.types {made}")
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else "\n  " + "\n  ".join(problems))


# Conditioning types: name -> (class "module:Class" following components/conditioning/contract.py, the
# image family whose environment has its libraries). A new type is a new folder and one line here;
# configs pick types by name (conditioning.types), and each family's types run in that family's task.
CONDITIONERS = {
    "canny": ("components.conditioning.canny:CannyConditioner", "conditioning"),
    "pose": ("components.conditioning.pose:PoseConditioner", "conditioning"),
    "depth": ("components.depth.conditioner:DepthConditioner", "vision"),
}


def _conditioner(name: str) -> tuple[str, str]:
    if name not in CONDITIONERS:
        raise ValueError(f"unknown conditioning type {name!r}; registered: {', '.join(sorted(CONDITIONERS))}")
    return CONDITIONERS[name]


def conditioner_class(name: str):
    import importlib

    module, _, cls = _conditioner(name)[0].partition(":")
    return getattr(importlib.import_module(module), cls)


def conditioner_family(name: str) -> str:
    return _conditioner(name)[1]


def conditioning_groups(types: list[str]) -> dict[str, list[str]]:
    """family -> the configured types it makes, in config order."""
    groups: dict[str, list[str]] = {}
    for name in types:
        groups.setdefault(conditioner_family(name), []).append(name)
    return groups


# Which secrets a stage's task reads: stage knowledge, here beside the stages, used for the kfp tasks
# (orchestration.kfp_tasks) and for the pods of a multi-host training JobSet (components/controlnet_train/multihost.py).
HUB_CONDITIONERS = {"depth"}  # conditioning types that load a model (from the Hub unless a local folder)

# Variables a listed stage reads only under some settings: (env, stage) -> whether this config (and the task's
# family, for conditioning) makes it read them. A pod that gets a secret it never reads can only fail to start.
_USED_WHEN = {
    ("HF_TOKEN", "hub_load"): lambda config, family: config.hub_load.kind == "hf" or config.hub_load.source.startswith("hf://"),
    ("HF_TOKEN", "conditioning"): lambda config, family: bool(
        HUB_CONDITIONERS & set(conditioning_groups(config.conditioning.types).get(family, config.conditioning.types))),
    ("WANDB_API_KEY", "controlnet_train"): lambda config, family: bool(config.train.wandb_project),
}


def secrets_for(stage: str, config, family: str = "") -> list:
    """The secrets (kubeflow.secrets) a task of `stage` uses: those listing it (or listing no stage), less the ones
    this config makes it not read (no W&B without train.wandb_project, no Hub token for a folder of seeds)."""
    used = []
    for secret in config.kubeflow.secrets:
        when = _USED_WHEN.get((secret.env, stage))
        if (not secret.stages or stage in secret.stages) and (when is None or when(config, family)):
            used.append(secret)
    return used
