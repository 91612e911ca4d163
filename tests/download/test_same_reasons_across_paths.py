"""The same files through hub_load's folder path and through the download stage (served over loopback, img2dataset
really runs): one decoding policy, cnpipe.images.decode_rgb, on both. Awkward images come out with decode_rgb's
pixels (EXIF orientation applied, 16-bit scaled, CMYK, palette and alpha converted), each conversion counted in the
manifest's notes by kind, and every defect of the bad-input matrix is rejected with the same reason on both paths.
The thresholds are set to agree: hub_load.min_image_side = download.min_image_size, hub_load.max_image_pixels =
download.max_image_area, hub_load.max_file_bytes = download.max_body_bytes."""
from __future__ import annotations

import io
import struct
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

import pipeline_configs
from cnpipe.images import decode_rgb
from cnpipe.ids import stable_id
from components.download import stage as download
from components.download.url_guard import ENV_VAR
from components.hub_load import stage as hub_load
from conftest import LoopbackWeb
from test_download_stage import retrieved

MIN_SIDE, MAX_PIXELS, MAX_BYTES = 16, 40_000, 100_000
JPEG_TOLERANCE = 8  # largest difference, on these smooth images, of img2dataset's JPEG (quality 95) from exact pixels


def gradient(width: int, height: int) -> Image.Image:
    """A smooth image that is the same under no rotation or flip."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 200 // width + 20, y * 180 // height + 40, (x * y) * 150 // (width * height)],
                                    axis=-1).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def exif_jpeg(orientation: int) -> bytes:
    """A JPEG whose stored pixels are turned; its EXIF orientation says how to stand them up."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(gradient(72, 40), "JPEG", quality=95, exif=exif.tobytes())


def bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: tens of kB that claim 400 million pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    idat = zlib.compress(b"\x00" * (1 + (side + 7) // 8) * side, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def awkward_files() -> dict[str, bytes]:
    """Images a decoder must convert to give the right pixels."""
    sixteen = np.add.outer(np.linspace(0, 30000, 32), np.linspace(0, 35535, 64)).astype(np.uint16)
    rgba = np.zeros((32, 64, 4), np.uint8)
    rgba[:, 32:] = (10, 20, 30, 255)  # left half fully transparent, right half opaque
    grays = np.random.default_rng(2).integers(0, 256, (3, 4, 1), dtype=np.uint8).repeat(3, axis=2)
    blocks = np.kron(grays, np.ones((16, 16, 1), np.uint8))  # flat gray 16x16 blocks: what JPEG keeps exactly
    return {
        "rotated_6.jpg": exif_jpeg(6),  # stored 72x40, upright 40x72
        "rotated_3.jpg": exif_jpeg(3),  # upside down
        "sixteen.png": encode(Image.fromarray(sixteen), "PNG"),  # 16-bit gray, mostly over 255
        "cmyk.jpg": encode(gradient(64, 48).convert("CMYK"), "JPEG", quality=95),
        "palette.gif": encode(Image.fromarray(blocks).quantize(12), "GIF"),
        "rgba.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "plain.jpg": encode(gradient(64, 48), "JPEG", quality=95),  # handed to img2dataset as it came
        "wide.png": encode(gradient(400, 20), "PNG"),  # aspect 20: hub_load has no aspect filter (see download config)
    }


def defective_files() -> dict[str, tuple[bytes, str]]:
    """The bad-input matrix: each file, and the reason both paths must give."""
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    png, jpeg = encode(Image.fromarray(noise), "PNG"), encode(Image.fromarray(noise), "JPEG", quality=90)
    huge = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (190, 190, 3), dtype=np.uint8)), "PNG")
    assert len(huge) > MAX_BYTES > len(bomb_png()) and 190 * 190 < MAX_PIXELS
    return {
        "empty.jpg": (b"", "empty_image"),
        "page.jpg": (b"<!doctype html><html><body>404 Not Found</body></html>", "not_an_image"),
        "truncated.png": (png[: len(png) // 2], "truncated_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated_image"),
        "corrupt.jpg": (b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(64), "corrupt_image"),
        "one.png": (encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), "too_small"),
        "narrow.png": (encode(gradient(200, 10), "PNG"), "too_small"),
        "bomb.png": (bomb_png(), "decompression_bomb"),
        "big.png": (encode(gradient(250, 200), "PNG"), "decompression_bomb"),  # 50,000 pixels > 40,000
        "huge.png": (huge, "file_too_large"),
    }


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory):
    """hub_load over a folder of the files, download over the same files served on loopback: (files, hub_load's
    manifest, download's manifest)."""
    tmp = tmp_path_factory.mktemp("paths")
    files = {**awkward_files(), **{name: data for name, (data, _) in defective_files().items()}}
    folder = tmp / "folder"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)

    config = pipeline_configs.embedded(str(tmp / "runs"))
    for key, value in {"kind": "folder", "source": str(folder), "min_image_side": MIN_SIDE, "max_image_pixels": MAX_PIXELS,
                       "max_file_bytes": MAX_BYTES, "max_image_side": 1024, "encode_format": "png"}.items():
        setattr(config.hub_load, key, value)
    for key, value in {"min_image_size": MIN_SIDE, "max_image_area": MAX_PIXELS, "max_body_bytes": MAX_BYTES,
                       "max_aspect_ratio": 25.0, "processes_count": 1, "thread_count": 4, "retries": 0, "timeout_s": 10,
                       "allowed_networks": ["127.0.0.1/32"]}.items():
        setattr(config.download, key, value)
    from_folder = hub_load.run(config, {}, str(tmp / "hub_load"))

    web = LoopbackWeb()
    web.files = {f"/{name}": ("image/jpeg", data) for name, data in files.items()}
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV_VAR, "")  # run() sets the worker's policy here: undone below, as is urllib's guarded opener
    try:
        from_web = download.run(config, {"retrieved": retrieved(tmp, {name: web.url(f"/{name}") for name in files})},
                                str(tmp / "download"))
    finally:
        mp.undo()
        urllib.request.install_opener(None)
        web.close()
    return files, from_folder, from_web


def reasons(manifest, ids: dict[str, str]) -> dict[str, str]:
    by_id = {r["id"]: r["reason"] for r in manifest.rejected_table().to_pylist()}
    return {name: by_id.get(row_id, "kept") for name, row_id in ids.items()}


def kept_images(manifest, ids: dict[str, str]) -> dict[str, np.ndarray]:
    by_id = {r["id"]: r["image"] for _, table in manifest.iter_shards() for r in table.to_pylist()}
    return {name: np.asarray(decode_rgb(by_id[row_id])).astype(int) for name, row_id in ids.items() if row_id in by_id}


def test_every_defect_has_the_same_reason_on_both_paths(both_paths):
    files, from_folder, from_web = both_paths
    expected = {name: reason for name, (_, reason) in defective_files().items()}
    expected.update({name: "kept" for name in awkward_files()})
    folder_reasons = reasons(from_folder, {name: stable_id("folder", name) for name in files})
    web_reasons = reasons(from_web, {name: name for name in files})
    assert {"hub_load": folder_reasons, "download": web_reasons} == {"hub_load": expected, "download": expected}


def test_awkward_images_come_out_with_the_pixels_of_the_one_decoding_policy(both_paths):
    files, from_folder, from_web = both_paths
    folder_images = kept_images(from_folder, {name: stable_id("folder", name) for name in awkward_files()})
    web_images = kept_images(from_web, {name: name for name in awkward_files()})
    assert sorted(folder_images) == sorted(web_images) == sorted(awkward_files())
    for name in awkward_files():
        truth = np.asarray(decode_rgb(files[name])).astype(int)
        assert folder_images[name].shape == web_images[name].shape == truth.shape, name
        assert np.array_equal(folder_images[name], truth), name  # hub_load stores PNG here: exact
        difference = np.abs(web_images[name] - truth)  # img2dataset stores JPEG
        assert difference.max() <= JPEG_TOLERANCE and difference.mean() < 1.5, (name, difference.max(), difference.mean())
    assert web_images["rotated_6.jpg"].shape == (72, 40, 3)  # stood up
    assert 100 < web_images["sixteen.png"].mean() < 160  # scaled from 16 bits, not saturated


def test_conversions_are_counted_by_kind_on_both_paths(both_paths):
    _, from_folder, from_web = both_paths
    expected = {"exif_rotated": 2, "converted_16bit": 1, "converted_cmyk": 1, "converted_palette": 1,
                "composited_alpha": 1}
    assert from_folder.notes == from_web.notes == expected
