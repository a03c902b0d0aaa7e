"""Image encoding and decoding: libjpeg-turbo through simplejpeg, PNG through imagecodecs,
resampling through Pillow (the same LANCZOS filter ``DeepZoomGenerator`` uses)."""

from __future__ import annotations

import imagecodecs
import numpy as np
import simplejpeg
from PIL import Image

JPEG = "image/jpeg"
PNG = "image/png"
WEBP = "image/webp"
JPEG_MAX_SIDE = 65500
"""The widest and tallest image libjpeg-turbo encodes."""
SOI = b"\xff\xd8"
"""The start-of-image marker every JPEG stream (complete or abbreviated) begins with."""
MEDIA_TYPES = {"jpeg": JPEG, "jpg": JPEG, "png": PNG, "webp": WEBP}

# APP14 "Adobe" segment with transform 0: the three components are RGB, not YCbCr.
# Aperio writes JPEG tiles of photometric RGB; without this marker a browser would
# decode them as YCbCr and paint them green and purple.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def complete_jpeg(tile: bytes, tables: bytes | None, rgb: bool) -> bytes:
    """A self-contained JPEG stream from a TIFF tile and the page's JPEGTables.

    The tile is an abbreviated stream (SOI, frame, scan, EOI); the tables stream holds the
    quantisation and Huffman tables between its own SOI and EOI.
    """
    parts = [b"\xff\xd8"]
    if rgb:
        parts.append(_ADOBE_RGB)
    if tables:
        parts.append(tables[2:-2])
    parts.append(tile[2:])
    return b"".join(parts)


def decode_jpeg(data: bytes, factor: int = 1, size: tuple[int, int] = (0, 0)) -> np.ndarray:
    """RGB pixels of a complete JPEG stream of ``size`` (width, height), decoded at
    1/``factor`` scale by libjpeg-turbo's DCT scaling (factor 1, 2, 4 or 8)."""
    if factor == 1:
        arr: np.ndarray = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False)
        return arr
    arr = simplejpeg.decode_jpeg(
        data,
        colorspace="RGB",
        min_width=-(-size[0] // factor),
        min_height=-(-size[1] // factor),
        min_factor=float(factor),
        strict=False,
    )
    return arr


def encode(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    """Encode a ``uint8`` array as ``jpeg``, ``png`` or ``webp``: RGB (h, w, 3), or grey
    (h, w) (RGB for WebP), or RGBA (h, w, 4) for PNG and WebP."""
    pixels = np.ascontiguousarray(pixels)
    if fmt == "png":
        return bytes(imagecodecs.png_encode(pixels, level=1))
    if fmt == "webp":
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        # lossy, fastest method: the others cost 2-4x the time for the same size
        return bytes(imagecodecs.webp_encode(pixels, level=quality, lossless=False, method=0))
    if pixels.ndim == 2:
        grey: bytes = simplejpeg.encode_jpeg(pixels[:, :, None], quality=quality,
                                             colorspace="GRAY")
        return grey
    data: bytes = simplejpeg.encode_jpeg(
        pixels, quality=quality, colorspace="RGB", colorsubsampling="420"
    )
    return data


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample to (width, height) with Pillow's LANCZOS, as ``Image.thumbnail`` does."""
    if (pixels.shape[1], pixels.shape[0]) == size:
        return pixels
    img = Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    return np.asarray(img)


def rotate(
    pixels: np.ndarray, degrees: float, background: tuple[int, int, int], transparent: bool
) -> np.ndarray:
    """Rotate RGB pixels clockwise by any angle, into the bounding box of the result; the
    corners are transparent (RGBA out) or the background colour."""
    img = Image.fromarray(pixels)
    if transparent:
        img = img.convert("RGBA")
        fill_colour: tuple[int, ...] = (0, 0, 0, 0)
    else:
        fill_colour = background
    out = img.rotate(-degrees, resample=Image.Resampling.BICUBIC, expand=True,
                     fillcolor=fill_colour)
    return np.asarray(out)


def to_gray(pixels: np.ndarray) -> np.ndarray:
    """Grey levels (h, w) of RGB or RGBA pixels (ITU-R 601-2 luma, Pillow's ``L``); the
    alpha of RGBA is kept, as grey+alpha is not encodable everywhere: transparent stays."""
    if pixels.shape[2] == 4:
        luma = np.asarray(Image.fromarray(pixels[:, :, :3]).convert("L"))
        return np.dstack((luma, luma, luma, pixels[:, :, 3]))
    return np.asarray(Image.fromarray(pixels).convert("L"))


def to_bitonal(pixels: np.ndarray) -> np.ndarray:
    """Black or white (0 or 255) by a threshold at mid-grey, without dithering."""
    grey = to_gray(pixels)
    if grey.ndim == 3:  # RGBA: threshold the colour, keep the alpha
        bw = np.where(grey[:, :, 0] >= 128, 255, 0).astype(np.uint8)
        return np.dstack((bw, bw, bw, grey[:, :, 3]))
    return np.where(grey >= 128, 255, 0).astype(np.uint8)


def fill(pixels: np.ndarray, rgb: tuple[int, int, int]) -> None:
    """Fill an (h, w, 3) array with one colour (fast: numpy broadcasts a 3-vector slowly)."""
    if rgb[0] == rgb[1] == rgb[2]:
        pixels.fill(rgb[0])
    elif pixels.size:
        row = np.empty((1, pixels.shape[1], 3), np.uint8)
        row[0, :] = rgb
        pixels[...] = row


def ycbcr_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """Full-range BT.601 YCbCr to RGB, as OpenSlide converts Aperio's YCbCr JPEG 2000."""
    ycc = pixels.astype(np.float32)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128.0, ycc[..., 2] - 128.0
    rgb = np.stack(
        (y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb), axis=-1
    )
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """Bring grey, grey+alpha, RGBA or 16-bit pixels to RGB ``uint8``."""
    if pixels.dtype != np.uint8:
        info = np.iinfo(pixels.dtype) if pixels.dtype.kind in "iu" else None
        scale = 255.0 / info.max if info else 255.0
        pixels = np.clip(pixels.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = pixels.shape[2]
    if channels == 3:
        return pixels
    if channels in (1, 2):
        return np.repeat(pixels[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])
