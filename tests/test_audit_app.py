"""The audit trail through the app, on SQLite and PostgreSQL: what is recorded (failed
authentication, one aggregated record per slide viewing session, share links, sign-out),
and ``GET /api/audit`` (admins only; filters, newest first, CSV, FHIR)."""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from tests.authkit import (
    ADMINS,
    ANONYMOUS,
    BHAM,
    LEEDS,
    Kit,
    Who,
    make_library,
    oidc_settings,
    running,
)
from tests.plugins.jwks_server import JwksServer
from tests.plugins.oidc_provider import CLIENT_ID, CLIENT_SECRET, OidcProvider
from wsi_server.auth.service import SESSION_COOKIE
from wsi_server.store._time import iso, utcnow

CSV_HEADER_FIELDS = {"time", "actor", "action", "slide", "detail"}


@pytest.fixture
def lib(tmp_path: Path, synthetic_slides: dict[str, Path]) -> Path:
    return make_library(tmp_path / "lib", synthetic_slides)


@pytest.fixture
def kit(tmp_path: Path, lib: Path, jwks_server: JwksServer, store_url: str) -> Iterator[Kit]:
    settings = oidc_settings(tmp_path, lib, jwks_server, database_url=store_url)
    with running(settings, jwks_server) as k:
        yield k


def events(kit: Kit, who: Who, query: str = "") -> list[dict[str, Any]]:
    r = kit.get("/api/audit" + query, who)
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["events"]
    return found


def test_recorded_actions(kit: Kit) -> None:
    admin = kit.bearer("root", [ADMINS])
    ids = kit.ids(admin)
    a, c = ids["a.svs"], ids["c.svs"]

    # failed authentication
    bad = Who("bad", headers={"Authorization": "Bearer " + "not-a-token-" * 3})
    assert kit.get("/api/slides", bad).status_code == 401

    # one record per user, slide and viewing session, however many tiles
    bea = kit.session("bea", [BHAM], name="Dr Bea")
    urls = [f"/api/slides/{a}", f"/slides/{a}.dzi"]
    urls += [f"/slides/{a}_files/{level}/0_0.jpeg" for level in range(13)]
    urls += [f"/slides/{a}/native_files/0/0_0.jpeg"] * 5
    for i, url in enumerate(urls):
        assert kit.get(url, bea).status_code == 200, url
        if i == 0:
            time.sleep(0.02)
    bea_again = kit.session("bea", [BHAM], name="Dr Bea")  # a second sign-in
    assert kit.get(f"/slides/{a}.dzi", bea_again).status_code == 200
    assert kit.get(f"/slides/{ids['b.tiff']}.dzi", bea).status_code == 200
    assert kit.get(f"/slides/{c}.dzi", bea).status_code == 404  # not hers: no view

    # share links: created, opened, used, revoked
    bob = kit.session("bob", [LEEDS])
    link = kit.share(c, bob, note="please look")
    r, viewer = kit.open_share(link["url"])
    assert r.status_code == 303
    for level in range(3):
        assert kit.get(f"/slides/{c}_files/{level}/0_0.jpeg", viewer).status_code == 200
    assert kit.delete(f"/api/shares/{link['id']}", bob).status_code == 200

    # sign-out
    assert kit.post("/auth/logout", bea_again).status_code == 303
    assert kit.get("/api/slides", bea_again).status_code == 401

    log = events(kit, admin, "?limit=1000")
    by_action: dict[str, list[dict[str, Any]]] = {}
    for e in log:
        by_action.setdefault(e["action"], []).append(e)
        assert set(e) >= {"time", "actor", "action", "slide", "detail"}

    failures = by_action["auth.failure"]
    assert len(failures) == 1
    assert failures[0]["actor"] == "anonymous" and failures[0]["outcome"] == "failure"
    assert "not-a-token" not in str(failures[0])

    views = by_action["slide.view"]
    bea_a = [v for v in views if v["actor"] == "bea" and v["slide"] == a]
    assert len(bea_a) == 2  # two sign-ins, two viewing sessions
    first = max(bea_a, key=lambda v: v["count"])
    assert first["count"] == len(urls)
    assert first["last_time"] > first["time"]
    assert min(v["count"] for v in bea_a) == 1
    assert [v["actor_name"] for v in bea_a] == ["Dr Bea", "Dr Bea"]
    assert {v["slide"] for v in views if v["actor"] == "bea"} == {a, ids["b.tiff"]}
    link_views = [v for v in views if v["actor"] == f"share:{link['id']}"]
    assert len(link_views) == 1 and link_views[0]["slide"] == c
    assert link_views[0]["count"] == 3

    (create,) = by_action["share.create"]
    assert (create["actor"], create["slide"]) == ("bob", c)
    assert create["detail"]["share"] == link["id"]
    (opened,) = by_action["share.open"]
    assert opened["slide"] == c and opened["detail"]["share"] == link["id"]
    assert opened["outcome"] == "success"
    (revoked,) = by_action["share.revoke"]
    assert (revoked["actor"], revoked["slide"]) == ("bob", c)
    assert revoked["detail"]["share"] == link["id"]
    (logout,) = by_action["auth.logout"]
    assert logout["actor"] == "bea"

    # opening the revoked link is a failed share.open
    r, _ = kit.open_share(link["url"])
    assert r.status_code == 410
    refused = events(kit, admin, "?action=share.open")
    assert [e["outcome"] for e in refused] == ["failure", "success"]

    # nothing holds a credential
    text = str(log)
    for credential in [*bea.cookies.values(), *viewer.cookies.values(),
                       link["url"].rsplit("/", 1)[1]]:
        assert credential not in text


def sign_in(kit: Kit, provider: OidcProvider, sub: str, next_: str) -> Any:
    """The whole browser sign-in without a browser: /auth/login, the provider's form,
    /auth/callback. The callback's response (the client keeps the session cookie)."""
    r = kit.client.get("/auth/login", params={"next": next_}, follow_redirects=False)
    assert r.status_code == 302, r.text
    assert r.headers["location"].startswith(provider.authorization_endpoint + "?")
    approved = httpx.post(r.headers["location"], data={"sub": sub}, timeout=5)
    assert approved.status_code == 302, approved.text
    callback = approved.headers["location"]
    assert callback.startswith("http://testserver/auth/callback?")
    return kit.client.get(callback, follow_redirects=False)


def test_sign_in_and_out_through_the_app(
    tmp_path: Path, lib: Path, oidc_provider: OidcProvider, store_url: str
) -> None:
    sub = f"ada-{uuid.uuid4().hex[:8]}"
    oidc_provider.set_user(sub, {"name": "Dr Ada", "email": f"{sub}@example.org",
                                 "groups": [LEEDS, "unrelated"]})
    settings = oidc_settings(tmp_path, lib, None, oidc_issuer=oidc_provider.issuer,
                             oidc_client_id=CLIENT_ID, oidc_client_secret=CLIENT_SECRET,
                             database_url=store_url)
    with running(settings) as kit:
        # an open redirect after sign-in is refused: back to the library
        r = sign_in(kit, oidc_provider, sub, "//evil.example/steal")
        assert r.status_code == 303
        assert r.headers["location"] == "/"
        set_cookie = r.headers["set-cookie"].lower()
        assert set_cookie.startswith(SESSION_COOKIE + "=")
        assert "httponly" in set_cookie and "samesite=lax" in set_cookie
        assert "secure" not in set_cookie  # plain http here; behind https it is Secure
        cookie = kit.client.cookies.get(SESSION_COOKIE)
        assert cookie
        kit.client.cookies.clear()
        ada = Who("ada", cookies={SESSION_COOKIE: cookie})
        assert set(kit.ids(ada)) == {"c.svs"}
        me = kit.get("/api/me", ada).json()
        assert (me["name"], me["subject"], me["admin"]) == ("Dr Ada", sub, False)

        # a local target survives the round trip
        r = sign_in(kit, oidc_provider, sub, "/view/abc?x=1&y=2")
        assert r.headers["location"] == "/view/abc?x=1&y=2"
        kit.client.cookies.clear()

        # a callback that was not started here fails, and is audited
        r = kit.client.get("/auth/callback?code=stolen&state=forged", follow_redirects=False)
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("text/html")

        assert kit.post("/auth/logout", ada).status_code == 303
        assert kit.get("/api/slides", ada).status_code == 401

        audit = kit.auth.audit
        logins = audit.query(action="auth.login")
        assert [(e.actor, e.actor_name) for e in logins] == [(sub, "Dr Ada")] * 2
        assert logins[-1].detail == {"groups": sorted([LEEDS, "unrelated"])}
        assert [e.actor for e in audit.query(action="auth.logout")] == [sub]
        (failure,) = audit.query(action="auth.failure")
        assert failure.detail and failure.detail["reason"].startswith("sign-in")
        assert "stolen" not in str(failure.detail) and "forged" not in str(failure.detail)
        assert cookie not in str([e.as_dict() for e in audit.query(limit=1000)])


def test_audit_api_is_for_admins_only(kit: Kit) -> None:
    admin = kit.bearer("root", [ADMINS])
    ids = kit.ids(admin)
    bea = kit.session("bea", [BHAM])
    _, viewer = kit.open_share(kit.share(ids["a.svs"], bea)["url"])
    for who in (bea, kit.bearer("bob", [LEEDS]), viewer):
        for url in ("/api/audit", "/api/audit?format=csv", "/api/audit/fhir"):
            r = kit.get(url, who)
            assert r.status_code == 403, (who.label, url)
            assert r.json()["error"] == "forbidden"
    assert kit.get("/api/audit", ANONYMOUS).status_code == 401
    assert kit.get("/api/audit", admin).status_code == 200
    admin_session = kit.session("root2", [ADMINS])
    assert kit.get("/api/audit", admin_session).status_code == 200


def test_filters_and_order(kit: Kit) -> None:
    admin = kit.bearer("root", [ADMINS])
    ids = kit.ids(admin)
    bea, bob = kit.session("bea", [BHAM]), kit.session("bob", [LEEDS])
    kit.share(ids["a.svs"], bea)
    kit.share(ids["c.svs"], bob)
    time.sleep(0.05)
    middle = utcnow()
    time.sleep(0.05)
    kit.share(ids["b.tiff"], bea)
    link = kit.share(ids["c.svs"], bob)
    kit.delete(f"/api/shares/{link['id']}", bob)

    everything = events(kit, admin)
    times = [e["time"] for e in everything]
    assert times == sorted(times, reverse=True)  # newest first
    assert [e["action"] for e in everything[:2]] == ["share.revoke", "share.create"]

    assert {e["actor"] for e in events(kit, admin, "?user=bea")} == {"bea"}
    assert len(events(kit, admin, "?user=bea&action=share.create")) == 2
    assert {e["slide"] for e in events(kit, admin, f"?slide={ids['c.svs']}")} == {ids["c.svs"]}
    assert len(events(kit, admin, f"?slide={ids['c.svs']}&action=share.create")) == 2
    assert {e["action"] for e in events(kit, admin, "?action=share.")} == {
        "share.create", "share.revoke"}
    assert events(kit, admin, "?user=nobody") == []

    stamp = iso(middle)
    assert stamp is not None
    later = events(kit, admin, f"?action=share.&since={stamp.replace('+', '%2B')}")
    earlier = events(kit, admin, f"?action=share.&until={stamp}")
    assert sorted(e["slide"] for e in later) == sorted([ids["b.tiff"], ids["c.svs"],
                                                        ids["c.svs"]])
    assert sorted(e["slide"] for e in earlier) == sorted([ids["a.svs"], ids["c.svs"]])
    assert events(kit, admin, "?since=2000-01-01&until=2000-01-02") == []
    assert len(events(kit, admin, "?limit=2")) == 2

    for bad in ("?since=yesterday", "?limit=0", "?limit=x", "?format=xml"):
        assert kit.get("/api/audit" + bad, admin).status_code == 400, bad


def test_csv_export_neutralises_formulas(kit: Kit) -> None:
    admin = kit.bearer("root", [ADMINS])
    sid = kit.ids(admin)["a.svs"]
    names = ["=HYPERLINK(\"https://evil.example\")", "+1+2", "-3", "@SUM(A1)", "Dr Plain"]
    for i, name in enumerate(names):
        kit.share(sid, kit.session(f"user{i}", [BHAM], name=name))

    r = kit.get("/api/audit?format=csv&action=share.create", admin)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(r.text)))
    header, body = rows[0], rows[1:]
    assert set(header) >= CSV_HEADER_FIELDS
    assert len(body) == len(names)
    column = header.index("actor_name")
    cells = {row[column] for row in body}
    assert "Dr Plain" in cells
    for cell in cells:
        assert cell[:1] not in ("=", "+", "-", "@")
    assert {c.lstrip("'") for c in cells} == set(names)

    # empty cells stay empty (a view has no detail): only formulas are quoted
    kit.get(f"/slides/{sid}.dzi", admin)
    views = list(csv.DictReader(io.StringIO(
        kit.get("/api/audit?format=csv&action=slide.view&user=root", admin).text)))
    assert len(views) == 1
    assert views[0]["detail"] == ""
    # a tab or carriage return before a formula does not sneak it through
    kit.share(sid, kit.session("tabby", [BHAM], name="\t=1+1"))
    tabbed = list(csv.DictReader(io.StringIO(
        kit.get("/api/audit?format=csv&user=tabby", admin).text)))
    assert tabbed[0]["actor_name"] == "'\t=1+1"

    by_accept = kit.get("/api/audit?action=share.create", admin,
                        headers={"Accept": "text/csv"})
    assert by_accept.headers["content-type"].startswith("text/csv")
    assert next(csv.reader(io.StringIO(by_accept.text))) == header


def test_fhir_export_is_a_valid_r4_bundle_of_audit_events(kit: Kit) -> None:
    admin = kit.bearer("root", [ADMINS])
    ids = kit.ids(admin)
    bea = kit.session("bea", [BHAM])
    kit.get(f"/slides/{ids['a.svs']}.dzi", bea)
    link = kit.share(ids["a.svs"], bea)
    kit.open_share(link["url"])
    kit.get("/api/slides", Who("bad", headers={"Authorization": "Bearer bogus-token-123"}))

    listed = events(kit, admin)
    r = kit.get("/api/audit/fhir", admin)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate(r.json())
    assert bundle.entry is not None
    resources = [e.resource for e in bundle.entry]
    assert all(isinstance(res, AuditEvent) for res in resources)
    assert len(resources) == len(listed)
    outcomes = {res.outcome for res in resources}  # type: ignore[union-attr]
    assert outcomes == {"0", "4"}  # successes and the failed authentication
    # the export itself is an audited admin action
    assert [e["action"] for e in events(kit, admin, "?action=admin.")] == ["admin.audit_export"]
