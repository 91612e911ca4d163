"""One decoding policy for every stage that turns bytes into pixels: upright as EXIF says, 16-bit scaled,
conversions counted by kind, and a zero-byte file named for what it is."""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from cnpipe import images


def upright() -> Image.Image:
    """64 wide, 32 high: red on the left, blue on the right, a green band at the top: every turn shows."""
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, :32, 0] = 255
    array[:, 32:, 2] = 255
    array[:6, :, 1] = 255
    return Image.fromarray(array)


def phone_jpeg(orientation: int, stored: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


# (EXIF orientation, how a camera stores the upright picture under that tag)
STORED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # displayed after turning 90° clockwise
    8: Image.Transpose.ROTATE_270,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_an_exif_rotated_jpeg_decodes_upright_and_is_counted(orientation):
    notes = Counter()
    decoded = images.decode_rgb(phone_jpeg(orientation, upright().transpose(STORED[orientation])), notes=notes)
    assert decoded.size == (64, 32)
    assert np.abs(np.asarray(decoded).astype(int) - np.asarray(upright()).astype(int)).mean() < 4  # JPEG tolerance
    assert notes == {"exif_rotated": 1}


def test_an_upright_exif_tag_changes_nothing_and_notes_nothing():
    notes = Counter()
    decoded = images.decode_rgb(phone_jpeg(1, upright()), notes=notes)
    assert decoded.size == (64, 32) and notes == {}


def test_a_16_bit_png_is_scaled_not_saturated():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    notes = Counter()
    decoded = np.asarray(images.decode_rgb(buffer.getvalue(), notes=notes))[:, :, 0].astype(int)
    assert np.abs(decoded - np.round(ramp / 257.0)).max() <= 1
    assert (decoded == 255).mean() < 0.05  # not saturated
    assert notes == {"converted_16bit": 1}


@pytest.mark.parametrize("mode, note", [("CMYK", "converted_cmyk"), ("RGBA", "composited_alpha"), ("P", "converted_palette"),
                                        ("L", "converted_gray")])
def test_every_conversion_is_counted_by_kind(mode, note):
    buffer = io.BytesIO()
    upright().convert(mode).save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
    notes = Counter()
    images.decode_rgb(buffer.getvalue(), notes=notes)
    assert notes == {note: 1}


def test_no_bytes_and_zero_bytes_are_told_apart():
    with pytest.raises(images.ImageRejected) as none:
        images.decode_rgb(None)
    with pytest.raises(images.ImageRejected) as empty:
        images.decode_rgb(b"")
    assert (none.value.reason, empty.value.reason) == ("missing_image", "empty_image")
