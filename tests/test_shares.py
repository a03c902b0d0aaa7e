"""Share links through the app: create, open, use with the share cookie alone, withheld
label and macro, list, revoke, expiry, and throttling of bad tokens."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select

from tests.authkit import (
    ADMINS,
    ANONYMOUS,
    BHAM,
    LEEDS,
    Kit,
    make_library,
    oidc_settings,
    running,
)
from tests.plugins.jwks_server import JwksServer
from wsi_server.auth import service as auth_service
from wsi_server.auth.service import SHARE_COOKIE
from wsi_server.settings import Settings
from wsi_server.store._time import utcnow
from wsi_server.store.tables import shares as shares_table

MAX_DAYS = 10


@pytest.fixture
def lib(tmp_path: Path, synthetic_slides: dict[str, Path]) -> Path:
    return make_library(tmp_path / "lib", synthetic_slides)


@pytest.fixture
def kit(tmp_path: Path, lib: Path, jwks_server: JwksServer) -> Iterator[Kit]:
    settings = oidc_settings(tmp_path, lib, jwks_server, share_max_days=MAX_DAYS)
    with running(settings, jwks_server) as k:
        yield k


@pytest.fixture
def ids(kit: Kit) -> dict[str, str]:
    return kit.ids(kit.bearer("root", [ADMINS]))


def token_of(url: str) -> str:
    path = urlsplit(url).path
    assert path.startswith("/s/")
    return path[len("/s/"):]


def when(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


# -- creating ------------------------------------------------------------------------------


def test_create_answers_201_with_an_absolute_link(kit: Kit, ids: dict[str, str]) -> None:
    bea = kit.session("bea", [BHAM])
    before = utcnow()
    r = kit.post(f"/api/slides/{ids['a.svs']}/shares", bea,
                 json={"note": "Deep margin, please", "viewport": {"x": 100, "y": 200, "z": 2}})
    assert r.status_code == 201
    body = r.json()
    assert {"id", "url", "expires_at"} <= set(body)
    url = urlsplit(body["url"])
    assert (url.scheme, url.netloc) == ("http", "testserver")
    assert url.path.startswith("/s/")
    assert body["slide_id"] == ids["a.svs"]
    assert body["note"] == "Deep margin, please"
    assert body["allow_associated"] is False
    # the default lifetime is 7 days
    expires = when(body["expires_at"])
    assert before + timedelta(days=7) <= expires <= utcnow() + timedelta(days=7)
    assert r.headers["cache-control"] == "no-store"


def test_lifetime_is_capped_by_share_max_days(kit: Kit, ids: dict[str, str]) -> None:
    bea = kit.bearer("bea", [BHAM])
    url = f"/api/slides/{ids['a.svs']}/shares"
    three = kit.post(url, bea, json={"expires_in_days": 3})
    assert three.status_code == 201
    assert abs(when(three.json()["expires_at"]) - (utcnow() + timedelta(days=3))) \
        < timedelta(minutes=1)
    assert kit.post(url, bea, json={"expires_in_days": MAX_DAYS}).status_code == 201
    for days in (MAX_DAYS + 1, 365, 0, -1, "7", True, None):
        r = kit.post(url, bea, json={"expires_in_days": days})
        assert r.status_code == 400, days
        assert r.json()["error"] == "bad_request"
    too_long = kit.post(url, bea, json={"expires_in_days": MAX_DAYS + 1})
    assert str(MAX_DAYS) in too_long.json()["detail"]
    for body in ({"expires": 3}, {"viewport": {"x": 1}}, {"note": 5},
                 {"allow_associated": "yes"}):
        assert kit.post(url, bea, json=body).status_code == 400, body
    assert kit.post(url, bea, content=b"not json").status_code == 400


def test_public_url_makes_the_link(tmp_path: Path, lib: Path, jwks_server: JwksServer) -> None:
    settings = oidc_settings(tmp_path, lib, jwks_server,
                             public_url="https://slides.example.org")
    with running(settings, jwks_server) as kit:
        admin = kit.bearer("root", [ADMINS])
        body = kit.share(kit.ids(admin)["a.svs"], admin)
        assert body["url"].startswith("https://slides.example.org/s/")
        # behind https the share cookie is Secure
        r, _ = kit.open_share(body["url"])
        assert r.status_code == 303
        assert "secure" in r.headers["set-cookie"].lower()


def test_tokens_are_long_random_and_stored_only_hashed(kit: Kit, ids: dict[str, str]) -> None:
    bea = kit.bearer("bea", [BHAM])
    links = [kit.share(ids["a.svs"], bea) for _ in range(5)]
    tokens = [token_of(link["url"]) for link in links]
    assert len(set(tokens)) == 5
    for token in tokens:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        assert len(raw) * 8 >= 128
    with kit.auth.store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(shares_table))]
    assert len(rows) == 5
    stored = repr(rows)
    for token in tokens:
        assert token not in stored
        assert hashlib.sha256(token.encode()).hexdigest() in stored  # kept as its hash
    for link in links:
        assert link["id"] not in tokens and link["id"] not in "".join(tokens)


# -- opening and using ------------------------------------------------------------------------


def test_open_redirects_to_the_viewer_and_sets_a_scoped_cookie(
    kit: Kit, ids: dict[str, str]
) -> None:
    bob = kit.session("bob", [LEEDS])
    link = kit.share(ids["c.svs"], bob, viewport={"x": 120.5, "y": 80, "z": 4, "r": 90})
    r, viewer = kit.open_share(link["url"])
    assert r.status_code == 303
    target = urlsplit(r.headers["location"])
    assert target.path == f"/view/{ids['c.svs']}" and not target.netloc
    query = {k: float(v[0]) for k, v in parse_qs(target.query).items()}
    assert query == {"x": 120.5, "y": 80, "z": 4, "r": 90}
    cookie = r.headers["set-cookie"].lower()
    assert cookie.startswith(SHARE_COOKIE + "=")
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
    token = token_of(link["url"])
    assert "secure" not in cookie  # plain http here
    # the token is not echoed in clear: not in any header, nor in the metrics
    assert all(token not in v for v in r.headers.values())
    tile = kit.get(f"/slides/{ids['c.svs']}_files/0/0_0.jpeg", viewer)
    assert all(token not in v for v in tile.headers.values())
    assert token not in kit.get("/metrics").text
    assert SHARE_COOKIE in viewer.cookies
    # without a viewport the viewer opens plainly
    plain = kit.share(ids["c.svs"], bob)
    r, _ = kit.open_share(plain["url"])
    assert r.headers["location"] == f"/view/{ids['c.svs']}"


def test_the_share_cookie_alone_opens_that_slide_only(kit: Kit, ids: dict[str, str]) -> None:
    link = kit.share(ids["c.svs"], kit.session("bob", [LEEDS]))
    _, viewer = kit.open_share(link["url"])
    assert not viewer.headers and set(viewer.cookies) == {SHARE_COOKIE}
    sid = ids["c.svs"]
    detail = kit.get(f"/api/slides/{sid}", viewer)
    assert detail.status_code == 200
    assert detail.json()["name"] == "c.svs"
    for url in (f"/slides/{sid}.dzi", f"/slides/{sid}/native.dzi",
                f"/slides/{sid}_files/0/0_0.jpeg", f"/slides/{sid}/native_files/0/0_0.jpeg",
                f"/api/slides/{sid}/thumbnail", f"/view/{sid}"):
        assert kit.get(url, viewer).status_code == 200, url
    assert set(kit.ids(viewer)) == {"c.svs"}
    for name in ("a.svs", "b.tiff", "top.tiff"):
        assert kit.get(f"/api/slides/{ids[name]}", viewer).status_code == 404
        assert kit.get(f"/slides/{ids[name]}_files/0/0_0.jpeg", viewer).status_code == 404
    me = kit.get("/api/me", viewer).json()
    assert me["kind"] == "share" and me["can_share"] is False
    assert [s["slide_id"] for s in me["shares"]] == [sid]
    assert me["shares"][0]["created_by_name"] == "Bob"
    # the audit trail is not for link viewers
    assert kit.get("/api/audit", viewer).status_code == 403


def test_label_and_macro_are_withheld_unless_allowed(kit: Kit, ids: dict[str, str]) -> None:
    bob = kit.session("bob", [LEEDS])
    sid = ids["c.svs"]
    assert {"label", "macro"} <= set(kit.get(f"/api/slides/{sid}", bob).json()["associated"])

    _, restricted = kit.open_share(kit.share(sid, bob)["url"])
    detail = kit.get(f"/api/slides/{sid}", restricted).json()
    assert not {"label", "macro"} & set(detail["associated"])
    assert not [k for k in detail["properties"] if "label" in k.lower()]
    for name in ("label", "macro"):
        r = kit.get(f"/api/slides/{sid}/associated/{name}", restricted)
        assert r.status_code == 404
        assert r.headers["content-type"].startswith("application/json")

    _, allowed = kit.open_share(kit.share(sid, bob, allow_associated=True)["url"])
    assert {"label", "macro"} <= set(kit.get(f"/api/slides/{sid}", allowed).json()["associated"])
    r = kit.get(f"/api/slides/{sid}/associated/label", allowed)
    assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"


def test_label_and_macro_are_withheld_on_the_iiif_and_dicomweb_fronts_too(
    kit: Kit, ids: dict[str, str]
) -> None:
    admin = kit.bearer("root", [ADMINS])
    sid = ids["c.svs"]
    _, restricted = kit.open_share(kit.share(sid, admin)["url"])
    _, allowed = kit.open_share(kit.share(sid, admin, allow_associated=True)["url"])
    dicom_json = {"Accept": "application/dicom+json"}
    iiif = kit.get(f"/iiif/3/{sid}/manifest.json", admin)
    dicom = kit.get("/dicomweb/instances?includefield=all", admin, headers=dicom_json)
    if iiif.status_code == 404 and dicom.status_code == 404:
        pytest.skip("neither IIIF nor DICOMweb is served")

    if iiif.status_code != 404:
        label_url = f"/api/slides/{sid}/associated/label"
        assert label_url in iiif.text
        assert label_url not in kit.get(f"/iiif/3/{sid}/manifest.json", restricted).text
        assert label_url in kit.get(f"/iiif/3/{sid}/manifest.json", allowed).text

    if dicom.status_code != 404:
        def value(rec: dict[str, Any], tag: str) -> Any:
            return rec[tag]["Value"]

        mine = [r for r in dicom.json() if value(r, "00400512") == [sid]]
        kinds = {value(r, "00080008")[2]: r for r in mine}
        assert {"LABEL", "OVERVIEW", "VOLUME"} <= set(kinds)
        study, series = value(mine[0], "0020000D")[0], value(mine[0], "0020000E")[0]
        base = f"/dicomweb/studies/{study}/series/{series}/instances"
        listed = kit.get(f"{base}?includefield=all", restricted, headers=dicom_json).json()
        assert {value(r, "00080008")[2] for r in listed} == set(kinds) - {"LABEL", "OVERVIEW"}
        for kind in ("LABEL", "OVERVIEW"):
            uid = value(kinds[kind], "00080018")[0]
            for tail in ("/metadata", "/rendered", "/frames/1"):
                assert kit.get(base + f"/{uid}{tail}", restricted).status_code == 404, tail
            assert kit.get(base + f"/{uid}/metadata", allowed,
                           headers=dicom_json).status_code == 200


def test_a_share_viewer_cannot_share(kit: Kit, ids: dict[str, str]) -> None:
    bob = kit.session("bob", [LEEDS])
    link = kit.share(ids["c.svs"], bob)
    _, viewer = kit.open_share(link["url"])
    r = kit.post(f"/api/slides/{ids['c.svs']}/shares", viewer, json={})
    assert r.status_code == 403
    assert kit.get("/api/shares", viewer).status_code == 403
    assert kit.delete(f"/api/shares/{link['id']}", viewer).status_code == 404
    assert kit.auth.shares.get(link["id"]).revoked_at is None


def test_a_user_holding_someone_elses_link_cannot_pass_it_on(
    kit: Kit, ids: dict[str, str]
) -> None:
    """A Birmingham user who opened a link to a Leeds slide sees it, but cannot make a
    link of their own to it (and so cannot open up its label and macro)."""
    link = kit.share(ids["c.svs"], kit.session("bob", [LEEDS]))
    _, carol = kit.open_share(link["url"], kit.session("carol", [BHAM]))
    assert set(kit.ids(carol)) == {"a.svs", "b.tiff", "c.svs"}
    r = kit.post(f"/api/slides/{ids['c.svs']}/shares", carol, json={"allow_associated": True})
    assert r.status_code == 403
    assert kit.auth.shares.list("carol") == []
    # her own collections she shares as before
    assert kit.post(f"/api/slides/{ids['a.svs']}/shares", carol, json={}).status_code == 201


def test_list_own_links(kit: Kit, ids: dict[str, str]) -> None:
    bea, bob = kit.session("bea", [BHAM]), kit.session("bob", [LEEDS])
    mine = {kit.share(ids["a.svs"], bea)["id"], kit.share(ids["b.tiff"], bea)["id"]}
    theirs = kit.share(ids["c.svs"], bob)["id"]
    listed = kit.get("/api/shares", bea).json()["shares"]
    assert {s["id"] for s in listed} == mine
    assert all(s["state"] == "active" for s in listed)
    assert all("token" not in str(s).lower() for s in listed)
    assert {s["id"] for s in kit.get("/api/shares", bob).json()["shares"]} == {theirs}
    # everyone's, for an admin who asks
    admin = kit.bearer("root", [ADMINS])
    assert kit.get("/api/shares", admin).json()["shares"] == []
    every = kit.get("/api/shares?all=1", admin).json()["shares"]
    assert {s["id"] for s in every} == mine | {theirs}
    # ... and only for an admin
    assert {s["id"] for s in kit.get("/api/shares?all=1", bob).json()["shares"]} == {theirs}


def test_revoke_by_creator_and_admin_only(kit: Kit, ids: dict[str, str]) -> None:
    bea, carol = kit.session("bea", [BHAM]), kit.session("carol", [BHAM])
    admin = kit.bearer("root", [ADMINS])
    first, second = kit.share(ids["a.svs"], bea)["id"], kit.share(ids["a.svs"], bea)["id"]

    other = kit.delete(f"/api/shares/{first}", carol)
    missing = kit.delete("/api/shares/nosuchshare0", carol)
    assert other.status_code == missing.status_code == 404
    assert other.content == missing.content
    assert kit.auth.shares.get(first).revoked_at is None

    r = kit.delete(f"/api/shares/{first}", bea)
    assert r.status_code == 200
    assert r.json()["state"] == "revoked" and r.json()["revoked_by"] == "bea"
    r = kit.delete(f"/api/shares/{second}", admin)
    assert r.status_code == 200
    assert r.json()["state"] == "revoked" and r.json()["revoked_by"] == "root"
    states = {s["id"]: s["state"] for s in kit.get("/api/shares", bea).json()["shares"]}
    assert states == {first: "revoked", second: "revoked"}


def test_revoked_link_is_410_and_its_cookie_stops_working(
    kit: Kit, ids: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth_service, "RECHECK_SECONDS", 0.3)
    bob = kit.session("bob", [LEEDS])
    link = kit.share(ids["c.svs"], bob)
    _, viewer = kit.open_share(link["url"])
    _, carol = kit.open_share(link["url"], kit.session("carol", [BHAM]))
    tile = f"/slides/{ids['c.svs']}_files/0/0_0.jpeg"
    assert kit.get(tile, viewer).status_code == 200
    assert kit.get(tile, carol).status_code == 200
    assert kit.delete(f"/api/shares/{link['id']}", bob).status_code == 200

    r, _ = kit.open_share(link["url"])
    assert r.status_code == 410
    assert r.json()["error"] == "share_expired"
    assert "revoked" in r.json()["detail"]
    assert SHARE_COOKIE not in r.headers.get("set-cookie", "")
    page = kit.get(urlsplit(link["url"]).path, headers={"Accept": "text/html"})
    assert page.status_code == 410
    assert page.headers["content-type"].startswith("text/html")
    assert "revoked" in page.text

    time.sleep(0.4)  # the verification cache keeps a grant at most RECHECK_SECONDS
    # the cookie names nothing live any more: the browser is anonymous again
    assert kit.get(tile, viewer).status_code == 401
    assert kit.get("/api/slides", viewer).status_code == 401
    # a signed-in user who held the link keeps their own collections only
    assert kit.get(tile, carol).status_code == 404
    assert set(kit.ids(carol)) == {"a.svs", "b.tiff"}


def test_expired_link_is_410_and_its_cookie_stops_working(
    kit: Kit, ids: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth_service, "RECHECK_SECONDS", 0.2)
    sid = ids["c.svs"]
    _, old_token = kit.auth.shares.create(sid, "bob", "Bob", utcnow() - timedelta(seconds=1))
    r = kit.get(f"/s/{old_token}")
    assert r.status_code == 410
    assert "expired" in r.json()["detail"]

    _, token = kit.auth.shares.create(sid, "bob", "Bob", utcnow() + timedelta(seconds=1.0))
    r, viewer = kit.open_share(f"/s/{token}")
    assert r.status_code == 303
    assert kit.get(f"/api/slides/{sid}", viewer).status_code == 200
    time.sleep(1.3)
    assert kit.get(f"/api/slides/{sid}", viewer).status_code == 401


def test_unknown_link_is_404(kit: Kit) -> None:
    r = kit.get("/s/" + "A" * 43)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    page = kit.get("/s/" + "A" * 43, headers={"Accept": "text/html"})
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")


def test_repeated_bad_tokens_are_slowed_down(kit: Kit, ids: dict[str, str]) -> None:
    link = kit.share(ids["a.svs"], kit.session("bea", [BHAM]))
    statuses = [kit.get(f"/s/guess{i:040d}").status_code for i in range(30)]
    assert statuses[0] == 404
    assert 429 in statuses
    first = statuses.index(429)
    assert first <= 20
    assert set(statuses[first:]) == {429}
    r = kit.get("/s/guess-after-the-limit-00000000000000000000")
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"] == "too_many_requests"
    # while throttled, even a real link waits: guessing cannot be mixed with real tries
    assert kit.get(urlsplit(link["url"]).path).status_code == 429


# -- without sign-in ----------------------------------------------------------------------


def test_with_auth_none_opening_a_link_keeps_the_local_users_access(
    tmp_path: Path, lib: Path
) -> None:
    settings = Settings(paths=(lib,), rescan_seconds=0, state_dir=tmp_path / "state")
    with running(settings) as kit:
        names = kit.ids(ANONYMOUS)
        assert set(names) == {"a.svs", "b.tiff", "c.svs", "top.tiff"}
        link = kit.share(names["a.svs"], ANONYMOUS)
        r, local = kit.open_share(link["url"])
        assert r.status_code == 303
        assert set(kit.ids(local)) == set(names)
        assert kit.post(f"/api/slides/{names['b.tiff']}/shares", local,
                        json={}).status_code == 201
        assert kit.get("/api/audit", local).status_code == 200
