"""OpenID Connect against a real provider (oidc-provider-mock, tests/plugins/oidc_provider.py):
discovery, bearer tokens it issues, and the sign-in of ``OidcLogin`` in a small app."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from tests.plugins.oidc_provider import (
    CLIENT_ID,
    CLIENT_SECRET,
    OidcProvider,
    sign_in_with_browser,
)
from tests.plugins.redis_server import free_port
from wsi_server.auth.oidc import (
    LOGIN_COOKIE,
    Discovery,
    DiscoveryError,
    LoginFailed,
    OidcLogin,
    discover,
    login_middleware,
)
from wsi_server.auth.tokens import BearerVerifier, TokenError


def new_subject() -> str:
    return f"user-{secrets.token_hex(4)}"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


# -- discovery --


async def test_discovery(oidc_provider: OidcProvider, http: httpx.AsyncClient) -> None:
    meta = await discover(oidc_provider.issuer, http)
    assert meta.issuer == oidc_provider.issuer
    assert meta.authorization_endpoint == oidc_provider.authorization_endpoint
    assert meta.token_endpoint == oidc_provider.token_endpoint
    assert meta.userinfo_endpoint == oidc_provider.userinfo_endpoint
    assert meta.jwks_uri == f"{oidc_provider.issuer}/jwks"
    assert meta.end_session_endpoint == f"{oidc_provider.issuer}/oauth2/end_session"
    assert meta.id_token_signing_alg_values_supported == ("RS256",)


async def test_discovery_refuses_an_issuer_mismatch(
    oidc_provider: OidcProvider, http: httpx.AsyncClient
) -> None:
    # Same server, but the configured issuer has a trailing slash the provider does not.
    with pytest.raises(DiscoveryError, match="must be identical"):
        await discover(oidc_provider.issuer + "/", http)


async def test_discovery_of_a_missing_provider(http: httpx.AsyncClient) -> None:
    with pytest.raises(DiscoveryError, match="unreachable"):
        await discover(f"http://127.0.0.1:{free_port()}", http)


# -- bearer tokens it issues --


async def test_opaque_access_token_verifies_via_userinfo(
    oidc_provider: OidcProvider, http: httpx.AsyncClient
) -> None:
    sub = new_subject()
    token = oidc_provider.access_token(
        sub, {"name": "Dr Ada", "email": f"{sub}@example.org", "groups": ["pathologists"]})
    assert token.count(".") != 2  # this provider's access tokens are opaque, not JWTs

    v = BearerVerifier(Discovery(oidc_provider.issuer, http), CLIENT_ID, http=http)
    for _ in range(5):
        result = await v.verify(token)
    assert result.kind == "opaque"
    assert result.subject == sub
    assert result.claims["groups"] == ["pathologists"]
    assert result.claims["name"] == "Dr Ada"
    assert (v.verifications, v.userinfo_requests) == (1, 1)

    with pytest.raises(TokenError, match="token rejected by the provider"):
        await v.verify("bogus-" + token)


async def test_revoked_access_token_is_refused(
    oidc_provider: OidcProvider, http: httpx.AsyncClient
) -> None:
    sub = new_subject()
    token = oidc_provider.access_token(sub)
    v = BearerVerifier(Discovery(oidc_provider.issuer, http), CLIENT_ID, http=http,
                       opaque_cache_seconds=0)
    assert (await v.verify(token)).subject == sub
    oidc_provider.revoke_tokens(sub)
    with pytest.raises(TokenError, match="token rejected by the provider"):
        await v.verify(token)


async def test_provider_signed_jwt_verifies_against_its_jwks(
    oidc_provider: OidcProvider, http: httpx.AsyncClient
) -> None:
    # The provider signs ID tokens only (RS256, no kid in the header): the JWT path checked
    # against a real provider's JWKS. Its audience is the client id.
    sub = new_subject()
    id_token = oidc_provider.tokens(sub, {"groups": ["research"]})["id_token"]
    v = BearerVerifier(Discovery(oidc_provider.issuer, http), CLIENT_ID, http=http)
    result = await v.verify(id_token)
    assert (result.kind, result.subject, result.claims["groups"]) == ("jwt", sub, ["research"])
    assert result.claims["iss"] == oidc_provider.issuer

    other = BearerVerifier(Discovery(oidc_provider.issuer, http), "wsi-api", http=http)
    with pytest.raises(TokenError, match="wrong audience"):
        await other.verify(id_token)


# -- sign-in --


def login_app(issuer: str, **kw: Any) -> Starlette:
    """Sign-in routes as the server will mount them: /auth/login and /auth/callback."""
    login = OidcLogin(issuer, CLIENT_ID, CLIENT_SECRET, **kw)

    async def start(request: Request) -> Response:
        try:
            return await login.redirect(request, str(request.url_for("callback")))
        except LoginFailed as exc:
            return JSONResponse({"reason": exc.reason}, 401)

    async def callback(request: Request) -> Response:
        try:
            claims, id_token = await login.complete_with_id_token(request)
        except LoginFailed as exc:
            return JSONResponse({"reason": exc.reason}, 401)
        return JSONResponse({"claims": claims,
                             "logout": login.logout_url("http://app.example/bye", id_token)})

    return Starlette(routes=[Mount("/auth", routes=[
        Route("/login", start), Route("/callback", callback, name="callback"),
    ], middleware=login_middleware("test-secret", https_only=False))])


@pytest.fixture
def app_client(oidc_provider: OidcProvider) -> Iterator[TestClient]:
    with TestClient(login_app(oidc_provider.issuer, extra_scopes=("groups",))) as client:
        yield client


def start_login(client: TestClient) -> str:
    """Begin a sign-in; the provider's authorization URL."""
    r = client.get("/auth/login", follow_redirects=False)
    assert r.status_code == 302, r.text
    return r.headers["location"]


def approve(auth_url: str, sub: str) -> str:
    """Approve at the provider as ``sub``; the callback URL it redirects to."""
    r = httpx.post(auth_url, data={"sub": sub}, timeout=5)
    assert r.status_code == 302, r.text
    return r.headers["location"]


def test_sign_in(
    oidc_provider: OidcProvider, app_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logged: list[str] = []  # what the app logged (not the test's own requests)

    def collect() -> None:
        logged.extend(rec.getMessage() for rec in caplog.records
                      if "http://testserver/" not in rec.getMessage())
        caplog.clear()

    sub = new_subject()
    oidc_provider.set_user(sub, {"name": "Dr Ada", "email": f"{sub}@example.org",
                                 "groups": ["pathologists", "research"]})

    caplog.clear()
    auth_url = start_login(app_client)
    collect()
    assert auth_url.startswith(oidc_provider.authorization_endpoint + "?")
    query = parse_qs(urlsplit(auth_url).query)
    assert query["client_id"] == [CLIENT_ID]
    assert query["scope"] == ["openid profile email groups"]
    assert query["code_challenge_method"] == ["S256"]
    assert len(query["code_challenge"][0]) == 43  # base64url of a SHA-256
    assert query["nonce"] and query["state"]
    cookie = app_client.cookies.get(LOGIN_COOKIE)
    assert cookie

    callback = approve(auth_url, sub)
    assert callback.startswith("http://testserver/auth/callback?")
    caplog.clear()
    r = app_client.get(callback)
    collect()
    assert r.status_code == 200, r.text
    claims = r.json()["claims"]
    assert claims["sub"] == sub
    assert claims["iss"] == oidc_provider.issuer
    assert claims["aud"] == [CLIENT_ID]
    assert claims["nonce"] == query["nonce"][0]
    assert (claims["name"], claims["email"]) == ("Dr Ada", f"{sub}@example.org")
    assert claims["groups"] == ["pathologists", "research"]
    assert app_client.cookies.get(LOGIN_COOKIE) is None  # sign-in state cleared

    logout = urlsplit(r.json()["logout"])
    assert f"{logout.scheme}://{logout.netloc}{logout.path}" == (
        f"{oidc_provider.issuer}/oauth2/end_session")
    logout_query = parse_qs(logout.query)
    assert logout_query["post_logout_redirect_uri"] == ["http://app.example/bye"]
    assert logout_query["client_id"] == [CLIENT_ID]
    assert logout_query["id_token_hint"][0].count(".") == 2

    text = "\n".join(logged)
    assert "oauth2/token" in text  # the token exchange is logged, without secrets
    code = parse_qs(urlsplit(callback).query)["code"][0]
    for secret in (cookie, code, query["state"][0], logout_query["id_token_hint"][0],
                   "Using code_verifier"):
        assert secret not in text


def test_login_cookie_attributes(app_client: TestClient) -> None:
    r = app_client.get("/auth/login", follow_redirects=False)
    set_cookie = r.headers["set-cookie"].lower()
    assert set_cookie.startswith(f"{LOGIN_COOKIE}=")
    for attribute in ("httponly", "samesite=lax", "max-age=600", "path=/"):
        assert attribute in set_cookie
    assert "secure" not in set_cookie


def test_callback_replay_is_refused(oidc_provider: OidcProvider, app_client: TestClient) -> None:
    callback = approve(start_login(app_client), new_subject())
    assert app_client.get(callback).status_code == 200
    r = app_client.get(callback)
    assert (r.status_code, r.json()["reason"]) == (
        401, "this sign-in expired or was not started here; try again")


def test_callback_with_another_state_is_refused(
    oidc_provider: OidcProvider, app_client: TestClient
) -> None:
    callback = approve(start_login(app_client), new_subject())
    forged = callback.replace("state=", "state=x", 1)
    r = app_client.get(forged)
    assert (r.status_code, r.json()["reason"]) == (
        401, "this sign-in expired or was not started here; try again")


def test_callback_in_another_browser_is_refused(
    oidc_provider: OidcProvider, app_client: TestClient
) -> None:
    # Login CSRF: a code obtained by someone else, without their login cookie.
    callback = approve(start_login(app_client), new_subject())
    with TestClient(app_client.app) as other:
        r = other.get(callback)
    assert r.status_code == 401


def test_refusal_by_the_provider(oidc_provider: OidcProvider, app_client: TestClient) -> None:
    denied = httpx.post(start_login(app_client), data={"action": "deny"}, timeout=5)
    callback = denied.headers["location"]
    assert "error=access_denied" in callback
    r = app_client.get(callback)
    assert (r.status_code, r.json()["reason"]) == (
        401, "the identity provider refused the sign-in (access_denied)")


def test_failed_token_exchange(oidc_provider: OidcProvider, app_client: TestClient) -> None:
    callback = approve(start_login(app_client), new_subject())
    code = parse_qs(urlsplit(callback).query)["code"][0]
    r = app_client.get(callback.replace(code, "not-the-code"))
    assert (r.status_code, r.json()["reason"]) == (
        401, "the identity provider did not accept the sign-in")


def test_sign_in_refused_when_the_issuer_does_not_match(oidc_provider: OidcProvider) -> None:
    with TestClient(login_app(oidc_provider.issuer + "/")) as client:
        r = client.get("/auth/login", follow_redirects=False)
    assert (r.status_code, r.json()["reason"]) == (401, "the identity provider is unavailable")


def test_sign_in_refused_when_the_provider_is_down() -> None:
    with TestClient(login_app(f"http://127.0.0.1:{free_port()}")) as client:
        r = client.get("/auth/login", follow_redirects=False)
    assert (r.status_code, r.json()["reason"]) == (401, "the identity provider is unavailable")


def test_sign_in_routes_need_the_login_middleware(oidc_provider: OidcProvider) -> None:
    login = OidcLogin(oidc_provider.issuer, CLIENT_ID, CLIENT_SECRET)

    async def start(request: Request) -> Response:
        return await login.redirect(request, "http://testserver/cb")

    app = Starlette(routes=[Route("/login", start)])
    with TestClient(app) as client, pytest.raises(RuntimeError, match="login_middleware"):
        client.get("/login")


async def test_logout_url_needs_loaded_metadata(oidc_provider: OidcProvider) -> None:
    login = OidcLogin(oidc_provider.issuer, CLIENT_ID, None)
    assert login.logout_url("http://app.example/bye") is None
    await login.provider_metadata()
    url = login.logout_url("http://app.example/bye")
    assert url is not None
    assert "id_token_hint" not in url
    assert url.startswith(f"{oidc_provider.issuer}/oauth2/end_session?")


# -- in a real browser --


class _ThreadedApp:
    def __init__(self, app: Starlette) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _ThreadedApp:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "test app did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.mark.browser
def test_sign_in_with_browser(oidc_provider: OidcProvider, page: Any) -> None:
    sub = new_subject()
    with _ThreadedApp(login_app(oidc_provider.issuer)) as app:
        page.goto(f"{app.url}/auth/login")
        sign_in_with_browser(page, oidc_provider, sub,
                             {"name": "Dr Browser", "groups": ["pathologists"]})
        assert page.url.startswith(f"{app.url}/auth/callback?")
        body = json.loads(page.locator("body").inner_text())
    assert body["claims"]["sub"] == sub
    assert body["claims"]["groups"] == ["pathologists"]
    assert body["claims"]["name"] == "Dr Browser"
