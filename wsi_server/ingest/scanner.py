"""Finding scans in the watch folder and deciding when each one has finished arriving.

A *unit* is what moves as one: a slide file; an ``.mrxs`` file with its sibling data
folder; a folder holding ``.dcm`` instances (a DICOM-WSI series, taken as a whole); a
``.zarr`` store. A folder that is none of these is looked into, so scanners that write
``WATCH/case-17/slide.svs`` work too. Names starting with a dot or ending in ``.tmp``,
``.part``, ``.partial`` are a scanner's work in progress: skipped at the top level, and a
unit that holds one inside is not settled.

A unit *settles* when the size and mtime of every one of its files (and the set of files)
stay unchanged for the settle time, measured with a monotonic clock by polling. Change
events (watchfiles) only wake the poller early; they are never trusted alone, since
network filesystems often do not deliver them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")

Signature = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Unit:
    source: str
    """Main member, relative to the watch folder (posix); the unit's key."""
    members: tuple[str, ...]
    """Top-level paths that move together, relative to the watch folder; main first."""
    urgent: bool
    kind: str  # "file" | "mrxs" | "dicom" | "zarr"


def _is_partial(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES)


def discover(watch: Path, urgent_dir: str, skip: Iterable[str] = ()) -> list[Unit]:
    """Every unit under ``watch``; ``skip`` names top-level folders that are not input."""
    skipped = set(skip)
    units: list[Unit] = []
    _walk(watch, watch, False, skipped | {urgent_dir}, units, root=True)
    urgent = watch / urgent_dir
    if urgent.is_dir():
        _walk(watch, urgent, True, set(), units, root=True)
    return units


def _walk(watch: Path, folder: Path, urgent: bool, skip: set[str], out: list[Unit],
          root: bool = False) -> None:
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return
    if not root and any(c.suffix.lower() == ".dcm" and not _is_partial(c.name)
                        and c.is_file() for c in children):
        # a DICOM series: the folder is the unit. Decided on this one listing, so a folder
        # caught empty by one look and with its first instance by the next is never taken
        # for a lone file
        rel = folder.relative_to(watch).as_posix()
        out.append(Unit(rel, (rel,), urgent, "dicom"))
        return
    names = {c.name for c in children}
    mrxs_data = {c.with_suffix("").name for c in children if c.suffix.lower() == ".mrxs"}
    for child in children:
        name = child.name
        if _is_partial(name) or (folder == watch and name in skip):
            continue
        rel = child.relative_to(watch).as_posix()
        try:
            is_dir = child.is_dir()
        except OSError:
            continue
        if is_dir:
            if name in mrxs_data:
                continue  # taken with its .mrxs file
            if name.lower().endswith(".zarr"):
                out.append(Unit(rel, (rel,), urgent, "zarr"))
            else:  # a DICOM series, or a folder of slides
                _walk(watch, child, urgent, set(), out)
        elif child.suffix.lower() == ".mrxs":
            data = child.with_suffix("").name
            members = (rel, child.with_suffix("").relative_to(watch).as_posix())
            out.append(Unit(rel, members if data in names else (rel,), urgent, "mrxs"))
        elif name.lower().endswith((".error.json", ".duplicate.json")):
            continue
        else:
            out.append(Unit(rel, (rel,), urgent, "file"))


def member_files(root: Path, members: Iterable[str]) -> list[Path]:
    """Every file of a unit's members, in a stable order."""
    files: list[Path] = []
    for m in members:
        p = root / m
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.exists():
            files.append(p)
    return files


def signature(root: Path, unit: Unit) -> tuple[Signature, bool]:
    """(size, mtime_ns) of every file of the unit, and whether it holds work in progress."""
    sig: list[tuple[str, int, int]] = []
    partial = False
    for m in unit.members:
        p = root / m
        paths = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in paths:
            try:
                st = f.stat()
            except OSError:
                partial = True  # vanished while we looked: still changing
                continue
            if f.is_dir():
                continue
            if f != p and _is_partial(f.name):
                partial = True
            sig.append((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(sig), partial


class SettleTracker:
    """Remembers each unit's last signature and since when it has been unchanged."""

    def __init__(self, settle_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.settle = settle_seconds
        self.clock = clock
        self._seen: dict[str, tuple[Signature, float]] = {}

    def observe(self, root: Path, units: Iterable[Unit]) -> list[Unit]:
        """Update with the units on disk now; return those settled."""
        now = self.clock()
        settled: list[Unit] = []
        present: set[str] = set()
        for unit in units:
            present.add(unit.source)
            sig, partial = signature(root, unit)
            if not sig:
                continue
            old = self._seen.get(unit.source)
            if old is None or old[0] != sig or partial:
                self._seen[unit.source] = (sig, now)
                continue
            if now - old[1] >= self.settle:
                settled.append(unit)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return settled

    def forget(self, source: str) -> None:
        self._seen.pop(source, None)

    def next_deadline(self) -> float | None:
        """Monotonic time at which the next still-unsettled unit would settle."""
        now = self.clock()
        pending = [s + self.settle for _, s in self._seen.values() if s + self.settle > now]
        return min(pending) if pending else None


def same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev
