"""The zarr v3 codec of converted stores' JPEG chunks: ``wsi_server.jpeg``.

A chunk is an RGB ``uint8`` array of shape ``(T, T, 3)`` stored as one complete baseline
JPEG stream (what a browser decodes). A chunk at the right or bottom edge of a level may be
stored as a JPEG of only its pixels inside the level (so that it can be served as the edge
tile as it is); decoding pads it to the chunk shape with the array's fill value.

zarr-python finds the codec by the entry point ``zarr.codecs`` of this package (installed
with it), and importing this module registers it too, so both
``zarr.open("slide.zarr")`` and ``import wsi_server.zarr_codecs; zarr.open(...)`` work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import simplejpeg
from zarr.abc.codec import ArrayBytesCodec
from zarr.registry import register_codec

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

CODEC_NAME = "wsi_server.jpeg"


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """One complete JPEG (YCbCr 4:2:0, libjpeg-turbo) of an RGB ``uint8`` array."""
    data: bytes = simplejpeg.encode_jpeg(
        np.ascontiguousarray(pixels), quality=quality, colorspace="RGB", colorsubsampling="420"
    )
    return data


def decode_jpeg_chunk(data: bytes, shape: tuple[int, ...], fill: int) -> np.ndarray:
    """Pixels of a stored JPEG chunk padded to the chunk ``shape`` (h, w, 3) with ``fill``."""
    arr: np.ndarray = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False)
    if arr.shape == shape:
        return arr
    out = np.full(shape, fill, np.uint8)
    h, w = min(arr.shape[0], shape[0]), min(arr.shape[1], shape[1])
    out[:h, :w] = arr[:h, :w]
    return out


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """Array-to-bytes codec: an RGB chunk as one JPEG stream."""

    is_fixed_size = False
    quality: int = 90

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        config = data.get("configuration") or {}
        return cls(quality=int(config.get("quality", 90)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": CODEC_NAME, "configuration": {"quality": self.quality}}

    def validate(self, *, shape: Any, dtype: Any, chunk_grid: Any) -> None:
        if len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"{CODEC_NAME} stores (y, x, 3) RGB arrays")

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        fill = int(chunk_spec.fill_value) if chunk_spec.fill_value is not None else 0
        arr = decode_jpeg_chunk(chunk_bytes.to_bytes(), tuple(chunk_spec.shape), fill)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(arr)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        arr = np.asarray(chunk_array.as_numpy_array(), dtype=np.uint8)
        return chunk_spec.prototype.buffer.from_bytes(encode_jpeg(arr, self.quality))

    async def _encode_single(
        self, chunk_array: NDBuffer, chunk_spec: ArraySpec
    ) -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError("JPEG chunks have no fixed size")


register_codec(CODEC_NAME, JpegCodec)
