"""Frame bytes: JPEG codestream inspection, frame encoding, and the byte framing of
DICOM answers (encapsulated Pixel Data items, ``multipart/related`` parts).

Pure functions over bytes and arrays; reading a slide is ``service.py``'s job.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable

import imagecodecs
import numpy as np
import simplejpeg
from pydicom.encaps import itemize_frame
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from wsi_server import codecs

JPEG_BASELINE = str(JPEGBaseline8Bit)
EXPLICIT_LE = str(ExplicitVRLittleEndian)
FRAME_QUALITY = 95
"""JPEG quality of frames the server has to encode (levels not stored as JPEG tiles):
encoded once and cached, so they are worth a higher quality than a Deep Zoom tile."""

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_photometric(data: bytes) -> str | None:
    """The DICOM Photometric Interpretation a JPEG codestream's own markers imply, the way
    libjpeg decides its colour space: an Adobe APP14 marker with transform 0 (or, without
    JFIF or Adobe markers, component ids 'R', 'G', 'B') means RGB components; otherwise
    three components are YCbCr, ``YBR_FULL_422`` when chroma is subsampled and ``YBR_FULL``
    when not; one component is ``MONOCHROME2``. None when the stream cannot be parsed."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, n = 2, len(data)
    jfif = False
    adobe_transform: int | None = None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE0 and segment.startswith(b"JFIF\x00"):
            jfif = True
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe_transform = segment[11]
        elif marker in _SOF_MARKERS:
            if len(segment) < 6:
                return None
            count = segment[5]
            if count == 1:
                return "MONOCHROME2"
            if count != 3 or len(segment) < 6 + 3 * count:
                return None
            ids = bytes(segment[6 + 3 * i] for i in range(3))
            sampling = segment[7]
            if adobe_transform == 0 or (
                adobe_transform is None and not jfif and ids == b"RGB"
            ):
                return "RGB"
            return "YBR_FULL_422" if sampling != 0x11 else "YBR_FULL"
        elif marker == 0xDA:  # scan before frame: not a valid stream
            return None
        pos += 2 + length
    return None


def encode_frame(pixels: np.ndarray, photometric: str, quality: int = FRAME_QUALITY) -> bytes:
    """A baseline JPEG of RGB ``pixels`` whose codestream says what ``photometric`` says:
    RGB components (Adobe marker, no colour transform) for ``RGB``, YCbCr otherwise."""
    pixels = np.ascontiguousarray(pixels)
    if photometric == "RGB":
        return bytes(
            imagecodecs.jpeg8_encode(
                pixels, level=quality, colorspace="RGB", outcolorspace="RGB", subsampling="444"
            )
        )
    sub = "444" if photometric == "YBR_FULL" else "420"
    data: bytes = simplejpeg.encode_jpeg(
        pixels, quality=quality, colorspace="RGB", colorsubsampling=sub
    )
    return data


def pad_frame(pixels: np.ndarray, size: tuple[int, int], background: tuple[int, int, int]
              ) -> np.ndarray:
    """``pixels`` placed top-left in a (width, height) frame filled with ``background``."""
    w, h = size
    if pixels.shape[1] == w and pixels.shape[0] == h:
        return pixels
    out = np.empty((h, w, 3), np.uint8)
    codecs.fill(out, background)
    ph, pw = min(pixels.shape[0], h), min(pixels.shape[1], w)
    out[:ph, :pw] = pixels[:ph, :pw]
    return out


def decode_frame(data: bytes) -> np.ndarray:
    """RGB pixels of a JPEG frame, in the colours its codestream states."""
    return codecs.decode_jpeg(data)


def trim_jpeg(data: bytes) -> bytes:
    """A JPEG frame without the padding byte of an odd-length DICOM fragment."""
    if data.endswith(b"\xff\xd9\x00"):
        return data[:-1]
    return data


# -- Part 10 framing of encapsulated Pixel Data ----------------------------------------
# PixelData (7FE0,0010), VR OB, undefined length; an empty Basic Offset Table item; the
# Sequence Delimitation Item. Each frame is one item, written by pydicom's itemize_frame.
PIXEL_DATA_HEADER = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
EMPTY_BOT = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
SEQUENCE_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def frame_item(frame: bytes) -> bytes:
    """One encapsulated frame as a Pixel Data item (even length, one fragment)."""
    return b"".join(itemize_frame(frame, 1))


def native_pixel_header(length: int) -> bytes:
    """PixelData (7FE0,0010) OB of explicit ``length`` (native, uncompressed frames)."""
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length + (length & 1))


# -- multipart/related ------------------------------------------------------------------
def new_boundary() -> str:
    return uuid.uuid4().hex


def multipart_part(boundary: str, content_type: str, data: bytes,
                   location: str | None = None) -> bytes:
    head = f"--{boundary}\r\nContent-Type: {content_type}\r\n"
    if location:
        head += f"Content-Location: {location}\r\n"
    return b"".join((head.encode("ascii"), b"\r\n", data, b"\r\n"))


def multipart_end(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def multipart_body(boundary: str, content_type: str, parts: Iterable[bytes]) -> bytes:
    return b"".join([*(multipart_part(boundary, content_type, p) for p in parts),
                     multipart_end(boundary)])
