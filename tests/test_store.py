"""The state store on both engines: schema, sessions, shares, audit, FHIR export, and
durability under concurrent starts and kill -9."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import Engine, inspect, select

from wsi_server.store import (
    AuditLog,
    Shares,
    Store,
    UserSessions,
    default_database_url,
    hash_token,
)
from wsi_server.store.engine import alembic_config
from wsi_server.store.fhir import audit_bundle
from wsi_server.store.tables import audit_events, metadata, shares, user_sessions

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
TABLES = {"user_sessions", "shares", "audit_events"}


class Clock:
    """A settable clock for the store's ``clock`` parameter."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> datetime:
        self.now += timedelta(**kw)
        return self.now


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store.open(store_url)
    yield s
    s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def raw_rows(engine: Engine, table: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table))]


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# -- engine and migrations -----------------------------------------------------------


def test_migrated_schema_equals_declared_tables(store: Store) -> None:
    with store.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diffs == []
        names = set(inspect(conn).get_table_names())
        assert names >= TABLES
        context = MigrationContext.configure(conn)
        heads = ScriptDirectory.from_config(alembic_config()).get_heads()
        assert context.get_current_heads() == tuple(heads)


def test_migrations_downgrade_to_empty_and_upgrade_again(store: Store) -> None:
    with store.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    with store.engine.connect() as conn:
        assert not TABLES & set(inspect(conn).get_table_names())
    store.close()
    again = Store.open(str(store.engine.url.render_as_string(hide_password=False)))
    with again.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    again.close()


def test_default_database_url_is_a_file_in_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "not" / "yet"
    url = default_database_url(state)
    assert state.is_dir()
    with Store.open(url) as s:
        AuditLog(s).append("admin.test", "root", "Root")
    assert (state / "wsi-server.db").is_file()


def test_sqlite_connections_are_durable_and_wait_for_locks(tmp_path: Path) -> None:
    store = Store.open(default_database_url(tmp_path))
    with store.engine.connect() as conn:
        pragma = {
            name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }
    # synchronous: 2 is FULL; busy_timeout in milliseconds.
    store.close()
    assert pragma == {
        "journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 5000,
    }


OPEN_SCRIPT = """
import sys, time
from pathlib import Path
from wsi_server.store import AuditLog, Store
go = Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
store = Store.open(sys.argv[1])
print(AuditLog(store).append("admin.start", "worker", "Worker"), flush=True)
"""


def test_concurrent_open_from_several_processes(store_url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_SCRIPT, store_url, str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        )
        for _ in range(4)
    ]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        ids.append(int(out.strip()))
    assert len(set(ids)) == 4
    with Store.open(store_url) as s:
        with s.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
            assert len(MigrationContext.configure(conn).get_current_heads()) == 1
        assert sorted(r.id for r in AuditLog(s).query()) == sorted(ids)


# -- sessions ------------------------------------------------------------------------


def test_session_create_and_get(store: Store, clock: Clock) -> None:
    sessions = UserSessions(store, clock=clock)
    token = sessions.create(
        "sub-1", "Ada Lovelace", ["pathology", "research"], ["admin"],
        expires_at=T0 + timedelta(hours=8), user_agent="Firefox/133",
        claims_expires_at=T0 + timedelta(minutes=30),
    )
    record = sessions.get(token)
    assert record is not None
    assert (record.subject, record.name) == ("sub-1", "Ada Lovelace")
    assert record.groups == ("pathology", "research")
    assert record.roles == ("admin",)
    assert record.created_at == T0
    assert record.expires_at == T0 + timedelta(hours=8)
    assert record.claims_expires_at == T0 + timedelta(minutes=30)
    assert record.expires_at.tzinfo is not None
    assert record.user_agent == "Firefox/133"
    assert record.revoked_at is None
    assert sessions.get(token + "x") is None
    assert sessions.get("") is None


def test_session_token_is_stored_only_as_its_hash(store: Store) -> None:
    sessions = UserSessions(store)
    token = sessions.create("sub-1", "Ada", [], [], datetime.now(UTC) + timedelta(hours=1))
    assert len(base64.urlsafe_b64decode(token + "==")) >= 16
    [row] = raw_rows(store.engine, user_sessions)
    assert row["id"] == sha256_hex(token)
    assert token not in json.dumps(row, default=str)


def test_session_expiry_and_claims_default(store: Store, clock: Clock) -> None:
    sessions = UserSessions(store, clock=clock)
    token = sessions.create("sub-1", "Ada", [], [], T0 + timedelta(hours=1))
    record = sessions.get(token)
    assert record is not None
    assert record.claims_expires_at == T0 + timedelta(hours=1)
    clock.advance(minutes=59)
    assert sessions.get(token) is not None
    clock.advance(minutes=1)
    assert sessions.get(token) is None
    born_dead = sessions.create("sub-2", "Bob", [], [], T0)
    assert sessions.get(born_dead) is None


def test_session_revoke(store: Store) -> None:
    sessions = UserSessions(store)
    expires = datetime.now(UTC) + timedelta(hours=1)
    token = sessions.create("sub-1", "Ada", [], [], expires)
    other = sessions.create("sub-1", "Ada", [], [], expires)
    assert sessions.revoke(token) is True
    assert sessions.get(token) is None
    assert sessions.revoke(token) is False
    assert sessions.revoke("unknown") is False
    assert sessions.get(other) is not None


def test_session_purge_expired(store: Store, clock: Clock) -> None:
    sessions = UserSessions(store, clock=clock)
    short = sessions.create("a", "A", [], [], T0 + timedelta(hours=1))
    long = sessions.create("b", "B", [], [], T0 + timedelta(days=2))
    clock.advance(hours=2)
    assert sessions.purge_expired() == 1
    assert [r["id"] for r in raw_rows(store.engine, user_sessions)] == [sha256_hex(long)]
    assert sessions.get(long) is not None
    assert sessions.get(short) is None


def test_session_inputs(store: Store) -> None:
    sessions = UserSessions(store)
    with pytest.raises(ValueError):
        sessions.create("a", "A", [], [], datetime(2030, 1, 1))  # naive
    token = sessions.create("a", "A", [], [], datetime.now(UTC) + timedelta(hours=1),
                            user_agent="x" * 1000)
    record = sessions.get(token)
    assert record is not None and record.user_agent is not None
    assert 0 < len(record.user_agent) <= 255


# -- shares --------------------------------------------------------------------------


def make_share(shares_: Shares, **kw: Any) -> tuple[Any, str]:
    args: dict[str, Any] = {
        "slide_id": "slide-A", "created_by": "sub-1", "created_by_name": "Ada",
        "expires_at": T0 + timedelta(days=7), "note": None, "viewport": None,
        "allow_associated": False,
    }
    args.update(kw)
    return shares_.create(**args)


def test_share_create_and_lookup(store: Store, clock: Clock) -> None:
    s = Shares(store, clock=clock)
    viewport = {"x": 0.25, "y": 0.5, "zoom": 4.0}
    share, token = make_share(s, note="tumour margin", viewport=viewport,
                              allow_associated=True)
    assert len(base64.urlsafe_b64decode(token + "==")) >= 16
    assert share.slide_id == "slide-A"
    assert (share.created_by, share.created_by_name) == ("sub-1", "Ada")
    assert share.created_at == T0
    assert share.note == "tumour margin"
    assert share.viewport == viewport
    assert share.allow_associated is True
    assert (share.open_count, share.last_opened_at) == (0, None)
    assert s.get(share.id) == share
    assert s.by_token(token) == share
    assert s.by_token(token[:-1]) is None
    assert s.by_token(share.id) is None
    assert s.get("nope") is None


def test_share_token_is_stored_only_as_its_hash(store: Store) -> None:
    s = Shares(store)
    share, token = make_share(s)
    [row] = raw_rows(store.engine, shares)
    assert row["token_hash"] == sha256_hex(token) == hash_token(token)
    assert token not in json.dumps(row, default=str)
    exported = json.dumps(share.as_dict(T0))
    assert token not in exported and sha256_hex(token) not in exported


def test_share_ids_and_tokens_differ(store: Store) -> None:
    s = Shares(store)
    made = [make_share(s) for _ in range(20)]
    assert len({share.id for share, _ in made}) == 20
    assert len({token for _, token in made}) == 20


def test_share_list_newest_first_and_by_creator(store: Store, clock: Clock) -> None:
    s = Shares(store, clock=clock)
    first, _ = make_share(s, created_by="sub-1")
    clock.advance(minutes=1)
    second, _ = make_share(s, created_by="sub-2", created_by_name="Bob")
    clock.advance(minutes=1)
    third, _ = make_share(s, created_by="sub-1")
    assert [x.id for x in s.list()] == [third.id, second.id, first.id]
    assert [x.id for x in s.list(None)] == [third.id, second.id, first.id]
    assert [x.id for x in s.list("sub-1")] == [third.id, first.id]
    assert s.list("nobody") == []


def test_share_revoke_is_idempotent_and_keeps_the_row(store: Store, clock: Clock) -> None:
    s = Shares(store, clock=clock)
    share, token = make_share(s)
    clock.advance(hours=1)
    revoked = s.revoke(share.id, "sub-admin")
    assert revoked is not None
    assert (revoked.revoked_at, revoked.revoked_by) == (T0 + timedelta(hours=1), "sub-admin")
    clock.advance(hours=1)
    again = s.revoke(share.id, "sub-other")
    assert again == revoked
    assert s.by_token(token) == revoked
    assert len(raw_rows(store.engine, shares)) == 1
    assert s.revoke("nope", "sub-admin") is None


def test_share_states(store: Store, clock: Clock) -> None:
    s = Shares(store, clock=clock)
    share, _ = make_share(s, expires_at=T0 + timedelta(days=1))
    assert share.state(T0) == "active"
    assert share.state(T0 + timedelta(days=1) - timedelta(seconds=1)) == "active"
    assert share.state(T0 + timedelta(days=1)) == "expired"
    revoked = s.revoke(share.id, "sub-1")
    assert revoked is not None
    assert revoked.state(T0) == "revoked"
    assert revoked.state(T0 + timedelta(days=30)) == "revoked"
    assert revoked.as_dict(T0)["state"] == "revoked"
    # A share that already expired when it was created is never active.
    stale, _ = make_share(s, expires_at=T0 - timedelta(seconds=1))
    assert stale.state(T0) == "expired"


def test_share_record_open(store: Store, clock: Clock) -> None:
    s = Shares(store, clock=clock)
    share, _ = make_share(s)
    other, _ = make_share(s)
    clock.advance(minutes=5)
    assert s.record_open(share.id) is True
    clock.advance(minutes=5)
    assert s.record_open(share.id) is True
    assert s.record_open("nope") is False
    after = s.get(share.id)
    assert after is not None
    assert (after.open_count, after.last_opened_at) == (2, T0 + timedelta(minutes=10))
    untouched = s.get(other.id)
    assert untouched is not None and untouched.open_count == 0


def test_share_as_dict_is_json(store: Store, clock: Clock) -> None:
    s = Shares(store, clock=clock)
    share, _ = make_share(s, note="n", viewport={"zoom": 2})
    d = json.loads(json.dumps(share.as_dict(T0)))
    assert d["id"] == share.id
    assert d["slide_id"] == "slide-A"
    assert d["viewport"] == {"zoom": 2}
    assert d["state"] == "active"
    assert datetime.fromisoformat(d["created_at"]) == T0
    assert datetime.fromisoformat(d["expires_at"]) == T0 + timedelta(days=7)
    assert d["revoked_at"] is None
    assert not {"token", "token_hash"} & set(d)


def test_share_note_limit(store: Store) -> None:
    s = Shares(store)
    make_share(s, note="x" * 500)
    with pytest.raises(ValueError):
        make_share(s, note="x" * 501)
    assert len(raw_rows(store.engine, shares)) == 1


# -- audit ---------------------------------------------------------------------------


def test_audit_append_and_query_newest_first(store: Store, clock: Clock) -> None:
    log = AuditLog(store, clock=clock)
    a = log.append("auth.login", "sub-1", "Ada", client="10.0.0.7", detail={"method": "oidc"})
    clock.advance(seconds=1)
    b = log.append("share.create", "sub-1", "Ada", slide="slide-A", detail={"share": "s1"})
    c = log.append("auth.failure", "anonymous", "anonymous", outcome="failure")
    assert a < b < c
    records = log.query()
    # b and c share a time: the later id comes first.
    assert [r.id for r in records] == [c, b, a]
    first = records[-1]
    assert first.time == T0 and first.last_time == T0 and first.count == 1
    assert first.client == "10.0.0.7" and first.detail == {"method": "oidc"}
    assert first.outcome == "success"
    assert records[0].outcome == "failure"
    assert records[1].slide == "slide-A"


def test_audit_query_filters(store: Store, clock: Clock) -> None:
    log = AuditLog(store, clock=clock)
    ids = {}
    for action, actor, slide in [
        ("auth.login", "sub-1", None),
        ("share.create", "sub-1", "slide-A"),
        ("share.open", "share:abc", "slide-A"),
        ("shares.export", "sub-2", None),
        ("share_x.y", "sub-2", None),
        ("slide.view", "sub-2", "slide-B"),
    ]:
        ids[action] = log.append(action, actor, actor.upper(), slide=slide)
        clock.advance(minutes=1)

    def found(**kw: Any) -> set[str]:
        return {r.action for r in log.query(**kw)}

    assert found(user="sub-1") == {"auth.login", "share.create"}
    assert found(slide="slide-A") == {"share.create", "share.open"}
    assert found(action="share.") == {"share.create", "share.open"}
    assert found(action="share_") == set()  # exact, not a LIKE pattern
    assert found(action="share_x.") == {"share_x.y"}
    assert found(action="share.open") == {"share.open"}
    assert found(action="share") == set()
    assert found(user="sub-1", action="auth.") == {"auth.login"}
    assert found(since=T0 + timedelta(minutes=4)) == {"share_x.y", "slide.view"}
    assert found(until=T0 + timedelta(minutes=1)) == {"auth.login"}
    assert found(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)) == {
        "share.create", "share.open",
    }
    page = log.query(limit=2, offset=1)
    assert [r.action for r in page] == ["share_x.y", "shares.export"]
    assert log.query(limit=0) == []


def test_audit_rejects_bad_outcome(store: Store) -> None:
    log = AuditLog(store)
    with pytest.raises(ValueError):
        log.append("auth.login", "a", "A", outcome="maybe")  # type: ignore[arg-type]
    assert log.query() == []


def test_audit_as_dict(store: Store, clock: Clock) -> None:
    log = AuditLog(store, clock=clock)
    log.append("ingest.done", "system", "ingest", slide="s", detail={"files": 3},
               client="::1")
    [record] = log.query()
    d = json.loads(json.dumps(record.as_dict()))
    assert set(d) == {"id", "time", "last_time", "count", "actor", "actor_name", "action",
                      "slide", "outcome", "client", "detail"}
    assert d["time"].endswith("Z")
    assert datetime.fromisoformat(d["time"]) == T0
    assert (d["action"], d["slide"], d["client"], d["detail"]) == (
        "ingest.done", "s", "::1", {"files": 3})


def test_first_view_is_committed_at_once_and_counters_on_flush(
    store_url: str, clock: Clock
) -> None:
    with Store.open(store_url) as writer_store, Store.open(store_url) as reader_store:
        log = AuditLog(writer_store, clock=clock)
        reader = AuditLog(reader_store)
        log.view("sub-1", "Ada", "slide-A", "sess-1", client="10.1.1.1")
        [row] = reader.query(action="slide.view")
        assert (row.actor, row.slide, row.count, row.time, row.client) == (
            "sub-1", "slide-A", 1, T0, "10.1.1.1")
        for _ in range(4):
            clock.advance(seconds=10)
            log.view("sub-1", "Ada", "slide-A", "sess-1")
        [row] = reader.query(action="slide.view")
        assert row.count == 1  # not flushed yet
        assert log.flush() == 1
        [row] = reader.query(action="slide.view")
        assert (row.count, row.time, row.last_time) == (5, T0, T0 + timedelta(seconds=40))
        assert log.flush() == 0
        # Another session, slide or actor is another row.
        log.view("sub-1", "Ada", "slide-A", "sess-2")
        log.view("sub-1", "Ada", "slide-B", "sess-1")
        log.view("sub-2", "Bob", "slide-A", "sess-1")
        assert len(reader.query(action="slide.view")) == 4


def test_count_view_only_counts_known_keys(store: Store, clock: Clock) -> None:
    log = AuditLog(store, clock=clock)
    assert log.count_view("sub-1", "slide-A", "sess-1") is False
    assert log.query() == []  # counting never inserts
    log.view("sub-1", "Ada", "slide-A", "sess-1")
    clock.advance(seconds=5)
    assert log.count_view("sub-1", "slide-A", "sess-1") is True
    assert log.count_view("sub-1", "slide-A", "sess-2") is False
    log.flush()
    [row] = log.query()
    assert (row.count, row.last_time) == (2, T0 + timedelta(seconds=5))


def test_query_flushes_own_view_counters(store: Store) -> None:
    log = AuditLog(store)
    for _ in range(3):
        log.view("sub-1", "Ada", "slide-A", "sess-1")
    [row] = log.query()
    assert row.count == 3


def test_views_from_many_threads(store: Store) -> None:
    log = AuditLog(store)
    threads, per_thread = 8, 50
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def viewer() -> None:
        try:
            barrier.wait()
            for _ in range(per_thread):
                log.view("sub-1", "Ada", "slide-A", "sess-1")
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=viewer) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    log.flush()
    rows = raw_rows(store.engine, audit_events)
    assert [r["count"] for r in rows] == [threads * per_thread]


def test_forgotten_view_keys_keep_their_counts(store: Store) -> None:
    log = AuditLog(store, max_views=2)
    log.view("a", "A", "s1", "k")
    log.view("a", "A", "s1", "k")  # pending +1 on the first row
    log.view("a", "A", "s2", "k")
    log.view("a", "A", "s3", "k")  # forgets s1
    log.view("a", "A", "s1", "k")  # a new row
    log.flush()
    counts = sorted((r["slide"], r["count"]) for r in raw_rows(store.engine, audit_events))
    assert counts == [("s1", 1), ("s1", 2), ("s2", 1), ("s3", 1)]


def test_audit_purge(store: Store, clock: Clock) -> None:
    log = AuditLog(store, clock=clock)
    log.append("auth.login", "old", "Old")
    log.view("viewer", "V", "slide-A", "k")  # first view long ago ...
    clock.advance(days=100)
    log.view("viewer", "V", "slide-A", "k")  # ... last view recent (pending, not flushed)
    recent = log.append("auth.login", "new", "New")
    assert log.purge(T0 + timedelta(days=50)) == 1
    remaining = {(r.actor, r.count) for r in log.query()}
    assert remaining == {("viewer", 2), ("new", 1)}
    assert recent in {r.id for r in log.query()}
    # After a purge, views still count (on the kept row or a new one).
    log.view("viewer", "V", "slide-A", "k")
    log.flush()
    assert sum(r.count for r in log.query(action="slide.view")) == 3


# -- FHIR ----------------------------------------------------------------------------

DCM = "http://dicom.nema.org/resources/ontology/DCM"


def codes(codings: Any) -> set[tuple[str, str]]:
    return {(c.system, c.code) for c in codings or []}


def test_fhir_bundle_of_audit_events(store: Store, clock: Clock) -> None:
    log = AuditLog(store, clock=clock)
    login = log.append("auth.login", "sub-1", "Ada", client="192.0.2.4")
    clock.advance(seconds=1)
    failure = log.append("auth.failure", "anonymous", "anonymous", outcome="failure",
                         detail={"reason": "bad state"})
    clock.advance(seconds=1)
    log.view("sub-1", "Ada", "slide-A", "sess-1")
    clock.advance(seconds=30)
    log.view("sub-1", "Ada", "slide-A", "sess-1")
    clock.advance(seconds=1)
    logout = log.append("auth.logout", "sub-1", "Ada")
    share = log.append("share.create", "sub-1", "Ada", slide="slide-A",
                       detail={"share": "abc", "days": 7})
    records = log.query()
    view_id = next(r.id for r in records if r.action == "slide.view")

    data = audit_bundle(records, "wsi-test")
    bundle = Bundle.model_validate_json(json.dumps(data))
    assert bundle.type in ("collection", "searchset")
    events = {e.resource.id: e.resource for e in bundle.entry}
    assert set(events) == {str(i) for i in (login, failure, view_id, logout, share)}
    for event in events.values():
        assert event.get_resource_type() == "AuditEvent"
        assert event.source.observer.display == "wsi-test"
        requestors = [a for a in event.agent if a.requestor]
        assert len(requestors) == 1

    ev = events[str(login)]
    assert (ev.type.system, ev.type.code) == (DCM, "110114")
    assert (DCM, "110122") in codes(ev.subtype)
    assert (ev.action, ev.outcome) == ("E", "0")
    assert ev.recorded == T0
    [user] = [a for a in ev.agent if a.requestor]
    assert user.who.display == "Ada" and user.who.identifier.value == "sub-1"
    assert user.network.address == "192.0.2.4"

    ev = events[str(failure)]
    assert (ev.type.code, ev.outcome) == ("110114", "4")
    details = {d.type: d.valueString for e in ev.entity for d in e.detail}
    assert json.loads(details["reason"]) == "bad state"

    ev = events[str(logout)]
    assert (DCM, "110123") in codes(ev.subtype)

    ev = events[str(view_id)]
    assert (ev.type.system, ev.type.code) == (
        "http://terminology.hl7.org/CodeSystem/audit-event-type", "rest")
    assert ("http://hl7.org/fhir/restful-interaction", "read") in codes(ev.subtype)
    assert ev.action == "R"
    [entity] = ev.entity
    assert entity.what.identifier.value == "slide-A"
    assert entity.what.identifier.system.startswith("urn:")
    assert ev.period.start == T0 + timedelta(seconds=2)
    assert ev.period.end == T0 + timedelta(seconds=32)

    ev = events[str(share)]
    assert ev.action == "C"
    [entity] = ev.entity
    assert entity.what.identifier.value == "slide-A"
    details = {d.type: json.loads(d.valueString) for d in entity.detail}
    assert details == {"share": "abc", "days": 7}


def test_fhir_bundle_of_nothing(store: Store) -> None:
    bundle = Bundle.model_validate(audit_bundle([], "wsi-test"))
    assert not bundle.entry


# -- durability ----------------------------------------------------------------------

APPEND_SCRIPT = """
import sys
from wsi_server.store import AuditLog, Store
log = AuditLog(Store.open(sys.argv[1]))
i = 0
while True:
    print(log.append("admin.durability", "writer", "Writer", detail={"i": i}), flush=True)
    i += 1
"""


def test_every_returned_append_survives_kill_9(store_url: str) -> None:
    Store.open(store_url).close()  # migrate first: the child starts appending at once
    proc = subprocess.Popen(
        [sys.executable, "-c", APPEND_SCRIPT, store_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
    )
    assert proc.stdout is not None
    printed: list[int] = []
    deadline = time.monotonic() + 60
    try:
        while len(printed) < 200 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            printed.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate(timeout=30)
    assert len(printed) == 200, err.decode()
    # Lines the child finished printing before it died were returned too.
    printed += [int(x) for x in rest.decode().split("\n")[:-1]]
    with Store.open(store_url) as s:
        stored = {r.id for r in AuditLog(s).query(action="admin.durability", limit=100_000)}
    missing = set(printed) - stored
    assert not missing
