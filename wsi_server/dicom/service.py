"""The DICOM view's service: slide models cached by fingerprint, the UID → slide index,
and frame bytes (stored tiles read as they are, other frames encoded once and cached in
the tile cache).

The service decides nothing about access: the front resolves every slide through
``ctx.slide_by_id`` first and asks the service only about slides the requester may see.
"""

from __future__ import annotations

import asyncio
import copy
import io
import logging
import os
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from wsi_server import codecs
from wsi_server.cache import TileCache
from wsi_server.dicom import frames as fr
from wsi_server.dicom.model import (
    InstanceModel,
    SlideModel,
    StoredTiles,
    build_model,
    name_uid,
    redacted,
)
from wsi_server.errors import UnreadableSlide
from wsi_server.library import Library, SlideEntry
from wsi_server.tiles import TileService

log = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = name_uid("wsi-server", "implementation")
IMPLEMENTATION_VERSION = "WSI_SERVER_01"
STREAM_BATCH = 16
"""Frames read per step while streaming a whole instance: memory stays a few frames."""


def part10_header(ds: Dataset, syntax: str) -> bytes:
    """Preamble, file meta and every attribute before Pixel Data, written by pydicom."""
    out = copy.copy(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    out.file_meta = meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, out, enforce_file_format=True)
    return buf.getvalue()


class DicomService:
    def __init__(self, library: Library, tiles: TileService, cache: TileCache) -> None:
        self.library = library
        self.tiles = tiles
        self.cache = cache
        self._models: dict[str, SlideModel | None] = {}
        self._fingerprints: dict[str, str] = {}
        self._by_uid: dict[str, str] = {}
        self._building: dict[tuple[str, str], asyncio.Future[SlideModel | None]] = {}
        self._json: dict[str, dict[str, object]] = {}

    # -- models and the UID index ------------------------------------------------------
    async def model(self, entry: SlideEntry) -> SlideModel | None:
        """The model of a readable slide, built once per fingerprint."""
        if entry.error is not None or entry.metadata is None or entry.remote:
            return None  # a DICOMweb archive's slide: its archive serves its DICOM view
        if self._fingerprints.get(entry.id) == entry.fingerprint:
            return self._models.get(entry.id)
        key = (entry.id, entry.fingerprint)
        pending = self._building.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[SlideModel | None] = asyncio.get_running_loop().create_future()
        self._building[key] = future
        try:
            model = await self.tiles.run(self._build, entry)
            self._register(entry, model)
            future.set_result(model)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            del self._building[key]
        return model

    def _build(self, entry: SlideEntry) -> SlideModel | None:
        try:
            return build_model(entry, self.library.reader(entry))
        except Exception as exc:  # one slide never breaks the DICOM view of the others
            log.warning("slide %s has no DICOM view: %r", entry.id, exc)
            return None

    def _register(self, entry: SlideEntry, model: SlideModel | None) -> None:
        old = self._models.get(entry.id)
        if old is not None:
            for uid in (old.study_uid, old.series_uid, *(i.uid for i in old.instances)):
                self._by_uid.pop(uid, None)
                self._json.pop(uid, None)
        self._models[entry.id] = model
        self._fingerprints[entry.id] = entry.fingerprint
        if model is not None:
            for uid in (model.study_uid, model.series_uid, *(i.uid for i in model.instances)):
                self._by_uid[uid] = entry.id

    async def models(self, entries: Sequence[SlideEntry]) -> list[SlideModel]:
        out = []
        for entry in entries:
            model = await self.model(entry)
            if model is not None:
                out.append(model)
        return out

    async def slide_id_of(self, uid: str) -> str | None:
        """The slide a study, series or instance UID belongs to (any slide of the library;
        access is decided by the caller)."""
        sid = self._by_uid.get(uid)
        if sid is None:
            await self.models(self.library.entries())
            sid = self._by_uid.get(uid)
        return sid

    # -- metadata ----------------------------------------------------------------------
    def instance_json(self, inst: InstanceModel, hidden: frozenset[str], bulk_uri: str
                      ) -> dict[str, object]:
        """DICOM JSON of an instance; Pixel Data as a BulkDataURI, binary values inline."""
        key = inst.uid if "label" not in hidden else inst.uid + ":redacted"
        cached = self._json.get(key)
        if cached is None:
            cached = redacted(inst.dataset, hidden).to_json_dict(
                bulk_data_threshold=2**31)
            cached["00083002"] = {"vr": "UI", "Value": list(inst.transfer_syntaxes)}
            if len(self._json) > 20000:
                self._json.clear()
            self._json[key] = cached
        out = dict(cached)
        out["7FE00010"] = {"vr": "OB", "BulkDataURI": bulk_uri}
        return out

    # -- frames ------------------------------------------------------------------------
    async def frames(self, entry: SlideEntry, inst: InstanceModel, indices: Sequence[int],
                     syntax: str) -> list[bytes]:
        """Frames (0-based ``indices``) in ``syntax``: the stored one, or uncompressed."""
        native = await self._native_frames(entry, inst, indices)
        if syntax == inst.transfer_syntax:
            return native
        if syntax == fr.EXPLICIT_LE:
            return await self.tiles.run(
                lambda: [np.ascontiguousarray(fr.decode_frame(f)).tobytes() for f in native])
        raise ValueError(f"frames of this instance cannot be had in {syntax}")

    async def _native_frames(self, entry: SlideEntry, inst: InstanceModel,
                             indices: Sequence[int]) -> list[bytes]:
        if inst.source == "file":
            return await self.tiles.run(self._file_frames, inst, list(indices))
        out: list[bytes | None] = [None] * len(indices)
        missing: list[int] = []
        if inst.source == "stored":
            reader = self.library.reader(entry)
            stored = reader if isinstance(reader, StoredTiles) else None
            for n, index in enumerate(indices):
                col, row = inst.address(index)
                raw = (stored.read_stored_tile(inst.level, col, row) if stored is not None
                       else reader.read_raw_tile(inst.level, col, row))
                if raw is not None:
                    out[n] = raw.data
                else:
                    missing.append(n)
        else:
            missing = list(range(len(indices)))
        if missing:
            keys = [self._cache_key(entry, inst, indices[n]) for n in missing]
            cached = await asyncio.gather(*(self.cache.get(k) for k in keys))
            todo = [(n, k) for n, k, c in zip(missing, keys, cached, strict=True) if c is None]
            for n, c in zip(missing, cached, strict=True):
                if c is not None:
                    out[n] = c
            if todo:
                rendered = await asyncio.gather(
                    *(self.tiles.run(self._render, entry, inst, indices[n]) for n, _ in todo))
                for (n, key), data in zip(todo, rendered, strict=True):
                    out[n] = data
                    await self.cache.set(key, data)
        return [b for b in out if b is not None]

    @staticmethod
    def _cache_key(entry: SlideEntry, inst: InstanceModel, index: int) -> str:
        return f"dcmframe:{entry.fingerprint}:{inst.uid}:{index}:{fr.FRAME_QUALITY}"

    def _render(self, entry: SlideEntry, inst: InstanceModel, index: int) -> bytes:
        """Cut one frame out of the level (or the associated image) and encode it."""
        reader = self.library.reader(entry)
        meta = reader.metadata
        if inst.source == "associated":
            assert inst.associated is not None
            pixels = reader.associated_image(inst.associated)
            return fr.encode_frame(pixels, inst.photometric)
        col, row = inst.address(index)
        ds = meta.levels[inst.level].downsample
        l_x, l_y = col * inst.tile_w, row * inst.tile_h
        w = min(inst.tile_w, inst.width - l_x)
        h = min(inst.tile_h, inst.height - l_y)
        pixels = reader.read_region(inst.level, int(l_x * ds), int(l_y * ds), w, h)
        padded = fr.pad_frame(pixels, (inst.tile_w, inst.tile_h), meta.background)
        return fr.encode_frame(padded, inst.photometric)

    @staticmethod
    def _file_frames(inst: InstanceModel, indices: list[int]) -> list[bytes]:
        assert inst.file is not None
        try:
            fd = os.open(inst.file.path, os.O_RDONLY)
        except OSError as exc:
            raise UnreadableSlide("a DICOM file of the slide cannot be read") from exc
        try:
            out = []
            for index in indices:
                data = b"".join(os.pread(fd, length, off)
                                for off, length in inst.file.frames[index])
                out.append(fr.trim_jpeg(data) if inst.file.encapsulated else data)
            return out
        finally:
            os.close(fd)

    # -- whole instances ---------------------------------------------------------------
    async def part10(self, entry: SlideEntry, inst: InstanceModel, hidden: frozenset[str]
                     ) -> AsyncIterator[bytes]:
        """A Part 10 file of the instance, streamed: header, then frames as they are read."""
        ds = redacted(inst.dataset, hidden)
        yield await self.tiles.run(part10_header, ds, inst.transfer_syntax)
        n = inst.frame_count
        encapsulated = inst.file is None or inst.file.encapsulated
        if encapsulated:
            yield fr.PIXEL_DATA_HEADER + fr.EMPTY_BOT
        else:
            assert inst.file is not None
            total = sum(length for spans in inst.file.frames for _, length in spans)
            yield fr.native_pixel_header(total)
        for start in range(0, n, STREAM_BATCH):
            stop = min(n, start + STREAM_BATCH)
            batch = await self._native_frames(entry, inst, range(start, stop))
            if encapsulated:
                yield b"".join(fr.frame_item(f) for f in batch)
            else:
                yield b"".join(batch)
        if encapsulated:
            yield fr.SEQUENCE_DELIMITER
        elif total & 1:
            yield b"\x00"

    # -- rendered images ---------------------------------------------------------------
    async def rendered(self, entry: SlideEntry, inst: InstanceModel, frame: int | None,
                       viewport: tuple[int, int] | None, fmt: str, quality: int) -> bytes:
        """The instance (or one frame) as a consumer image, fitted into ``viewport``."""
        if frame is not None:
            data = (await self._native_frames(entry, inst, [frame]))[0]
            pixels = await self.tiles.run(self._decode_native, inst, data)
        else:
            pixels = await self.tiles.run(self._whole_image, entry, inst, viewport)
        return await self.tiles.run(self._fit_encode, pixels, viewport, fmt, quality)

    @staticmethod
    def _decode_native(inst: InstanceModel, data: bytes) -> np.ndarray:
        if inst.file is not None and not inst.file.encapsulated:
            arr = np.frombuffer(data, np.uint8)
            spp = int(inst.dataset.get("SamplesPerPixel", 3))
            return codecs.to_rgb(arr.reshape(inst.tile_h, inst.tile_w, spp))
        return fr.decode_frame(data)

    def _whole_image(self, entry: SlideEntry, inst: InstanceModel,
                     viewport: tuple[int, int] | None) -> np.ndarray:
        reader = self.library.reader(entry)
        if inst.kind != "VOLUME":
            if inst.associated is not None:
                return reader.associated_image(inst.associated)
            if inst.frame_count == 1:
                data = self._file_frames(inst, [0])[0]
                return self._decode_native(inst, data)[: inst.height, : inst.width]
            raise UnreadableSlide("this instance cannot be rendered")
        meta = reader.metadata
        target = viewport or (inst.width, inst.height)
        scale = min(target[0] / inst.width, target[1] / inst.height, 1.0)
        want_w = max(1, round(inst.width * scale))
        # the coarsest level still at least as large as wanted, never finer than the instance
        base_level = inst.level if inst.level >= 0 else 0
        level = base_level
        for i in range(base_level, len(meta.levels)):
            if meta.levels[i].width >= want_w:
                level = i
        lv = meta.levels[level]
        if lv.width * lv.height > 64 * 2**20:
            from wsi_server.errors import BadRequest

            raise BadRequest("the image is too large to render whole; give a smaller viewport")
        return reader.read_region(level, 0, 0, lv.width, lv.height)

    @staticmethod
    def _fit_encode(pixels: np.ndarray, viewport: tuple[int, int] | None, fmt: str,
                    quality: int) -> bytes:
        h, w = pixels.shape[:2]
        if viewport is not None:
            scale = min(viewport[0] / w, viewport[1] / h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            pixels = codecs.resize(pixels, size)
        return codecs.encode(pixels, fmt, quality)
