"""How each task runs on Kubernetes: its family's image, resources, accelerators and node selectors,
tolerations, secrets as environment, retries. All from the config; kfp.local ignores the Kubernetes parts."""
from __future__ import annotations

from cnpipe.kfp_images import image_ref
from components.registry import STAGES, conditioning_groups

GKE_GPU = "cloud.google.com/gke-accelerator"
GKE_TPU = "cloud.google.com/gke-tpu-accelerator"
GKE_TPU_TOPOLOGY = "cloud.google.com/gke-tpu-topology"
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


def configure(task, stage: str, config, family: str = ""):
    """Apply everything the config says about running `stage` (in `family`'s image when given) to its task."""
    from kfp import kubernetes

    kf = config.kubeflow
    res = getattr(kf.resources, stage, None) or kf.resources.report  # small helper tasks: the smallest pod
    task.set_container_image(image_ref(config.images, family or STAGES[stage].family))
    task.set_display_name(stage.replace("_", " "))
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu_limit or res.cpu)
    task.set_memory_request(res.memory).set_memory_limit(res.memory_limit or res.memory)
    if res.accelerator and res.accelerator_count:
        task.set_accelerator_type(res.accelerator).set_accelerator_limit(res.accelerator_count)
        if res.accelerator == "google.com/tpu":
            if not (res.tpu_type and res.tpu_topology):
                raise ValueError(f"kubeflow.resources.{stage}: a TPU needs tpu_type and tpu_topology (GKE node selectors)")
            kubernetes.add_node_selector(task, GKE_TPU, res.tpu_type)
            kubernetes.add_node_selector(task, GKE_TPU_TOPOLOGY, res.tpu_topology)
        elif res.gpu_type:
            kubernetes.add_node_selector(task, GKE_GPU, res.gpu_type)
        for toleration in kf.tolerations:
            if toleration.key == res.accelerator:
                kubernetes.add_toleration(task, key=toleration.key, operator=toleration.operator,
                                          value=toleration.value or None, effect=toleration.effect)
    if res.retries:
        task.set_retry(num_retries=res.retries, backoff_duration=res.retry_backoff, backoff_factor=2.0)
    for secret in secrets_for(stage, config, family):
        kubernetes.use_secret_as_env(task, secret_name=secret.secret_name, secret_key_to_env={secret.key: secret.env},
                                     optional=secret.optional)
    if kf.image_pull_secret:
        kubernetes.set_image_pull_secrets(task, [kf.image_pull_secret])
    if kf.image_pull_policy:
        kubernetes.set_image_pull_policy(task, kf.image_pull_policy)
    return task
