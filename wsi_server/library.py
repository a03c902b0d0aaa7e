"""The slide library: what is under the configured roots, with opaque, stable slide ids.

A slide id is derived from the slide's path relative to its root, hashed, so it is stable
across restarts, identical on every replica that mounts the same library, URL-safe, and
carries nothing of the file name (file names often hold patient identifiers).
A DICOM-WSI slide is a folder of ``.dcm`` instances; a zarr store is a ``.zarr`` folder;
MRXS is the ``.mrxs`` file with its sibling data folder.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wsi_server.errors import SlideNotFound, UnreadableSlide, WsiServerError
from wsi_server.pool import ReaderPool
from wsi_server.readers import SlideMetadata, SlideReader

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = frozenset(
    {
        ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif",
        ".svslide", ".qptiff", ".vsi", ".czi", ".btf", ".isyntax", ".dcm",
    }
)
Probe = Callable[[Path], "WsiServerError | None"]
SKIP_DIRS = frozenset({"quarantine", "__pycache__", "node_modules"})
FINGERPRINT_TTL = 1.0


def slide_id(relative: str) -> str:
    digest = hashlib.sha256(relative.encode("utf-8")).digest()[:12]
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def collection_of(root: Path, path: Path) -> str | None:
    """The collection of a slide: the top-level folder of its library root (``None`` for
    a slide at the top of a root, or a root that is the slide itself)."""
    if path == root:
        return None
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path]
    if path.suffix.lower() == ".mrxs":
        data = path.with_suffix("")
        if data.is_dir():
            files += sorted(p for p in data.rglob("*") if p.is_file())
    return files


def fingerprint(path: Path) -> tuple[str, int]:
    """Hash of (path, size, mtime_ns) of every file of the slide, and its total size."""
    h = hashlib.sha1(usedforsecurity=False)
    total = 0
    for f in _files_of(path):
        st = f.stat()
        total += st.st_size
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20], total


def is_dicom_folder(path: Path) -> bool:
    try:
        return any(c.suffix.lower() == ".dcm" for c in path.iterdir() if c.is_file())
    except OSError:
        return False


def find_slides(root: Path) -> Iterator[Path]:
    """Every slide under ``root`` (or ``root`` itself): files, DICOM folders, zarr stores."""
    if root.is_file():
        yield root
        return
    if root.suffix.lower() == ".zarr" or is_dicom_folder(root):
        yield root
        return
    try:
        children = sorted(root.iterdir())
    except OSError as exc:
        log.warning("cannot list %s: %s", root, exc)
        return
    mrxs_data = {c.with_suffix("") for c in children if c.suffix.lower() == ".mrxs"}
    for child in children:
        name = child.name
        if name.startswith(".") or name.endswith((".tmp", ".partial", ".part")):
            continue
        if child.is_dir():
            if name in SKIP_DIRS or child in mrxs_data:
                continue
            yield from find_slides(child)
        elif child.suffix.lower() in SLIDE_SUFFIXES and child.suffix.lower() != ".dcm":
            yield child


@dataclass
class SlideEntry:
    id: str
    name: str
    path: Path
    fingerprint: str
    size_bytes: int
    metadata: SlideMetadata | None = None
    error: WsiServerError | None = None
    collection: str | None = None
    """Top-level folder of the library root the slide is under (access is granted per
    collection)."""
    added: float = field(default_factory=time.time)
    checked: float = field(default_factory=time.monotonic)
    remote: bool = False
    """A slide of a DICOMweb archive (``--dicomweb-source``): no local files; listed by
    its source (``Library.set_remote``), never rescanned."""

    @property
    def status(self) -> str:
        return "error" if self.error else "ready"


class Library:
    def __init__(
        self,
        roots: Iterable[Path],
        pool: ReaderPool,
        convert_dir: Path | None = None,
        probe: Probe | None = None,
    ) -> None:
        self.roots = tuple(Path(r).resolve() for r in roots)
        self.pool = pool
        self.probe = probe
        """Checks a new or changed slide before this process opens it (``--isolate-open``):
        returns the error that keeps it unserved, or None."""
        self.convert_dir = Path(convert_dir).resolve() if convert_dir is not None else None
        self._entries: dict[str, SlideEntry] = {}
        self._remote: dict[str, dict[str, SlideEntry]] = {}
        """Slides of each DICOMweb source, by source key."""
        self._lock = threading.Lock()
        self.loaded = False

    # -- scanning --------------------------------------------------------------
    def _relative(self, root_index: int, path: Path) -> str:
        root = self.roots[root_index]
        rel = path.relative_to(root).as_posix() if path != root else path.name
        return rel if root_index == 0 else f"{root_index}:{rel}"

    def scan(self) -> None:
        """Find every slide under the roots; open new or changed ones to read metadata."""
        started = time.time()
        seen: dict[str, SlideEntry] = {}
        for i, root in enumerate(self.roots):
            if not root.exists():
                log.warning("library root %s does not exist", root)
                continue
            for path in find_slides(root):
                rel = self._relative(i, path)
                sid = slide_id(rel)
                if sid in seen:
                    continue
                entry = self._load(sid, path, collection_of(root, path))
                if entry is not None:
                    seen[sid] = entry
        with self._lock:
            # a slide added (e.g. by ingest) while this scan walked the folders stays
            for sid, entry in self._entries.items():
                if sid not in seen and entry.added >= started and entry.path.exists():
                    seen[sid] = entry
            for remote in self._remote.values():
                for sid, entry in remote.items():
                    seen.setdefault(sid, entry)
            self._entries = seen
        self.loaded = True
        ok = sum(1 for e in seen.values() if e.error is None)
        log.info("library: %d slides ready, %d unreadable", ok, len(seen) - ok)

    def add(self, path: Path) -> SlideEntry | None:
        """Add (or refresh) one slide under a root, e.g. just moved in by ingest."""
        path = path.resolve()
        for i, root in enumerate(self.roots):
            if path == root or root in path.parents:
                rel = self._relative(i, path)
                entry = self._load(slide_id(rel), path, collection_of(root, path))
                if entry is not None:
                    with self._lock:
                        self._entries[entry.id] = entry
                return entry
        raise ValueError("path is not under a library root")

    def converted_copy(self, path: Path) -> Path | None:
        """The complete zarr copy of a slide under ``convert_dir``, if any: it is
        served in place of the original, under the original's id and name."""
        if self.convert_dir is None:
            return None
        from wsi_server.readers.zarr_backend import is_complete_store

        for i, root in enumerate(self.roots):
            if path == root or root in path.parents:
                rel = self._relative(i, path).replace(":", "/", 1)
                store = self.convert_dir / f"{rel}.zarr"
                return store if is_complete_store(store) else None
        return None

    def _load(self, sid: str, path: Path, collection: str | None) -> SlideEntry | None:
        old = self._entries.get(sid)
        name = old.name if old is not None else path.name
        path = self.converted_copy(path) or path
        try:
            fp, size = fingerprint(path)
        except OSError as exc:
            log.warning("cannot stat %s: %s", path.name, exc)
            return None
        if old is not None and old.fingerprint == fp:
            old.checked = time.monotonic()
            return old
        entry = SlideEntry(sid, name, path, fp, size, collection=collection)
        if self.probe is not None:
            refused = self.probe(path)
            if refused is not None:
                entry.error = refused
                log.warning("slide %s (%s) left unserved: %s", sid, path.name, refused.detail)
                return entry
        try:
            entry.metadata = self.pool.get(path, fp).metadata
        except WsiServerError as exc:
            entry.error = exc
            log.warning("slide %s (%s) left unserved: %s", sid, path.name, exc.detail)
        except Exception as exc:  # never let one file stop the scan
            entry.error = UnreadableSlide("the slide could not be opened")
            log.warning("slide %s (%s) failed to open: %r", sid, path.name, exc)
        return entry

    # -- lookups ---------------------------------------------------------------
    def entries(self) -> list[SlideEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name.lower())

    def entry(self, sid: str) -> SlideEntry:
        entry = self._entries.get(sid)
        if entry is None:
            raise SlideNotFound("no slide with this id")
        return entry

    def is_stale(self, entry: SlideEntry) -> bool:
        if entry.remote:  # its source lists it again (set_remote)
            return False
        return time.monotonic() - entry.checked > FINGERPRINT_TTL

    def set_remote(self, source: str, entries: Iterable[SlideEntry]) -> None:
        """The slides a DICOMweb source lists now: those it no longer lists go, an entry
        whose series did not change is kept as it is."""
        with self._lock:
            old = self._remote.get(source, {})
            new: dict[str, SlideEntry] = {}
            for entry in entries:
                kept = old.get(entry.id)
                new[entry.id] = kept if kept and kept.fingerprint == entry.fingerprint else entry
            for sid in old.keys() - new.keys():
                self._entries.pop(sid, None)
            self._entries.update(new)
            self._remote[source] = new

    def refresh(self, entry: SlideEntry) -> SlideEntry:
        """Re-check the files of a slide; a replaced or edited file is reopened."""
        if not os.path.exists(entry.path):
            with self._lock:
                self._entries.pop(entry.id, None)
            raise SlideNotFound("the slide has been removed")
        fresh = self._load(entry.id, entry.path, entry.collection)
        if fresh is None:
            raise SlideNotFound("the slide cannot be reached")
        if fresh is not entry:
            with self._lock:
                self._entries[entry.id] = fresh
        return fresh

    def reader(self, entry: SlideEntry) -> SlideReader:
        if entry.error is not None:
            raise entry.error
        return self.pool.get(entry.path, entry.fingerprint)
