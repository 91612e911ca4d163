"""The Kubernetes Deployment + Service that host an index built by `python pipeline.py index`, from the config:
the vision family's image (faiss, and the CLIP text model for text queries), the index copied from index.output to
a volume of the pod (memory mapping needs a local file) and served memory-mapped, a readiness probe on
`GET /indices-list` (the server listens only once its index is loaded), resources from index.serve_resources.

    python pipeline.py serve-index --manifest [--preset production]        # print it
    python pipeline.py serve-index --apply                                 # kubectl apply -f - it
"""
from __future__ import annotations

from cnpipe.kfp_images import image_ref

APP_LABEL = "app.kubernetes.io/name"
PORT_NAME = "http"
MOUNT = "/index"


def service_url(config) -> str:
    """The URL of the service's /knn-service inside the cluster (what retrieval.service_url should say)."""
    cfg = config.index
    return f"http://{cfg.service_name}.{cfg.namespace}.svc.cluster.local:{cfg.port}/knn-service"


def text_model(config) -> str:
    """The CLIP model that embeds text queries: index.clip_model, else the one clip_embed uses (the index's vectors
    and the queries must come from the same model)."""
    return config.index.clip_model or config.clip_embed.model


def _resources(res) -> dict:
    return {"requests": {"cpu": res.cpu, "memory": res.memory},
            "limits": {"cpu": res.cpu_limit or res.cpu, "memory": res.memory_limit or res.memory}}


def objects(config) -> list[dict]:
    """[Namespace, Deployment, Service] as plain dicts."""
    cfg, kf = config.index, config.kubeflow
    if not cfg.output:
        raise ValueError("index.output is empty: the manifest serves the index folder that `pipeline.py index` wrote there")
    name = cfg.service_name
    labels = {APP_LABEL: name, "app.kubernetes.io/part-of": "controlnet-pipeline"}
    command = ["/opt/family/bin/python", "-m", "components.knn_index.serve",
               "--index", f"{config.retrieval.indice_name}={cfg.output}", "--local-dir", MOUNT,
               "--host", "0.0.0.0", "--allow-public-bind", "--port", str(cfg.port), "--threads", str(cfg.search_threads)]
    clip_model = text_model(config)
    if clip_model:
        command += ["--clip-model", clip_model]
    probe = {"httpGet": {"path": "/indices-list", "port": PORT_NAME}}
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    for secret in kf.secrets:  # a Hub token, when the text model comes from the Hub
        if secret.env == "HF_TOKEN" and clip_model and not clip_model.startswith("/"):
            env.append({"name": secret.env, "valueFrom": {"secretKeyRef": {
                "name": secret.secret_name, "key": secret.key, "optional": True}}})
    volume: dict = {"name": "index"}
    claim = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": cfg.disk}}}
    if cfg.storage_class:
        claim["storageClassName"] = cfg.storage_class
    volume["ephemeral"] = {"volumeClaimTemplate": {"metadata": {"labels": labels}, "spec": claim}}
    pod: dict = {
        "securityContext": {"runAsUser": 10001, "runAsNonRoot": True, "fsGroup": 10001},
        "containers": [{
            "name": "knn-index",
            "image": image_ref(config.images, "vision"),
            "imagePullPolicy": kf.image_pull_policy or "IfNotPresent",
            "command": command,
            "ports": [{"name": PORT_NAME, "containerPort": cfg.port}],
            "env": env,
            "resources": _resources(cfg.serve_resources),
            # copying a large index from the bucket takes minutes: the start-up probe waits up to an hour
            "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 360},
            "readinessProbe": {**probe, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
            "livenessProbe": {**probe, "periodSeconds": 30, "timeoutSeconds": 10, "failureThreshold": 5},
            "volumeMounts": [{"name": "index", "mountPath": MOUNT}],
        }],
        "volumes": [volume],
    }
    if kf.service_account:
        pod["serviceAccountName"] = kf.service_account  # reads index.output (Workload Identity on GKE)
    if kf.image_pull_secret:
        pod["imagePullSecrets"] = [{"name": kf.image_pull_secret}]
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": cfg.namespace, "labels": labels},
        "spec": {"replicas": cfg.replicas, "selector": {"matchLabels": {APP_LABEL: name}},
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": cfg.namespace, "labels": labels},
        "spec": {"selector": {APP_LABEL: name}, "ports": [{"name": PORT_NAME, "port": cfg.port, "targetPort": PORT_NAME}]},
    }
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cfg.namespace}}
    return ([namespace] if cfg.namespace != "default" else []) + [deployment, service]


def render(config) -> str:
    import yaml

    header = (f"# kNN index {config.retrieval.indice_name} from {config.index.output}, served memory-mapped with "
              f"clip-retrieval's API at {service_url(config)}\n")
    return header + yaml.safe_dump_all(objects(config), sort_keys=False)
