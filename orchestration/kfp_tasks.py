"""How each task runs on Kubernetes: its family's image, resources, accelerators and node selectors,
tolerations, secrets as environment, retries. All from the config; kfp.local ignores the Kubernetes parts."""
from __future__ import annotations

from cnpipe.kfp_images import image_ref
from components.registry import STAGES, secrets_for

GKE_GPU = "cloud.google.com/gke-accelerator"
GKE_TPU = "cloud.google.com/gke-tpu-accelerator"
GKE_TPU_TOPOLOGY = "cloud.google.com/gke-tpu-topology"


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
