"""The bytes img2dataset decodes, made to give the pixels cnpipe.images.decode_rgb gives (the one decoding policy).

img2dataset decodes with OpenCV (IMREAD_UNCHANGED): EXIF orientation is ignored, 16-bit samples are written to
8-bit JPEG saturated, CMYK and palette images are read otherwise than Pillow reads them. So, in the fetch layer:
an 8-bit RGB or gray JPEG, PNG or WebP without rotation, transparency or frames (nearly every image on the web)
is handed over as it came, at the cost of the header parse the guard does anyway; any other image is decoded by
decode_rgb and handed over as a lossless PNG of its upright 8-bit RGB, with the conversions counted. A body
that decode_rgb refuses is refused with decode_rgb's reason (empty_image, not_an_image, corrupt_image,
truncated_image, decompression_bomb), so a defect has the same name here as in hub_load.
"""
from __future__ import annotations

import io
from collections import Counter

from PIL import Image

from cnpipe import images

# what OpenCV decodes as Pillow does, given 8-bit RGB or gray samples (MPO: a JPEG, of which both read the first image)
AS_SENT_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")
_METADATA = ("exif", "xmp", "XML:com.adobe.xmp")  # where Pillow finds an orientation


def for_img2dataset(body: bytes, max_area: int) -> tuple[bytes, Counter]:
    """(the bytes to hand img2dataset, the conversions made); ImageRejected(decode_rgb's reason) for a body that is
    no usable image. Only the header is read unless the image needs converting."""
    try:
        with Image.open(io.BytesIO(body)) as image:
            width, height = image.size
            if width * height <= max_area and decodes_as_sent(image, body):
                return body, Counter()
    except Exception:  # noqa: BLE001 - decode_rgb below names whatever is wrong with it
        pass
    notes: Counter = Counter()
    rgb = images.decode_rgb(body, 1, max_area, notes)
    return lossless_png(rgb), notes


def decodes_as_sent(image: Image.Image, body: bytes) -> bool:
    """Whether OpenCV decodes these bytes to decode_rgb's pixels, judged from the header alone."""
    if image.format not in AS_SENT_FORMATS or image.mode not in ("RGB", "L") or "transparency" in image.info:
        return False
    if image.format != "MPO" and getattr(image, "is_animated", False):
        return False
    if image.format == "PNG":
        if body[12:16] != b"IHDR" or body[24] != 8:  # 16-bit (or 1/2/4-bit) samples, which Pillow may report as RGB/L
            return False
        if not any(key in image.info for key in _METADATA):
            return True  # (PngImageFile.getexif would decode the pixels to look for an eXIf chunk after them)
    return image.getexif().get(images.ORIENTATION_TAG, 1) in (0, 1)


def lossless_png(image: Image.Image) -> bytes:
    """PNG at zlib's fastest level: it is decoded once, in this process, and never stored."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()

