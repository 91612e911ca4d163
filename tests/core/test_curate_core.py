"""curate's parts that need no model: the hashes (pHash bit for bit as imagehash computes it, with SciPy's DCT), the
pipeline wiring (curate between blip_caption and conditioning, gone when curate.enabled is false), the run report's
curation section with example duplicate pairs."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image, ImageDraw

import pipeline_configs
from cnpipe.dataset import Reject, ShardedOutput, ShardResult, StageOutput
from components.curate import hashes


def picture(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x, y = (int(v) for v in rng.integers(0, min(size) // 2, 2))
        draw.ellipse([x, y, x + size[0] // 3, y + size[1] // 3], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image


def imagehash_phash(image: Image.Image) -> int:
    """imagehash.phash (hash_size 8, highfreq_factor 4), written out with SciPy as the package does."""
    import scipy.fftpack

    pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
    low = dct[:8, :8]
    bits = (low > np.median(low)).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def test_phash_is_imagehash_s_dct_hash_bit_for_bit():
    for seed in range(8):
        image = picture(seed, (100 + 13 * seed, 80 + 7 * seed))
        assert hashes.phash(image) == imagehash_phash(image)
    block = np.random.default_rng(1).random((32, 32))
    import scipy.fftpack

    np.testing.assert_allclose(hashes.dct2(block), scipy.fftpack.dct(scipy.fftpack.dct(block, axis=0), axis=1), atol=1e-9)


def test_phash_tells_copies_from_other_pictures_and_skips_plain_ones():
    image = picture(3, (240, 180))
    copy = image.resize((120, 90), Image.Resampling.BICUBIC)
    assert hashes.hamming(hashes.phash(image), hashes.phash(copy)) <= 2
    assert min(hashes.hamming(hashes.phash(image), hashes.phash(picture(s, (240, 180)))) for s in range(4, 12)) > 10
    # a plain image has nothing to hash: its bits would be noise
    assert hashes.phash(Image.new("RGB", (64, 64), (200, 10, 10))) is None


def test_pixel_hash_is_of_the_decoded_pixels_not_the_file():
    image = picture(5)

    def pixels(fmt: str) -> np.ndarray:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))

    assert hashes.pixel_hash(pixels("PNG")) == hashes.pixel_hash(pixels("BMP")) == hashes.pixel_hash(np.asarray(image))
    changed = np.asarray(image).copy()
    changed[0, 0, 0] ^= 1
    assert hashes.pixel_hash(changed) != hashes.pixel_hash(np.asarray(image))
    flat = np.zeros((4, 6, 3), dtype=np.uint8)
    assert hashes.pixel_hash(flat) != hashes.pixel_hash(flat.reshape(6, 4, 3))  # same bytes, another shape


def compiled(tmp_path, **overrides) -> dict:
    from kfp import compiler

    import pipeline

    config = pipeline_configs.with_overrides(pipeline_configs.preset("embedded"),
                                             [f"{k}={v}" for k, v in {"shard_groups": 1, **overrides}.items()])
    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline.build(config), package_path=str(path))
    return next(yaml.safe_load_all(path.read_text()))["root"]["dag"]["tasks"]


def test_curate_runs_between_captions_and_conditioning_and_a_preset_can_drop_it(tmp_path):
    tasks = compiled(tmp_path)
    assert set(tasks["curate-keys"]["dependentTasks"]) == {"blip-caption", "clip-embed"}  # seed embeddings reused
    assert tasks["curate-dedup"]["dependentTasks"] == ["curate-keys"]
    assert set(tasks["curate"]["dependentTasks"]) == {"blip-caption", "curate-keys", "curate-dedup"}
    assert tasks["conditioning"]["dependentTasks"] == ["curate"]
    assert {"curate", "curate-keys", "curate-dedup"} <= set(tasks["report"]["dependentTasks"])
    off = compiled(tmp_path, **{"curate.enabled": "false"})
    assert not [name for name in off if name.startswith("curate")]
    assert off["conditioning"]["dependentTasks"] == ["blip-caption"]


def test_the_summary_lists_curate_after_the_captions():
    from orchestration.local_run import STAGE_ORDER

    assert STAGE_ORDER.index("blip_caption") + 1 == STAGE_ORDER.index("curate") == STAGE_ORDER.index("conditioning") - 1
    assert "curate_keys" not in STAGE_ORDER and "curate_dedup" not in STAGE_ORDER  # parts of curate, under its folder


def test_report_shows_rows_removed_per_reason_and_duplicate_pairs_side_by_side(tmp_path):
    from components.report import curation

    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32())])
    images = ShardedOutput(str(tmp_path / "images"), "blip_caption", "t", schema)
    for name, ids in (("s0", ["kept-1", "x"]), ("s1", ["copy-1"])):
        blobs = []
        for i in ids:
            buffer = io.BytesIO()
            picture(len(i)).save(buffer, format="PNG")
            blobs.append(buffer.getvalue())
        images.commit(name, ShardResult(pa.table({"id": ids, "image": blobs, "width": [120] * len(ids), "height": [90] * len(ids)},
                                                 schema=schema)), rows_in=len(ids))
    images_manifest = images.finalize(["s0", "s1"], inputs=[])
    out = ShardedOutput(str(tmp_path / "curate"), "curate", "t", schema)
    out.commit("s0", ShardResult(schema.empty_table(), [Reject("kept-1", "low_resolution", ""), Reject("x", "unsafe", "")]), rows_in=2)
    out.commit("s1", ShardResult(schema.empty_table(), [Reject("copy-1", "near_duplicate", "kept kept-1: phash distance 2")]), rows_in=1)
    curated = out.finalize(["s0", "s1"], inputs=[images_manifest.uri, "keys", "dedup"])
    dedup = StageOutput(str(tmp_path / "dedup"), {
        "considered": 3, "duplicate": 0, "near_duplicate": 1, "evidence": {"phash": 1, "embedding": 0},
        "clip_similarity": {"p05": 0.1, "p50": 0.2, "p95": 0.3},
        "examples": [{"reason": "near_duplicate", "kept_id": "kept-1", "kept_shard": "s0", "dropped_id": "copy-1",
                      "dropped_shard": "s1", "evidence": "phash distance 2"}]})
    lines, pairs = curation.section({"curate": curated, "curate_dedup": dedup})
    text = "\n".join(lines)
    assert "## Curation" in text and "| near_duplicate | 1 |" in text and "| unsafe | 1 |" in text
    assert "| near_duplicate | `kept-1` | `copy-1` | phash distance 2 |" in text
    assert [p["kept"]["id"] for p in pairs] == ["kept-1"] and [p["dropped"]["id"] for p in pairs] == ["copy-1"]
    sheet = curation.render(pairs)
    assert sheet.size[1] > 100 and np.asarray(sheet)[40:100, 10:100].std() > 0  # the kept picture is drawn
    assert curation.section({"blip_caption": images_manifest}) == ([], [])  # no curate in the run: no section


@pytest.mark.parametrize("value", ["auto", "SQ8", "IVF1024,SQ8"])
def test_curate_settings_are_checked_with_the_others(value):
    from components.registry import check_settings

    config = pipeline_configs.with_overrides(pipeline_configs.preset("production"), [f"curate.embedding_index={value}"])
    check_settings(config)
    bad = pipeline_configs.with_overrides(config, ["curate.phash_max_distance=40", "curate.min_side=-1"])
    with pytest.raises(pipeline_configs.ConfigError, match="curate.phash_max_distance"):
        check_settings(bad)


def test_the_html_report_has_the_curation_section_too(tmp_path):
    from components.report import curation

    schema = pa.schema([("id", pa.string()), ("image", pa.binary())])
    out = ShardedOutput(str(tmp_path / "curate"), "curate", "t", schema)
    out.commit("s0", ShardResult(schema.empty_table(), [Reject("a", "duplicate", "kept b: same pixels")]), rows_in=1)
    curated = out.finalize(["s0"], inputs=[str(tmp_path / "images")])
    pair = {"reason": "duplicate", "kept_id": "b", "dropped_id": "a", "evidence": "same pixels"}
    from components.report.contact_sheet import to_png

    sections = curation.html_sections({"curate": curated}, [pair], to_png(Image.new("RGB", (8, 8))))
    text = "\n".join(sections)
    assert "<h2>Curation</h2>" in text and "duplicate" in text and "same pixels" in text and "data:image/png;base64," in text
    assert curation.html_sections({}, [], None) == []
