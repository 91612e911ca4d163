"""The kfp components of curation (components/curate): keys per shard, the global dedup, the filtered dataset.

Only URIs cross kfp's boundary (see cnpipe.kfp_bridge); each step runs in its family's interpreter. curate_keys and
curate are per-image steps: `part`/`parts` make the task one shard group of a fan-out (pipeline.py).
"""
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from cnpipe.kfp_images import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def curate_keys(
    config_json: str,
    run_id: str,
    images: Input[Dataset],
    embeddings: Input[Dataset],
    output: Output[Dataset],
    part: int = -1,
    parts: int = 1,
):
    """Per row: pixel hash, pHashes, CLIP image embedding (clip_embed's for seed rows), caption similarity, filters."""
    from components.registry import run_component

    run_component("curate_keys", config_json, run_id, {"images": images, "embeddings": embeddings}, output, part, parts)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def curate_dedup(config_json: str, run_id: str, keys: Input[Dataset], output: Output[Dataset]):
    """The global duplicate pass over the compact keys: which rows are dropped, for which kept row."""
    from components.registry import run_component

    run_component("curate_dedup", config_json, run_id, {"keys": keys}, output)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def curate(
    config_json: str,
    run_id: str,
    images: Input[Dataset],
    keys: Input[Dataset],
    dedup: Input[Dataset],
    output: Output[Dataset],
    part: int = -1,
    parts: int = 1,
):
    """The images less duplicates and rows that failed a filter, with clip_similarity."""
    from components.registry import run_component

    run_component("curate", config_json, run_id, {"images": images, "keys": keys, "dedup": dedup}, output, part, parts)
