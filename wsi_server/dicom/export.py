"""``wsi-server dicom export SLIDE DEST_DIR``: a slide's DICOM view written as Part 10 files.

The files are the instances the DICOMweb front serves, byte for byte: the same model
(``model.build_model``), the same frames (stored JPEG tiles copied, other levels encoded
once) and the same streamed Part 10 writer (``DicomService.part10``). One file per
instance, named ``<SOPInstanceUID>.dcm``, so the folder is a DICOM-WSI slide that
wsi-server, wsidicom and OpenSlide open as one series.

Resumable and atomic per instance: an instance is written as ``.<uid>.dcm.partial`` in
``DEST_DIR``, fsynced and renamed when complete. Running the same command again skips the
instances whose file is complete and rewrites any partial one. UIDs are derived from the
slide's content identity (slide id and fingerprint), so a slide that changed between two
runs gets new UIDs: its stale files are listed and left alone (never deleted).

Slide ids (and hence UIDs) depend on the library root the slide is found under: give
``--library ROOT`` with the server's root to get the UIDs the server's front serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_server.cache.memory import MemoryCache
from wsi_server.dicom.model import SlideModel
from wsi_server.dicom.service import STREAM_BATCH, DicomService
from wsi_server.errors import BadRequest, SlideNotFound, WsiServerError
from wsi_server.geometry import GeometryParams
from wsi_server.ingest.faults import fault
from wsi_server.library import Library, SlideEntry
from wsi_server.pool import ReaderPool
from wsi_server.progress import LineProgress, clock, eta
from wsi_server.readers import ReaderRegistry, default_registry
from wsi_server.tiles import TileService

PARTIAL = ".partial"


@dataclass(frozen=True)
class ExportProgress:
    frames_done: int
    frames_total: int
    instances_done: int
    instances_total: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return self.frames_done / self.frames_total if self.frames_total else 1.0

    @property
    def eta(self) -> float | None:
        return eta(self.frames_done, self.frames_total, self.elapsed)


@dataclass(frozen=True)
class ExportResult:
    dest: Path
    study_uid: str
    series_uid: str
    files: tuple[Path, ...]
    written: int
    skipped: int
    stale: tuple[Path, ...]
    seconds: float
    bytes_written: int


def final_name(uid: str) -> str:
    return f"{uid}.dcm"


def partial_name(uid: str) -> str:
    return f".{uid}.dcm{PARTIAL}"


def _open_entry(slide: Path, library: Library) -> SlideEntry:
    entry = library.add(slide)
    if entry is None:
        raise SlideNotFound("the slide cannot be read")
    if entry.error is not None:
        raise entry.error
    return entry


def _library_for(slide: Path, roots: list[Path], pool: ReaderPool) -> Library:
    slide = slide.resolve()
    for root in roots:
        root = root.resolve()
        if slide == root or root in slide.parents:
            return Library([root], pool)
    if roots:
        raise BadRequest("the slide is not under any --library root")
    return Library([slide.parent], pool)


async def _export(
    entry: SlideEntry, service: DicomService, model: SlideModel, dest: Path,
    hidden: frozenset[str], progress: Callable[[ExportProgress], None] | None,
) -> tuple[list[Path], int, int, int]:
    chosen = model.visible(hidden)
    total = sum(i.frame_count for i in chosen)
    done = instances_done = written = bytes_written = 0
    started = time.perf_counter()
    files: list[Path] = []

    def report() -> None:
        if progress is not None:
            progress(ExportProgress(done, total, instances_done, len(chosen),
                                    time.perf_counter() - started))

    for inst in chosen:
        final = dest / final_name(inst.uid)
        files.append(final)
        if final.is_file():  # complete: written whole and renamed
            done += inst.frame_count
            instances_done += 1
            report()
            continue
        tmp = dest / partial_name(inst.uid)
        before = done
        with open(tmp, "wb") as out:
            chunks = 0
            async for chunk in service.part10(entry, inst, hidden):
                out.write(chunk)
                bytes_written += len(chunk)
                chunks += 1
                # header, pixel data header, then batches of STREAM_BATCH frames
                done = before + min(inst.frame_count, max(0, chunks - 2) * STREAM_BATCH)
                report()
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, final)
        written += 1
        instances_done += 1
        done = before + inst.frame_count
        report()
        fault("dicom-export-instance")  # crash tests: die between two instances
    _fsync_dir(dest)
    return files, written, len(chosen) - written, bytes_written


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_slide(
    slide: Path,
    dest: Path,
    *,
    library_roots: list[Path] | None = None,
    hide_associated: bool = False,
    progress: Callable[[ExportProgress], None] | None = None,
    registry: ReaderRegistry | None = None,
    threads: int = 0,
) -> ExportResult:
    """Write the DICOM instances of ``slide`` into ``dest`` (created when missing).

    Raises the reader's errors for an unreadable slide and ``BadRequest`` when the slide
    has no DICOM view or ``dest`` is not a folder.
    """
    started = time.perf_counter()
    slide, dest = Path(slide), Path(dest)
    if dest.exists() and not dest.is_dir():
        raise BadRequest(f"{dest.name} exists and is not a folder")
    pool = ReaderPool(registry or default_registry(), 4)
    library = _library_for(slide, list(library_roots or []), pool)
    entry = _open_entry(slide, library)
    workers = threads or os.cpu_count() or 2
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsi-export")
    try:
        tiles = TileService(library, MemoryCache(0), executor, GeometryParams(254, 1, False))
        service = DicomService(library, tiles, MemoryCache(0))

        async def run() -> tuple[SlideModel, list[Path], int, int, int]:
            model = await service.model(entry)
            if model is None:
                raise BadRequest("the slide has no DICOM view")
            dest.mkdir(parents=True, exist_ok=True)
            hidden = frozenset({"label", "macro"}) if hide_associated else frozenset()
            got = await _export(entry, service, model, dest, hidden, progress)
            return (model, *got)

        model, files, written, skipped, nbytes = asyncio.run(run())
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        pool.clear()
    ours = {f.name for f in files}
    stale = tuple(sorted(p for p in dest.iterdir()
                         if p.suffix == ".dcm" and p.name not in ours))
    return ExportResult(dest, model.study_uid, model.series_uid, tuple(files), written,
                        skipped, stale, time.perf_counter() - started, nbytes)


# -- progress --------------------------------------------------------------------------
class ExportProgressPrinter(LineProgress):
    """A bar redrawn in place on a terminal; plain lines every ``interval`` s otherwise."""

    def __init__(self, stream: Any = None, interval: float = 5.0) -> None:
        super().__init__("dicom export", stream, interval)

    @staticmethod
    def line(p: ExportProgress) -> str:
        return (f"{p.fraction * 100:5.1f}%  frames {p.frames_done}/{p.frames_total}  "
                f"instances {p.instances_done}/{p.instances_total}  ETA {clock(p.eta)}")

    def __call__(self, p: ExportProgress) -> None:
        self.show(p.fraction, self.line(p), p.instances_done >= p.instances_total)


# -- command line ----------------------------------------------------------------------
def add_dicom_command(sub: Any) -> None:
    """Register ``wsi-server dicom export SLIDE DEST_DIR`` on the CLI's subparsers."""
    dicom = sub.add_parser("dicom", help="DICOM tools (export a slide as DICOM-WSI files)")
    dsub = dicom.add_subparsers(dest="dicom_command", required=True)
    p = dsub.add_parser(
        "export",
        help="write a slide's DICOM VL Whole Slide Microscopy instances as Part 10 files",
        description="Write the instances the DICOMweb front serves for SLIDE (one per "
        "pyramid level, plus label, overview and thumbnail) as Part 10 files "
        "<SOPInstanceUID>.dcm in DEST_DIR. Each file is written under a hidden temporary "
        "name and renamed when complete; run again to resume an interrupted export.",
    )
    p.add_argument("slide", type=Path, help="slide file, or DICOM-WSI folder")
    p.add_argument("dest", type=Path, help="folder to write into (created when missing)")
    p.add_argument("--library", action="append", type=Path, default=[], metavar="ROOT",
                   help="library root(s) the server serves: the slide's id, hence its UIDs, "
                   "are then those of the server's DICOMweb front (default: the slide's "
                   "folder)")
    p.add_argument("--hide-associated", action="store_true",
                   help="leave out the label and overview instances (and label text)")
    p.add_argument("--threads", type=int, default=0, metavar="K",
                   help="threads reading and encoding frames (0: one per core)")
    p.set_defaults(func=cmd_dicom_export)


def cmd_dicom_export(args: Any) -> int:
    try:
        result = export_slide(args.slide, args.dest, library_roots=list(args.library),
                              hide_associated=bool(args.hide_associated),
                              progress=ExportProgressPrinter(), threads=int(args.threads))
    except WsiServerError as exc:
        print(json.dumps({"error": exc.code, "detail": exc.detail}), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(f"exported study {result.study_uid}: {len(result.files)} instances "
          f"({result.written} written, {result.skipped} already complete), "
          f"{result.bytes_written / 2**20:.1f} MiB in {result.seconds:.1f} s")
    if result.stale:
        print(f"note: {len(result.stale)} other .dcm file(s) in {result.dest} are not "
              "instances of this slide's current version (left in place)", file=sys.stderr)
    return 0
