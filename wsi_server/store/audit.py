"""The audit log: append-only, each record committed before the call returns.

Actions are dotted names: ``auth.login``, ``auth.logout``, ``auth.failure``,
``slide.view``, ``share.create``, ``share.open``, ``share.revoke``, ``admin.*``,
``ingest.*``. Actors are a user's subject, ``share:<share id>`` or ``anonymous``.

``slide.view`` is aggregated so that a viewer fetching hundreds of tiles writes one row:
the first view of a slide by an actor in a session inserts a committed row; later views
only raise in-memory counters (``count``, ``last_time``) that :meth:`AuditLog.flush`
writes. The only updates are these counters; the only delete is :meth:`AuditLog.purge`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import bindparam, delete, select, update

from wsi_server.store._time import as_utc, iso, utcnow
from wsi_server.store.engine import Store
from wsi_server.store.tables import audit_events

t = audit_events
Outcome = Literal["success", "failure"]
VIEW = "slide.view"
_ViewKey = tuple[str, str, str]


@dataclass(frozen=True)
class AuditRecord:
    """One row of the audit log; ``count`` > 1 only for aggregated ``slide.view``."""

    id: int
    time: datetime
    last_time: datetime
    count: int
    actor: str
    actor_name: str
    action: str
    slide: str | None
    session_key: str | None
    client: str | None
    outcome: str
    detail: dict[str, Any] | None

    @classmethod
    def _from_row(cls, row: Any) -> AuditRecord:
        return cls(**{c.name: getattr(row, c.name) for c in t.c})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (times in ISO-8601 UTC); the session key is left out."""
        return {
            "id": self.id,
            "time": iso(self.time),
            "last_time": iso(self.last_time),
            "count": self.count,
            "actor": self.actor,
            "actor_name": self.actor_name,
            "action": self.action,
            "slide": self.slide,
            "outcome": self.outcome,
            "client": self.client,
            "detail": self.detail,
        }


@dataclass(eq=False)
class _View:
    """A (actor, slide, session key) seen by this process; ``ready`` is set once its row
    is committed (``row_id``) or its insert failed (``row_id`` stays None)."""

    ready: threading.Event = field(default_factory=threading.Event)
    row_id: int | None = None


@dataclass
class _Pending:
    added: int
    last_time: datetime


class AuditLog:
    """The ``audit_events`` table. Thread-safe."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime] = utcnow,
        max_views: int = 10_000,
    ) -> None:
        """``max_views``: how many (actor, slide, session) keys are remembered; a key
        forgotten and seen again starts a new row."""
        self._engine = store.engine
        self._clock = clock
        self._max_views = max_views
        self._lock = threading.Lock()
        self._views: OrderedDict[_ViewKey, _View] = OrderedDict()
        self._pending: dict[int, _Pending] = {}

    def append(
        self,
        action: str,
        actor: str,
        actor_name: str,
        slide: str | None = None,
        outcome: Outcome = "success",
        detail: Mapping[str, Any] | None = None,
        client: str | None = None,
    ) -> int:
        """Insert one record and commit it; returns its id."""
        return self._insert(action, actor, actor_name, slide, None, outcome, detail, client)

    def view(
        self,
        actor: str,
        actor_name: str,
        slide: str,
        session_key: str,
        client: str | None = None,
    ) -> None:
        """Record that ``actor`` viewed ``slide`` in session ``session_key``.

        The first call for the key inserts a committed row before returning (concurrent
        first calls wait for it); later calls add to counters that :meth:`flush` writes.
        """
        key = (actor, slide, session_key)
        while True:
            with self._lock:
                entry = self._views.get(key)
                if entry is not None:
                    self._views.move_to_end(key)
                    if entry.row_id is not None:
                        self._bump(entry.row_id)
                        return
                    owner = False
                else:
                    entry = self._views[key] = _View()
                    while len(self._views) > self._max_views:
                        self._views.popitem(last=False)
                    owner = True
            if not owner:
                # Another thread is inserting this key's row: wait until it is committed,
                # then count this view on it (or insert, if that insert failed).
                entry.ready.wait()
                continue
            try:
                row_id = self._insert(VIEW, actor, actor_name, slide, session_key, "success",
                                      None, client)
            except BaseException:
                with self._lock:
                    if self._views.get(key) is entry:
                        del self._views[key]
                entry.ready.set()
                raise
            with self._lock:
                entry.row_id = row_id
            entry.ready.set()
            return

    def count_view(self, actor: str, slide: str, session_key: str) -> bool:
        """Count a view whose row is already committed, in memory only (cheap enough for
        the event loop). False when this process has no committed row for the key: then
        call :meth:`view` (in a thread), which inserts it."""
        key = (actor, slide, session_key)
        with self._lock:
            entry = self._views.get(key)
            if entry is None or entry.row_id is None:
                return False
            self._views.move_to_end(key)
            self._bump(entry.row_id)
            return True

    def _bump(self, row_id: int) -> None:
        now = self._clock()
        pending = self._pending.get(row_id)
        if pending is None:
            self._pending[row_id] = _Pending(1, now)
        else:
            pending.added += 1
            pending.last_time = max(pending.last_time, now)

    def flush(self) -> int:
        """Write the view counters gathered since the last flush; returns how many rows
        were updated. On failure the counters are kept for the next flush."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        statement = (
            update(t)
            .where(t.c.id == bindparam("row_id"))
            .values(count=t.c.count + bindparam("added"), last_time=bindparam("seen"))
        )
        params = [
            {"row_id": row_id, "added": p.added, "seen": p.last_time}
            for row_id, p in pending.items()
        ]
        try:
            with self._engine.begin() as conn:
                conn.execute(statement, params)
        except BaseException:
            with self._lock:
                for row_id, p in pending.items():
                    newer = self._pending.get(row_id)
                    if newer is None:
                        self._pending[row_id] = p
                    else:
                        newer.added += p.added
                        newer.last_time = max(newer.last_time, p.last_time)
            raise
        return len(pending)

    def _insert(
        self,
        action: str,
        actor: str,
        actor_name: str,
        slide: str | None,
        session_key: str | None,
        outcome: str,
        detail: Mapping[str, Any] | None,
        client: str | None,
    ) -> int:
        if outcome not in ("success", "failure"):
            raise ValueError(f"outcome must be 'success' or 'failure', not {outcome!r}")
        if not action or len(action) > t.c.action.type.length:  # type: ignore[attr-defined]
            raise ValueError(f"bad audit action {action!r}")
        now = self._clock()
        with self._engine.begin() as conn:
            result = conn.execute(
                t.insert()
                .values(
                    time=now,
                    last_time=now,
                    count=1,
                    actor=actor,
                    actor_name=actor_name,
                    action=action,
                    slide=slide,
                    session_key=session_key,
                    client=client,
                    outcome=outcome,
                    detail=dict(detail) if detail is not None else None,
                )
            )
            row_id = result.inserted_primary_key[0]  # type: ignore[index]
        return int(row_id)

    def query(
        self,
        user: str | None = None,
        slide: str | None = None,
        action: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[AuditRecord]:
        """Records newest first (by first time, then id), after flushing this process's
        view counters.

        ``user`` matches the actor exactly; ``action`` is an exact name, or a prefix when
        it ends in ``.`` (``"share."``). A record matches ``since``/``until`` when it was
        active in that interval: ``last_time >= since`` and ``time < until``.
        """
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must be >= 0")
        self.flush()
        q = select(t)
        if user is not None:
            q = q.where(t.c.actor == user)
        if slide is not None:
            q = q.where(t.c.slide == slide)
        if action is not None:
            if action.endswith("."):
                q = q.where(t.c.action.startswith(action, autoescape=True))
            else:
                q = q.where(t.c.action == action)
        if since is not None:
            q = q.where(t.c.last_time >= as_utc(since))
        if until is not None:
            q = q.where(t.c.time < as_utc(until))
        q = q.order_by(t.c.time.desc(), t.c.id.desc()).limit(limit).offset(offset)
        with self._engine.connect() as conn:
            return [AuditRecord._from_row(row) for row in conn.execute(q)]

    def purge(self, older_than: datetime) -> int:
        """Delete the records whose last activity is before ``older_than`` (retention);
        returns how many."""
        self.flush()
        with self._engine.begin() as conn:
            result = conn.execute(delete(t).where(t.c.last_time < as_utc(older_than)))
        with self._lock:
            # A remembered row may be gone: later views of its key start a new one.
            self._views.clear()
        return result.rowcount
