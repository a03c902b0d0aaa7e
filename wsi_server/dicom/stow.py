"""STOW-RS: DICOM instances pushed over HTTP enter the ingest pipeline.

A request body (``multipart/related; type="application/dicom"``) is streamed to a file
in the watch folder's staging area (``WATCH/.stow/<request>/``, hidden from the ingest
scanner, on the watch folder's filesystem so a rename is atomic), never held in memory,
and refused past the size limit. The parts are then cut out of that file (``split_parts``,
an ``mmap`` search for the boundary), each parsed with pydicom and checked
(``check_instance``): a part that is not DICOM, not a VL Whole Slide Microscopy instance,
lacks what a tiled slide needs, or belongs to another study than the URL names, fails
with its PS3.18 failure reason and is not kept. The instances that pass are grouped by
series, one folder per series (``stow-<digest of the Series Instance UID>``), and each
folder is renamed into the watch folder (or its urgent subfolder) in one step: the ingest
scanner sees a complete DICOM-WSI folder or nothing, then settles, validates it in its
isolated process, and moves it into the library (or quarantines it with a reason).
A later push of more instances of a series still waiting in the watch folder joins its
folder (each file renamed in, which restarts the settle time).

The answer is the PS3.18 Store Instances Response Module as DICOM JSON
(``status_document``): ``ReferencedSOPSequence`` with each stored instance's
``RetrieveURL`` (where it will be once ingest has moved it), ``FailedSOPSequence`` with a
``FailureReason`` per refused instance.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from wsi_server.dicom.model import WSI_SOP_CLASS

STAGING = ".stow"
"""Staging folder in the watch folder (hidden: the ingest scanner skips it)."""
FOLDER_PREFIX = "stow-"

# Failure reasons (PS3.18 10.5.3, from the C-STORE statuses of PS3.4 Annex B)
OUT_OF_RESOURCES = 0xA700
"""Refused: out of resources (the instance could not be written)."""
DOES_NOT_MATCH_SOP_CLASS = 0xA900
"""Error: Data Set does not match SOP Class (attributes missing, another study than the
URL names)."""
CANNOT_UNDERSTAND = 0xC000
"""Error: cannot understand (not a DICOM Part 10 file, not application/dicom)."""
SOP_CLASS_NOT_SUPPORTED = 0x0122
"""Refused: SOP Class not supported (anything but VL Whole Slide Microscopy Image)."""
DUPLICATE = 0x0111
"""Duplicate SOP Instance within one request (the first copy is kept)."""
PROCESSING_FAILURE = 0x0110

_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns",
             "TotalPixelMatrixColumns", "TotalPixelMatrixRows", "ImageType")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_HEADER = 16 * 1024
MAX_PARTS = 100_000


class MalformedBody(ValueError):
    """The body is not a multipart/related payload with the announced boundary."""


@dataclass(frozen=True)
class Part:
    path: Path
    content_type: str


@dataclass
class Outcome:
    """Instances stored and failed by one request."""

    stored: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(SOP Class UID, SOP Instance UID, Study UID, Series UID) of each stored instance."""
    failed: list[tuple[str | None, str | None, int, str]] = field(default_factory=list)
    """(SOP Class UID, SOP Instance UID, failure reason, why) of each refused part."""
    folders: list[Path] = field(default_factory=list)
    """Where each series went in the watch folder."""

    @property
    def status(self) -> int:
        """200 all stored, 202 some, 409 none (PS3.18 10.5.3)."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409


def boundary_of(content_type: str) -> str | None:
    """The boundary of a ``multipart/related; type="application/dicom"`` content type;
    None when the content type is anything else."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/related":
        return None
    found: dict[str, str] = {}
    for m in re.finditer(r'\s*([A-Za-z_-]+)\s*=\s*("([^"]*)"|[^;\s]*)\s*;?', params):
        found[m.group(1).lower()] = m.group(3) if m.group(3) is not None else m.group(2)
    kind = found.get("type", "application/dicom").strip().lower()
    if kind != "application/dicom":
        return None
    boundary = found.get("boundary", "")
    if not 1 <= len(boundary) <= 200:
        return None
    return boundary


def split_parts(body: Path, boundary: str, out_dir: Path) -> list[Part]:
    """Cut each part of a multipart body file into its own file in ``out_dir``.

    Raises ``MalformedBody`` when the body does not follow RFC 2046 with this boundary.
    """
    size = body.stat().st_size
    if size == 0:
        raise MalformedBody("the body is empty")
    delim = b"--" + boundary.encode("latin-1")
    parts: list[Part] = []
    with open(body, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[: len(delim)] == delim:
            pos = 0
        else:  # after a preamble (or an empty one: the body starts with CRLF)
            pos = mm.find(b"\r\n" + delim)
            if pos < 0:
                raise MalformedBody("the body holds no part with the announced boundary")
            pos += 2
        while True:
            pos += len(delim)
            if mm[pos : pos + 2] == b"--":
                break  # close delimiter
            line_end = mm.find(b"\r\n", pos)
            if line_end < 0 or mm[pos:line_end].strip(b" \t"):
                raise MalformedBody("a boundary line is malformed")
            head_start = line_end + 2
            head_end = mm.find(b"\r\n\r\n", head_start - 2, head_start + MAX_HEADER)
            if head_end < 0:
                raise MalformedBody("a part has no header end")
            headers = _headers(bytes(mm[head_start:head_end]))
            data_start = head_end + 4
            nxt = mm.find(b"\r\n" + delim, data_start - 2)
            if nxt < 0:
                raise MalformedBody("the body ends inside a part (no closing boundary)")
            if len(parts) >= MAX_PARTS:
                raise MalformedBody(f"more than {MAX_PARTS} parts")
            path = out_dir / f"part-{len(parts):06d}"
            end = max(nxt, data_start)  # an empty part: its CRLF is the header's
            with open(path, "wb") as out:
                for off in range(data_start, end, 8 << 20):
                    out.write(mm[off : min(end, off + (8 << 20))])
            parts.append(Part(path, headers.get("content-type", "application/dicom")))
            pos = nxt + 2
    return parts


def _headers(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def check_instance(part: Part, study: str | None) -> tuple[Dataset | None, int, str]:
    """The instance's dataset (without pixel data) when it may be stored, else None with
    the failure reason and why. ``study``: the Study Instance UID the URL names."""
    media = part.content_type.split(";")[0].strip().lower()
    if media != "application/dicom":
        return None, CANNOT_UNDERSTAND, f"a part of type {media!r} is not application/dicom"
    try:
        ds = pydicom.dcmread(part.path, stop_before_pixels=False, defer_size=1024)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        return None, CANNOT_UNDERSTAND, f"not a DICOM Part 10 file ({type(exc).__name__})"
    except Exception as exc:  # pydicom on hostile bytes: never a 500
        return None, CANNOT_UNDERSTAND, f"not a DICOM Part 10 file ({type(exc).__name__})"
    try:
        sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get(
            "MediaStorageSOPClassUID", ""))
        if sop_class != WSI_SOP_CLASS:
            return ds, SOP_CLASS_NOT_SUPPORTED, (
                "only VL Whole Slide Microscopy Image Storage instances are accepted")
        missing = [k for k in _REQUIRED if not ds.get(k)]
        if missing:
            return ds, DOES_NOT_MATCH_SOP_CLASS, "missing " + ", ".join(missing)
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if not valid_uid(str(ds.get(key))):
                return ds, DOES_NOT_MATCH_SOP_CLASS, f"{key} is not a valid UID"
        if "PixelData" not in ds:
            return ds, DOES_NOT_MATCH_SOP_CLASS, "no Pixel Data"
        if study is not None and str(ds.StudyInstanceUID) != study:
            return ds, DOES_NOT_MATCH_SOP_CLASS, (
                "the instance's Study Instance UID is not the study of the URL")
    except Exception as exc:  # a value pydicom cannot convert
        return None, CANNOT_UNDERSTAND, f"unreadable attribute ({type(exc).__name__})"
    return ds, 0, ""


def valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and bool(_UID.match(uid))


def series_folder_name(series_uid: str) -> str:
    """The watch-folder name of a pushed series (no UID in clear: short and opaque)."""
    return FOLDER_PREFIX + hashlib.sha256(series_uid.encode()).hexdigest()[:20]


def store_parts(parts: list[Part], study: str | None, work: Path, target: Path) -> Outcome:
    """Check each part and move the good ones, grouped by series, into ``target`` (the
    watch folder or its urgent subfolder). ``work`` is this request's staging folder on
    the same filesystem; the caller removes it afterwards."""
    outcome = Outcome()
    groups: dict[str, list[tuple[Path, str, str, str]]] = {}
    seen: set[str] = set()
    for part in parts:
        ds, reason, why = check_instance(part, study)
        sop_class = str(ds.get("SOPClassUID", "")) or None if ds is not None else None
        sop = str(ds.get("SOPInstanceUID", "")) or None if ds is not None else None
        if reason:
            outcome.failed.append((sop_class, sop, reason, why))
            continue
        assert ds is not None and sop is not None and sop_class is not None
        if sop in seen:
            outcome.failed.append((sop_class, sop, DUPLICATE,
                                   "the instance appears twice in the request"))
            continue
        seen.add(sop)
        series = str(ds.SeriesInstanceUID)
        folder = work / series_folder_name(series)
        folder.mkdir(exist_ok=True)
        dest = folder / f"{sop}.dcm"
        os.rename(part.path, dest)
        groups.setdefault(series, []).append((dest, sop_class, sop, str(ds.StudyInstanceUID)))
    target.mkdir(parents=True, exist_ok=True)
    for series, members in groups.items():
        try:
            for path, *_ in members:
                _fsync(path)
            folder = _publish(members[0][0].parent, target)
        except OSError as exc:
            why = ("no space left to store the instance" if exc.errno == errno.ENOSPC
                   else "the instance could not be written")
            for _, sop_class, sop, _study in members:
                outcome.failed.append((sop_class, sop, OUT_OF_RESOURCES, why))
            continue
        outcome.folders.append(folder)
        outcome.stored += [(c, s, st, series) for _, c, s, st in members]
    return outcome


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(folder: Path, target: Path) -> Path:
    """Rename the staged series folder into ``target`` in one step; join the folder of
    the same series when it is still waiting there (file by file)."""
    final = target / folder.name
    try:
        os.rename(folder, final)  # atomic: the scanner sees all of it or nothing
        _fsync(target)
        return final
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    try:
        for f in sorted(folder.iterdir()):
            os.rename(f, final / f.name)
        return final
    except FileNotFoundError:  # ingest took the waiting folder meanwhile: a new one
        other = target / f"{folder.name}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, other)
        return other


def new_work_dir(watch: Path) -> Path:
    work = watch / STAGING / uuid.uuid4().hex
    work.mkdir(parents=True)
    return work


def remove_work_dir(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)


def status_document(outcome: Outcome, base_url: str) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-?) as a dataset."""
    ds = Dataset()
    studies = {st for _, _, st, _ in outcome.stored}
    if len(studies) == 1:
        ds.RetrieveURL = f"{base_url}/studies/{next(iter(studies))}"
    if outcome.failed:
        items = []
        for sop_class, sop, reason, _why in outcome.failed:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class or ""
            item.ReferencedSOPInstanceUID = sop or ""
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    if outcome.stored:
        refs = []
        for sop_class, sop, study, series in outcome.stored:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop
            item.RetrieveURL = f"{base_url}/studies/{study}/series/{series}/instances/{sop}"
            refs.append(item)
        ds.ReferencedSOPSequence = refs
    return ds


def iter_reasons(outcome: Outcome) -> Iterator[str]:
    for _, _, reason, why in outcome.failed:
        yield f"{reason:04X}: {why}"
