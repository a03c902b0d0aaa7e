"""A real OpenID provider for tests: the ``oidc-provider-mock`` package (see tests/test_oidc.py).

``oidc_provider`` runs ``python -m oidc_provider_mock`` (a Flask app under uvicorn) as a
child process on a free loopback port for the whole session, with ``--require-nonce``.
What that provider does, read from its source:

- Its issuer is ``http://127.0.0.1:PORT`` (it derives it from the request's host, so always
  reach it through ``.issuer``). Any client id and secret are accepted, with any
  redirect URI; PKCE parameters are accepted but not enforced.
- ID tokens are RS256 JWTs signed by a key generated at start (JWKS at ``/jwks``; the key
  has a ``kid``, the tokens' headers do not). Access tokens are opaque random strings
  checked by ``/userinfo``, which answers 400 (not 401) to an unknown token.
- Users are created by the authorization form (type a subject; a new user gets the
  claim ``email`` = subject) or set with ``PUT /users/{sub}`` (``set_user``), whose JSON
  claims replace the user's. Custom claims such as ``groups`` go into the ID token and
  userinfo whatever the scope; standard ones (``name``, ``email``...) only with their scope.
- ``POST /users/{sub}/revoke-tokens`` (``revoke_tokens``) invalidates a user's tokens.

``tokens(sub, claims)`` runs the authorization-code flow without a browser (the form post,
then the token endpoint); ``sign_in_with_browser(page, provider, sub, claims)`` fills the
authorization form in a Playwright page. Without the package the tests are skipped locally
and fail in CI (env ``CI`` set).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest

from tests.plugins.redis_server import free_port

CLIENT_ID = "wsi-test"
CLIENT_SECRET = "wsi-test-secret"
SCOPE = "openid profile email"


class OidcProvider:
    """An ``oidc-provider-mock`` child process."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.authorization_endpoint = f"{self.issuer}/oauth2/authorize"
        self.token_endpoint = f"{self.issuer}/oauth2/token"
        self.userinfo_endpoint = f"{self.issuer}/userinfo"
        self.log_path = workdir / "oidc-provider.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "NO_COLOR": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1",
                 "--port", str(self.port), "--require-nonce"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=2)
                if r.status_code == 200 and r.json().get("issuer") == self.issuer:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"oidc-provider-mock did not start on {self.port}:\n{tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def set_user(self, sub: str, claims: Mapping[str, Any]) -> None:
        """Create or replace user ``sub`` with ``claims`` (e.g. name, email, groups)."""
        r = httpx.put(f"{self.issuer}/users/{quote(sub, safe='')}", json=dict(claims),
                      timeout=5)
        r.raise_for_status()

    def revoke_tokens(self, sub: str) -> None:
        """Invalidate every access and refresh token of ``sub``."""
        r = httpx.post(f"{self.issuer}/users/{quote(sub, safe='')}/revoke-tokens", timeout=5)
        r.raise_for_status()

    def authorization_code(
        self, sub: str, *, client_id: str = CLIENT_ID, scope: str = SCOPE,
        redirect_uri: str = "http://127.0.0.1/callback", nonce: str | None = None,
    ) -> str:
        """Approve an authorization request as ``sub`` (the form post) and return the code."""
        state = secrets.token_urlsafe(8)
        params = {"response_type": "code", "client_id": client_id, "scope": scope,
                  "redirect_uri": redirect_uri, "state": state,
                  "nonce": nonce or secrets.token_urlsafe(8)}
        r = httpx.post(self.authorization_endpoint, params=params, data={"sub": sub},
                       timeout=5)
        if r.status_code != 302:
            raise RuntimeError(f"authorization failed: HTTP {r.status_code} {r.text[:200]}")
        query = parse_qs(urlsplit(r.headers["location"]).query)
        assert query["state"] == [state]
        return query["code"][0]

    def tokens(
        self, sub: str, claims: Mapping[str, Any] | None = None, *,
        client_id: str = CLIENT_ID, scope: str = SCOPE,
    ) -> dict[str, Any]:
        """The token response (access_token, id_token, refresh_token, expires_in) of a
        completed sign-in of ``sub``, whose claims are first set to ``claims`` if given."""
        if claims is not None:
            self.set_user(sub, claims)
        redirect_uri = "http://127.0.0.1/callback"
        code = self.authorization_code(sub, client_id=client_id, scope=scope,
                                       redirect_uri=redirect_uri)
        r = httpx.post(self.token_endpoint, timeout=5, data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "client_id": client_id, "client_secret": CLIENT_SECRET,
        })
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    def access_token(self, sub: str, claims: Mapping[str, Any] | None = None) -> str:
        """An access token of ``sub`` (opaque: this provider issues no JWT access tokens)."""
        token: str = self.tokens(sub, claims)["access_token"]
        return token


def sign_in_with_browser(
    page: Any, provider: OidcProvider, sub: str, claims: Mapping[str, Any] | None = None,
    *, timeout: float = 15_000,
) -> None:
    """Approve the provider's authorization form shown (or about to be shown) in the
    Playwright ``page`` as ``sub``, after setting that user's ``claims`` if given; returns
    once the browser has left the provider (redirected back to the app)."""
    if claims is not None:
        provider.set_user(sub, claims)
    page.wait_for_url(f"{provider.authorization_endpoint}**", timeout=timeout)
    page.locator("input[name=sub]").fill(sub)
    page.get_by_role("button", name="Authorize", exact=True).click()
    page.wait_for_url(lambda url: not url.startswith(provider.issuer + "/"), timeout=timeout)


def _installed() -> None:
    if importlib.util.find_spec("oidc_provider_mock") is None:
        if os.environ.get("CI"):
            pytest.fail("oidc-provider-mock is not installed (required in CI)")
        pytest.skip("oidc-provider-mock is not installed")


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    _installed()
    provider = OidcProvider(tmp_path_factory.mktemp("oidc"))
    provider.start()
    yield provider
    provider.stop()
