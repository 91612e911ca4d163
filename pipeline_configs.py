"""Typed configuration of the pipeline, and its presets.

A preset is a complete `PipelineConfig`. A new domain is a new preset here: dataset, retrieval
prompts, conditioning types and models change; `pipeline.py` does not. Configs are strict:
an unknown or mistyped key fails before any work, naming the field.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import pathlib
import typing
from dataclasses import dataclass, field
from typing import Any


# conditioning.caption_source and encode.caption_source: which caption a row carries on
CAPTION_SOURCES = ("prefer_source", "blip", "source")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field."""


def throughput(default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A setting that changes how fast a stage runs, never what it writes (threads, batch sizes, devices,
    timeouts): left out of the stage's config hash, so a resume after changing it is not refused."""
    return field(default=default, metadata={"throughput": True}, **kwargs)


@dataclass
class StorageConfig:
    root: str = "runs"  # a local folder or gs://bucket/prefix; every stage writes under <root>/<run id>/


@dataclass
class ImagesConfig:
    """Where each family's image lives: <registry>/<namespace>/<prefix><family>:<tag> (see build_images.sh)."""

    registry: str = "ghcr.io"
    namespace: str = "controlnet-pipeline"
    prefix: str = "controlnet-"
    tag: str = "0.1.0"
    train_variant: str = "cuda12"  # cuda12 | tpu | cpu: which build of the train image (build_images.sh makes cuda12 and tpu)


@dataclass
class HubLoadConfig:
    kind: str = "folder"  # hf | folder | table
    source: str = ""  # dataset id (hf), folder path or URL (folder), .parquet/.csv path or URL (table)
    split: str = "train"
    revision: str = ""  # hf only: a commit, tag or branch of the dataset; empty: the default branch's current commit
    streaming: bool = throughput(True)  # hf only: stream instead of downloading the whole dataset first
    image_column: str = "image"
    caption_column: str = "text"
    url_column: str = "url"
    id_column: str = ""  # empty: ids are derived from the source location of each row
    max_rows: int = 0  # 0: all rows
    rows_per_shard: int = 512
    min_image_side: int = 16
    max_image_side: int = 1024  # larger images are downscaled once, here
    max_image_pixels: int = 89_478_485  # decompression-bomb guard (Pillow's default)
    encode_format: str = "jpeg"
    max_file_bytes: int = 64 * 2**20  # every image or caption file read is capped at this many bytes
    # hf only: an image struct that names a file (`path`, no `bytes`) is read only when this is true, and then only
    # from under the dataset's own local folder (never a URL, never outside it)
    allow_local_paths: bool = False


@dataclass
class ClipEmbedConfig:
    model: str = "openai/clip-vit-large-patch14"  # hub id or local save_pretrained folder
    batch_size: int = throughput(32)
    device: str = throughput("auto")  # auto | cpu | cuda


@dataclass
class RetrievalConfig:
    service_url: str = "https://knn.laion.ai/knn-service"
    indice_name: str = "laion5B-L-14"
    prompts: list[str] = field(default_factory=list)
    use_image_seeds: bool = True  # query with each seed image's CLIP embedding
    max_seed_images: int = 0  # 0: all
    num_images: int = 40  # results asked per query
    min_similarity: float = 0.0
    deduplicate: bool = True
    use_safety_model: bool = True
    use_violence_detector: bool = True
    aesthetic_score: int = 9
    aesthetic_weight: float = 0.5
    timeout_s: float = throughput(60.0)  # per connect and per read
    query_deadline_s: float = throughput(300.0)  # a whole query (one try), however slowly the answer drips in
    retries: int = throughput(3)
    max_response_bytes: int = 16 * 2**20  # a larger answer is refused (and retried); results beyond num_images are rejected
    max_urls: int = 0  # 0: no cap


@dataclass
class DownloadConfig:
    image_size: int = 512
    resize_mode: str = "keep_ratio"  # img2dataset: no | keep_ratio | center_crop | border
    min_image_size: int = 64
    max_aspect_ratio: float = 3.0
    timeout_s: int = throughput(10)
    retries: int = throughput(1)
    thread_count: int = throughput(32)
    processes_count: int = throughput(1)
    batch_rows: int = throughput(10_000)  # rows of consecutive input shards downloaded together (split evenly over the processes)
    encode_format: str = "jpg"
    encode_quality: int = 95
    max_body_bytes: int = 32 * 2**20  # a response body larger than this is refused before it is all read
    max_image_area: int = 89_478_485  # pixels; checked from the image header, before anything is decoded
    allow_file_urls: bool = False
    allowed_networks: list[str] = field(default_factory=list)  # CIDRs exempt from the private-address guard
    # an http(s) proxy for every download; proxies in the environment (HTTP_PROXY, ...) are never used. With a proxy,
    # the private-address check of resolved addresses is the proxy's job (what the URL says is still checked here)
    proxy: str = ""
    # a shard where more than this fraction of its URLs failed transiently (connection error, timeout, DNS lookup,
    # 408/429/5xx) is not committed: the stage fails after committing the rest, and a rerun fetches it again. Web URL
    # lists always have some dead hosts and slow sites; raise it if they keep a shard back on every rerun
    max_transient_fraction: float = throughput(0.2)
    distributor: str = throughput("multiprocessing")  # img2dataset's: multiprocessing (one pod) | pyspark | ray (a cluster you run)
    user_agent_token: str = "controlnet-pipeline"
    disallowed_header_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])


@dataclass
class CaptionConfig:
    model: str = "Salesforce/blip-image-captioning-large"
    batch_size: int = throughput(16)
    max_new_tokens: int = 30
    num_beams: int = 1
    prompt: str = ""  # conditional captioning prefix, e.g. "a photography of"; stripped from the captions, as BLIP does
    device: str = throughput("auto")


@dataclass
class CurateConfig:
    """The curate stage (components/curate), between blip_caption and conditioning: duplicates and weak pairs out,
    across the whole dataset. Every filter can be switched off on its own; `enabled: false` drops the stage."""

    enabled: bool = True  # false: no curate tasks in the pipeline; conditioning reads blip_caption's output
    # duplicate: the same decoded pixels (a 64-bit hash of the RGB array), whatever the file format or metadata
    exact_dedup: bool = True
    # near_duplicate by perceptual hash: 64-bit DCT hashes (pHash) of the image and of its centred crops at
    # phash_crop_scales (a share of each side); two images are near duplicates when one's whole-image hash is at most
    # phash_max_distance bits from any of the other's hashes (so a copy cut by a few % per side still matches)
    phash_dedup: bool = True
    phash_max_distance: int = 6  # bench/curate.py: precision 0.998, recall 0.989 at 6; precision 0.985 at 8
    phash_crop_scales: list[float] = field(default_factory=lambda: [0.95, 0.9, 0.85, 0.8])
    # near_duplicate by CLIP image embedding (clip_embed.model): cosine similarity of at least this
    embedding_dedup: bool = True
    embedding_min_cosine: float = 0.95
    # the kept rows' embeddings in the global pass, a faiss index factory string (inner product); auto: "SQ8" (8-bit
    # codes, exact search) up to 20k rows, "IVF<4 sqrt(n)>,SQ8" (searched over embedding_nprobe lists) above
    embedding_index: str = "auto"
    embedding_nprobe: int = 16
    # caption-image agreement: the CLIP cosine of the caption and the image is kept as clip_similarity for every row;
    # below min_clip_similarity a row is rejected (low_clip_similarity). LAION-5B kept ViT-B/32 pairs >= 0.28;
    # ViT-L/14 scores run lower (DataComp's L/14 top-30 % cut is 0.243)
    caption_filter: bool = True
    min_clip_similarity: float = 0.25
    caption_source: str = ""  # the caption judged: prefer_source | blip | source; empty: conditioning.caption_source (the one trained on)
    # the decoded image: shorter side at least min_side (low_resolution), longer/shorter at most max_aspect_ratio (bad_aspect_ratio)
    resolution_filter: bool = True
    min_side: int = 256
    max_aspect_ratio: float = 3.0
    # LAION's scores, where the retrieval rows carry them (pwatermark, punsafe columns; rows without a score pass)
    watermark_filter: bool = True
    max_pwatermark: float = 0.5  # above: watermarked (Stable Diffusion 1's LAION subsets kept pwatermark < 0.5)
    unsafe_filter: bool = True
    max_punsafe: float = 0.5  # above: unsafe (Stable Diffusion 2 trained on punsafe < 0.1)
    batch_size: int = throughput(32)  # CLIP batch (images and captions) in the per-shard pass
    device: str = throughput("auto")  # auto | cpu | cuda, for the per-shard pass's CLIP


@dataclass
class ConditioningConfig:
    types: list[str] = field(default_factory=lambda: ["canny", "pose"])
    canny_low: int = 100
    canny_high: int = 200
    pose_min_detection_confidence: float = 0.5
    pose_model_complexity: int = 1  # 0, 1 or 2: MediaPipe's lite, full and heavy pose models (only 1 ships in the wheel)
    pose_min_visibility: float = 0.5  # landmarks less visible than this are left out of the skeleton
    pose_min_keypoints: int = 6  # fewer visible OpenPose keypoints than this counts as no_pose
    # implausible_pose (components/conditioning/pose.py): chosen on scikit-image's and matplotlib's photos with and without people
    pose_min_spread: float = 0.2  # the skeleton's larger side, as a share of the image's
    pose_min_area: float = 0.03  # the skeleton's box, as a share of the image's area
    pose_max_limb_ratio: float = 3.0  # no head, arm, torso side or leg segment longer than this × the shoulder width
    pose_min_head_ratio: float = 0.35  # neck to nose at least this × the shoulder width
    detect_resolution: int = 512  # controls made at this shorter side (x64-rounded, as controlnet_aux), resized back; 0: native
    caption_source: str = "prefer_source"  # which caption goes in `caption`: prefer_source | blip | source
    workers: int = throughput(0)  # threads making control images (each with its own conditioners); 0: one per CPU core
    depth_model: str = "depth-anything/Depth-Anything-V2-Small-hf"  # depth type: a transformers depth-estimation model
    depth_device: str = throughput("auto")


@dataclass
class ReportConfig:
    sample_rows: int = 8


@dataclass
class BaseModelConfig:
    """The frozen Stable-Diffusion-style base the ControlNet is trained beside (a diffusers folder or hub id)."""

    path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: str = ""
    text_encoder: str = "clip"  # clip (SD 1.x/2.x text_encoder) | t5 (T5EncoderModel, for T5-conditioned bases)
    t5_model: str = ""  # t5 only: folder or hub id of the T5 encoder (and tokenizer)


@dataclass
class EncodeConfig:
    conditioning_type: str = "canny"  # which conditioning dataset to train on
    resolution: int = 512  # must be divisible by 8
    caption_source: str = "prefer_source"  # prefer_source | blip | source
    holdout_fraction: float = 0.02  # rows (by stable id, cnpipe.splits) kept out of training for evaluate
    batch_size: int = throughput(8)
    max_text_length: int = 77
    device: str = throughput("auto")


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 10_000
    global_batch_size: int = 32  # over all devices and hosts, per optimizer step
    grad_accum_steps: int = 1
    learning_rate: float = 1e-5
    warmup_steps: int = 500
    lr_schedule: str = "cosine"  # constant | cosine | linear
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999  # 0 disables EMA
    compute_dtype: str = "auto"  # auto (bf16 on accelerators, fp32 on CPU) | bfloat16 | float32
    gradient_checkpointing: bool = False
    # fp32 weights, AdamW moments and EMA: auto (sharded over the devices where more than one, ZeRO-style) | sharded | replicated
    shard_state: str = throughput("auto")
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    validation_every: int = 0  # 0: only at the end
    num_processes: int = 1  # hosts; >1 runs jax.distributed.initialize
    coordinator_address: str = ""  # host:port of process 0 for multi-host runs (else from the environment)
    wandb_project: str = ""
    tensorboard: bool = False
    # ControlNet's conditioning embedder (pixels -> latent grid): one entry per level, len-1 stride-2 convs,
    # so its length must be log2(VAE scale factor) + 1 (4 for SD's 8x VAE).
    conditioning_embedding_out_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    caption_dropout: float = 0.0  # fraction of rows trained with the empty-prompt encoding (enables CFG)
    shuffle_window_shards: int = 4  # rows are shuffled within windows of this many shards (bounded memory)
    validation_rows: int = 4  # held-out rows rendered into validation/ (0: none)
    validation_inference_steps: int = 20
    validation_guidance_scale: float = 3.0


@dataclass
class EvaluateConfig:
    num_samples: int = 8  # held-out control images
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    controlnet_conditioning_scale: float = 1.0
    batch_size: int = 4  # images per pipeline call (one seed per sample: results equal up to float rounding)
    use_ema: bool = True
    seed: int = 0
    fid_min_images: int = 50  # fd_clip (FID formula on CLIP features) only with at least this many held-out pairs
    clip_model: str = "openai/clip-vit-large-patch14"
    device: str = "auto"


@dataclass
class TaskResources:
    """What one stage's pod asks Kubernetes for (ignored by kfp.local)."""

    cpu: str = "2"
    memory: str = "8Gi"
    cpu_limit: str = ""  # empty: same as the request
    memory_limit: str = ""
    accelerator: str = ""  # "" | nvidia.com/gpu | google.com/tpu
    accelerator_count: int = 0
    gpu_type: str = ""  # node selector cloud.google.com/gke-accelerator, e.g. nvidia-l4
    tpu_type: str = ""  # node selector cloud.google.com/gke-tpu-accelerator, e.g. tpu-v5-lite-podslice
    tpu_topology: str = ""  # node selector cloud.google.com/gke-tpu-topology, e.g. 2x4
    retries: int = 0
    retry_backoff: str = "30s"


@dataclass
class Toleration:
    key: str = ""
    operator: str = "Exists"  # Exists | Equal
    value: str = ""
    effect: str = "NoSchedule"


@dataclass
class SecretEnv:
    """A Kubernetes secret key exposed as an environment variable: the value never enters the YAML. A task gets it
    only where it is used (components.registry.secrets_for), so a cluster without the secret runs the stages that need none."""

    secret_name: str = ""
    key: str = ""
    env: str = ""
    stages: list[str] = field(default_factory=list)  # the stages whose tasks get it; empty: every task
    optional: bool = True  # the pod starts without it (the code can do without: public models); false: it must exist


@dataclass
class StageResources:
    hub_load: TaskResources = field(default_factory=lambda: TaskResources(cpu="2", memory="8Gi"))
    clip_embed: TaskResources = field(default_factory=lambda: TaskResources(cpu="4", memory="16Gi", accelerator="nvidia.com/gpu", accelerator_count=1))
    laion_retrieval: TaskResources = field(default_factory=lambda: TaskResources(cpu="1", memory="4Gi", retries=3))
    download: TaskResources = field(default_factory=lambda: TaskResources(cpu="8", memory="16Gi", retries=3))
    blip_caption: TaskResources = field(default_factory=lambda: TaskResources(cpu="4", memory="24Gi", accelerator="nvidia.com/gpu", accelerator_count=1))
    # curate: keys per shard (CLIP, hashes) in shard groups; one global dedup pass (compact keys: about 2.4 GB of
    # peak per million rows at 768-d with SQ8 codes, so 32Gi holds ~14 M rows; PQ codes for more, see the README's
    # "Curate"); filtering per shard in shard groups
    curate_keys: TaskResources = field(default_factory=lambda: TaskResources(cpu="4", memory="16Gi", accelerator="nvidia.com/gpu", accelerator_count=1))
    curate_dedup: TaskResources = field(default_factory=lambda: TaskResources(cpu="8", memory="32Gi"))
    curate: TaskResources = field(default_factory=lambda: TaskResources(cpu="2", memory="8Gi"))
    conditioning: TaskResources = field(default_factory=lambda: TaskResources(cpu="8", memory="16Gi"))
    encode: TaskResources = field(default_factory=lambda: TaskResources(cpu="4", memory="24Gi", accelerator="nvidia.com/gpu", accelerator_count=1))
    controlnet_train: TaskResources = field(default_factory=lambda: TaskResources(
        cpu="24", memory="96Gi", accelerator="google.com/tpu", accelerator_count=8,
        tpu_type="tpu-v5-lite-podslice", tpu_topology="2x4"))
    evaluate: TaskResources = field(default_factory=lambda: TaskResources(cpu="4", memory="24Gi", accelerator="nvidia.com/gpu", accelerator_count=1))
    report: TaskResources = field(default_factory=lambda: TaskResources(cpu="1", memory="2Gi"))


@dataclass
class KubeflowConfig:
    pipeline_root: str = ""  # where kfp keeps its artifacts, e.g. gs://bucket/kfp-root; empty: the cluster default
    resources: StageResources = field(default_factory=StageResources)
    tolerations: list[Toleration] = field(default_factory=lambda: [
        Toleration(key="nvidia.com/gpu"), Toleration(key="google.com/tpu")])
    # HF_TOKEN: stages that may load from the Hub (hub_load only when kind is hf, conditioning only for types with a
    # model; curate_keys embeds downloaded images and captions with clip_embed.model); WANDB_API_KEY: training, only
    # when train.wandb_project is set, and then required (wandb.init needs it)
    secrets: list[SecretEnv] = field(default_factory=lambda: [
        SecretEnv(secret_name="controlnet-pipeline", key="hf-token", env="HF_TOKEN", stages=[
            "hub_load", "clip_embed", "blip_caption", "curate_keys", "conditioning", "encode", "controlnet_train",
            "evaluate"]),
        SecretEnv(secret_name="controlnet-pipeline", key="wandb-api-key", env="WANDB_API_KEY",
                  stages=["controlnet_train"], optional=False)])
    service_account: str = ""
    image_pull_secret: str = ""
    image_pull_policy: str = "IfNotPresent"


@dataclass
class IndexConfig:
    """A kNN index you build and host yourself: `python pipeline.py index` builds it with autofaiss from image
    embeddings (clip-retrieval's layout, or a clip_embed output), `python pipeline.py serve-index` serves it
    memory-mapped with clip-retrieval's API under retrieval.indice_name (`--manifest`: its Kubernetes Deployment and
    Service). components/knn_index/."""

    # clip-retrieval's layout (img_emb/*.npy + metadata/*.parquet with url, caption) or a clip_embed output; local or gs://
    source: str = ""
    source_kind: str = "auto"  # auto (a manifest.json: clip_embed) | clip_retrieval | clip_embed
    output: str = ""  # the index folder, local or gs://: image.index, metadata/*.arrow, infos.json, index.json
    # clip_embed rows without a url (a folder of your images): this prefix + the image's path in the folder
    image_url_prefix: str = ""
    metadata_columns: list[str] = field(default_factory=lambda: ["url", "caption"])  # kept per vector, returned per result
    dim: int = 0  # expected dimension; 0: the first file's
    max_index_memory_usage: str = "16G"  # autofaiss: the index's size at most (sets the PQ code size); served memory-mapped
    current_memory_available: str = "32G"  # autofaiss: the build's memory budget
    max_index_query_time_ms: float = 10.0  # autofaiss sets nprobe to the most that answers within this
    min_nearest_neighbors_to_retrieve: int = 40  # ... and to at least what returns this many results
    index_key: str = ""  # a faiss index factory string instead of autofaiss's choice (e.g. "OPQ64_256,IVF4096,PQ64x8")
    nb_cores: int = throughput(0)  # build threads; 0: every core
    check_rows: int = 1024  # rows per embedding file checked for unit length before the build
    norm_tolerance: float = 0.01
    # serving
    clip_model: str = ""  # the CLIP model that embeds text queries; empty: clip_embed.model (the index's own model)
    host: str = "127.0.0.1"  # serve-index on this machine (the pod binds 0.0.0.0)
    port: int = 1234
    search_threads: int = 1  # faiss threads per batch: concurrent queries are searched together, in one thread
    namespace: str = "clip-retrieval"
    service_name: str = "knn-index"
    replicas: int = 1
    disk: str = "200Gi"  # the pod's volume that holds its copy of the index (a generic ephemeral volume)
    storage_class: str = ""  # of that volume; empty: the cluster's default (e.g. premium-rwo for SSD on GKE)
    serve_resources: TaskResources = field(default_factory=lambda: TaskResources(cpu="4", memory="16Gi"))
    build_resources: TaskResources = field(default_factory=lambda: TaskResources(cpu="16", memory="40Gi"))

    def service_url(self) -> str:
        """The in-cluster URL of the Service that `serve-index --manifest` describes."""
        return f"http://{self.service_name}.{self.namespace}.svc.cluster.local:{self.port}/knn-service"


@dataclass
class PipelineConfig:
    name: str = "production"
    storage: StorageConfig = field(default_factory=StorageConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    hub_load: HubLoadConfig = field(default_factory=HubLoadConfig)
    clip_embed: ClipEmbedConfig = field(default_factory=ClipEmbedConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    base_model: BaseModelConfig = field(default_factory=BaseModelConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    kubeflow: KubeflowConfig = field(default_factory=KubeflowConfig)
    index: IndexConfig = field(default_factory=IndexConfig)  # a kNN index you build and host (pipeline.py index / serve-index)
    allow_pickle_weights: bool = False  # torch stages: also load pickle checkpoints (they can run code); safetensors only when false
    shard_groups: int = 8  # per-image stages fan out into this many parallel tasks (pods), each every n-th shard
    kubeflow_host: str = ""
    embedded_assets: str = ""  # folder of generated seeds, pool and tiny models (embedded preset only)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def section_hash(self, section: str) -> str:
        """Hash of the settings of one stage that change what it writes: a rerun with other such settings must not
        reuse its shards. Throughput knobs (`throughput(...)` fields) are left out: changing them resumes."""
        knobs = {f.name for f in dataclasses.fields(getattr(self, section)) if f.metadata.get("throughput")}
        settings = {k: v for k, v in self.to_dict()[section].items() if k not in knobs}
        blob = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config field '{path or 'root'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(_unknown_key(path, unknown[0], names))
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _unknown_key(path: str, key: str, names: set[str], given: str = "") -> str:
    """The error for a key no section has (`given`: the whole dotted key as the user wrote it), with the nearest
    valid key when one is close (`download.threads`)."""
    where = f"{path}." if path else ""
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close and len(key) >= 4:
        close = [n for n in sorted(names) if key in n][:1]
    hint = f" (did you mean '{where}{close[0]}'?)" if close else ""
    return f"unknown config key '{given or where + key}'{hint}; valid keys{' of ' + path if path else ''}: {', '.join(sorted(names))}"


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config field '{path}' must be a list, got {value!r}")
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"config field '{path}' must be {hint.__name__}, got {value!r}")
    return value


def from_dict(data: dict) -> PipelineConfig:
    return _build(PipelineConfig, data, "")


def from_json(text: str) -> PipelineConfig:
    return from_dict(json.loads(text))


def with_overrides(config: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """Apply `section.key=value` overrides (value parsed as JSON, else taken as a string)."""
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        keys = dotted.split(".")
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                sections = {k for k, v in node.items() if isinstance(v, dict)}
                raise ConfigError(_unknown_key(".".join(keys[:depth]), key, sections, given=dotted))
            node = node[key]
        if keys[-1] not in node:
            raise ConfigError(_unknown_key(".".join(keys[:-1]), keys[-1], set(node)))
        node[keys[-1]] = value
    return from_dict(data)


EMBEDDED_ASSETS = str(pathlib.Path(__file__).resolve().parent / ".cache" / "embedded")


def embedded(assets: str = EMBEDDED_ASSETS) -> PipelineConfig:
    """Runs on one machine with no network: generated seed images, a loopback LAION stand-in, tiny models."""
    return PipelineConfig(
        name="embedded",
        storage=StorageConfig(root="runs"),
        hub_load=HubLoadConfig(kind="folder", source=f"{assets}/seeds", rows_per_shard=8, max_image_side=256),
        clip_embed=ClipEmbedConfig(model=f"{assets}/models/tiny-clip", batch_size=8, device="cpu"),
        retrieval=RetrievalConfig(
            service_url="",  # set at run time to the loopback kNN service
            indice_name="embedded-pool",
            prompts=["a photo of a person", "a photo of a cat", "a colorful pattern"],
            num_images=6,
            use_safety_model=False,
            use_violence_detector=False,
            timeout_s=30.0,
        ),
        download=DownloadConfig(
            image_size=256,
            min_image_size=32,
            timeout_s=5,
            retries=0,
            thread_count=8,
            processes_count=1,
            allowed_networks=["127.0.0.0/8"],
            max_transient_fraction=0.05,  # the loopback web never fails but when it is down: then nothing is final
        ),
        caption=CaptionConfig(model=f"{assets}/models/tiny-blip", batch_size=8, max_new_tokens=12, device="cpu"),
        # The tiny CLIP has random weights: it puts any two pictures within cosine 0.9-0.9999 of each other and scores
        # captions at random, so here duplicates are found by pixels and pHash, and clip_similarity is only recorded.
        curate=CurateConfig(embedding_dedup=False, caption_filter=False, min_side=64, batch_size=8, device="cpu"),
        conditioning=ConditioningConfig(types=["canny", "pose"], pose_model_complexity=1),
        report=ReportConfig(sample_rows=8),
        base_model=BaseModelConfig(path=f"{assets}/models/tiny-sd"),
        encode=EncodeConfig(conditioning_type="canny", resolution=64, batch_size=8, holdout_fraction=0.15, device="cpu"),
        train=TrainConfig(
            max_steps=30, global_batch_size=4, learning_rate=1e-4, warmup_steps=5, ema_decay=0.99,
            checkpoint_every=10, log_every=5, compute_dtype="auto", conditioning_embedding_out_channels=[8, 8, 16, 16],
            validation_rows=2, validation_inference_steps=4,
        ),
        evaluate=EvaluateConfig(
            num_samples=4, num_inference_steps=4, guidance_scale=3.0, clip_model=f"{assets}/models/tiny-clip", device="cpu",
        ),
        shard_groups=2,
        embedded_assets=assets,
    )


def production(bucket: str = "gs://controlnet-pipeline-data") -> PipelineConfig:
    """A Kubeflow run on GCS with real models: seed images from the Hub, more from a clip-retrieval
    service you host (the public LAION one has been down since 2024), SD 1.5 as the base."""
    return PipelineConfig(
        name="production",
        storage=StorageConfig(root=f"{bucket}/runs"),
        hub_load=HubLoadConfig(kind="hf", source="lambdalabs/naruto-blip-captions", caption_column="text", rows_per_shard=2048),
        retrieval=RetrievalConfig(
            # the index you build and host: `pipeline.py index`, then `pipeline.py serve-index --apply` (its Service)
            service_url=IndexConfig().service_url(),
            prompts=["a full body photo of a person standing", "a person dancing, full body", "a person doing yoga"],
            num_images=200,
        ),
        kubeflow=KubeflowConfig(pipeline_root=f"{bucket}/kfp-root"),
        images=ImagesConfig(train_variant="tpu"),  # the train task runs on the TPU v5e node pool (StageResources)
        # embeddings in clip-retrieval's layout (released ones you may use, or clip-retrieval inference's output)
        index=IndexConfig(source=f"{bucket}/embeddings", output=f"{bucket}/knn-index"),
    )


def embedded_depth(assets: str = EMBEDDED_ASSETS) -> PipelineConfig:
    """The embedded default moved to a new domain by config alone: a third control type (depth, made in
    the vision family's environment) and a ControlNet trained on it."""
    config = embedded(assets)
    config.name = "embedded-depth"
    config.conditioning.types = ["canny", "pose", "depth"]
    config.conditioning.depth_model = f"{assets}/models/tiny-depth"
    config.conditioning.depth_device = "cpu"
    config.encode.conditioning_type = "depth"
    config.retrieval.prompts = ["a photo of a room", "a photo of a street", "a photo of a person"]
    return config


OWN_INDEX_PORT = 48722  # the embedded-own-index preset's served index (loopback)


def embedded_own_index(assets: str = EMBEDDED_ASSETS) -> PipelineConfig:
    """The embedded default retrieving from an index you build and serve, as production does, instead of the
    stand-in's in-process one: `python pipeline.py index --preset embedded-own-index` makes an embedding set in
    clip-retrieval's layout (the pool embedded by the tiny CLIP, plus 20 000 distractors) and builds it with
    autofaiss; `python pipeline.py serve-index --preset embedded-own-index` serves it memory-mapped on a loopback port;
    `python pipeline.py run --preset embedded-own-index` retrieves from it."""
    config = embedded(assets)
    config.name = "embedded-own-index"
    config.retrieval.service_url = f"http://127.0.0.1:{OWN_INDEX_PORT}/knn-service"
    config.retrieval.indice_name = "embedded-own-index"
    config.index = IndexConfig(
        source=f"{assets}/own-index/embeddings", output=f"{assets}/own-index/index", max_index_memory_usage="64MB",
        current_memory_available="1G", min_nearest_neighbors_to_retrieve=config.retrieval.num_images,
        port=OWN_INDEX_PORT, namespace="default", disk="1Gi",
    )
    return config


def embedded_fill(assets: str = EMBEDDED_ASSETS) -> PipelineConfig:
    """Where learning shows on two CPU cores: the fill domain (cnpipe/embedded/fill.py, in the spirit of fill50k: a
    filled circle of one colour on a background of another, the prompt naming both, canny of the image its outline)
    and a tiny SD-style base pretrained on it, both made once under <assets>/fill/ by `prepare_embedded`. Retrieval
    contributes nothing (no prompts, no image queries: the pool's photos are not of this domain), so the generated
    folder is the dataset; curate is off (synthetic, no duplicates to find, and pHash would call circles of one
    colour pair near duplicates). Canny at the images' own 64 px."""
    config = embedded(assets)
    config.name = "embedded-fill"
    config.hub_load.source = f"{assets}/fill/seeds"
    config.hub_load.rows_per_shard = 128
    config.hub_load.encode_format = "png"
    config.retrieval.prompts = []
    config.retrieval.use_image_seeds = False
    config.curate.enabled = False
    config.conditioning.types = ["canny"]
    config.conditioning.detect_resolution = 0
    config.base_model.path = f"{assets}/fill/tiny-sd-fill"
    config.encode.holdout_fraction = 0.02
    config.encode.batch_size = 32
    config.train = TrainConfig(
        max_steps=1500, global_batch_size=16, learning_rate=5e-4, warmup_steps=50, lr_schedule="constant",
        ema_decay=0.0, checkpoint_every=500, log_every=10, conditioning_embedding_out_channels=[16, 32, 32],  # fill.VAE downsamples 4x
        validation_rows=0,
    )
    config.evaluate = EvaluateConfig(
        num_samples=8, num_inference_steps=20, guidance_scale=3.0, batch_size=8, use_ema=False,
        clip_model=f"{assets}/models/tiny-clip", device="cpu",
    )
    config.report.sample_rows = 6
    return config


PRESETS: dict[str, typing.Callable[[], PipelineConfig]] = {
    "embedded": embedded,
    "embedded-fill": embedded_fill,
    "embedded-depth": embedded_depth,
    "embedded-own-index": embedded_own_index,
    "production": production,
}


def preset(name: str) -> PipelineConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
