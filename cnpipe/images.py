"""Decode untrusted image bytes into clean RGB, or say exactly why not.

Every stage that reads pixels goes through `decode_rgb`, so EXIF orientation, CMYK, 16-bit, palette and
alpha images are normalised in one place (each conversion counted by kind when the caller keeps notes), and
empty, corrupt, truncated or oversized ones get one reason each.
"""
from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageRejected(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_rgb(data: bytes | None, min_side: int = 1, max_pixels: int = 89_478_485,
               notes: Counter | None = None) -> Image.Image:
    """Return an RGB image, upright as its EXIF orientation says; raise ImageRejected(reason) for anything unusable.

    Reasons: missing_image (no bytes at all), empty_image (zero bytes), not_an_image, corrupt_image, truncated_image,
    decompression_bomb, too_small. `notes` counts what was converted (see `to_rgb`, plus exif_rotated and
    animated_first_frame).
    """
    if data is None:
        raise ImageRejected("missing_image")
    if not data:
        raise ImageRejected("empty_image", "zero bytes")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageRejected("decompression_bomb", f"{width}x{height} exceeds {max_pixels} pixels")
                image.load()
            except ImageRejected:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise ImageRejected("decompression_bomb", str(err)) from None
            except UnidentifiedImageError:  # its message names the BytesIO object's address: not a stable detail
                raise ImageRejected("not_an_image", f"Pillow recognises no image format in these {len(data)} bytes") from None
            except OSError as err:
                reason = "truncated_image" if "image file is truncated" in str(err) else "corrupt_image"
                raise ImageRejected(reason, str(err)) from None
            except (ValueError, SyntaxError, EOFError) as err:
                raise ImageRejected("corrupt_image", str(err)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    notes = notes if notes is not None else Counter()
    if getattr(image, "is_animated", False):
        notes["animated_first_frame"] += 1
    if image.getexif().get(ORIENTATION_TAG, 1) not in (0, 1):
        image = ImageOps.exif_transpose(image)
        notes["exif_rotated"] += 1
    if min(image.size) < min_side:
        raise ImageRejected("too_small", f"{image.size[0]}x{image.size[1]} < {min_side}px")
    return to_rgb(image, notes)


ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 is upright; 2-8 say how the stored pixels must be turned


def to_rgb(image: Image.Image, notes: Counter | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is composited on white, 16-bit is scaled, not clipped. Each
    conversion is counted in `notes` (converted_16bit, converted_palette, composited_alpha, converted_<mode>)."""
    notes = notes if notes is not None else Counter()
    if image.mode != "RGB":
        notes[CONVERSION_NOTES.get(image.mode, f"converted_{image.mode.lower().replace(';', '_')}")] += 1
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


CONVERSION_NOTES = {
    "I;16": "converted_16bit", "I;16B": "converted_16bit", "I;16L": "converted_16bit", "I": "converted_16bit",
    "P": "converted_palette", "PA": "composited_alpha", "RGBA": "composited_alpha", "LA": "composited_alpha",
    "CMYK": "converted_cmyk", "L": "converted_gray", "1": "converted_bilevel",
}


def encode(image: Image.Image, fmt: str = "jpeg", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if fmt.lower() in ("jpg", "jpeg"):
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=fmt.upper())
    return buffer.getvalue()


def fit_within(image: Image.Image, max_side: int) -> Image.Image:
    """Downscale so that the longer side is at most `max_side`; never upscale."""
    if max_side <= 0 or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def encode_array(array, fmt: str = "png") -> bytes:
    """Encode an H×W×3 uint8 array with Pillow (any format Pillow writes)."""
    return encode(Image.fromarray(array), fmt)


def encode_control(array: np.ndarray) -> bytes:
    """Lossless PNG of a control image (H×W×3 RGB, or H×W gray), made fast because every row makes one.

    OpenCV's PNG writer at its fastest setting (zlib level 1, RLE) is ~4× Pillow's default on control images,
    and a black-and-white map (canny edges) is written 1 bit per pixel, ~3× smaller again; Pillow reads all of
    these back, and decode_rgb turns them into the same RGB array. Falls back to Pillow where OpenCV is absent.
    """
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"a control image is H×W×3 or H×W uint8, got {array.dtype} {array.shape}")
    try:
        import cv2
    except ImportError:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()
    params = []
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    elif not np.count_nonzero((array != 0) & (array != 255)):
        params = [cv2.IMWRITE_PNG_BILEVEL, 1]
    ok, encoded = cv2.imencode(".png", array, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.shape} control image as PNG")
    return encoded.tobytes()
