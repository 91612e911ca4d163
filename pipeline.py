"""The ControlNet pipeline: the kfp DAG and its command line.

    python pipeline.py                      # = run: the embedded default, on this machine, through kfp.local
    python pipeline.py run --run-id R       # resume run R: finished shards and stages are not redone
    python pipeline.py run --set train.max_steps=50 --preset embedded
    python pipeline.py compile -o pipeline.yaml [--preset production]
    python pipeline.py submit --host https://kfp.example.com [--experiment E] [--namespace NS] [--run-name N]
    python pipeline.py index [--preset embedded-own-index] [--set index.source=... --set index.output=...]
    python pipeline.py serve-index [--manifest | --apply]   # serve index.output (clip-retrieval's API), or its k8s manifest

Stages hand each other dataset URIs only; every stage runs in its image family's environment
(.venvs/<family> here, the family's image on Kubeflow).
"""

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent


def _ensure_driver_environment() -> None:
    """`python pipeline.py` from any Python: set up the family environments once, then re-run in the core one."""
    core = REPO / ".venvs" / "core" / "bin" / "python"
    if pathlib.Path(sys.prefix).resolve() == (REPO / ".venvs" / "core").resolve():
        return
    try:
        import kfp  # noqa: F401  (already in an environment that has kfp: e.g. a family image)

        return
    except ImportError:
        pass
    import subprocess

    subprocess.run(["bash", str(REPO / "scripts" / "setup_envs.sh")], check=True)
    os.execv(str(core), [str(core), *sys.argv])


if __name__ == "__main__":
    _ensure_driver_environment()

from kfp import dsl  # noqa: E402

import pipeline_configs  # noqa: E402
from orchestration.kfp_tasks import configure  # noqa: E402
from components.blip_caption.component import blip_caption  # noqa: E402
from components.clip_embed.component import clip_embed  # noqa: E402
from components.conditioning.component import conditioning  # noqa: E402
from components.conditioning.merge_component import conditioning_merge  # noqa: E402
from components.controlnet_train.component import controlnet_train  # noqa: E402
from components.curate.component import curate, curate_dedup, curate_keys  # noqa: E402
from components.download.component import download  # noqa: E402
from components.encode.component import encode  # noqa: E402
from components.evaluate.component import evaluate  # noqa: E402
from components.hub_load.component import hub_load  # noqa: E402
from components.laion_retrieval.component import laion_retrieval  # noqa: E402
from components.registry import check_settings, conditioning_groups  # noqa: E402
from components.report.component import report  # noqa: E402


def build(config: pipeline_configs.PipelineConfig):
    """The pipeline for `config`: its JSON is the default of the `config_json` parameter, and every task
    runs in the image of its stage's family with the resources the config gives it (orchestration.kfp_tasks)."""

    def on_image(task, stage: str, family: str = ""):
        return configure(task, stage, config, family)

    def per_image(component, stage: str, common: dict, family: str = "", **inputs):
        """A per-image stage: shard groups in parallel tasks, then one task that writes the manifest."""
        extra = {"family": family} if family else {}
        groups = config.shard_groups
        if groups <= 1:
            return on_image(component(**common, **inputs, **extra), stage, family)
        with dsl.ParallelFor(items=list(range(groups)), parallelism=groups) as group:
            part = on_image(component(**common, **inputs, **extra, part=group, parts=groups), stage, family)
        return on_image(component(**common, **inputs, **extra), stage, family).after(part)

    def conditioning_stage(common: dict, images):
        """One task per image family among the configured conditioning types (registry.CONDITIONERS)."""
        groups = conditioning_groups(config.conditioning.types)
        finals = [per_image(conditioning, "conditioning", common, family=family, images=images) for family in groups]
        if len(finals) == 1:
            return finals[0]
        return on_image(conditioning_merge(**common), "conditioning_merge").after(*finals)

    def curate_stage(common: dict, images, embeddings) -> dict:
        """Keys per shard (shard groups), one global dedup pass, the filtered dataset per shard (shard groups);
        none of it when curate.enabled is false (conditioning then reads the captioned images)."""
        if not config.curate.enabled:
            return {}
        keys = per_image(curate_keys, "curate_keys", common, images=images, embeddings=embeddings)
        dedup = on_image(curate_dedup(**common, keys=keys.output), "curate_dedup")
        curated = per_image(curate, "curate", common, images=images, keys=keys.output, dedup=dedup.output)
        return {"curate_keys": keys.output, "curate_dedup": dedup.output, "curate": curated.output}

    @dsl.pipeline(name=f"controlnet-{config.name}", description="Raw images to a trained ControlNet.",
                  pipeline_root=config.kubeflow.pipeline_root or None)
    def controlnet_pipeline(config_json: str = config.to_json(), run_id: str = "run"):
        common = {"config_json": config_json, "run_id": run_id}
        seeds = on_image(hub_load(**common), "hub_load")
        embedded = per_image(clip_embed, "clip_embed", common, seeds=seeds.output)
        retrieved = on_image(laion_retrieval(**common, seeds=embedded.output), "laion_retrieval")
        images = per_image(download, "download", common, retrieved=retrieved.output, seeds=embedded.output)
        captioned = per_image(blip_caption, "blip_caption", common, images=images.output)
        curated = curate_stage(common, captioned.output, embedded.output)
        controls = conditioning_stage(common, curated.get("curate", captioned.output))
        encoded = per_image(encode, "encode", common, conditioning=controls.output)
        trained = on_image(controlnet_train(**common, encoded=encoded.output), "controlnet_train")
        evaluated = on_image(evaluate(**common, trained=trained.output, conditioning=controls.output), "evaluate")
        on_image(
            report(
                **common, hub_load=seeds.output, clip_embed=embedded.output, laion_retrieval=retrieved.output,
                download=images.output, blip_caption=captioned.output, conditioning=controls.output,
                encode=encoded.output, controlnet_train=trained.output, evaluate=evaluated.outputs["output"], **curated,
            ),
            "report",
        )

    return controlnet_pipeline


def load_config(args) -> pipeline_configs.PipelineConfig:
    config = pipeline_configs.preset(args.preset)
    if args.config:
        config = pipeline_configs.from_json(pathlib.Path(args.config).read_text())
    config = pipeline_configs.with_overrides(config, args.set or [])
    check_settings(config)
    return _credentials_out_of_config(config, args.command)


def _credentials_out_of_config(config: pipeline_configs.PipelineConfig, command: str) -> pipeline_configs.PipelineConfig:
    """The config becomes the pipeline's `config_json` parameter (the YAML, the pod spec, every task's command
    line): user:password in retrieval.service_url leaves it and reaches the tasks as an environment variable."""
    from cnpipe.redact import CREDENTIALS_ENV, config_without_credentials

    config, credentials = config_without_credentials(config)
    if credentials and command == "run":  # kfp.local's tasks are this process's children: they inherit it
        os.environ[CREDENTIALS_ENV] = credentials
    elif credentials:
        mapped = [s for s in config.kubeflow.secrets if s.env == CREDENTIALS_ENV]
        where = (f"kubeflow.secrets maps it from secret {mapped[0].secret_name!r} key {mapped[0].key!r}" if mapped else
                 f"add a kubeflow.secrets entry with env {CREDENTIALS_ENV} for a Kubernetes secret key holding user:password")
        print(f"note: the credentials in retrieval.service_url were left out of the pipeline; its retrieval task reads "
              f"them from ${CREDENTIALS_ENV}: {where}", file=sys.stderr)
    return config


def cmd_run(args) -> int:
    from orchestration import local_run

    return local_run.run(load_config(args), build, run_id=args.run_id)


def cmd_compile(args) -> int:
    from kfp import compiler

    config = load_config(args)
    compiler.Compiler().compile(build(config), package_path=args.output)
    print(f"wrote {args.output} (preset {config.name})")
    return 0


def cmd_submit(args) -> int:
    import datetime

    from orchestration import submit

    config = load_config(args)
    try:
        host = submit.resolve_host(args.host, config.kubeflow_host)
        run_id = args.run_id or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        remote_id, client = submit.submit(
            build(config), config, host, args.experiment, args.namespace, args.run_name or f"{config.name}-{run_id}",
            run_id, None if args.caching == "default" else args.caching == "on",
        )
    except submit.SubmitError as err:
        print(f"submit: {err}", file=sys.stderr)
        return 1
    print(f"submitted run {remote_id} (run id {run_id}, preset {config.name}) to {host}")
    print(f"run: {submit.run_url(host, remote_id)}", flush=True)
    if not args.wait:
        return 0
    try:
        state = submit.follow(client, host, remote_id, poll_s=args.poll_interval)
    except submit.SubmitError as err:
        print(f"submit: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nstopped following run {remote_id}; it goes on in Kubeflow: {submit.run_url(host, remote_id)}",
              file=sys.stderr)
        return 130
    return 0 if state == submit.SUCCEEDED else 1


def cmd_index(args) -> int:
    """Build index.source into index.output with autofaiss (components/knn_index), here or as a kfp pipeline."""
    from components.knn_index import driver

    config = load_config(args)
    if args.compile:
        driver.compile_pipeline(config, args.compile)
        print(f"wrote {args.compile}: the index build as a Kubeflow pipeline (preset {config.name}, image of family index)")
        return 0
    return driver.build(config, force=args.force)


def cmd_serve_index(args) -> int:
    """Serve index.output with clip-retrieval's API on this machine, or print / apply its Kubernetes manifest."""
    from components.knn_index import driver, manifest

    config = load_config(args)
    if args.manifest:
        print(manifest.render(config), end="")
        return 0
    return driver.apply(config) if args.apply else driver.serve(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")

    def with_config(p, default_preset):
        p.add_argument("--preset", default=default_preset, choices=sorted(pipeline_configs.PRESETS))
        p.add_argument("--config", help="a JSON file holding a whole PipelineConfig (instead of a preset)")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config field")
        return p

    run = with_config(commands.add_parser("run", help="run on this machine through kfp.local (default)"), "embedded")
    run.add_argument("--run-id", help="resume this run, or name a new one (default: a timestamp)")
    run.set_defaults(func=cmd_run)
    comp = with_config(commands.add_parser("compile", help="write the Kubeflow Pipelines YAML"), "production")
    comp.add_argument("-o", "--output", default="pipeline.yaml")
    comp.set_defaults(func=cmd_compile)
    sub = with_config(commands.add_parser("submit", help="compile and submit to a Kubeflow Pipelines host"), "production")
    sub.add_argument("--host", help="KFP API endpoint (default: $KF_PIPELINES_ENDPOINT, then the config's kubeflow_host)")
    sub.add_argument("--experiment", default="controlnet")
    sub.add_argument("--namespace", help="Kubeflow profile namespace (multi-user deployments)")
    sub.add_argument("--run-name")
    sub.add_argument("--run-id", help="names the run's folder under storage.root (default: a timestamp)")
    sub.add_argument("--caching", choices=["default", "on", "off"], default="default", help="task caching for this run")
    sub.add_argument("--wait", action="store_true",
                     help="follow the run: each task's state as it changes, then the run's; exit 1 unless it succeeds")
    sub.add_argument("--poll-interval", type=float, default=15.0, metavar="S", help="seconds between reads with --wait")
    sub.set_defaults(func=cmd_submit)
    idx = with_config(commands.add_parser("index", help="build a kNN index with autofaiss (index.source -> index.output)"),
                      "embedded-own-index")
    idx.add_argument("--force", action="store_true", help="rebuild even if index.output holds this index")
    idx.add_argument("--compile", metavar="YAML", help="write the build as a Kubeflow pipeline instead of running it here")
    idx.set_defaults(func=cmd_index)
    srv = with_config(commands.add_parser("serve-index", help="serve index.output with clip-retrieval's API (or its k8s manifest)"),
                      "embedded-own-index")
    srv.add_argument("--manifest", action="store_true", help="print the Kubernetes Deployment + Service instead")
    srv.add_argument("--apply", action="store_true", help="kubectl apply the manifest")
    srv.set_defaults(func=cmd_serve_index)
    args = parser.parse_args(argv if argv is not None else (sys.argv[1:] or ["run"]))
    try:
        return args.func(args)
    except pipeline_configs.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
