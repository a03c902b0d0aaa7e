"""Ingest state: a small SQLite database kept in the library, ``LIBRARY/.wsi-ingest.sqlite``.

The database is what makes the pipeline crash-safe. Every scan walks these states, each
written (and committed) before the step it names starts::

    seen ─▶ settled ─▶ validating ─▶ moving ─▶ staged ─▶ done
                          │            │
                          └────────────┴─▶ quarantined | duplicate

(``gone``: the files vanished from the watch folder before they settled.)

After a crash (kill -9 at any point) the pipeline reads the scans left in ``settled``,
``validating``, ``moving`` or ``staged`` and finishes them; every file step is idempotent
and checks where the members are on disk before acting (see :mod:`wsi_server.ingest.mover`).
The name starts with a dot, so the library scan never mistakes it for a slide.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DB_NAME = ".wsi-ingest.sqlite"

ACTIVE_STATES = ("seen", "settled", "validating", "moving", "staged", "converting")
FINAL_STATES = ("done", "quarantined", "duplicate", "gone")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,           -- path of the main member, relative to the watch folder
    members TEXT NOT NULL,          -- JSON list of member paths relative to the watch folder
    urgent INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    content_hash TEXT,
    size_bytes INTEGER,
    dest TEXT,                      -- final path of the main member (library, quarantine...)
    finals TEXT,                    -- JSON list: final path of every member
    outcome TEXT,                   -- state once moved: done | quarantined | duplicate
    staging TEXT,                   -- staging folder inside the destination's filesystem
    copy INTEGER NOT NULL DEFAULT 0,-- 1 when moved by copy + fsync + verify (cross-device)
    slide_id TEXT,
    error TEXT,                     -- JSON {"step", "code", "detail"} for failures
    first_seen REAL NOT NULL,
    settled_at REAL,
    finished_at REAL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS scans_state ON scans(state);
CREATE INDEX IF NOT EXISTS scans_hash ON scans(content_hash);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    scan_id INTEGER,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ScanRecord:
    id: int
    source: str
    members: tuple[str, ...]
    urgent: bool
    state: str
    content_hash: str | None
    size_bytes: int | None
    dest: str | None
    finals: tuple[str, ...]
    outcome: str | None
    staging: str | None
    copy: bool
    slide_id: str | None
    error: dict[str, Any] | None
    first_seen: float
    settled_at: float | None
    finished_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ScanRecord:
        return cls(
            id=row["id"],
            source=row["source"],
            members=tuple(json.loads(row["members"])),
            urgent=bool(row["urgent"]),
            state=row["state"],
            content_hash=row["content_hash"],
            size_bytes=row["size_bytes"],
            dest=row["dest"],
            finals=tuple(json.loads(row["finals"])) if row["finals"] else (),
            outcome=row["outcome"],
            staging=row["staging"],
            copy=bool(row["copy"]),
            slide_id=row["slide_id"],
            error=json.loads(row["error"]) if row["error"] else None,
            first_seen=row["first_seen"],
            settled_at=row["settled_at"],
            finished_at=row["finished_at"],
        )


class IngestState:
    """Thread-safe access to the ingest database; every write is its own transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @classmethod
    def in_library(cls, library: Path) -> IngestState:
        return cls(library / DB_NAME)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- scans -------------------------------------------------------------------
    def add(self, source: str, members: list[str], urgent: bool) -> ScanRecord:
        now = time.time()
        cur = self._exec(
            "INSERT INTO scans (source, members, urgent, state, first_seen, updated) "
            "VALUES (?, ?, ?, 'seen', ?, ?)",
            (source, json.dumps(members), int(urgent), now, now),
        )
        assert cur.lastrowid is not None
        self.event(cur.lastrowid, "seen", "new scan in the watch folder")
        return self.get(cur.lastrowid)

    def get(self, scan_id: int) -> ScanRecord:
        rows = self._rows("SELECT * FROM scans WHERE id = ?", (scan_id,))
        if not rows:
            raise KeyError(scan_id)
        return ScanRecord.from_row(rows[0])

    def update(self, scan_id: int, **fields: Any) -> ScanRecord:
        """Set fields (``members`` and ``error`` are JSON-encoded) and commit."""
        fields["updated"] = time.time()
        for name in ("members", "error", "finals"):
            if name in fields and fields[name] is not None:
                fields[name] = json.dumps(fields[name])
        for name in ("copy", "urgent"):
            if name in fields:
                fields[name] = int(fields[name])
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._exec(f"UPDATE scans SET {cols} WHERE id = ?", (*fields.values(), scan_id))
        return self.get(scan_id)

    def active(self) -> list[ScanRecord]:
        marks = ",".join("?" * len(ACTIVE_STATES))
        rows = self._rows(
            f"SELECT * FROM scans WHERE state IN ({marks}) ORDER BY id", ACTIVE_STATES
        )
        return [ScanRecord.from_row(r) for r in rows]

    def active_by_source(self) -> dict[str, ScanRecord]:
        return {r.source: r for r in self.active()}

    def done_with_hash(self, content_hash: str) -> ScanRecord | None:
        rows = self._rows(
            "SELECT * FROM scans WHERE state = 'done' AND content_hash = ? ORDER BY id LIMIT 1",
            (content_hash,),
        )
        return ScanRecord.from_row(rows[0]) if rows else None

    def reserved_dests(self) -> set[str]:
        """Destinations claimed by scans not yet finished (so two never pick one name)."""
        rows = self._rows(
            "SELECT finals FROM scans WHERE finals IS NOT NULL AND state IN ('moving', 'staged')"
        )
        return {f for r in rows for f in json.loads(r["finals"])}

    def recent(self, states: tuple[str, ...], limit: int = 50) -> list[ScanRecord]:
        marks = ",".join("?" * len(states))
        rows = self._rows(
            f"SELECT * FROM scans WHERE state IN ({marks}) ORDER BY finished_at DESC, id DESC "
            "LIMIT ?",
            (*states, limit),
        )
        return [ScanRecord.from_row(r) for r in rows]

    def all(self) -> Iterator[ScanRecord]:
        for row in self._rows("SELECT * FROM scans ORDER BY id"):
            yield ScanRecord.from_row(row)

    # -- events ------------------------------------------------------------------
    def event(self, scan_id: int | None, kind: str, message: str) -> None:
        self._exec(
            "INSERT INTO events (ts, scan_id, kind, message) VALUES (?, ?, ?, ?)",
            (time.time(), scan_id, kind, message),
        )

    def published_since(self, event_id: int) -> tuple[int, list[str]]:
        """The last event id, and the library paths of the slides published by events
        after ``event_id`` (what a standby process follows)."""
        rows = self._rows(
            "SELECT e.id, s.dest FROM events e JOIN scans s ON s.id = e.scan_id "
            "WHERE e.id > ? AND e.kind = 'ingested' ORDER BY e.id", (event_id,))
        last = self._rows("SELECT COALESCE(MAX(id), 0) AS id FROM events")[0]["id"]
        return max(int(last), event_id), [r["dest"] for r in rows if r["dest"]]

    def last_event_before(self, ts: float) -> int:
        rows = self._rows("SELECT COALESCE(MAX(id), 0) AS id FROM events WHERE ts < ?", (ts,))
        return int(rows[0]["id"])

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT e.ts, e.scan_id, e.kind, e.message, s.source FROM events e "
            "LEFT JOIN scans s ON s.id = e.scan_id ORDER BY e.id DESC LIMIT ?",
            (limit,),
        )
        return [dict(r) for r in rows]
