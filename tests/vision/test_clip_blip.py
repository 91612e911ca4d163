"""clip_embed and blip_caption on the tiny CLIP/BLIP (same classes, processors and safetensors files as the
real checkpoints): unit-norm float32 embeddings that do not depend on the batch size, captions added beside
the source caption, corrupt images and rows without an image accounted for."""
from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

import pipeline_configs
from cnpipe.dataset import Manifest, ShardedOutput, ShardResult
from components.blip_caption import stage as blip_caption
from components.clip_embed import stage as clip_embed
from components.hub_load.stage import SEED_SCHEMA


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> pathlib.Path:
    """Built once per session (ensure is idempotent), shared by this family's data-half test modules."""
    from cnpipe.embedded import tiny_models

    root = tmp_path_factory.getbasetemp() / "data-half-models"
    tiny_models.ensure(str(root))
    return root


def picture(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, min(size) // 2, 2))
        draw.ellipse([x, y, x + size[0] // 3, y + size[1] // 3], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


SIZES = [(64, 48), (80, 80), (40, 100), (128, 96), (70, 50), (64, 64)]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Manifest:
    ids = [f"img-{i}" for i in range(len(SIZES))] + ["same-as-img-0", "corrupt", "url-only"]
    blobs = [picture(i, s) for i, s in enumerate(SIZES)] + [picture(0, SIZES[0]), b"\xff\xd8\xff\xe0" + bytes(64), None]
    table = pa.table(
        {
            "id": ids, "image": blobs, "width": [None] * len(ids), "height": [None] * len(ids),
            "url": [None] * (len(ids) - 1) + ["http://example.com/a.jpg"],
            "source_caption": [f"source {i}" if i % 2 else None for i in range(len(ids))],
            "origin": [f"test:{i}" for i in ids],
        },
        schema=SEED_SCHEMA,
    )
    output = ShardedOutput(str(tmp_path_factory.mktemp("clip-blip") / "seeds"), "hub_load", "test", SEED_SCHEMA)
    names = []
    for index, start in enumerate(range(0, table.num_rows, 4)):
        names.append(f"part-{index:05d}")
        chunk = table.slice(start, 4)
        output.commit(names[-1], ShardResult(chunk), chunk.num_rows)
    return output.finalize(names, inputs=[])


def config(models: pathlib.Path, clip_batch: int = 8) -> pipeline_configs.PipelineConfig:
    cfg = pipeline_configs.embedded(str(models.parent))
    cfg.clip_embed.model = str(models / "tiny-clip")
    cfg.clip_embed.batch_size = clip_batch
    cfg.caption.model = str(models / "tiny-blip")
    cfg.caption.batch_size = 3
    return cfg


def all_rows(manifest: Manifest) -> pa.Table:
    return pa.concat_tables([t for _, t in manifest.iter_shards()])


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_models, seeds) -> dict[int, Manifest]:
    root = tmp_path_factory.mktemp("clip-out")
    return {b: clip_embed.run(config(tiny_models, b), {"seeds": seeds}, str(root / f"batch-{b}")) for b in (8, 1)}


def test_clip_embeddings_are_unit_norm_float32_of_projection_dim(embedded, seeds, tiny_models):
    manifest = embedded[8]
    dim = json.loads((tiny_models / "tiny-clip" / "config.json").read_text())["projection_dim"]
    assert manifest.rows_in == seeds.rows_in == 9
    assert manifest.rows_in == manifest.rows_out + manifest.rows_rejected
    assert manifest.rejections == {"not_an_image": 1}
    assert manifest.rejected_table().column("id").to_pylist() == ["corrupt"]
    assert manifest.notes == {"no_image_to_embed": 1}
    assert manifest.arrow_schema().field("clip_embedding").type == pa.list_(pa.float32())
    rows = {r["id"]: r for r in all_rows(manifest).to_pylist()}
    assert rows["url-only"]["clip_embedding"] is None  # nothing to embed yet: passes through, counted
    vectors = {i: np.asarray(r["clip_embedding"], dtype=np.float32) for i, r in rows.items() if i != "url-only"}
    assert len(vectors) == 7
    for vector in vectors.values():
        assert vector.shape == (dim,)
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    np.testing.assert_allclose(vectors["img-0"], vectors["same-as-img-0"], atol=1e-6)
    distinct = np.stack([vectors[f"img-{i}"] for i in range(len(SIZES))])
    assert (distinct @ distinct.T)[~np.eye(len(SIZES), dtype=bool)].max() < 0.99999  # images are told apart
    assert all(rows[i]["source_caption"] == r["source_caption"] for i, r in rows.items())


def test_clip_batch_size_does_not_change_embeddings(embedded):
    one, eight = all_rows(embedded[1]), all_rows(embedded[8])
    assert one.column("id").to_pylist() == eight.column("id").to_pylist()
    for a, b in zip(one.column("clip_embedding").to_pylist(), eight.column("clip_embedding").to_pylist()):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert embedded[1].config_hash == embedded[8].config_hash  # a throughput knob: a resume after changing it is not refused


def test_blip_adds_a_caption_and_keeps_the_source_caption(tmp_path, embedded, tiny_models):
    source = embedded[8]
    manifest = blip_caption.run(config(tiny_models), {"images": source}, str(tmp_path / "captioned"))
    assert manifest.rows_in == source.rows_out == manifest.rows_out + manifest.rows_rejected
    assert manifest.rejections == {"missing_image": 1}  # the URL row that has no image yet
    assert manifest.arrow_schema() == source.arrow_schema().append(pa.field("blip_caption", pa.string()))
    captioned = {r["id"]: r for r in all_rows(manifest).to_pylist()}
    originals = {r["id"]: r for r in all_rows(source).to_pylist()}
    assert sorted(captioned) == sorted(i for i in originals if i != "url-only")
    for row_id, row in captioned.items():
        assert isinstance(row["blip_caption"], str)
        assert row["source_caption"] == originals[row_id]["source_caption"]
        assert row["image"] == originals[row_id]["image"] and row["clip_embedding"] == originals[row_id]["clip_embedding"]
    empty = sum(1 for r in captioned.values() if not r["blip_caption"])
    assert manifest.notes.get("blip_caption_empty", 0) == empty
    assert captioned["img-0"]["blip_caption"] == captioned["same-as-img-0"]["blip_caption"]  # greedy decoding


def test_blip_conditional_prompt_is_stripped_from_captions(tmp_path, embedded, tiny_models):
    """BLIP continues the prompt ("a picture of" ...): the generated text starts with it, the caption does not
    (the original BLIP returns caption[len(prompt):])."""
    cfg = config(tiny_models)
    cfg.caption.prompt = "A picture of"  # the uncased tokenizer spells it back in lower case
    manifest = blip_caption.run(cfg, {"images": embedded[8]}, str(tmp_path / "prompted"))
    captions = {r["id"]: r["blip_caption"] for r in all_rows(manifest).to_pylist()}
    captioner = blip_caption.BlipCaptioner(cfg.caption.model, prompt=cfg.caption.prompt)
    originals = {r["id"]: r["image"] for r in all_rows(embedded[8]).to_pylist()}
    pictures = [Image.open(io.BytesIO(originals[i])).convert("RGB") for i in captions]
    batch = captioner.prepare(pictures)
    tokens = captioner.model.generate(**batch, **captioner.generate_kwargs)
    generated = [t.strip() for t in captioner.processor.batch_decode(tokens, skip_special_tokens=True)]
    assert len(generated) == len(captions) == 7
    for text, caption in zip(generated, captions.values()):
        assert text.startswith("a picture of")
        assert caption == text[len("a picture of"):].strip()
    assert manifest.notes.get("blip_caption_empty", 0) == sum(1 for c in captions.values() if not c)
