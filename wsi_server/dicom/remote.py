"""DICOMweb archives as library sources (``--dicomweb-source URL``).

``DicomwebSource`` is one archive: QIDO-RS lists its whole-slide series, WADO-RS series
metadata describes each one (levels, frame size, pixel spacing, label/overview/thumbnail
instances), WADO-RS frames are fetched in batches (one request per region, frames listed
with commas) with the stored transfer syntax (``transfer-syntax=*``).

``SourceSet`` lists every source in a background thread (at start, then every
``--dicomweb-source-refresh`` seconds) and puts their slides into the library
(``Library.set_remote``): ids derived from the source URL and the Series Instance UID,
in the ``dicomweb`` collection. The slides are read by ``DicomwebReader``
(``wsi_server.readers.dicomweb``), found by the reader registry through their entry path
``dicomweb:<n>/<study>/<series>``.

Never a hang: every request has the source's timeout; after a failure the source is
considered down for a few seconds and its slides answer 503 at once (with the reason)
instead of waiting again; the listing of a source that is down keeps the slides listed
before. Local slides never wait on an archive: the tile path fetches an archive's frames
on the event loop (``DicomwebReader.prefetch``, an async request), not in the render
threads.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from wsi_server.dicom.model import WSI_SOP_CLASS
from wsi_server.errors import BackendUnavailable, UnreadableSlide
from wsi_server.library import Library, SlideEntry, slide_id
from wsi_server.readers import LevelInfo, SlideMetadata

log = logging.getLogger(__name__)

PATH_PREFIX = "dicomweb:"
COLLECTION = "dicomweb"
FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
MAX_BATCH = 64
"""Most frames one WADO-RS request lists."""
COOLDOWN = 5.0
"""Seconds a source that failed is answered as down without being asked."""


@dataclass(frozen=True)
class RemoteInstance:
    uid: str
    kind: str  # VOLUME | LABEL | OVERVIEW | THUMBNAIL
    width: int
    height: int
    tile_w: int
    tile_h: int
    frames: int
    photometric: str
    samples: int

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_h)


@dataclass(frozen=True)
class RemoteSeries:
    source: int
    study: str
    series: str
    name: str
    levels: tuple[RemoteInstance, ...]
    """VOLUME instances, largest first."""
    associated: dict[str, RemoteInstance]
    metadata: SlideMetadata
    fingerprint: str

    @property
    def path(self) -> Path:
        return Path(f"{PATH_PREFIX}{self.source}/{self.study}/{self.series}")


def _value(item: dict[str, Any], tag: str, default: Any = None) -> Any:
    values = item.get(tag, {}).get("Value")
    return values[0] if values else default


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value") or [])


def parse_series(source: int, study: str, series: str, metadata: list[dict[str, Any]]
                 ) -> RemoteSeries | None:
    """A series' slide description from its WADO-RS metadata; None when it is not a
    whole-slide image this server can tile (no TILED_FULL volume, several focal planes
    or optical paths)."""
    volumes: dict[tuple[int, int], RemoteInstance] = {}
    associated: dict[str, RemoteInstance] = {}
    spacing: tuple[float, float] | None = None
    power: float | None = None
    names = {"LABEL": "label", "OVERVIEW": "macro", "THUMBNAIL": "thumbnail"}
    first: dict[str, Any] = {}
    for item in metadata:
        if _value(item, "00080016") != WSI_SOP_CLASS:
            continue
        image_type = [str(v) for v in _values(item, "00080008")]
        kind = next((k for k in ("VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL")
                     if k in image_type), None)
        if kind is None:
            continue
        if str(_value(item, "00209311", "TILED_FULL")) != "TILED_FULL":
            continue
        if int(_value(item, "00480303", 1) or 1) != 1 or int(_value(item, "00480302", 1) or 1) != 1:
            continue  # several focal planes or optical paths
        try:
            inst = RemoteInstance(
                uid=str(_value(item, "00080018")), kind=kind,
                width=int(_value(item, "00480006", _value(item, "00280011"))),
                height=int(_value(item, "00480007", _value(item, "00280010"))),
                tile_w=int(_value(item, "00280011")), tile_h=int(_value(item, "00280010")),
                frames=int(_value(item, "00280008", 1) or 1),
                photometric=str(_value(item, "00280004", "RGB")),
                samples=int(_value(item, "00280002", 3) or 3),
            )
        except (TypeError, ValueError):
            continue
        if inst.frames != inst.cols * inst.rows:
            continue
        if kind == "VOLUME":
            key = (inst.width, inst.height)
            volumes.setdefault(key, inst)
            if not first or inst.width > int(_value(first, "00480006", 0)):
                first = item
        else:
            associated.setdefault(names[kind], inst)
    if not volumes:
        return None
    levels = tuple(sorted(volumes.values(), key=lambda i: -i.width))
    shared = _values(first, "52009229")
    measures = _values(shared[0], "00289110") if shared else []
    if measures:
        ps = [float(v) for v in _values(measures[0], "00280030")]
        if len(ps) == 2 and ps[0] > 0 and ps[1] > 0:
            spacing = (ps[1] * 1000, ps[0] * 1000)  # (x, y) in µm
    paths = _values(first, "00480105")
    if paths and _value(paths[0], "00480112") is not None:
        power = float(_value(paths[0], "00480112"))
    base = levels[0]
    meta = SlideMetadata(
        format="dicomweb",
        vendor=str(_value(first, "00080070", "") or "") or None,
        levels=tuple(LevelInfo(i.width, i.height, base.width / i.width, (i.tile_w, i.tile_h))
                     for i in levels),
        mpp=spacing,
        objective_power=power,
        associated=tuple(associated),
        bounds=None,
        properties={"dicom.StudyInstanceUID": study, "dicom.SeriesInstanceUID": series},
    )
    name = str(_value(first, "00400512", "") or _value(first, "0008103E", "") or series)
    identity = "\0".join([series, *sorted(i.uid for i in (*levels, *associated.values()))])
    fp = hashlib.sha1(identity.encode(), usedforsecurity=False).hexdigest()[:20]
    return RemoteSeries(source, study, series, name, levels, associated, meta, fp)


def split_multipart(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a ``multipart/related`` answer: (headers, body) each."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if m is None:
        raise ValueError("no boundary in a multipart answer")
    delim = b"--" + m.group(1).encode("latin-1")
    out = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part without headers")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        out.append((headers, data[:-2] if data.endswith(b"\r\n") else data))
    return out


@dataclass
class DicomwebSource:
    index: int
    url: str
    timeout: float
    auth: str | None = None
    down_until: float = 0.0
    reason: str = ""
    frame_requests: int = 0
    """WADO-RS frame requests sent (tests and benchmarks count round trips)."""
    series: dict[str, RemoteSeries] = field(default_factory=dict)
    """Listed series by entry path."""
    _client: httpx.Client | None = None
    _async: httpx.AsyncClient | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc or self.url

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self.auth} if self.auth else {}

    @property
    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=self.timeout, headers=self._headers())
            return self._client

    def async_client(self) -> httpx.AsyncClient:
        if self._async is None:
            limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
            self._async = httpx.AsyncClient(timeout=self.timeout, headers=self._headers(),
                                            limits=limits)
        return self._async

    # -- health --------------------------------------------------------------------------
    def check_up(self) -> None:
        if time.monotonic() < self.down_until:
            raise BackendUnavailable(f"the DICOMweb archive {self.host} is unavailable "
                                     f"({self.reason}); retried in a few seconds")

    def failed(self, exc: Exception) -> BackendUnavailable:
        if isinstance(exc, httpx.TimeoutException):
            reason = f"no answer within {self.timeout:g} s"
        elif isinstance(exc, httpx.HTTPStatusError):
            reason = f"it answered {exc.response.status_code}"
        elif isinstance(exc, httpx.TransportError):
            reason = f"cannot connect ({type(exc).__name__})"
        else:
            reason = f"unexpected answer ({type(exc).__name__})"
        self.reason = reason
        self.down_until = time.monotonic() + min(COOLDOWN, self.timeout)
        log.warning("DICOMweb source %s: %s", self.host, reason)
        return BackendUnavailable(f"the DICOMweb archive {self.host} is unavailable: {reason}")

    # -- listing -------------------------------------------------------------------------
    def list_series(self) -> dict[str, RemoteSeries]:
        """Every whole-slide series of the archive (runs in the listing thread)."""
        base = self.url.rstrip("/")
        try:
            r = self.client.get(f"{base}/series", params={"Modality": "SM"},
                                headers={"Accept": "application/dicom+json"})
            r.raise_for_status()
            found = r.json() if r.content.strip() else []
            out: dict[str, RemoteSeries] = {}
            for item in found:
                study, series = _value(item, "0020000D"), _value(item, "0020000E")
                if not study or not series:
                    continue
                meta = self.client.get(f"{base}/studies/{study}/series/{series}/metadata",
                                       headers={"Accept": "application/dicom+json"})
                meta.raise_for_status()
                parsed = parse_series(self.index, str(study), str(series), meta.json())
                if parsed is not None:
                    out[str(parsed.path)] = parsed
        except (httpx.HTTPError, ValueError) as exc:
            raise self.failed(exc) from None
        self.down_until = 0.0
        return out

    # -- frames --------------------------------------------------------------------------
    def _frames_url(self, rs: RemoteSeries, inst: RemoteInstance, numbers: Iterable[int]
                    ) -> str:
        listed = ",".join(str(n) for n in numbers)
        return (f"{self.url.rstrip('/')}/studies/{rs.study}/series/{rs.series}/instances/"
                f"{inst.uid}/frames/{listed}")

    @staticmethod
    def _parse_frames(response: httpx.Response, count: int) -> list[bytes]:
        ctype = response.headers.get("content-type", "")
        if ctype.startswith("multipart/"):
            parts = [data for _, data in split_multipart(ctype, response.content)]
        else:
            parts = [response.content]
        if len(parts) != count:
            raise ValueError(f"asked {count} frames, got {len(parts)}")
        return parts

    def fetch(self, rs: RemoteSeries, inst: RemoteInstance, numbers: list[int]) -> list[bytes]:
        """Frames (1-based ``numbers``) of an instance, in batches (a render thread)."""
        self.check_up()
        out: list[bytes] = []
        try:
            for i in range(0, len(numbers), MAX_BATCH):
                batch = numbers[i : i + MAX_BATCH]
                self.frame_requests += 1
                r = self.client.get(self._frames_url(rs, inst, batch),
                                    headers={"Accept": FRAMES_ACCEPT})
                out += self._frames_of(r, len(batch))
        except (httpx.HTTPError, ValueError) as exc:
            raise self.failed(exc) from None
        return out

    def _frames_of(self, r: httpx.Response, count: int) -> list[bytes]:
        """The frames of one WADO-RS frames response (a 404: the instance is gone)."""
        if r.status_code == 404:
            raise UnreadableSlide("the archive no longer holds this instance")
        r.raise_for_status()
        return self._parse_frames(r, count)

    async def fetch_async(self, rs: RemoteSeries, inst: RemoteInstance, numbers: list[int]
                          ) -> list[bytes]:
        """``fetch`` on the event loop (no render thread waits on the archive)."""
        self.check_up()
        client = self.async_client()
        out: list[bytes] = []
        try:
            for i in range(0, len(numbers), MAX_BATCH):
                batch = numbers[i : i + MAX_BATCH]
                self.frame_requests += 1
                r = await client.get(self._frames_url(rs, inst, batch),
                                     headers={"Accept": FRAMES_ACCEPT})
                out += self._frames_of(r, len(batch))
        except (httpx.HTTPError, ValueError) as exc:
            raise self.failed(exc) from None
        return out

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class SourceSet:
    """Every ``--dicomweb-source`` of the server, listed into the library by a thread."""

    def __init__(self, urls: Iterable[str], timeout: float, auth: str | None,
                 refresh: float) -> None:
        self.sources = [DicomwebSource(i, u, timeout, auth) for i, u in enumerate(urls)]
        self.refresh = refresh
        self.library: Library | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listed = threading.Event()
        """Set once every source has been listed (or failed) once."""

    def series_at(self, path: Path) -> tuple[DicomwebSource, RemoteSeries] | None:
        text = str(path)
        if not text.startswith(PATH_PREFIX):
            return None
        index = text[len(PATH_PREFIX):].split("/", 1)[0]
        if not index.isdigit() or int(index) >= len(self.sources):
            return None
        source = self.sources[int(index)]
        rs = source.series.get(text)
        return (source, rs) if rs is not None else None

    def entry_of(self, source: DicomwebSource, rs: RemoteSeries) -> SlideEntry:
        sid = slide_id(f"dicomweb:{source.url.rstrip('/')}:{rs.series}")
        return SlideEntry(sid, rs.name, rs.path, rs.fingerprint, 0, metadata=rs.metadata,
                          collection=COLLECTION, remote=True)

    def list_once(self) -> None:
        for source in self.sources:
            try:
                found = source.list_series()
            except BackendUnavailable as exc:
                log.warning("DICOMweb source %s not listed: %s (its slides listed before "
                            "stay)", source.host, exc.detail)
                continue
            source.series = found
            if self.library is not None:
                self.library.set_remote(
                    f"dicomweb:{source.index}",
                    [self.entry_of(source, rs) for rs in found.values()])
            log.info("DICOMweb source %s: %d slides", source.host, len(found))
        self.listed.set()

    def start(self, library: Library) -> None:
        self.library = library
        if not self.sources or self._thread is not None:
            return

        def run() -> None:
            while not self._stop.is_set():
                try:
                    self.list_once()
                except Exception:
                    log.exception("listing the DICOMweb sources failed")
                if self.refresh <= 0 or self._stop.wait(self.refresh):
                    return

        self._thread = threading.Thread(target=run, name="dicomweb-sources", daemon=True)
        self._thread.start()

    async def aclose(self) -> None:
        self._stop.set()
        for source in self.sources:
            source.close()
            if source._async is not None:
                await source._async.aclose()
                source._async = None
