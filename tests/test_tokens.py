"""Bearer token verification against a scriptable provider (tests/plugins/jwks_server.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from joserfc.util import json_b64encode, urlsafe_b64encode

from tests.plugins.jwks_server import AUDIENCE, JwksServer, new_key
from wsi_server.auth.oidc import Discovery, DiscoveryError, discover
from wsi_server.auth.tokens import (
    BearerVerifier,
    ProviderUnavailable,
    TokenError,
    VerifiedToken,
    fingerprint,
)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


@pytest.fixture
def verifier(jwks_server: JwksServer, http: httpx.AsyncClient) -> Callable[..., BearerVerifier]:
    def make(**kw: object) -> BearerVerifier:
        kw.setdefault("audience", AUDIENCE)
        return BearerVerifier(Discovery(jwks_server.issuer, http), http=http, **kw)  # type: ignore[arg-type]

    return make


# -- accepted --


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
@pytest.mark.parametrize(("kind", "alg"), [("RSA", "RS256"), ("RSA", "PS256"), ("EC", "ES256"),
                                           ("OKP", "EdDSA"), ("OKP", "Ed25519")])
async def test_valid_tokens_verify(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier], kind: str, alg: str
) -> None:
    key = new_key(kind)  # type: ignore[arg-type]
    jwks_server.keys.append(key)
    claims = jwks_server.claims(sub="dr-who", groups=["pathologists", "research"])
    token = jwks_server.sign(claims, key=key, alg=alg)

    result = await verifier().verify(token)

    assert result == VerifiedToken(subject="dr-who", claims=claims,
                                   expires_at=float(claims["exp"]), kind="jwt")


async def test_audience_list_on_either_side(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    token = jwks_server.sign(jwks_server.claims(aud=["other-api", "second-api"]))
    assert (await verifier(audience=["wsi-api", "second-api"]).verify(token)).subject == "user-1"
    with pytest.raises(TokenError, match="wrong audience"):
        await verifier(audience="wsi-api").verify(token)


async def test_token_without_kid_uses_the_key_that_fits(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    # The served set holds an RSA and an EC key; the ES256 token names neither.
    token = jwks_server.sign(key=jwks_server.keys[1], kid=False)
    assert (await verifier().verify(token)).kind == "jwt"


async def test_verified_once_for_many_requests(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    v = verifier()
    token = jwks_server.sign()
    results = [await v.verify(token) for _ in range(200)]
    assert {r.subject for r in results} == {"user-1"}
    assert (v.verifications, v.cache_hits) == (1, 199)
    assert jwks_server.hits["/jwks"] == 1
    assert jwks_server.hits["/.well-known/openid-configuration"] == 1


async def test_concurrent_first_requests_share_one_verification(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    v = verifier()
    token = jwks_server.sign()
    results = await asyncio.gather(*(v.verify(token) for _ in range(50)))
    assert len({id(r) for r in results}) == 1
    assert v.verifications == 1

    others = [jwks_server.sign(jwks_server.claims(sub=f"u{i}")) for i in range(20)]
    subjects = [r.subject for r in await asyncio.gather(*(v.verify(t) for t in others))]
    assert subjects == [f"u{i}" for i in range(20)]
    assert jwks_server.hits["/jwks"] == 1  # one fetch served every first request


async def test_cached_token_is_refused_once_expired(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    now = [time.time()]
    v = verifier(clock=lambda: now[0], leeway=5)
    token = jwks_server.sign(jwks_server.claims(exp=int(now[0]) + 60))
    await v.verify(token)
    now[0] += 30
    await v.verify(token)
    assert (v.verifications, v.cache_hits) == (1, 1)
    now[0] += 60
    with pytest.raises(TokenError, match="token expired"):
        await v.verify(token)
    assert v.verifications == 2


async def test_cache_is_bounded(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    v = verifier(cache_size=3)
    tokens = [jwks_server.sign(jwks_server.claims(sub=f"u{i}")) for i in range(4)]
    for t in tokens:
        await v.verify(t)
    await v.verify(tokens[3])
    assert v.cache_hits == 1
    await v.verify(tokens[0])  # evicted as the least recently used
    assert v.verifications == 5


# -- key rotation --


async def test_rotated_key_is_fetched_and_unknown_kids_are_rate_limited(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    v = verifier(jwks_refresh_min_seconds=0.5)
    await v.verify(jwks_server.sign())
    assert jwks_server.hits["/jwks"] == 1

    await asyncio.sleep(0.6)
    (new,) = jwks_server.rotate("RSA")
    rotated = await v.verify(jwks_server.sign(jwks_server.claims(sub="after"), key=new))
    assert rotated.subject == "after"
    assert jwks_server.hits["/jwks"] == 2

    # Tokens naming keys the provider does not serve: no refetch within the interval.
    for i in range(5):
        ghost = new_key("RSA", kid=f"ghost-{i}")
        with pytest.raises(TokenError, match="unknown signing key"):
            await v.verify(jwks_server.sign(jwks_server.claims(sub=f"g{i}"), key=ghost))
    assert jwks_server.hits["/jwks"] == 2

    # A key published meanwhile is picked up once the interval has passed, even by a
    # token refused before: its refusal was cached only until the next refetch.
    late = new_key("EC", kid="late")
    late_token = jwks_server.sign(key=late)
    with pytest.raises(TokenError, match="unknown signing key"):
        await v.verify(late_token)
    jwks_server.keys.append(late)
    await asyncio.sleep(0.6)
    assert (await v.verify(late_token)).kind == "jwt"
    assert jwks_server.hits["/jwks"] == 3


async def test_keys_removed_from_the_jwks_stop_verifying_after_a_refetch(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    old = jwks_server.keys[0]
    v = verifier(jwks_refresh_min_seconds=0.2, jwks_max_age_seconds=0.2)
    await v.verify(jwks_server.sign(key=old))
    jwks_server.rotate("EC")
    await asyncio.sleep(0.3)
    with pytest.raises(TokenError, match="unknown signing key"):
        await v.verify(jwks_server.sign(jwks_server.claims(sub="late"), key=old))


# -- refused --


def _hs256_with_public_key(server: JwksServer) -> str:
    # The classic key-confusion forgery: HMAC keyed with the RSA public key's PEM.
    # joserfc refuses to build such a key, so the forgery is made by hand here.
    rsa = server.keys[0]
    assert isinstance(rsa, RSAKey)
    public_pem = rsa.as_pem(private=False)
    signing_input = (json_b64encode({"alg": "HS256", "typ": "JWT", "kid": rsa.kid})
                     + b"." + json_b64encode(server.claims(sub="admin")))
    signature = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + urlsafe_b64encode(signature)).decode()


def _tampered(server: JwksServer) -> str:
    header, _, signature = server.sign().split(".")
    payload = json_b64encode(server.claims(sub="admin", groups=["admins"])).decode()
    return f"{header}.{payload}.{signature}"


def _alg_none(server: JwksServer) -> str:
    with pytest.warns(UserWarning):  # joserfc warns that "none" is deprecated
        return jwt.encode({"alg": "none"}, server.claims(), None,  # type: ignore[arg-type]
                          algorithms=["none"])


REFUSED: dict[str, tuple[Callable[[JwksServer], str], str]] = {
    "expired": (lambda s: s.sign(s.claims(exp=int(time.time()) - 3600)), "token expired"),
    "not yet valid": (lambda s: s.sign(s.claims(nbf=int(time.time()) + 3600)),
                      "token not yet valid"),
    "issued in the future": (lambda s: s.sign(s.claims(iat=int(time.time()) + 3600)),
                             "token issued in the future"),
    "wrong issuer": (lambda s: s.sign(s.claims(iss="https://evil.example")), "wrong issuer"),
    "wrong audience": (lambda s: s.sign(s.claims(aud="other-api")), "wrong audience"),
    "missing exp": (lambda s: s.sign(s.claims(exp=None)), "missing claim: exp"),
    "missing aud": (lambda s: s.sign(s.claims(aud=None)), "missing claim: aud"),
    "alg none": (_alg_none, "algorithm not allowed"),
    "HS256 with the public key": (_hs256_with_public_key, "algorithm not allowed"),
    "unknown kid": (lambda s: s.sign(key=new_key("RSA", kid="nobody")), "unknown signing key"),
    "unserved key without kid": (lambda s: s.sign(key=new_key("RSA"), kid=False),
                                 "invalid signature"),
    "tampered payload": (_tampered, "invalid signature"),
    "RS256 header on an EC key's kid": (
        lambda s: _relabel(s.sign(key=s.keys[1]), alg="RS256"), "unknown signing key"),
    "not base64 JSON": (lambda s: "eyJhbGciOi.eyJzdWIiOiJ4In0.c2ln", "malformed token"),
    "spaces": (lambda s: "not a token at all", "malformed token"),
    "control character": (lambda s: "abc\x00def", "malformed token"),
    "empty": (lambda s: "", "malformed token"),
    "overlong opaque": (lambda s: "x" * 5000, "malformed token"),
    "overlong JWT": (lambda s: "a" * 9000 + "." + "b" * 9000 + ".c", "malformed token"),
    "garbage opaque": (lambda s: "Zm9vYmFyYmF6cXV4", "token rejected by the provider"),
}


def _relabel(token: str, **header: object) -> str:
    h, payload, signature = token.split(".")
    original = json.loads(base64.urlsafe_b64decode(h + "=" * (-len(h) % 4)))
    return f"{json_b64encode({**original, **header}).decode()}.{payload}.{signature}"


@pytest.mark.parametrize("case", list(REFUSED))
async def test_refused_tokens(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier],
    caplog: pytest.LogCaptureFixture, case: str,
) -> None:
    make, reason = REFUSED[case]
    token = make(jwks_server)
    caplog.set_level(logging.DEBUG)

    with pytest.raises(TokenError) as info:
        await verifier().verify(token)

    assert info.value.reason == reason
    assert not isinstance(info.value, ProviderUnavailable)
    if token:
        assert token not in info.value.reason
        assert token not in caplog.text
        assert token not in str(info.value)
        for part in token.split("."):  # not even the signature or payload alone
            assert len(part) < 8 or part not in caplog.text


async def test_rejection_is_logged_by_fingerprint(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier],
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = jwks_server.sign(jwks_server.claims(aud="other-api"))
    caplog.set_level(logging.INFO, logger="wsi_server.auth.tokens")
    with pytest.raises(TokenError):
        await verifier().verify(token)
    assert f"bearer token {fingerprint(token)} rejected: wrong audience" in caplog.text


async def test_failures_are_cached_briefly(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    now = [time.time()]
    v = verifier(clock=lambda: now[0], failure_cache_seconds=30)
    for _ in range(20):
        with pytest.raises(TokenError, match="token rejected by the provider"):
            await v.verify("unknown-opaque-token")
        with pytest.raises(TokenError, match="wrong audience"):
            await v.verify(jwks_server.sign(jwks_server.claims(aud="x")))
    assert jwks_server.hits["/userinfo"] == 1
    now[0] += 31
    with pytest.raises(TokenError):
        await v.verify("unknown-opaque-token")
    assert jwks_server.hits["/userinfo"] == 2


def test_unsafe_algorithms_cannot_be_configured(http: httpx.AsyncClient) -> None:
    async def meta() -> None:
        raise AssertionError

    for algs in (["RS256", "HS256"], ["none"], []):
        with pytest.raises(ValueError, match="asymmetric"):
            BearerVerifier(meta, "wsi-api", algorithms=algs, http=http)  # type: ignore[arg-type]


async def test_algorithms_outside_the_configured_set_are_refused(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    token = jwks_server.sign(key=jwks_server.keys[1])  # ES256
    with pytest.raises(TokenError, match="algorithm not allowed"):
        await verifier(algorithms=["RS256"]).verify(token)


# -- opaque tokens --


async def test_opaque_token_checked_once_via_userinfo(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    jwks_server.opaque_tokens["opaque-abc123"] = {"sub": "u7", "groups": ["residents"]}
    v = verifier(opaque_cache_seconds=300)
    before = time.time()
    results = [await v.verify("opaque-abc123") for _ in range(10)]
    assert results[0].kind == "opaque"
    assert results[0].subject == "u7"
    assert results[0].claims["groups"] == ["residents"]
    assert before + 299 < results[0].expires_at < time.time() + 301
    assert jwks_server.hits["/userinfo"] == 1
    assert (v.verifications, v.cache_hits) == (1, 9)


async def test_opaque_cache_is_capped_by_a_known_lifetime(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    exp = int(time.time()) + 20
    jwks_server.opaque_tokens["short-lived"] = {"sub": "u8", "exp": exp}
    assert (await verifier(opaque_cache_seconds=300).verify("short-lived")).expires_at == exp


async def test_revoked_opaque_token_refused_after_the_cache_period(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    now = [time.time()]
    jwks_server.opaque_tokens["revocable"] = {"sub": "u9"}
    v = verifier(clock=lambda: now[0], opaque_cache_seconds=60)
    await v.verify("revocable")
    del jwks_server.opaque_tokens["revocable"]
    await v.verify("revocable")  # still trusted from the cache
    now[0] += 61
    with pytest.raises(TokenError, match="token rejected by the provider"):
        await v.verify("revocable")


async def test_provider_outage_is_not_the_tokens_fault_and_not_cached(
    jwks_server: JwksServer, verifier: Callable[..., BearerVerifier]
) -> None:
    jwks_server.opaque_tokens["good-token"] = {"sub": "u1"}
    jwks_server.userinfo_status = 503
    v = verifier()
    with pytest.raises(ProviderUnavailable, match="identity provider unavailable"):
        await v.verify("good-token")
    jwks_server.userinfo_status = None
    assert (await v.verify("good-token")).subject == "u1"


async def test_unreachable_provider_is_unavailable(http: httpx.AsyncClient) -> None:
    server = JwksServer()
    issuer = server.issuer
    server.stop()
    v = BearerVerifier(Discovery(issuer, http), "wsi-api", http=http)
    for token in ("opaque-token", "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"):
        with pytest.raises(ProviderUnavailable):
            await v.verify(token)


# -- discovery --


async def test_discovery(jwks_server: JwksServer, http: httpx.AsyncClient) -> None:
    meta = await discover(jwks_server.issuer, http)
    assert meta.issuer == jwks_server.issuer
    assert meta.jwks_uri == f"{jwks_server.issuer}/jwks"
    assert meta.userinfo_endpoint == f"{jwks_server.issuer}/userinfo"
    assert meta.end_session_endpoint is None
    assert meta.id_token_signing_alg_values_supported == ("RS256", "ES256")


async def test_discovery_refuses_another_issuer(
    jwks_server: JwksServer, http: httpx.AsyncClient, verifier: Callable[..., BearerVerifier]
) -> None:
    jwks_server.reported_issuer = "https://idp.example"
    with pytest.raises(DiscoveryError, match=r"reports issuer 'https://idp\.example'"):
        await discover(jwks_server.issuer, http)
    with pytest.raises(ProviderUnavailable):
        await verifier().verify(jwks_server.sign())


async def test_discovery_is_cached(jwks_server: JwksServer, http: httpx.AsyncClient) -> None:
    d = Discovery(jwks_server.issuer, http)
    first, second = await asyncio.gather(d(), d())
    assert first is second
    assert await d() is first
    assert jwks_server.hits["/.well-known/openid-configuration"] == 1


async def test_discovery_keeps_the_last_metadata_during_an_outage(
    jwks_server: JwksServer, http: httpx.AsyncClient
) -> None:
    d = Discovery(jwks_server.issuer, http, ttl=0.0, retry_after=60.0)
    first = await d()
    jwks_server.reported_issuer = "https://broken.example"
    assert await d() is first  # refetch failed: last good metadata kept
    assert jwks_server.hits["/.well-known/openid-configuration"] == 2
    assert await d() is first  # and no new attempt before retry_after
    assert jwks_server.hits["/.well-known/openid-configuration"] == 2
