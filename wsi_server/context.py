"""``AppContext``: the services every front reaches, built once by ``create_app``.

A front is a module with ``routes(ctx) -> list[BaseRoute]``; it reaches the library, the
tile path, the cache and the metrics through the context, never by importing ``app.py``.
Every slide route resolves its slide through ``ctx.slide(request)``: the one place where a
slide id becomes a ``SlideEntry`` and where access is decided.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from wsi_server.auth import policy
from wsi_server.auth.principal import Principal, anonymous
from wsi_server.auth.service import AuthService, load_secret
from wsi_server.cache import TileCache, build_cache
from wsi_server.errors import SlideNotFound, UnreadableSlide, UnsupportedSlide, WsiServerError
from wsi_server.geometry import GeometryParams
from wsi_server.ingest.web import IngestHook
from wsi_server.library import Library, SlideEntry
from wsi_server.metrics import Metrics
from wsi_server.pool import ReaderPool
from wsi_server.readers import ReaderRegistry, default_registry
from wsi_server.settings import Settings
from wsi_server.tiles import TileService

if TYPE_CHECKING:
    from wsi_server.dicom.remote import SourceSet

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
log = logging.getLogger(__name__)


@dataclass(eq=False)
class AppContext:
    settings: Settings
    library: Library
    tiles: TileService
    cache: TileCache
    pool: ReaderPool
    metrics: Metrics
    executor: ThreadPoolExecutor
    threads: int
    ingest: IngestHook
    auth: AuthService
    isolation: IsolatedProbe | None = None
    sources: SourceSet | None = None
    """The ``--dicomweb-source`` archives, listed into the library by a thread."""

    # -- the one slide helper ------------------------------------------------------
    def slide_id_of(self, conn: HTTPConnection) -> str:
        sid = str(conn.path_params.get("slide_id", ""))
        if not _ID.match(sid):
            raise SlideNotFound("no slide with this id")
        return sid

    async def slide(self, conn: HTTPConnection, *, readable: bool = True) -> SlideEntry:
        """The slide a request names, when the requester may see it.

        Raises ``SlideNotFound`` both for an unknown id and for a slide the requester may
        not see, so the two cannot be told apart. With ``readable`` (the default) an
        unreadable slide raises its error; without, its entry is returned as is (the
        JSON API describes unreadable slides).
        """
        return await self.slide_by_id(conn, self.slide_id_of(conn), readable=readable)

    async def slide_by_id(
        self, conn: HTTPConnection, slide_id: str, *, readable: bool = True
    ) -> SlideEntry:
        """``slide`` for a front whose URLs do not carry the slide id (DICOMweb's UIDs):
        the same lookup and the same access decision, for an id the front resolved."""
        if not _ID.match(slide_id):
            raise SlideNotFound("no slide with this id")
        entry = self.library.entry(slide_id)
        who = principal(conn)
        if not policy.can_see(who, entry.id, entry.collection):
            raise SlideNotFound("no slide with this id")
        if self.library.is_stale(entry):
            entry = await self.tiles.run(self.library.refresh, entry)
        if readable and entry.error is not None:
            raise entry.error
        await self.auth.record_view(who, entry.id, conn.client.host if conn.client else "")
        return entry

    def visible_slides(self, conn: HTTPConnection) -> list[SlideEntry]:
        """The library entries the requester may see, by name."""
        who = principal(conn)
        return [e for e in self.library.entries() if policy.can_see(who, e.id, e.collection)]

    def hidden_associated(self, conn: HTTPConnection, entry: SlideEntry) -> frozenset[str]:
        """Associated images withheld from this requester: label and macro (patient
        identifiers) when the server hides them, or from a share-link viewer unless the
        link allows them."""
        return policy.withheld_associated(
            principal(conn), entry.id, entry.collection, self.settings.hide_associated
        )

    def cache_control(self, conn: HTTPConnection, immutable: bool) -> str:
        """Cache-Control of a slide's tiles and descriptors: what a signed-in user or a
        share link sees may be kept by the browser only, never by a shared proxy."""
        scope = "public" if principal(conn).kind == "anonymous" else "private"
        return f"{scope}, max-age=31536000, immutable" if immutable else f"{scope}, no-cache"


def principal(conn: HTTPConnection) -> Principal:
    """The requester, as the auth middleware resolved it."""
    user = conn.scope.get("user")
    if not isinstance(user, Principal):  # no auth middleware: nobody
        return anonymous(everything=False)
    return user


def build_context(
    settings: Settings,
    registry: ReaderRegistry | None = None,
    cache: TileCache | None = None,
) -> AppContext:
    registry = registry or default_registry()
    sources = None
    if settings.dicomweb_source:
        from wsi_server.dicom.remote import SourceSet
        from wsi_server.readers.dicomweb import DicomwebBackend

        sources = SourceSet(settings.dicomweb_source, settings.dicomweb_source_timeout,
                            settings.dicomweb_source_auth, settings.dicomweb_source_refresh)
        registry = ReaderRegistry([*registry.backends, DicomwebBackend(sources)])
    pool = ReaderPool(registry, settings.pool_size)
    isolation = None
    if settings.isolate_open:
        roots = tuple(Path(r).resolve() for r in settings.paths)
        isolation = IsolatedProbe(settings.ingest_validate_timeout, state_dir(settings, roots))
    library = Library(settings.paths, pool, convert_dir=settings.convert_dir, probe=isolation)
    metrics = Metrics()
    threads = settings.render_threads or os.cpu_count() or 2
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsi-render")
    tile_cache = cache or build_cache(settings)
    auth = build_auth(settings, library.roots)
    tiles = TileService(
        library,
        tile_cache,
        executor,
        GeometryParams(settings.tile_size, settings.overlap, settings.limit_bounds),
        settings.jpeg_quality,
        metrics,
    )
    return AppContext(
        settings=settings,
        library=library,
        tiles=tiles,
        cache=tile_cache,
        pool=pool,
        metrics=metrics,
        executor=executor,
        threads=threads,
        ingest=IngestHook(settings, library),
        auth=auth,
        isolation=isolation,
        sources=sources,
    )


def state_dir(settings: Settings, roots: tuple[Path, ...]) -> Path:
    """The state folder: the setting, else $XDG_STATE_HOME/wsi-server; created, and
    refused inside a library root (the library must hold slides only)."""
    if settings.state_dir is not None:
        folder = settings.state_dir
    else:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        folder = Path(base) / "wsi-server"
    folder = folder.resolve()
    for root in roots:
        if folder == root or root in folder.parents:
            raise ValueError(f"the state folder {folder} is inside the library root {root}; "
                             "give --state-dir outside every library root")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def build_auth(settings: Settings, roots: tuple[Path, ...]) -> AuthService:
    """The store (migrated), the access file and the auth service over them."""
    from wsi_server.store.engine import Store, default_database_url

    folder = state_dir(settings, roots)
    access = policy.load_access_config(settings.access_config)
    store = Store.open(settings.database_url or default_database_url(folder))
    return AuthService(settings, store, access, load_secret(settings, folder))


class IsolatedProbe:
    """``--isolate-open`` (the default): the ingest validator's warm subprocess opens and
    decodes a slide before the server does; a crash or a hang costs that process only.

    With ``state_dir``, verdicts are remembered by the slide's fingerprint (path, size and
    mtime of its files) in ``state_dir/checked-slides.jsonl``, so a restart does not check
    the library again: only new or changed slides are. A crash or a timeout of the
    validator is not remembered (it may have been the machine's, not the file's): such a
    slide is checked again at the next start. After the first scan, ``compact`` drops the
    verdicts of files that are gone or changed, so the file follows the library's size.
    """

    LEDGER = "checked-slides.jsonl"

    def __init__(self, timeout: float, state_dir: Path | None = None) -> None:
        from wsi_server.ingest.validate import Validator

        self._validator = Validator(timeout)
        self._lock = threading.Lock()  # one question at a time to the one process
        self._ledger = state_dir / self.LEDGER if state_dir is not None else None
        self._known: dict[str, tuple[str, str]] = {}
        self._lines = 0
        self._read_to = 0  # bytes of the ledger read so far, of the file with this inode:
        self._inode = 0
        self._read_new()

    def _read_new(self) -> None:
        """Read the verdicts appended to the ledger since the last read (by this process or
        by another worker, e.g. the one that ingested a slide this one is told of)."""
        if self._ledger is None:
            return
        try:
            with open(self._ledger, "rb") as fh:
                st = os.fstat(fh.fileno())
                if st.st_ino != self._inode or st.st_size < self._read_to:
                    self._inode, self._read_to = st.st_ino, 0  # new (compacted): read whole
                fh.seek(self._read_to)
                data = fh.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read %s: %s", self._ledger, exc)
            return
        end = data.rfind(b"\n") + 1  # whole lines only: a worker may be writing one
        self._read_to += end
        for line in data[:end].decode("utf-8", "replace").splitlines():
            self._lines += 1
            try:
                row = json.loads(line)
                self._known[str(row["fp"])] = (str(row["code"]), str(row["detail"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash

    def __call__(self, path: Path) -> WsiServerError | None:
        from wsi_server.library import fingerprint

        try:
            fp = fingerprint(path)[0]
        except OSError:
            fp = None
        known = self._known.get(fp) if fp is not None else None
        if known is None and fp is not None:
            with self._lock:
                self._read_new()
            known = self._known.get(fp)
        if known is None:
            with self._lock:
                verdict = self._validator.validate(path)
            known = (verdict.code, verdict.detail)
            if fp is not None and verdict.code in ("ok", UnsupportedSlide.code,
                                                   UnreadableSlide.code):
                self._remember(fp, known)
        code, detail = known
        if code == "ok":
            return None
        if code == UnsupportedSlide.code:
            return UnsupportedSlide(detail)
        return UnreadableSlide(detail)

    @staticmethod
    def _line(fp: str, verdict: tuple[str, str]) -> str:
        return json.dumps({"fp": fp, "code": verdict[0], "detail": verdict[1][:500]}) + "\n"

    def compact(self, current: Iterable[str]) -> int:
        """Rewrite the ledger with the verdicts of the ``current`` fingerprints only (the
        library's, after a full scan), when at least half of its lines are of files that
        are gone or changed, or repeated; returns the lines dropped. The rewrite is a new
        file renamed over the old one: a reader sees one or the other, whole."""
        if self._ledger is None:
            return 0
        keep = {fp: v for fp in current if (v := self._known.get(fp)) is not None}
        dropped = self._lines - len(keep)
        if dropped < max(100, len(keep)):
            return 0
        tmp = self._ledger.with_name(f".{self.LEDGER}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(self._line(fp, v) for fp, v in keep.items())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._ledger)
            st = os.stat(self._ledger)
        except OSError as exc:
            log.warning("cannot compact %s: %s", self._ledger, exc)
            tmp.unlink(missing_ok=True)
            return 0
        with self._lock:
            self._known, self._lines = keep, len(keep)
            self._inode, self._read_to = st.st_ino, st.st_size
        log.info("slide checks: %d outdated verdicts dropped from %s", dropped, self.LEDGER)
        return dropped

    def _remember(self, fp: str, verdict: tuple[str, str]) -> None:
        self._known[fp] = verdict
        if self._ledger is None:
            return
        line = self._line(fp, verdict)  # counted in _lines when read back
        try:  # one short append per verdict: whole lines, even with several workers
            with open(self._ledger, "a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError as exc:
            log.warning("cannot record a slide check in %s: %s", self._ledger, exc)

    def close(self) -> None:
        with self._lock:
            self._validator.close()
