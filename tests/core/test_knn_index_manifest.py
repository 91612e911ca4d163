"""Issue 16: hosting your own index. The Kubernetes manifest `pipeline.py serve-index --manifest` prints (the vision
image, the index served memory-mapped from a local copy, a readiness probe, resources from the config) is the service
the production preset's retrieval stage queries; the index build compiles as a Kubeflow pipeline of its own."""
from __future__ import annotations

import yaml

import pipeline
import pipeline_configs
from cnpipe.kfp_images import image_ref
from components.knn_index import manifest


def test_manifest_is_the_service_production_retrieves_from(capsys):
    assert pipeline.main(["serve-index", "--preset", "production", "--manifest",
                          "--set", "index.serve_resources.memory=24Gi", "--set", "index.storage_class=premium-rwo"]) == 0
    namespace, deployment, service = list(yaml.safe_load_all(capsys.readouterr().out))
    config = pipeline_configs.preset("production")
    assert namespace == {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "clip-retrieval"}}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == image_ref(config.images, "vision")
    command = container["command"]
    assert command[:3] == ["/opt/family/bin/python", "-m", "components.knn_index.serve"]
    assert command[command.index("--index") + 1] == f"{config.retrieval.indice_name}={config.index.output}"
    assert command[command.index("--clip-model") + 1] == config.clip_embed.model  # queries embedded by the index's model
    assert "--allow-public-bind" in command and command[command.index("--host") + 1] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/indices-list", "port": "http"}
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "24Gi"}
    assert container["resources"]["limits"]["memory"] == "24Gi"
    mount = container["volumeMounts"][0]["mountPath"]
    assert command[command.index("--local-dir") + 1] == mount
    claim = pod["volumes"][0]["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "premium-rwo" and claim["resources"]["requests"]["storage"] == config.index.disk
    # the Service the production preset's retrieval stage is pointed at
    port = service["spec"]["ports"][0]["port"]
    url = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port}/knn-service"
    assert url == config.retrieval.service_url == manifest.service_url(config)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_manifest_needs_an_index(capsys):
    config = pipeline_configs.preset("production")
    config.index.output = ""
    try:
        manifest.objects(config)
    except ValueError as err:
        assert "index.output is empty" in str(err)
    else:
        raise AssertionError("a manifest without an index folder")


def test_index_build_compiles_as_its_own_pipeline(tmp_path, capsys):
    out = tmp_path / "index.yaml"
    assert pipeline.main(["index", "--preset", "production", "--compile", str(out)]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    config = pipeline_configs.preset("production")
    executors = spec["deploymentSpec"]["executors"]
    (executor,) = executors.values()
    assert executor["container"]["image"] == image_ref(config.images, "index")
    assert executor["container"]["resources"]["memoryLimit"] == 40 * 2**30 / 1e9  # index.build_resources: 40Gi
    assert executor["container"]["resources"]["cpuLimit"] == 16
    assert platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "components.knn_index.build" in "\n".join(executor["container"]["command"])
    default = spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"]
    assert pipeline_configs.from_json(default).index.source == config.index.source


def test_serve_index_without_an_index_says_how_to_build_it(tmp_path, capsys):
    assert pipeline.main(["serve-index", "--preset", "embedded-own-index", "--set", f"index.output={tmp_path}/none"]) == 2
    assert "python pipeline.py index --preset embedded-own-index" in capsys.readouterr().err
