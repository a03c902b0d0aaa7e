"""Helpers of the access-control tests: a library with collections, an access file, apps
with sign-in on (bearer JWTs from the ``jwks_server`` fixture, session cookies made through
the real store) and the principals the tests act as.

Library layout (names are file names, which is how the slide list names slides)::

    lib/birmingham/a.svs   (with label and macro)
    lib/solihull/b.tiff
    lib/leeds/c.svs        (with label and macro)
    lib/top.tiff           (at the top of the root: no collection, admins only)
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from tests.plugins.jwks_server import AUDIENCE, JwksServer
from wsi_server.app import create_app
from wsi_server.auth.service import SESSION_COOKIE, SHARE_COOKIE
from wsi_server.settings import Settings
from wsi_server.store._time import utcnow

ORIGIN = "http://testserver"  # what TestClient sends requests to
CLIENT_ID = "wsi-test"

BHAM = "bham-histopathology"
LEEDS = "leeds-histopathology"
ADMINS = "pathology-admins"

ACCESS_TOML = f"""
[[grant]]
group = "{BHAM}"
collections = ["birmingham", "solihull"]

[[grant]]
group = "{LEEDS}"
collections = ["leeds"]

[[grant]]
group = "{ADMINS}"
role = "admin"
"""

LAYOUT = {
    "a.svs": ("birmingham", "aperio-rgb"),
    "b.tiff": ("solihull", "generic"),
    "c.svs": ("leeds", "aperio-ycbcr"),
    "top.tiff": (None, "odd"),
}


def make_library(root: Path, synthetic_slides: Mapping[str, Path]) -> Path:
    for name, (collection, source) in LAYOUT.items():
        folder = root / collection if collection else root
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(synthetic_slides[source], folder / name)
    return root


def write_access(path: Path, text: str = ACCESS_TOML) -> Path:
    path.write_text(text)
    return path


def oidc_settings(tmp_path: Path, lib: Path, jwks: JwksServer | None, **kw: Any) -> Settings:
    """Settings of an app with sign-in on, trusting ``jwks`` for bearer tokens (or the
    ``oidc_issuer`` given)."""
    values: dict[str, Any] = {
        "paths": (lib,),
        "rescan_seconds": 0,
        "state_dir": tmp_path / "state",
        "auth": "oidc",
        "oidc_issuer": jwks.issuer if jwks else None,
        "oidc_client_id": CLIENT_ID,
        "oidc_audience": AUDIENCE,
        "access_config": write_access(tmp_path / "access.toml"),
    }
    values.update(kw)
    return Settings(**values)


@dataclass
class Who:
    """Credentials to send with a request: headers (bearer) and/or cookies."""

    label: str
    headers: dict[str, str] = field(default_factory=dict)
    cookies: dict[str, str] = field(default_factory=dict)

    def request_headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        out = dict(self.headers)
        if self.cookies:
            out["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        out.update(extra or {})
        return out


ANONYMOUS = Who("anonymous")


class Kit:
    """One app, one entered TestClient, and ways to act as different principals. The
    client's cookie jar is kept empty: every request names its own credentials."""

    def __init__(self, client: TestClient, jwks: JwksServer | None) -> None:
        self.client = client
        self.jwks = jwks
        self.app: Any = client.app
        self.ctx = self.app.state.ctx
        self.auth = self.ctx.auth

    # -- principals ------------------------------------------------------------------
    def bearer(self, sub: str, groups: list[str], **claims: Any) -> Who:
        assert self.jwks is not None
        claims.setdefault("jti", uuid.uuid4().hex)  # a new token each time, as from a provider
        token = self.jwks.sign(self.jwks.claims(sub=sub, groups=groups, **claims))
        return Who(f"bearer {sub}", headers={"Authorization": f"Bearer {token}"})

    def session(self, sub: str, groups: list[str], name: str | None = None,
                roles: tuple[str, ...] = ()) -> Who:
        """A signed-in browser: a session stored as /auth/callback stores it."""
        token = self.auth.sessions.create(
            sub, name or sub.title(), groups, roles, utcnow() + timedelta(hours=1), "pytest"
        )
        return Who(f"session {sub}", cookies={SESSION_COOKIE: self.auth.session_cookie(token)})

    def open_share(self, url: str, who: Who = ANONYMOUS) -> tuple[Any, Who]:
        """Open a share link as ``who``; the response and ``who`` holding its cookie."""
        path = url.split("://", 1)[-1]
        path = path[path.index("/"):]
        r = self.request("GET", path, who)
        cookie = r.cookies.get(SHARE_COOKIE)
        cookies = dict(who.cookies)
        if cookie:
            cookies[SHARE_COOKIE] = cookie
        return r, Who(f"{who.label} + share", headers=dict(who.headers), cookies=cookies)

    # -- requests --------------------------------------------------------------------
    def request(self, method: str, url: str, who: Who = ANONYMOUS, *,
                headers: Mapping[str, str] | None = None, **kw: Any) -> Any:
        extra = dict(headers or {})
        if method not in ("GET", "HEAD") and who.cookies:
            extra.setdefault("Origin", ORIGIN)
        kw.setdefault("follow_redirects", False)
        try:
            return self.client.request(method, url, headers=who.request_headers(extra), **kw)
        finally:
            self.client.cookies.clear()

    def get(self, url: str, who: Who = ANONYMOUS, **kw: Any) -> Any:
        return self.request("GET", url, who, **kw)

    def post(self, url: str, who: Who = ANONYMOUS, **kw: Any) -> Any:
        return self.request("POST", url, who, **kw)

    def delete(self, url: str, who: Who = ANONYMOUS, **kw: Any) -> Any:
        return self.request("DELETE", url, who, **kw)

    def ids(self, who: Who) -> dict[str, str]:
        """Slide name -> id of the slides ``who`` is listed."""
        r = self.get("/api/slides", who)
        assert r.status_code == 200, r.text
        return {s["name"]: s["id"] for s in r.json()["slides"]}

    def share(self, slide_id: str, who: Who, **body: Any) -> dict[str, Any]:
        r = self.post(f"/api/slides/{slide_id}/shares", who, json=body)
        assert r.status_code == 201, r.text
        out: dict[str, Any] = r.json()
        return out


@contextmanager
def running(settings: Settings, jwks: JwksServer | None = None) -> Iterator[Kit]:
    with TestClient(create_app(settings)) as client:
        yield Kit(client, jwks)
