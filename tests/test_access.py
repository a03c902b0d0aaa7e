"""Access control through the app: who sees which slides on every slide route, sign-in
redirects, bearer tokens, security headers, caching, cross-site requests.

Principals: bearer JWTs signed by the ``jwks_server`` fixture (its discovery document is
the app's OIDC issuer) and session cookies made through the real store, as
``/auth/callback`` makes them (see tests/authkit.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from joserfc.jwk import RSAKey
from joserfc.util import json_b64encode, urlsafe_b64encode
from starlette.routing import BaseRoute, Host, Mount, Route

from tests.authkit import (
    ACCESS_TOML,
    ADMINS,
    ANONYMOUS,
    BHAM,
    LEEDS,
    ORIGIN,
    Kit,
    Who,
    make_library,
    oidc_settings,
    running,
    write_access,
)
from tests.plugins.jwks_server import JwksServer, new_key
from wsi_server import settings as settings_mod
from wsi_server.app import create_app
from wsi_server.auth.service import FAILURES_PER_MINUTE
from wsi_server.cli import build_parser
from wsi_server.settings import Settings
from wsi_server.web.auth import safe_next

NO_SUCH_ID = "AAAAAAAAAAAAAAAA"  # a well-formed id that names no slide
# Path parameters that name a slide: its id, or (DICOMweb) the UID of its study.
SLIDE_PARAMS = ("slide_id", "study")
# Values for the other path parameters of slide routes; valid for a.svs.
PARAM_VALUES = {"level": "0", "tile": "0_0.jpeg", "name": "label", "region": "full",
                "size": "64,", "rotation": "0", "quality_format": "default.jpg",
                "frames": "1"}
# Well-formed DICOM UIDs that name nothing.
NO_SUCH_UIDS = {"study": "2.25.101", "series": "2.25.102", "instance": "2.25.103"}
# Slide dimensions that must never appear in a refusal (see tests/conftest.py).
DIMENSIONS = {"a.svs": (3000, 2100), "b.tiff": (2000, 1500), "c.svs": (1333, 777),
              "top.tiff": (1001, 517)}


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory, synthetic_slides: dict[str, Path]) -> Path:
    return make_library(tmp_path_factory.mktemp("access") / "lib", synthetic_slides)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, lib: Path) -> Iterator[Kit]:
    """One app for the tests that only read or add state of their own (their own
    subjects, relative counts): building an app per test is most of their time."""
    jwks = JwksServer()
    try:
        settings = oidc_settings(tmp_path_factory.mktemp("access-app"), lib, jwks)
        with running(settings, jwks) as k:
            yield k
    finally:
        jwks.stop()


# -- no byte leaks ----------------------------------------------------------------------


# Routes with path parameters that name no slide, and mounts of whole ASGI apps; anything
# else with a parameter must be a slide route covered by the leak test below.
NOT_SLIDE_ROUTES = {"/api/shares/{share_id}", "/s/{token}", "/viewer/static/{name}",
                    "/bench/bytes/{n}", "/iiif/3/{path:path}"}
APP_MOUNTS = {"/viewer/osd"}  # OpenSeadragon's static files
DICOM_JSON = {"Accept": "application/dicom+json"}


def walk_routes(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, BaseRoute]]:
    """Every route of a router with its full path, inside mounts too; a mount of a whole
    ASGI app (no routes of its own) is itself yielded."""
    for route in routes:
        path = prefix + getattr(route, "path", "")
        if isinstance(route, Mount | Host) and route.routes:
            yield from walk_routes(list(route.routes), path)
        else:
            yield path, route


def names_a_slide(path: str) -> bool:
    return any("{" + p in path for p in SLIDE_PARAMS)


def slide_routes(app: Any) -> list[tuple[str, str, bool]]:
    """(path template, method, is a viewer page) of every route naming a slide."""
    out = []
    for path, route in walk_routes(app.routes):
        if not names_a_slide(path):
            continue
        if not isinstance(route, Route):
            pytest.fail(f"{type(route).__name__} {path}: this test does not cover its kind "
                        "of route yet; add it")
        methods = sorted((route.methods or {"GET"}) - {"HEAD"})
        if methods == ["POST"] and path.startswith("/dicomweb/studies"):
            continue  # STOW-RS stores, reveals nothing: administrators only (403 for
            # others whatever the study), see tests/test_dicomweb_stow.py
        method = "GET" if "GET" in methods else methods[0]
        page = getattr(route.endpoint, "__module__", "").startswith("wsi_server.viewer")
        out.append((path, method, page))
    return out


def concrete(template: str, values: dict[str, str]) -> str:
    """The template with the slide's own values (id, UIDs), then the common ones."""
    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        value = values.get(name, PARAM_VALUES.get(name))
        if value is None:
            pytest.fail(f"{template}: no test value for the path parameter {{{name}}}; "
                        "add one to PARAM_VALUES")
        return value

    return re.sub(r"\{([a-z_]+)(?::[a-z]+)?\}", fill, template)


def dicom_value(record: dict[str, Any], tag: str) -> str:
    return str(record[tag]["Value"][0])


def study_uids(kit: Kit, who: Who) -> set[str]:
    """The studies a DICOMweb search shows ``who``."""
    r = kit.get("/dicomweb/studies", who, headers=DICOM_JSON)
    assert r.status_code == 200, r.text
    return {dicom_value(rec, "0020000D") for rec in r.json()}


def slide_values(kit: Kit, ids: dict[str, str], dicom: bool) -> dict[str, dict[str, str]]:
    """Per slide name, the values naming it in URLs: its id and, with DICOMweb, its study,
    series and an instance, found by a DICOMweb search as a link viewer of that slide
    alone."""
    out = {name: {"slide_id": sid} for name, sid in ids.items()}
    out[NO_SUCH_ID] = {"slide_id": NO_SUCH_ID, **NO_SUCH_UIDS}
    if not dicom:
        return out
    owner = kit.bearer("root", [ADMINS])
    for name, sid in ids.items():
        _, only = kit.open_share(kit.share(sid, owner)["url"])
        (study,) = study_uids(kit, only)
        series = kit.get(f"/dicomweb/studies/{study}/series", only, headers=DICOM_JSON).json()
        series_uid = dicom_value(series[0], "0020000E")
        instances = kit.get(f"/dicomweb/studies/{study}/series/{series_uid}/instances", only,
                            headers=DICOM_JSON).json()
        out[name].update(study=study, series=series_uid,
                         instance=dicom_value(instances[0], "00080018"))
    return out


def call(kit: Kit, method: str, url: str, who: Who, **kw: Any) -> Any:
    if method == "POST":
        kw["json"] = {}
    return kit.request(method, url, who, **kw)


def assert_no_slide_data(r: Any, name: str, where: str) -> None:
    text = r.content.decode("utf-8", "replace")
    assert name not in text, where
    for dim in DIMENSIONS[name]:
        assert not re.search(rf"\b{dim}\b", text), f"{where}: dimension {dim} in the body"
    assert "etag" not in r.headers, where
    assert "x-tile-source" not in r.headers, where


def test_no_slide_route_leaks_a_slide_to_those_who_may_not_see_it(kit: Kit) -> None:
    admin = kit.bearer("root", [ADMINS])
    ids = kit.ids(admin)
    assert set(ids) == set(DIMENSIONS)
    routes = slide_routes(kit.app)
    dicom = any("{study" in t for t, _, _ in routes)
    values = slide_values(kit, ids, dicom)
    share = kit.share(ids["b.tiff"], kit.session("sue", [BHAM]))
    _, link_viewer = kit.open_share(share["url"])

    denied: list[tuple[Who, list[str]]] = [
        (kit.bearer("bob", [LEEDS]), ["a.svs", "b.tiff", "top.tiff"]),
        (kit.session("bea", [BHAM]), ["c.svs", "top.tiff"]),
        (kit.bearer("nobody", []), list(DIMENSIONS)),
        (ANONYMOUS, list(DIMENSIONS)),
        (link_viewer, ["a.svs", "c.svs", "top.tiff"]),
    ]
    visited: set[str] = set()
    for who, names in denied:
        for template, method, page in routes:
            missing = call(kit, method, concrete(template, values[NO_SUCH_ID]), who)
            for name in names:
                url = concrete(template, values[name])
                where = f"{who.label}: {method} {url} ({name})"
                r = call(kit, method, url, who)
                visited.add(template)
                # indistinguishable from a slide that does not exist
                assert (r.status_code, r.content) == (missing.status_code, missing.content), \
                    where
                assert_no_slide_data(r, name, where)
                if page and who is not ANONYMOUS:
                    continue  # the viewer's page shell: same bytes for any id (see above)
                if r.status_code in (200, 204) and r.content.strip() in (b"", b"[]"):
                    continue  # a search (QIDO) that matches nothing, as for an unknown UID
                assert r.status_code in (401, 404), where
                assert r.headers["content-type"].startswith("application/json"), where
                assert set(r.json()) == {"error", "detail"}, where

    # the test visited every slide route of the app, which has at least the issue's
    # metadata, DZI and tiles in both geometries, thumbnail, associated, warm, shares
    assert visited == {t for t, _, _ in routes}
    assert len(visited) >= 9

    # the lists show exactly what each may see
    bob, bea, nobody = (who for who, _ in denied[:3])
    assert set(kit.ids(bob)) == {"c.svs"}
    assert set(kit.ids(bea)) == {"a.svs", "b.tiff"}
    assert kit.ids(nobody) == {}
    assert kit.get("/api/slides").status_code == 401
    assert set(kit.ids(link_viewer)) == {"b.tiff"}
    if dicom:
        def studies(*names: str) -> set[str]:
            return {values[n]["study"] for n in names}

        assert study_uids(kit, bob) == studies("c.svs")
        assert study_uids(kit, bea) == studies("a.svs", "b.tiff")
        assert study_uids(kit, nobody) == set()
        assert study_uids(kit, link_viewer) == studies("b.tiff")
        assert kit.get("/dicomweb/studies", headers=DICOM_JSON).status_code == 401

    # the same URLs work for someone who may see the slide: they were right
    for template, method, _ in routes:
        url = concrete(template, values["a.svs"])
        r = call(kit, method, url, admin, follow_redirects=True)
        assert r.status_code == (201 if template.endswith("/shares") else 200), url


def test_every_route_that_could_name_a_slide_is_covered(kit: Kit) -> None:
    """A route added later that names a slide some other way (a DICOM UID, a mount of
    another app...) fails here until it is covered by the leak test or classified."""
    seen = set()
    for path, route in walk_routes(kit.app.routes):
        seen.add(path)
        if isinstance(route, Mount):
            assert path in APP_MOUNTS, f"mounted app {path}: cover it in the leak test"
        elif "{" in path and not names_a_slide(path):
            assert path in NOT_SLIDE_ROUTES, f"{path}: cover it in the leak test"
    assert "/s/{token}" in seen and "/api/slides/{slide_id}" in seen


def test_viewer_page_of_a_forbidden_slide_is_404(kit: Kit) -> None:
    ids = kit.ids(kit.bearer("root", [ADMINS]))
    assert kit.get(f"/view/{ids['c.svs']}", kit.bearer("bea", [BHAM])).status_code == 404


GROUP_CASES = [
    ([BHAM], {"a.svs", "b.tiff"}),
    ([LEEDS], {"c.svs"}),
    ([BHAM, LEEDS], {"a.svs", "b.tiff", "c.svs"}),
    ([ADMINS], {"a.svs", "b.tiff", "c.svs", "top.tiff"}),
    ([LEEDS, ADMINS], {"a.svs", "b.tiff", "c.svs", "top.tiff"}),
    (["unknown-group"], set()),
    ([], set()),
]


def test_users_see_exactly_the_collections_of_their_groups(kit: Kit) -> None:
    all_ids = kit.ids(kit.bearer("root", [ADMINS]))
    for i, (groups, expected) in enumerate(GROUP_CASES):
        for who in (kit.bearer(f"u{i}", groups), kit.session(f"s{i}", groups)):
            assert set(kit.ids(who)) == expected, (who.label, groups)
            for name, sid in all_ids.items():
                r = kit.get(f"/slides/{sid}.dzi", who)
                assert r.status_code == (200 if name in expected else 404), (who.label, name)


def test_forbidden_is_byte_identical_to_nonexistent(kit: Kit) -> None:
    ids = kit.ids(kit.bearer("root", [ADMINS]))
    bob = kit.bearer("bob", [LEEDS])
    for template in ("/api/slides/{}", "/slides/{}_files/0/0_0.jpeg", "/slides/{}.dzi",
                     "/api/slides/{}/associated/label"):
        forbidden = kit.get(template.format(ids["a.svs"]), bob)
        missing = kit.get(template.format(NO_SUCH_ID), bob)
        assert forbidden.status_code == missing.status_code == 404
        assert forbidden.content == missing.content
        assert forbidden.headers["content-type"] == missing.headers["content-type"]
        assert forbidden.headers["content-length"] == missing.headers["content-length"]


def test_a_slide_of_an_own_collection_is_fully_served(kit: Kit) -> None:
    bea = kit.session("bea", [BHAM])
    sid = kit.ids(bea)["a.svs"]
    detail = kit.get(f"/api/slides/{sid}", bea).json()
    assert (detail["width"], detail["height"]) == DIMENSIONS["a.svs"]
    assert {"label", "macro"} <= set(detail["associated"])
    r = kit.get(f"/api/slides/{sid}/associated/label", bea)
    assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"


def test_the_ingest_report_is_for_admins(kit: Kit) -> None:
    # scan file names often carry patient identifiers, of every collection
    for who in (kit.bearer("bea", [BHAM]), kit.session("bob", [LEEDS])):
        assert kit.get("/api/ingest", who).status_code == 403
    assert kit.get("/api/ingest").status_code == 401
    assert kit.get("/api/ingest", kit.bearer("root", [ADMINS])).status_code == 200


# -- anonymous clients with sign-in on ------------------------------------------------------


def test_anonymous_api_clients_get_401_json(kit: Kit) -> None:
    sid = kit.ids(kit.bearer("root", [ADMINS]))["a.svs"]
    for url in ("/api/slides", f"/api/slides/{sid}", f"/slides/{sid}_files/0/0_0.jpeg",
                "/api/shares", "/api/audit", "/", f"/view/{sid}"):
        r = kit.get(url, headers={"Accept": "application/json"})
        assert r.status_code == 401, url
        assert r.json()["error"] == "unauthenticated"
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = kit.post(f"/api/slides/{sid}/warm", headers={"Accept": "text/html"})
    assert r.status_code == 401  # a form post is not redirected


def test_anonymous_browsers_are_sent_to_sign_in(kit: Kit) -> None:
    sid = kit.ids(kit.bearer("root", [ADMINS]))["a.svs"]
    for target in ("/", f"/view/{sid}?x=10&y=20&z=2"):
        r = kit.get(target, headers={"Accept": "text/html,application/xhtml+xml"})
        assert r.status_code in (302, 303)
        location = urlsplit(r.headers["location"])
        assert location.path == "/auth/login" and not location.netloc
        assert parse_qs(location.query)["next"] == [target]
    # the sign-in itself starts at the provider
    r = kit.get("/auth/login?next=/", headers={"Accept": "text/html"})
    assert r.status_code in (302, 303)
    assert r.headers["location"].startswith(kit.jwks.issuer + "/authorize?")  # type: ignore[union-attr]


def test_probes_stay_public(kit: Kit) -> None:
    assert kit.get("/healthz").status_code == 200
    assert kit.get("/readyz").status_code == 200
    me = kit.get("/api/me")
    assert me.status_code == 200
    assert me.json()["authenticated"] is False


def test_a_revoked_session_is_anonymous(kit: Kit) -> None:
    bea = kit.session("bea", [BHAM])
    assert kit.get("/api/slides", bea).status_code == 200
    forged = Who("forged", cookies={"wsi_session": bea.cookies["wsi_session"] + "x"})
    assert kit.get("/api/slides", forged).status_code == 401


def test_access_file_changes_apply_to_live_sessions(
    tmp_path: Path, lib: Path, jwks_server: JwksServer
) -> None:
    settings = oidc_settings(tmp_path, lib, jwks_server)
    with running(settings, jwks_server) as kit:
        # what /auth/callback stores for a member of the admins' and Leeds' groups
        signed_in = kit.auth.principal_from_claims(
            {"sub": "ada", "groups": [ADMINS, LEEDS]}, via="session", session_key="")
        ada = kit.session("ada", sorted(signed_in.groups), roles=tuple(sorted(signed_in.roles)))
        assert kit.get("/api/audit", ada).status_code == 200
        assert len(kit.ids(ada)) == 4
    # the admin grant is withdrawn from the access file, and the server restarted
    assert settings.access_config is not None
    write_access(settings.access_config, ACCESS_TOML.split("[[grant]]\ngroup = \"" + ADMINS)[0])
    with running(settings, jwks_server) as kit:
        assert kit.get("/api/audit", ada).status_code == 403
        assert set(kit.ids(ada)) == {"c.svs"}
        assert kit.get("/api/me", ada).json()["admin"] is False


# -- --auth none -------------------------------------------------------------------------


def test_auth_none_refuses_a_public_address_unless_allowed(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", str(tmp_path), "--host", "0.0.0.0"])
    with pytest.raises(ValueError) as info:
        settings_mod.from_sources(args, environ={})
    assert "--allow-anonymous" in str(info.value) and "0.0.0.0" in str(info.value)
    with pytest.raises(ValueError, match="--allow-anonymous"):
        settings_mod.from_sources(None, environ={"WSI_HOST": "10.1.2.3"})
    allowed = settings_mod.from_sources(
        build_parser().parse_args(["serve", str(tmp_path), "--host", "0.0.0.0",
                                   "--allow-anonymous"]), environ={})
    assert allowed.allow_anonymous and allowed.host == "0.0.0.0"
    for host in ("127.0.0.1", "localhost", "::1"):
        assert settings_mod.from_sources(None, environ={"WSI_HOST": host}).auth == "none"
    # sign-in on: any address
    oidc = settings_mod.from_sources(None, environ={
        "WSI_HOST": "0.0.0.0", "WSI_AUTH": "oidc", "WSI_OIDC_ISSUER": "https://idp.example",
        "WSI_OIDC_CLIENT_ID": "x"})
    assert oidc.auth == "oidc"


def test_allow_anonymous_warns_at_start(
    tmp_path: Path, lib: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from starlette.testclient import TestClient

    caplog.set_level(logging.WARNING)
    settings = Settings(paths=(lib,), rescan_seconds=0, state_dir=tmp_path / "state",
                        host="0.0.0.0", allow_anonymous=True)
    with TestClient(create_app(settings)) as client:
        assert len(client.get("/api/slides").json()["slides"]) == 4
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING
                and "0.0.0.0" in r.getMessage()]
    assert len(warnings) == 1
    assert "without sign-in" in warnings[0].getMessage().lower()

    caplog.clear()
    loopback = Settings(paths=(lib,), rescan_seconds=0, state_dir=tmp_path / "state")
    with TestClient(create_app(loopback)):
        pass
    assert not [r for r in caplog.records if "sign-in" in r.getMessage().lower()]


# -- bearer tokens -------------------------------------------------------------------------


def test_a_valid_bearer_token_is_verified_once(kit: Kit) -> None:
    before = kit.auth.bearer.verifications
    bea = kit.bearer("bea", [BHAM])
    sid = kit.ids(bea)["a.svs"]
    for i in range(40):
        r = kit.get(f"/slides/{sid}_files/{8 + i % 4}/0_0.jpeg", bea)
        assert r.status_code == 200
    assert kit.auth.bearer.verifications == before + 1
    other = kit.bearer("bob", [LEEDS])
    assert set(kit.ids(other)) == {"c.svs"}
    assert kit.auth.bearer.verifications == before + 2


def _hs256_with_public_key(s: JwksServer) -> str:
    rsa = s.keys[0]
    assert isinstance(rsa, RSAKey)
    signing_input = (json_b64encode({"alg": "HS256", "typ": "JWT", "kid": rsa.kid}) + b"."
                     + json_b64encode(s.claims(groups=[ADMINS])))
    import hashlib
    import hmac

    mac = hmac.new(rsa.as_pem(private=False), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + urlsafe_b64encode(mac)).decode()


def _alg_none(s: JwksServer) -> str:
    return (json_b64encode({"alg": "none", "typ": "JWT"}) + b"."
            + json_b64encode(s.claims(groups=[ADMINS])) + b".").decode()


def _tampered(s: JwksServer) -> str:
    header, _, signature = s.sign(s.claims(groups=[BHAM])).split(".")
    return f"{header}.{json_b64encode(s.claims(groups=[ADMINS])).decode()}.{signature}"


BAD_TOKENS = {
    "expired": lambda s: s.sign(s.claims(exp=int(time.time()) - 3600)),
    "not yet valid": lambda s: s.sign(s.claims(nbf=int(time.time()) + 3600)),
    "wrong issuer": lambda s: s.sign(s.claims(iss="https://evil.example")),
    "wrong audience": lambda s: s.sign(s.claims(aud="another-api")),
    "alg none": _alg_none,
    "HS256 with the public key": _hs256_with_public_key,
    "unknown kid": lambda s: s.sign(key=new_key("RSA", kid="not-served")),
    "tampered payload": _tampered,
    "garbage": lambda s: "garbage-" + "x7" * 20,
    "garbage JWT shape": lambda s: "eyJhbGciOi.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
}


def test_bad_bearer_tokens_get_401_json_and_are_never_logged(
    kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert kit.jwks is not None
    sid = kit.ids(kit.bearer("root", [ADMINS]))["a.svs"]
    tokens = {case: make(kit.jwks) for case, make in BAD_TOKENS.items()}
    for case, token in tokens.items():
        who = Who(case, headers={"Authorization": f"Bearer {token}"})
        for url in ("/api/slides", f"/slides/{sid}_files/0/0_0.jpeg", f"/api/slides/{sid}"):
            r = kit.get(url, who)
            assert r.status_code == 401, (case, url, r.text)
            assert r.headers["content-type"].startswith("application/json"), case
            assert r.json()["error"] == "unauthenticated", case
            assert "www-authenticate" in r.headers, case
            assert token not in r.text, case
            assert all(token not in v for v in r.headers.values()), case
    # audited, but a flood from one address costs at most a few records a minute
    failures = kit.auth.audit.query(action="auth.failure")
    assert len(tokens) * 3 > FAILURES_PER_MINUTE
    assert len(failures) == FAILURES_PER_MINUTE
    assert all(f.outcome == "failure" and f.actor == "anonymous" for f in failures)
    assert all(str((f.detail or {}).get("reason", "")).startswith("bearer token: ")
               for f in failures)
    for token in tokens.values():
        assert token not in json.dumps([f.as_dict() for f in failures])
    metrics = kit.get("/metrics").text
    for case, token in tokens.items():
        for part in [token, *token.split(".")]:
            if len(part) >= 12:
                assert part not in caplog.text, case
                assert part not in metrics, case


# -- headers ------------------------------------------------------------------------------


def csp(r: Any) -> dict[str, str]:
    out = {}
    for directive in r.headers["content-security-policy"].split(";"):
        name, _, value = directive.strip().partition(" ")
        out[name] = value
    return out


def test_security_headers_on_every_kind_of_response(
    tmp_path: Path, lib: Path, jwks_server: JwksServer
) -> None:
    ancestors = "'self' https://pacs.example.org"
    settings = oidc_settings(tmp_path, lib, jwks_server, frame_ancestors=ancestors)
    with running(settings, jwks_server) as kit:
        bea = kit.bearer("bea", [BHAM])
        sid = kit.ids(bea)["a.svs"]
        responses = [
            kit.get("/healthz"), kit.get("/api/slides"), kit.get("/api/slides", bea),
            kit.get(f"/slides/{sid}_files/0/0_0.jpeg", bea), kit.get(f"/view/{sid}", bea),
            kit.get(f"/api/slides/{NO_SUCH_ID}", bea),
            kit.get("/api/slides", Who("bad", headers={"Authorization": "Bearer nope-nope"})),
            kit.get("/s/" + "x" * 43),
        ]
        for r in responses:
            policy = csp(r)
            assert "'unsafe-inline'" not in policy["script-src"]
            assert "'unsafe-eval'" not in policy["script-src"]
            assert policy["frame-ancestors"] == ancestors
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"


def test_tiles_of_signed_in_users_are_private(kit: Kit) -> None:
    admin = kit.bearer("root", [ADMINS])
    ids = kit.ids(admin)
    detail = kit.get(f"/api/slides/{ids['a.svs']}", admin).json()
    share = kit.share(ids["a.svs"], admin)
    _, link_viewer = kit.open_share(share["url"])
    for who in (admin, kit.session("bea", [BHAM]), link_viewer):
        for url in (f"/slides/{ids['a.svs']}_files/0/0_0.jpeg",
                    f"/slides/{ids['a.svs']}_files/0/0_0.jpeg?v={detail['version']}",
                    f"/slides/{ids['a.svs']}/native_files/0/0_0.jpeg",
                    f"/slides/{ids['a.svs']}.dzi",
                    f"/api/slides/{ids['a.svs']}/thumbnail"):
            r = kit.get(url, who)
            assert r.status_code == 200, (who.label, url)
            directives = {d.strip() for d in r.headers["cache-control"].split(",")}
            assert "private" in directives and "public" not in directives, (who.label, url)


def test_tiles_without_sign_in_are_public(
    make_client: Any, tmp_path: Path, lib: Path
) -> None:
    client = make_client(paths=(lib,), state_dir=tmp_path / "state")
    slide = next(s for s in client.get("/api/slides").json()["slides"] if s["name"] == "a.svs")
    for url in (f"/slides/{slide['id']}_files/0/0_0.jpeg",
                f"/slides/{slide['id']}_files/0/0_0.jpeg?v={slide['version']}"):
        r = client.get(url)
        assert r.status_code == 200
        assert r.headers["cache-control"].startswith("public")
    r = client.get(f"/slides/{slide['id']}_files/0/0_0.jpeg?v={slide['version']}")
    assert "immutable" in r.headers["cache-control"]


# -- cross-site requests ---------------------------------------------------------------------


def test_cookie_authenticated_writes_must_come_from_this_site(kit: Kit) -> None:
    admin = kit.bearer("root", [ADMINS])
    sid = kit.ids(admin)["a.svs"]
    bea = kit.session("bea", [BHAM])
    own = kit.share(sid, bea)["id"]

    def writes() -> list[tuple[str, str, dict[str, Any]]]:
        return [
            ("POST", f"/api/slides/{sid}/warm?levels=1", {}),
            ("POST", f"/api/slides/{sid}/shares", {"json": {}}),
            ("DELETE", f"/api/shares/{own}", {}),
        ]

    before = len(kit.auth.shares.list("bea"))
    for origin in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                   {"Origin": "http://testserver.evil.example"},
                   {"Referer": "https://evil.example/page"}):
        for method, url, kw in writes():
            r = kit.client.request(method, url, headers={**bea.request_headers(), **origin},
                                   **kw)
            assert r.status_code == 403, (origin, method, url)
            assert r.json()["error"] == "forbidden"
    for method, url, kw in writes():  # no Origin, no Referer
        r = kit.client.request(method, url, headers=bea.request_headers(), **kw)
        assert r.status_code == 403, (method, url)
    assert len(kit.auth.shares.list("bea")) == before
    assert kit.auth.shares.get(own).revoked_at is None

    # from this site: accepted (by Origin, or by Referer when a browser sends no Origin)
    expected = {"warm": 200, "shares": 201, own: 200}
    for method, url, kw in writes():
        headers = {**bea.request_headers(), "Origin": ORIGIN}
        r = kit.client.request(method, url, headers=headers, **kw)
        assert r.status_code == expected[url.split("?")[0].rsplit("/", 1)[1]], (method, url)
    r = kit.client.post(f"/api/slides/{sid}/warm?levels=1",
                        headers={**bea.request_headers(), "Referer": ORIGIN + "/view/x"})
    assert r.status_code == 200

    # a bearer token is not sent by browsers on their own: no Origin needed
    assert kit.client.post(f"/api/slides/{sid}/warm?levels=1",
                           headers=admin.request_headers()).status_code == 200


@pytest.mark.parametrize(
    "target",
    ["//evil.example/x", "/\\evil.example", "/\\/evil.example", "https://evil.example/",
     "http:/evil.example", "javascript:alert(1)", "JavaScript:alert(1)", "evil.example",
     "/view/x\r\nSet-Cookie: a=b", "/view/\x00x", "/view/x\ty", "\\\\evil.example", "",
     None, "///evil.example", "/%0d%0aLocation:%20https://evil.example"],
)
def test_safe_next_never_leaves_the_site(target: str | None) -> None:
    result = safe_next(target)
    assert result.startswith("/")
    assert not result.startswith(("//", "/\\"))
    assert not any(ord(c) < 32 for c in result)
    parts = urlsplit(result)
    assert not parts.scheme and not parts.netloc


@pytest.mark.parametrize("target", ["/", "/view/abc?x=1&y=2&z=3", "/api/slides",
                                    "/view/a-b_c", "/?q=liver%20biopsy"])
def test_safe_next_keeps_local_paths(target: str) -> None:
    assert safe_next(target) == target
