"""The kfp component that builds a kNN index (components/knn_index/build.py) in the index family's image; the
pipeline around it is compiled by `python pipeline.py index --compile index.yaml`."""
from kfp import dsl

from cnpipe.kfp_images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def knn_index_build(config_json: str, force: bool):
    """Build the kNN index of index.source into index.output with autofaiss."""
    import os
    import subprocess
    import sys

    python = os.environ.get("CNPIPE_PYTHON_INDEX", sys.executable)
    subprocess.run([python, "-m", "components.knn_index.build", "--config-json", config_json]
                   + (["--force"] if force else []), check=True)


def build_pipeline(config):
    """A Kubeflow pipeline of its own: one task that builds the index in the index family's image, with
    index.build_resources."""
    from kfp import kubernetes

    from cnpipe.kfp_images import image_ref

    res, kf = config.index.build_resources, config.kubeflow

    @dsl.pipeline(name=f"knn-index-{config.name}", description="Build a kNN index with autofaiss.",
                  pipeline_root=kf.pipeline_root or None)
    def knn_index_pipeline(config_json: str = config.to_json(), force: bool = False):
        task = knn_index_build(config_json=config_json, force=force)
        task.set_container_image(image_ref(config.images, "index")).set_display_name("knn index build")
        task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu_limit or res.cpu)
        task.set_memory_request(res.memory).set_memory_limit(res.memory_limit or res.memory)
        task.set_caching_options(False)
        if kf.image_pull_policy:
            kubernetes.set_image_pull_policy(task, kf.image_pull_policy)
        if kf.image_pull_secret:
            kubernetes.set_image_pull_secrets(task, [kf.image_pull_secret])

    return knn_index_pipeline
