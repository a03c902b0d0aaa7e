"""The ingest pipeline: watch folder ─▶ settle ─▶ hash ─▶ validate ─▶ move ─▶ library.

One thread runs the loop: poll the watch folder (woken early by watchfiles events where
the filesystem delivers them), record new scans, mark the ones that settled, and take the
next settled scan — urgent ones first, then in the order they settled. Each scan is
hashed (a scan whose content is already in the library goes to ``duplicates/`` beside a
``NAME.duplicate.json``), validated in a separate process, and moved: into the library
when valid, into the quarantine beside ``NAME.error.json`` when not. Every step is
recorded in the SQLite state before it starts, so a restart after a crash finishes what
was under way (:meth:`IngestPipeline.recover`).

The library is a folder (the server's first slide root); a scan keeps its path relative
to the watch folder (less the ``urgent/`` prefix), with ``-2``, ``-3``... added to the
name when another slide already holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wsi_server.ingest import mover
from wsi_server.ingest.faults import fault
from wsi_server.ingest.scanner import SettleTracker, Unit, discover, signature
from wsi_server.ingest.state import IngestState, ScanRecord
from wsi_server.ingest.validate import DEFAULT_TIMEOUT, Validator

log = logging.getLogger(__name__)

OnIngested = Callable[[Path], "str | None"]
OnOutcome = Callable[["ScanRecord"], None]


@dataclass(frozen=True)
class IngestConfig:
    watch: Path
    """The drop folder scanners write into."""
    library: Path
    """Where valid scans go; the server's first slide root. Holds the state database."""
    settle_seconds: float = 10.0
    """How long size and mtime of every file of a scan must stay unchanged."""
    quarantine: Path | None = None
    """Where bad scans go (default ``WATCH/quarantine``)."""
    urgent_dir: str = "urgent"
    """Subfolder of the watch folder whose scans jump the queue."""
    duplicates_dir: str = "duplicates"
    """Subfolder of the watch folder where repeated drops are kept."""
    poll: bool = False
    """Poll only; do not use filesystem events (network filesystems)."""
    poll_interval: float | None = None
    """Seconds between polls (default: a fifth of the settle time, within 0.1–2 s)."""
    validate_timeout: float = DEFAULT_TIMEOUT
    """Seconds the validator may take on one scan before it is killed."""
    force_copy: bool = False
    """Move by copy + fsync + verify + remove even on one filesystem (tests)."""
    convert: bool = False
    """Convert each ingested slide to zarr (into ``convert_dir``)."""
    convert_dir: Path | None = None
    """Where converted copies go: ``convert_dir/<path in the library>.zarr``, the place the
    server's ``--convert-dir`` serves them from in place of the original."""

    @property
    def interval(self) -> float:
        if self.poll_interval is not None:
            return self.poll_interval
        return min(2.0, max(0.1, self.settle_seconds / 5))

    @classmethod
    def from_settings(cls, settings: Any, watch: Path | None = None,
                      library: Path | None = None) -> IngestConfig:
        """From a :class:`wsi_server.settings.Settings` (ingest fields read if present)."""
        watch = watch or settings.ingest
        if library is None:
            if not settings.paths:
                raise ValueError("ingest needs a library: the first slide folder to serve")
            library = Path(settings.paths[0])
        if library.exists() and not library.is_dir():
            raise ValueError("the ingest library (first slide path) must be a folder")
        return cls(
            watch=Path(watch),
            library=library,
            settle_seconds=float(getattr(settings, "ingest_settle_seconds", 10.0)),
            quarantine=getattr(settings, "ingest_quarantine", None),
            urgent_dir=str(getattr(settings, "ingest_urgent_dir", "urgent")),
            poll=bool(getattr(settings, "ingest_poll", False)),
            validate_timeout=float(getattr(settings, "ingest_validate_timeout", DEFAULT_TIMEOUT)),
            convert=bool(getattr(settings, "ingest_convert", False)),
            convert_dir=getattr(settings, "convert_dir", None),
        )


def _convert_progress(progress: object) -> None:
    fault("convert-mid")  # crash tests: die with the conversion half done


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(path: Path, body: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(body, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


LOCK_FILE = ".wsi-ingest.lock"


class LibraryLock:
    """One ingest per library: an exclusive ``flock`` on ``LIBRARY/.wsi-ingest.lock``.

    Several worker processes (``--workers N``) or replicas may all run with ``--ingest``;
    the one holding the lock ingests, the others wait to take over if it dies (the kernel
    releases the lock with the process)."""

    def __init__(self, library: Path) -> None:
        self.path = library / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


class IngestPipeline:
    def __init__(self, config: IngestConfig, on_ingested: OnIngested | None = None) -> None:
        self.config = config
        self.watch = config.watch.resolve()
        self.library = config.library.resolve()
        self.watch.mkdir(parents=True, exist_ok=True)
        self.library.mkdir(parents=True, exist_ok=True)
        self.quarantine = (config.quarantine or self.watch / "quarantine").resolve()
        self.duplicates = self.watch / config.duplicates_dir
        self.on_ingested = on_ingested
        self.on_outcome: OnOutcome | None = None
        """Told of each scan's outcome once its files are where they belong: done,
        quarantined or duplicate (the server writes it to the audit trail)."""
        self.on_followed: Callable[[Path], object] | None = None
        """While another process ingests into the library (this one stands by): told of
        each slide that process publishes, within a second (``--workers N``: every
        worker's library knows a new slide, not only the ingesting worker's)."""
        self.state = IngestState.in_library(self.library)
        # a minute back: a slide published while this process scanned its library is
        # announced again (adding a slide the library has is a no-op)
        self._followed = self.state.last_event_before(time.time() - 60)
        self.tracker = SettleTracker(config.settle_seconds)
        self.validator = Validator(config.validate_timeout)
        self.current: int | None = None
        self._retry_at: dict[int, float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._skip = {p.name for p in (self.quarantine, self.duplicates)
                      if p.parent == self.watch}
        self.lock = LibraryLock(self.library)

    # -- running ---------------------------------------------------------------
    def start(self) -> None:
        """Recover, then run the loop (and the event watcher) in background threads."""
        loop = threading.Thread(target=self._run, name="wsi-ingest", daemon=True)
        self._threads.append(loop)
        loop.start()
        if not self.config.poll:
            watcher = threading.Thread(target=self._watch_events, name="wsi-ingest-events",
                                       daemon=True)
            self._threads.append(watcher)
            watcher.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads; a scan cut mid-way is finished by the next start (recover)."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        alive = [t for t in self._threads if t.is_alive()]
        self._threads = alive
        if alive:
            log.warning("ingest: still busy with scan %s at shutdown", self.current)
        else:
            self.validator.close()

    def close(self) -> None:
        self.stop()
        if not self._threads:
            self.state.close()
            self.lock.release()

    def _acquire(self) -> bool:
        """Wait for the library's ingest lock; False when stopped before getting it."""
        logged = False
        while not self.lock.try_acquire():
            if not logged:
                log.info("ingest: another process ingests into %s; standing by", self.library)
                logged = True
            self.follow()
            if self._stop.wait(1.0):
                return False
        return True

    def follow(self) -> int:
        """On a standby process: pass the slides the ingesting process published since the
        last call to ``on_followed``; returns how many."""
        try:
            self._followed, paths = self.state.published_since(self._followed)
        except sqlite3.Error as exc:  # the journal busy or away: the next second retries
            log.warning("ingest: cannot read the journal: %s", exc)
            return 0
        for path in paths:
            if self.on_followed is not None:
                try:
                    self.on_followed(Path(path))
                except Exception:
                    log.exception("ingest: the library did not take %s", Path(path).name)
        return len(paths)

    def _run(self) -> None:
        if not self._acquire():
            return
        try:
            self.recover()
        except Exception:
            log.exception("ingest recovery failed")
        while not self._stop.is_set():
            try:
                worked = self.step()
            except Exception:
                log.exception("ingest step failed")
                worked = False
            if worked:
                continue
            timeout = self.config.interval
            deadline = self.tracker.next_deadline()
            if deadline is not None:
                timeout = min(timeout, max(0.02, deadline - time.monotonic()))
            self._wake.wait(timeout)
            self._wake.clear()

    def _watch_events(self) -> None:
        try:
            import watchfiles

            for _ in watchfiles.watch(self.watch, stop_event=self._stop, debounce=50, step=20,
                                      rust_timeout=1000, yield_on_timeout=False):
                self._wake.set()
        except Exception as exc:  # no inotify: polling alone still finds everything
            log.warning("ingest: filesystem events unavailable (%s); polling only", exc)

    def run_until_idle(self, timeout: float = 60.0) -> None:
        """Run the loop in this thread until nothing is arriving or queued (tests, CLI)."""
        if not self._acquire():
            return
        self.recover()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.step():
                continue
            if not self.state.active() and self.tracker.next_deadline() is None:
                self.poll()
                if not self.state.active():
                    return
            time.sleep(min(self.config.interval, 0.05))
        raise TimeoutError("ingest did not become idle")

    def step(self) -> bool:
        """Poll once and process the next settled scan; False when there was none."""
        self.poll()
        rec = self._next()
        if rec is None:
            return False
        self.process(rec)
        return True

    # -- the queue ---------------------------------------------------------------
    def poll(self) -> None:
        units = discover(self.watch, self.config.urgent_dir, self._skip)
        by_source = self.state.active_by_source()
        present = {u.source for u in units}
        for unit in units:
            if unit.source not in by_source:
                by_source[unit.source] = self.state.add(
                    unit.source, list(unit.members), unit.urgent
                )
        for source, rec in by_source.items():
            if rec.state == "seen" and source not in present:
                self.state.update(rec.id, state="gone", finished_at=time.time())
                self.state.event(rec.id, "gone", "the files left the watch folder unsettled")
        for unit in self.tracker.observe(self.watch, units):
            rec = by_source[unit.source]
            if rec.state == "seen":
                self.state.update(rec.id, state="settled", settled_at=time.time(),
                                  members=list(unit.members), urgent=unit.urgent)
                self.state.event(rec.id, "settled", "unchanged for the settle time")

    def _next(self) -> ScanRecord | None:
        now = time.monotonic()
        ready = [r for r in self.state.active()
                 if r.state != "seen" and self._retry_at.get(r.id, 0.0) <= now]
        if not ready:
            return None
        return min(ready, key=lambda r: (not r.urgent, r.settled_at or 0.0, r.id))

    # -- one scan ------------------------------------------------------------------
    def recover(self) -> None:
        """After a restart: scans caught mid-validation settle again; moves finish."""
        for rec in self.state.active():
            if rec.state == "validating":
                self.state.update(rec.id, state="seen")
                self.state.event(rec.id, "recovered", "validation was cut; settling again")
            elif rec.state in ("moving", "staged", "converting"):
                self.state.event(rec.id, "recovered", f"resuming from {rec.state}")

    def process(self, rec: ScanRecord) -> None:
        self.current = rec.id
        try:
            if rec.state == "settled":
                rec = self._route(rec)
            if rec.state in ("moving", "staged"):
                rec = self._move(rec)
            if rec.state == "converting":
                rec = self._convert(rec)
            self._retry_at.pop(rec.id, None)
        except mover.MoveError as exc:
            log.warning("ingest scan %d: %s", rec.id, exc)
            self.state.event(rec.id, "move_error", str(exc))
            self._retry_at[rec.id] = time.monotonic() + 10 * self.config.interval
        except OSError as exc:  # disk full, permissions: keep everything, try again later
            log.warning("ingest scan %d: %s", rec.id, exc)
            self.state.event(rec.id, "io_error", f"{type(exc).__name__}: {exc.strerror}")
            self._retry_at[rec.id] = time.monotonic() + 10 * self.config.interval
        finally:
            self.current = None

    def _sources(self, rec: ScanRecord) -> list[Path]:
        return [self.watch / m for m in rec.members]

    def _route(self, rec: ScanRecord) -> ScanRecord:
        """settled ─▶ validating ─▶ moving, with the destination chosen and recorded."""
        sources = self._sources(rec)
        if not sources[0].exists():
            self.tracker.forget(rec.source)
            self.state.event(rec.id, "gone", "the files left the watch folder")
            return self.state.update(rec.id, state="gone", finished_at=time.time())
        rec = self.state.update(rec.id, state="validating")
        unit = Unit(rec.source, rec.members, rec.urgent, "")
        before, _ = signature(self.watch, unit)
        digest, size = mover.content_hash(sources)
        rec = self.state.update(rec.id, content_hash=digest, size_bytes=size)
        original = self.state.done_with_hash(digest)
        if original is not None:
            fault("routed")
            return self._plan(rec, self.duplicates, "duplicate", {
                "duplicate_of": {"slide_id": original.slide_id,
                                 "library_path": self._in_library(original.dest)},
                "content_hash": digest,
            })
        verdict = self.validator.validate(sources[0])
        after, _ = signature(self.watch, unit)
        if after != before:
            self.state.event(rec.id, "changed", "the scan changed while being validated")
            return self.state.update(rec.id, state="seen")
        fault("routed")
        if not verdict.ok:
            self.state.event(rec.id, "invalid", f"{verdict.code}: {verdict.detail}")
            return self._plan(rec, self.quarantine, "quarantined", {
                "failed_step": "validate", "error": verdict.code, "detail": verdict.detail,
                "content_hash": digest,
            })
        self.state.event(rec.id, "valid",
                         f"{verdict.info.get('format')} {verdict.info.get('width')}x"
                         f"{verdict.info.get('height')} in {verdict.seconds:.2f} s")
        relative_dir = Path(rec.source).parent
        if rec.urgent:
            relative_dir = Path(*relative_dir.parts[1:]) if relative_dir.parts else relative_dir
        return self._plan(rec, self.library / relative_dir, "done", None)

    def _in_library(self, dest: str | None) -> str | None:
        if dest is None:
            return None
        with contextlib.suppress(ValueError):
            return Path(dest).relative_to(self.library).as_posix()
        return None

    def _plan(self, rec: ScanRecord, dest_dir: Path, outcome: str,
              record: dict[str, Any] | None) -> ScanRecord:
        dest_dir.mkdir(parents=True, exist_ok=True)
        names = [Path(m).name for m in rec.members]
        sidecar = {"quarantined": ".error.json", "duplicate": ".duplicate.json"}.get(outcome)
        wanted = names + ([names[0] + sidecar] if sidecar else [])
        free = mover.free_name(dest_dir, wanted, self.state.reserved_dests())[: len(names)]
        finals = [str(dest_dir / n) for n in free]
        copy = self.config.force_copy or mover.needs_copy(self._sources(rec)[0], dest_dir)
        body = None
        if record is not None:
            body = {"scan": rec.source, "outcome": outcome, "when": _now_iso(), **record,
                    "size_bytes": rec.size_bytes}
        return self.state.update(
            rec.id, state="moving", dest=finals[0], finals=finals, outcome=outcome,
            staging=str(mover.staging_for(dest_dir, rec.id)), copy=copy, error=body,
        )

    def _move(self, rec: ScanRecord) -> ScanRecord:
        """moving ─▶ staged ─▶ published: done | quarantined | duplicate (or converting)."""
        sources = self._sources(rec)
        finals = [Path(f) for f in rec.finals]
        staging = Path(rec.staging or "")
        if rec.state == "moving":
            mover.stage(sources, finals, staging, rec.copy, rec.content_hash)
            fault("staged-before-commit")
            rec = self.state.update(rec.id, state="staged")
            fault("staged")
        elif rec.copy:
            sources = self._sources_to_remove(rec, sources)
        if rec.copy:
            mover.remove_sources(sources, finals, staging)
        mover.publish(finals, staging)
        fault("published")
        self.tracker.forget(rec.source)
        outcome = rec.outcome or "done"
        if outcome != "done":
            assert rec.error is not None
            sidecar = ".error.json" if outcome == "quarantined" else ".duplicate.json"
            _write_json(finals[0].with_name(finals[0].name + sidecar), rec.error)
            self.state.event(rec.id, outcome, f"kept in {finals[0].parent.name}/")
            return self._report(
                self.state.update(rec.id, state=outcome, finished_at=time.time()))
        sid = self._announce(finals[0])
        self.state.event(rec.id, "ingested", f"now served as slide {sid}")
        if self.config.convert:
            return self._report(
                self.state.update(rec.id, state="converting", slide_id=sid))
        return self._report(
            self.state.update(rec.id, state="done", slide_id=sid, finished_at=time.time()))

    def _report(self, rec: ScanRecord) -> ScanRecord:
        if self.on_outcome is not None:
            try:
                self.on_outcome(rec)
            except Exception:  # reporting never stops ingest
                log.exception("ingest: reporting the outcome of scan %d failed", rec.id)
        return rec

    def _sources_to_remove(self, rec: ScanRecord, sources: list[Path]) -> list[Path]:
        """On recovery of a copy: leave a source that is a *new* drop under the same name."""
        present = [s for s in sources if s.exists()]
        if len(present) == len(sources) and rec.content_hash is not None:
            digest, _ = mover.content_hash(sources)
            if digest != rec.content_hash:
                self.state.event(rec.id, "kept", "a new scan took the source's name")
                return []
        return present

    def _announce(self, path: Path) -> str | None:
        from wsi_server.library import slide_id

        sid: str | None = slide_id(path.relative_to(self.library).as_posix())
        if self.on_ingested is not None:
            try:
                sid = self.on_ingested(path) or sid
            except Exception:
                log.exception("ingest: the library did not take %s", path.name)
        return sid

    def _convert(self, rec: ScanRecord) -> ScanRecord:
        """converting ─▶ done: optional zarr conversion (skipped when not installed)."""
        try:
            convert_mod = importlib.import_module("wsi_server.convert")
        except ImportError:
            self.state.event(rec.id, "convert_skipped", "wsi_server.convert is not installed")
            return self.state.update(rec.id, state="done", finished_at=time.time())
        src = Path(rec.dest or "")
        if self.config.convert_dir is None:
            self.state.event(rec.id, "convert_skipped", "no --convert-dir to convert into")
            return self.state.update(rec.id, state="done", finished_at=time.time())
        rel = src.relative_to(self.config.library)
        dest = self.config.convert_dir / rel.with_name(rel.name + ".zarr")
        if not dest.exists():
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                # resumable: a conversion killed midway continues from its finished shards
                convert_mod.convert_slide(src, dest, progress=_convert_progress)
                self.state.event(rec.id, "converted", f"zarr store {dest.name}")
                if self.on_ingested is not None:
                    self.on_ingested(src)  # the library now serves the converted copy
            except Exception as exc:
                log.warning("ingest: conversion of scan %d failed: %r", rec.id, exc)
                self.state.event(rec.id, "convert_failed", repr(exc)[:500])
        return self.state.update(rec.id, state="done", finished_at=time.time())

    # -- reporting -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What ``GET /api/ingest`` returns."""
        active = self.state.active()

        def item(r: ScanRecord) -> dict[str, Any]:
            return {
                "scan": r.id, "name": Path(r.source).name, "state": r.state,
                "urgent": r.urgent, "first_seen": r.first_seen, "settled_at": r.settled_at,
                "finished_at": r.finished_at, "slide_id": r.slide_id,
                "size_bytes": r.size_bytes, "error": r.error if r.state != "done" else None,
            }

        waiting = [r for r in active if r.state in ("seen", "settled")]
        waiting.sort(key=lambda r: (not r.urgent, r.settled_at or float("inf"), r.id))
        return {
            "enabled": True,
            "runs_here": self.lock.held,  # else another process holds the library's lock
            "settle_seconds": self.config.settle_seconds,
            "queue": {
                "waiting": [item(r) for r in waiting],
                "in_progress": [item(r) for r in active if r.state not in ("seen", "settled")],
                "urgent": [item(r) for r in waiting if r.urgent],
            },
            "recent": [item(r) for r in self.state.recent(("done", "duplicate"), 50)],
            "failures": [item(r) for r in self.state.recent(("quarantined",), 50)],
            "events": self.state.events(100),
        }
