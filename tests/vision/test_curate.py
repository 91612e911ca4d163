"""curate (components/curate) on a small dataset with known duplicates and known bad rows: every row accounted for with
the verdict it must get, duplicates found across shards with the seed and then the larger image kept, clip_similarity
equal to CLIP's own cosine, seed embeddings reused from clip_embed, the embedding index path, one or two shard groups
giving the same output, bad input refused."""
from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pytest

import pipeline_configs
from cnpipe import stage as stage_loop
from cnpipe import storage
from cnpipe.dataset import ContractError, Manifest, ShardedOutput, ShardResult, StageOutput
from components.curate import dedup, keys, settings
from components.curate import stage as curate
from tests.vision.curate_data import make_datasets, rows


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> pathlib.Path:
    from cnpipe.embedded import tiny_models

    root = tmp_path_factory.getbasetemp() / "data-half-models"
    tiny_models.ensure(str(root))
    return root


def config(models: pathlib.Path, **curate_settings) -> pipeline_configs.PipelineConfig:
    cfg = pipeline_configs.embedded(str(models.parent))
    cfg.clip_embed.model = str(models / "tiny-clip")
    cfg.curate.batch_size = 3
    cfg.curate.device = "cpu"
    for key, value in curate_settings.items():
        setattr(cfg.curate, key, value)
    return cfg


@pytest.fixture(scope="module")
def embedder(tiny_models):
    from components.clip_embed.stage import ClipEmbedder

    return ClipEmbedder(str(tiny_models / "tiny-clip"), "cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, embedder) -> tuple[Manifest, Manifest]:
    return make_datasets(tmp_path_factory.mktemp("curate-in"), embedder)


def run_all(cfg, images: Manifest, embeddings: Manifest | None, root: pathlib.Path) -> tuple[Manifest, StageOutput, Manifest]:
    given = {"images": images, **({"embeddings": embeddings} if embeddings is not None else {})}
    key_set = keys.run(cfg, given, str(root / "curate" / "keys"))
    decided = dedup.run(cfg, {"keys": key_set}, str(root / "curate" / "dedup"))
    return key_set, decided, curate.run(cfg, {"images": images, "keys": key_set, "dedup": decided}, str(root / "curate"))


def every_row(manifest: Manifest) -> pa.Table:
    return pa.concat_tables([t for _, t in manifest.iter_shards()])


@pytest.fixture(scope="module")
def curated(tmp_path_factory, tiny_models, inputs):
    images, embeddings = inputs
    return run_all(config(tiny_models), images, embeddings, tmp_path_factory.mktemp("curated"))


def test_every_row_is_accounted_for_with_its_reason_and_the_kept_row_named(curated, inputs):
    key_set, decided, out = curated
    images, _ = inputs
    assert out.rows_in == images.rows_out == len(rows()) == out.rows_out + out.rows_rejected
    assert sum(out.rejections.values()) == out.rows_rejected == len(out.rejected_table())
    assert key_set.rows_in == key_set.rows_out == images.rows_out  # keys keep every row: curate rejects
    rejected = {r["id"]: r for r in out.rejected_table().to_pylist()}
    kept = every_row(out).column("id").to_pylist()
    assert len(kept) == len(set(kept)) and not set(kept) & set(rejected)
    for row in rows():
        want, _, kept_id = row["expect"].partition(":")
        if want == "kept":
            assert row["id"] in kept, (row["id"], rejected.get(row["id"]))
            continue
        assert rejected[row["id"]]["reason"] == want, (row["id"], rejected[row["id"]])
        if kept_id:  # a dropped duplicate names the row kept in its place
            assert rejected[row["id"]]["detail"].startswith(f"kept {kept_id}: "), rejected[row["id"]]
    # seed over retrieved (web-a-big is larger than seed-a), then the larger image (web-c-big over its small copy and
    # its crop); the same pixels in another format are `duplicate`, a resized or cut copy `near_duplicate`
    assert out.rejections["duplicate"] == 2 and out.rejections["near_duplicate"] == 3
    assert decided.summary["duplicate"] == 2 and decided.summary["near_duplicate"] == 3
    assert {e["reason"] for e in decided.summary["examples"]} == {"duplicate", "near_duplicate"}


def test_duplicates_are_found_across_shards_not_within_one(curated, inputs):
    """Every dropped duplicate's kept row sits in another shard: a per-shard dedup would have kept them all."""
    key_set, decided, out = curated
    where = {i: name for name, t in key_set.iter_shards(columns=["id"]) for i in t.column("id").to_pylist()}
    pairs = [(r["id"], r["detail"].split()[1].rstrip(":")) for r in out.rejected_table().to_pylist()
             if r["reason"] in ("duplicate", "near_duplicate")]
    assert pairs and sum(where[a] != where[b] for a, b in pairs) >= 3


def test_clip_similarity_is_clips_cosine_of_the_trained_caption_and_the_image(curated, embedder, inputs):
    import torch
    from PIL import Image
    import io

    key_set, _, out = curated
    table = every_row(out)
    assert out.arrow_schema().field("clip_similarity").type == pa.float32()
    by_id = {r["id"]: r for r in table.to_pylist()}
    seed = by_id["seed-a"]  # the seed's caption is its source caption (conditioning.caption_source prefer_source)
    image = Image.open(io.BytesIO(seed["image"])).convert("RGB")
    with torch.inference_mode():
        pixels = embedder.processor(images=[image], return_tensors="pt")["pixel_values"]
        image_vector = torch.nn.functional.normalize(embedder.model.get_image_features(pixel_values=pixels), dim=-1)[0]
        tokens = embedder.tokenizer([seed["source_caption"]], return_tensors="pt")
        text_vector = torch.nn.functional.normalize(embedder.model.get_text_features(**tokens), dim=-1)[0]
    assert seed["clip_similarity"] == pytest.approx(float(image_vector @ text_vector), abs=1e-4)
    assert by_id["web-e"]["clip_similarity"] is None  # no caption to judge
    assert key_set.notes["no_caption_to_score"] == 1
    every = every_row(key_set)  # a rejected row's similarity is kept in the keys too
    assert every.column("clip_similarity").null_count == 2  # web-e (no caption), web-corrupt (no image)


def test_low_caption_similarity_is_rejected_when_the_filter_is_on(tmp_path, tiny_models, inputs, curated):
    images, embeddings = inputs
    scores = sorted(s for s in every_row(curated[0]).column("clip_similarity").to_pylist() if s is not None)
    threshold = float(np.median(scores))
    _, _, out = run_all(config(tiny_models, caption_filter=True, min_clip_similarity=threshold), images, embeddings, tmp_path)
    kept = every_row(out)
    assert out.rejections.get("low_clip_similarity", 0) > 0
    assert all(s >= threshold for s in kept.column("clip_similarity").to_pylist() if s is not None)
    low = [r for r in out.rejected_table().to_pylist() if r["reason"] == "low_clip_similarity"]
    assert all("clip similarity" in r["detail"] for r in low)


def test_each_filter_switches_off_on_its_own(tmp_path, tiny_models, inputs):
    images, embeddings = inputs
    cfg = config(tiny_models, exact_dedup=False, phash_dedup=False, resolution_filter=False, watermark_filter=False,
                 unsafe_filter=False)
    _, _, out = run_all(cfg, images, embeddings, tmp_path)
    assert out.rejections == {"not_an_image": 1}  # decoding is not a filter: nothing else is rejected


def test_seed_embeddings_come_from_clip_embed_and_are_not_recomputed(tmp_path, tiny_models):
    """clip_embed's output for the seeds holds marker vectors the model could never make: curate's keys carry them."""
    marker = lambda pictures: [np.eye(32, dtype=np.float32)[i] for i in range(len(pictures))]  # noqa: E731
    images, embeddings = make_datasets(tmp_path / "in", marker)
    key_set = keys.run(config(tiny_models), {"images": images, "embeddings": embeddings}, str(tmp_path / "keys"))
    got = {r["id"]: r["clip_embedding"] for r in every_row(key_set).to_pylist()}
    assert got["seed-a"] == np.eye(32)[0].tolist() and got["seed-b"] == np.eye(32)[1].tolist()
    assert key_set.notes["clip_embedding_reused"] == 2
    assert key_set.notes["clip_embedding_computed"] == len(rows()) - 2 - 1  # less the seeds and the row that is no image


def keys_dataset(root: pathlib.Path, shards: list[list[dict]]) -> Manifest:
    out = ShardedOutput(str(root), keys.DATASET, "test", keys.KEYS_SCHEMA)
    names = []
    for number, part in enumerate(shards):
        table = pa.table({name: [r.get(name) for r in part] for name in keys.KEYS_SCHEMA.names}, schema=keys.KEYS_SCHEMA)
        names.append(f"part-{number:05d}")
        out.commit(names[-1], ShardResult(table), rows_in=len(part))
    return out.finalize(names, inputs=[])


def unit(vector) -> list[float]:
    v = np.asarray(vector, dtype=np.float64)
    return (v / np.linalg.norm(v)).tolist()


@pytest.mark.parametrize("index", ["SQ8", "IVF4,SQ8", "Flat"])
def test_embedding_near_duplicates_over_the_whole_dataset(tmp_path, tiny_models, index):
    """Keys made by hand, no pHash: rows whose embeddings' cosine is >= the threshold are near duplicates wherever
    they are; below it they stay, however alike. The faiss index kind (exact or IVF) does not change the verdicts."""
    rng = np.random.default_rng(0)
    base = [unit(rng.standard_normal(16)) for _ in range(6)]

    def near(v, cos):  # a unit vector at cosine `cos` from v
        other = np.asarray(unit(rng.standard_normal(16)))
        v = np.asarray(v)
        orth = unit(other - (other @ v) * v)
        return unit(cos * v + np.sqrt(1 - cos ** 2) * np.asarray(orth))

    def row(i, vector, seed=False, side=100):
        return {"id": i, "seed": seed, "width": side, "height": side, "pixel_hash": abs(hash(i)) % 2**63, "phash": None,
                "clip_embedding": vector, "clip_similarity": 0.3}

    shards = [
        [row("a", base[0], seed=True, side=80), row("c", base[1])],  # the seed a wins over the larger b
        [row("b", near(base[0], 0.97), side=200), row("d", near(base[1], 0.90))],  # b: near a; d: alike, kept
        [row("e", base[2], side=300), row("f", near(base[2], 0.99), seed=True, side=50)],  # the seed f wins
        [row("g", base[3]), row("h", near(base[3], 0.951), side=90), row("x", base[4]), row("y", base[5])],
    ]
    key_set = keys_dataset(tmp_path / "keys", shards)
    cfg = config(tiny_models, exact_dedup=False, phash_dedup=False, embedding_dedup=True, embedding_min_cosine=0.95,
                 embedding_index=index, embedding_nprobe=4)
    decided = dedup.run(cfg, {"keys": key_set}, str(tmp_path / "dedup"))
    dropped = {}
    for name in decided.summary["decision_shards"]:
        for r in storage.read_parquet(storage.join(decided.uri, "decisions", f"{name}.parquet")).to_pylist():
            dropped[r["id"]] = (r["reason"], r["kept_id"], r["cosine"])
    assert {k: v[:2] for k, v in dropped.items()} == {
        "b": ("near_duplicate", "a"), "e": ("near_duplicate", "f"), "h": ("near_duplicate", "g")}
    assert dropped["b"][2] == pytest.approx(0.97, abs=0.01)
    assert decided.summary["embedding_index"] == index and decided.summary["evidence"]["embedding"] == 3


def test_same_output_with_one_and_two_shard_groups(tmp_path, tiny_models, embedder):
    """The per-shard steps run as two shard groups (every other shard each, as two kfp tasks) then the final pass;
    duplicates whose rows the two groups computed are still found, and every output equals a one-group run's."""
    images, embeddings = make_datasets(tmp_path / "in", embedder, rows_per_shard=2)
    cfg = config(tiny_models)
    single = run_all(cfg, images, embeddings, tmp_path / "one")
    root = tmp_path / "two"
    given = {"images": images, "embeddings": embeddings}
    try:
        for part in (0, 1):
            stage_loop.set_part(part, 2)
            partial = keys.run(cfg, given, str(root / "curate" / "keys"))
            assert isinstance(partial, StageOutput) and not (root / "curate" / "keys" / "manifest.json").exists()
        stage_loop.set_part(0, 1)
        key_set = keys.run(cfg, given, str(root / "curate" / "keys"))
        decided = dedup.run(cfg, {"keys": key_set}, str(root / "curate" / "dedup"))
        for part in (1, 0):
            stage_loop.set_part(part, 2)
            curate.run(cfg, {"images": images, "keys": key_set, "dedup": decided}, str(root / "curate"))
        stage_loop.set_part(0, 1)
        out = curate.run(cfg, {"images": images, "keys": key_set, "dedup": decided}, str(root / "curate"))
    finally:
        stage_loop.set_part(0, 1)
    for a, b in zip(single, (key_set, decided, out)):
        if isinstance(a, Manifest):
            for field in ("shards", "rows_in", "rows_out", "rows_rejected", "rejections", "notes", "config_hash"):
                assert getattr(a, field) == getattr(b, field), field
            assert every_row(a).equals(every_row(b)) and a.rejected_table().equals(b.rejected_table())
        else:
            for field in ("kept", "duplicate", "near_duplicate", "decision_shards", "examples", "config_hash"):
                assert a.summary[field] == b.summary[field], field
    shard_of = {i: n for n, t in key_set.iter_shards(columns=["id"]) for i in t.column("id").to_pylist()}
    group = {s["name"]: i % 2 for i, s in enumerate(key_set.shards)}
    pairs = [(r["id"], r["detail"].split()[1].rstrip(":")) for r in out.rejected_table().to_pylist()
             if r["reason"] in ("duplicate", "near_duplicate")]
    assert any(group[shard_of[a]] != group[shard_of[b]] for a, b in pairs), "no duplicate pair spans the two groups"


def test_bad_input_is_refused_with_a_message(tmp_path, tiny_models, inputs, curated):
    from pipeline_configs import ConfigError

    images, embeddings = inputs
    key_set, decided, _ = curated
    cfg = config(tiny_models)
    # dedup decisions made with other settings, or of other keys, are not applied
    other = config(tiny_models, phash_max_distance=2)
    with pytest.raises(ContractError, match="other settings or keys"):
        curate.run(other, {"images": images, "keys": key_set, "dedup": decided}, str(tmp_path / "a"))
    # decisions of other keys, or keys that are not of these images, are not applied
    with pytest.raises(ContractError, match="not made from the keys"):
        curate.run(cfg, {"images": images, "keys": embeddings, "dedup": decided}, str(tmp_path / "b"))
    table = next(images.iter_shards())[1]
    wrong = next(key_set.iter_shards(columns=["id", "clip_similarity", "reason", "detail"]))[1].slice(1)
    with pytest.raises(ContractError, match="does not hold the rows"):
        curate.curate_shard(table, wrong, None)
    with pytest.raises(ContractError, match="not a faiss index factory string"):
        dedup.run(config(tiny_models, embedding_dedup=True, embedding_index="NotAnIndex"), {"keys": key_set}, str(tmp_path / "c"))
    for field, value, words in (("caption_source", "alt", "caption_source"), ("phash_crop_scales", [1.2], "phash_crop_scales"),
                                ("max_aspect_ratio", 0.5, "max_aspect_ratio"), ("max_punsafe", 2.0, "max_punsafe"),
                                ("embedding_min_cosine", 1.5, "embedding_min_cosine")):
        with pytest.raises(ConfigError, match=words):
            settings.check_settings(config(tiny_models, **{field: value}))
    settings.check_settings(config(tiny_models, enabled=False, max_punsafe=2.0))  # a stage that is off is not checked


def test_an_empty_dataset_gives_empty_outputs(tmp_path, tiny_models, inputs):
    images, _ = inputs
    empty = ShardedOutput(str(tmp_path / "images"), "blip_caption", "test", images.arrow_schema())
    empty.commit("part-00000", ShardResult(images.arrow_schema().empty_table()), rows_in=0)
    key_set, decided, out = run_all(config(tiny_models), empty.finalize(["part-00000"], inputs=[]), None, tmp_path)
    assert (key_set.rows_out, decided.summary["considered"], out.rows_in, out.rows_out) == (0, 0, 0, 0)


def test_a_finished_dedup_is_reused_and_a_half_written_one_redone(tmp_path, tiny_models, curated):
    key_set, decided, _ = curated
    cfg = config(tiny_models)
    out = tmp_path / "dedup"
    # killed while writing: a decisions file of another run and no summary
    (out / "decisions").mkdir(parents=True)
    stale = storage.read_parquet(storage.join(decided.uri, "decisions", f"{decided.summary['decision_shards'][0]}.parquet"))
    storage.write_parquet_atomic(str(out / "decisions" / "leftover.parquet"), stale)
    again = dedup.run(cfg, {"keys": key_set}, str(out))
    assert not (out / "decisions" / "leftover.parquet").exists()
    assert {k: again.summary[k] for k in ("kept", "duplicate", "near_duplicate", "examples", "decision_shards")} == \
        {k: decided.summary[k] for k in ("kept", "duplicate", "near_duplicate", "examples", "decision_shards")}
    written = (out / "summary.json").stat().st_mtime_ns
    assert dedup.run(cfg, {"keys": key_set}, str(out)).summary == again.summary
    assert (out / "summary.json").stat().st_mtime_ns == written  # found, not redone
