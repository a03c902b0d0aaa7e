"""Slide readers: the ``SlideReader`` protocol, its backends and the registry that picks one.

Backends are tried by priority (lower first) among those whose ``can_open`` accepts the
path; a backend that finds the file outside its competence raises ``UnsupportedSlide`` and
the next is tried.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from wsi_server.errors import UnreadableSlide, UnsupportedSlide, WsiServerError
from wsi_server.readers.base import (
    LevelInfo,
    RawTile,
    ReaderBackend,
    SlideMetadata,
    SlideReader,
)

__all__ = [
    "LevelInfo",
    "RawTile",
    "ReaderBackend",
    "ReaderRegistry",
    "SlideMetadata",
    "SlideReader",
    "default_registry",
]

log = logging.getLogger(__name__)

# Formats some backend reads: a file of this kind that no backend accepts is damaged.
READABLE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
     ".dcm", ".zarr"}
)


class ReaderRegistry:
    def __init__(self, backends: Sequence[ReaderBackend]) -> None:
        self.backends = sorted(backends, key=lambda b: b.priority)

    def open(self, path: Path) -> SlideReader:
        first_error: WsiServerError | None = None
        for backend in self.backends:
            if not backend.can_open(path):
                continue
            try:
                reader = backend.open(path)
                try:
                    check_metadata(reader.metadata)
                except UnreadableSlide:
                    reader.close()
                    raise
                return reader
            except (UnsupportedSlide, UnreadableSlide) as exc:
                log.debug("backend %s declined %s: %s", backend.name, path.name, exc.detail)
                if first_error is None or isinstance(first_error, UnsupportedSlide):
                    first_error = exc
            except Exception as exc:  # a backend must never take the server down
                log.warning("backend %s failed on %s: %r", backend.name, path.name, exc)
                if first_error is None:
                    first_error = UnreadableSlide(f"{backend.name} could not read the slide")
        if first_error is not None:
            raise first_error
        if path.suffix.lower() in READABLE_SUFFIXES:
            raise UnreadableSlide(
                "the file has a supported slide format's name but cannot be read "
                "(truncated, corrupt or still being written?)"
            )
        raise UnsupportedSlide("no reader supports this file format")

    def backend_named(self, name: str) -> ReaderBackend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)


def check_metadata(meta: SlideMetadata) -> None:
    """Refuse a pyramid no slide has (a damaged header's): a level without pixels, or one
    larger than the level before it. Every backend's metadata passes here."""
    if not meta.levels:
        raise UnreadableSlide("the slide has no image levels")
    previous: LevelInfo | None = None
    for lv in meta.levels:
        if lv.width < 1 or lv.height < 1 or not lv.downsample >= 1 - 1e-6:
            raise UnreadableSlide("a level of the slide declares an impossible size")
        if previous is not None and (
            lv.width > previous.width or lv.height > previous.height
            or lv.downsample < previous.downsample
        ):
            raise UnreadableSlide("the levels of the slide are not a pyramid")
        previous = lv


def default_registry() -> ReaderRegistry:
    from wsi_server.readers.dicom import DicomBackend
    from wsi_server.readers.openslide_backend import OpenSlideBackend, openslide_cache
    from wsi_server.readers.tiff import TiffBackend

    cache = openslide_cache()  # one for every OpenSlide handle of the process
    backends: list[ReaderBackend] = [TiffBackend(), DicomBackend(cache), OpenSlideBackend(cache)]
    try:
        from wsi_server.readers.zarr_backend import ZarrBackend
    except ImportError:
        pass
    else:
        backends.append(ZarrBackend())
    return ReaderRegistry(backends)
