"""Bearer access tokens issued by the OpenID provider, verified once and then cached.

- A JWT is verified locally with joserfc against the provider's JWKS: the key is chosen by
  ``kid`` (an unknown ``kid`` refetches the JWKS, at most once per
  ``jwks_refresh_min_seconds``), only the configured asymmetric algorithms are accepted
  (never ``none`` nor HS*), and ``iss``, ``aud``, ``exp`` (required), ``nbf`` and ``iat`` are
  checked with a small leeway.
- Any other plausible token is opaque: the provider's userinfo endpoint is asked once. That
  proves the token is live but not whom it was issued for: opaque tokens carry no audience.

Outcomes are cached by the token's SHA-256 (successes until they expire, failures briefly),
so a request with a known token costs a dictionary lookup. Tokens are never logged; log
lines name a token by ``fingerprint(token)``. Use a verifier from one event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from joserfc import jws, jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import Key, import_key
from joserfc.jws import JWSRegistry

from .oidc import ProviderMetadata

log = logging.getLogger(__name__)

DEFAULT_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA", "Ed25519",
)
# The only algorithms a verifier may be configured with: asymmetric signatures.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
     "EdDSA", "Ed25519", "Ed448"}
)
MAX_JWT_LENGTH = 16384
MAX_OPAQUE_LENGTH = 4096
_PRINTABLE = re.compile(r"[!-~]+")  # visible ASCII, no spaces
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_JWKS_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class VerifiedToken:
    """A bearer token that verified. For an opaque token ``expires_at`` is when the
    verification stops being trusted (the token's own lifetime is unknown)."""

    subject: str
    claims: dict[str, Any]
    expires_at: float
    kind: Literal["jwt", "opaque"]


class TokenError(Exception):
    """A bearer token that does not verify. ``reason`` is short, safe to show to clients
    and never contains the token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProviderUnavailable(TokenError):
    """The token could not be checked because the provider (discovery, JWKS or userinfo)
    did not answer usefully; not the token's fault (a 503 rather than a 401)."""

    def __init__(self, reason: str = "identity provider unavailable") -> None:
        super().__init__(reason)


class _Rejected(TokenError):
    """A rejection whose cached copy must not outlive ``cache_for`` seconds."""

    def __init__(self, reason: str, cache_for: float) -> None:
        super().__init__(reason)
        self.cache_for = cache_for


@dataclass(frozen=True)
class _Failure:
    reason: str
    unavailable: bool


_Outcome = VerifiedToken | _Failure


def fingerprint(token: str) -> str:
    """A short SHA-256 prefix naming a token in logs without revealing it."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:12]


class BearerVerifier:
    """Verifies bearer access tokens of one provider for ``audience`` (one value or any of
    several). Counters: ``verifications`` (full checks), ``cache_hits``, ``jwks_fetches``,
    ``userinfo_requests``."""

    def __init__(
        self,
        metadata: Callable[[], Awaitable[ProviderMetadata]],
        audience: str | Sequence[str],
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        leeway: int = 60,
        jwks_refresh_min_seconds: float = 60.0,
        opaque_cache_seconds: float = 300.0,
        *,
        http: httpx.AsyncClient,
        failure_cache_seconds: float = 30.0,
        jwks_max_age_seconds: float = 3600.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        unsafe = set(algorithms) - ASYMMETRIC_ALGORITHMS
        if unsafe or not algorithms:
            raise ValueError(f"only asymmetric JWS algorithms may be allowed, not {unsafe}")
        self.audiences = [audience] if isinstance(audience, str) else list(audience)
        if not self.audiences:
            raise ValueError("at least one audience is required")
        self.algorithms = tuple(algorithms)
        self.leeway = leeway
        self.jwks_refresh_min_seconds = jwks_refresh_min_seconds
        self.jwks_max_age_seconds = jwks_max_age_seconds
        self.opaque_cache_seconds = opaque_cache_seconds
        self.failure_cache_seconds = failure_cache_seconds
        self.cache_size = cache_size
        self.verifications = 0
        self.cache_hits = 0
        self.jwks_fetches = 0
        self.userinfo_requests = 0
        self._metadata = metadata
        self._http = http
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[float, _Outcome]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[_Outcome]] = {}
        self._jwks_lock = asyncio.Lock()
        self._keys: list[Key] | None = None
        self._keys_uri: str | None = None
        self._keys_at = 0.0
        self._jwks_failed_at: float | None = None

    async def verify(self, token: str) -> VerifiedToken:
        """The verified token, or ``TokenError`` (``ProviderUnavailable`` when the provider
        could not be asked)."""
        if not _plausible(token):
            log.info("bearer token rejected: malformed token")
            raise TokenError("malformed token")
        key = hashlib.sha256(token.encode("ascii")).digest()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > self._clock():
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return _unwrap(cached[1])
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._verify_and_cache(token, key))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return _unwrap(await asyncio.shield(task))

    async def _verify_and_cache(self, token: str, key: bytes) -> _Outcome:
        self.verifications += 1
        fp = fingerprint(token)
        try:
            if _JWT_SHAPE.fullmatch(token):
                verified = await self._verify_jwt(token)
            else:
                verified = await self._verify_opaque(token)
        except ProviderUnavailable as exc:
            log.warning("bearer token %s not checked: %s", fp, exc.reason)
            return _Failure(exc.reason, unavailable=True)
        except TokenError as exc:
            cache_for = self.failure_cache_seconds
            if isinstance(exc, _Rejected):
                cache_for = min(cache_for, exc.cache_for)
            log.info("bearer token %s rejected: %s", fp, exc.reason)
            failure = _Failure(exc.reason, unavailable=False)
            self._store(key, self._clock() + cache_for, failure)
            return failure
        except Exception:
            log.exception("bearer token %s: verification failed unexpectedly", fp)
            return _Failure("token could not be verified", unavailable=True)
        valid_until = verified.expires_at
        if verified.kind == "jwt":
            valid_until += self.leeway
        self._store(key, valid_until, verified)
        log.debug("bearer token %s verified (%s, subject %s)", fp, verified.kind,
                  verified.subject)
        return verified

    def _store(self, key: bytes, valid_until: float, outcome: _Outcome) -> None:
        if valid_until <= self._clock():
            return
        self._cache[key] = (valid_until, outcome)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # -- JWT --

    async def _verify_jwt(self, token: str) -> VerifiedToken:
        if len(token) > MAX_JWT_LENGTH:
            raise TokenError("malformed token")
        registry = JWSRegistry(algorithms=self.algorithms, strict_check_header=False)
        registry.max_header_length = 4096
        try:
            header = jws.extract_compact(token.encode("ascii"), registry=registry).headers()
        except (JoseError, ValueError, TypeError) as exc:
            raise TokenError("malformed token") from exc
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenError("algorithm not allowed")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("malformed token")
        metadata = await self._provider()

        candidates = _candidates(await self._jwks(metadata, refresh=False), kid, alg)
        if not candidates:
            keys = await self._jwks(metadata, refresh=True)
            candidates = _candidates(keys, kid, alg)
            if not candidates:
                raise _Rejected("unknown signing key", self._until_jwks_refresh())

        verified: jwt.Token | None = None
        for candidate in candidates:
            try:
                verified = jwt.decode(token, candidate, registry=registry)
                break
            except BadSignatureError:
                continue
            except (JoseError, ValueError, TypeError) as exc:
                raise TokenError("malformed token") from exc
        if verified is None:
            raise TokenError("invalid signature")
        return self._check_claims(verified.claims, metadata.issuer)

    def _check_claims(self, claims: dict[str, Any], issuer: str) -> VerifiedToken:
        now = self._clock()
        checks = jwt.JWTClaimsRegistry(
            now=int(now), leeway=self.leeway,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "values": self.audiences},
            exp={"essential": True},
            sub={"essential": True},
        )
        try:
            checks.validate(claims)
        except ExpiredTokenError as exc:
            raise TokenError("token expired") from exc
        except MissingClaimError as exc:
            raise TokenError(f"missing claim: {exc.claim}") from exc
        except InvalidClaimError as exc:
            if exc.claim == "nbf" and _is_number(claims.get("nbf")):
                wait = float(claims["nbf"]) - self.leeway - now
                raise _Rejected("token not yet valid", wait) from exc
            reasons = {"iss": "wrong issuer", "aud": "wrong audience",
                       "iat": "token issued in the future"}
            raise TokenError(reasons.get(exc.claim, f"invalid claim: {exc.claim}")) from exc
        return VerifiedToken(subject=claims["sub"], claims=claims,
                             expires_at=float(claims["exp"]), kind="jwt")

    async def _jwks(self, metadata: ProviderMetadata, *, refresh: bool) -> list[Key]:
        """The provider's signing keys: cached, refetched when older than
        ``jwks_max_age_seconds``, or on ``refresh`` when the last fetch is older than
        ``jwks_refresh_min_seconds``. One fetch at a time."""
        async with self._jwks_lock:
            now = time.monotonic()
            if self._keys is not None and self._keys_uri == metadata.jwks_uri:
                age = now - self._keys_at
                limit = self.jwks_refresh_min_seconds if refresh else self.jwks_max_age_seconds
                if age < limit:
                    return self._keys
            failed_at = self._jwks_failed_at
            if failed_at is not None and now - failed_at < _JWKS_RETRY_SECONDS:
                if self._keys is not None:
                    return self._keys
                raise ProviderUnavailable()
            self.jwks_fetches += 1
            try:
                response = await self._http.get(metadata.jwks_uri,
                                                headers={"Accept": "application/json"})
                response.raise_for_status()
                keys = _import_keys(response.json())
            except (httpx.HTTPError, ValueError, TypeError) as exc:
                self._jwks_failed_at = now
                log.warning("JWKS fetch from %s failed: %s", metadata.jwks_uri,
                            type(exc).__name__)
                if self._keys is not None:
                    return self._keys
                raise ProviderUnavailable() from exc
            self._jwks_failed_at = None
            self._keys, self._keys_uri, self._keys_at = keys, metadata.jwks_uri, now
            log.info("JWKS loaded from %s: %d signing keys", metadata.jwks_uri, len(keys))
            return keys

    def _until_jwks_refresh(self) -> float:
        return max(0.0, self._keys_at + self.jwks_refresh_min_seconds - time.monotonic())

    # -- opaque --

    async def _verify_opaque(self, token: str) -> VerifiedToken:
        if len(token) > MAX_OPAQUE_LENGTH:
            raise TokenError("malformed token")
        metadata = await self._provider()
        if metadata.userinfo_endpoint is None:
            raise TokenError("opaque tokens are not accepted")
        self.userinfo_requests += 1
        try:
            response = await self._http.get(
                metadata.userinfo_endpoint,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            log.warning("userinfo request failed: %s", type(exc).__name__)
            raise ProviderUnavailable() from exc
        if response.status_code in (400, 401, 403):
            raise TokenError("token rejected by the provider")
        if response.status_code != 200:
            log.warning("userinfo answered HTTP %d", response.status_code)
            raise ProviderUnavailable()
        try:
            claims = response.json()
        except ValueError as exc:
            raise ProviderUnavailable("unsupported userinfo response") from exc
        if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
            raise ProviderUnavailable("unsupported userinfo response")
        expires_at = self._clock() + self.opaque_cache_seconds
        if _is_number(claims.get("exp")):
            expires_at = min(expires_at, float(claims["exp"]))
        return VerifiedToken(subject=claims["sub"], claims=claims, expires_at=expires_at,
                             kind="opaque")

    async def _provider(self) -> ProviderMetadata:
        try:
            return await self._metadata()
        except Exception as exc:
            log.warning("provider metadata unavailable: %s", exc)
            raise ProviderUnavailable() from exc


def _unwrap(outcome: _Outcome) -> VerifiedToken:
    if isinstance(outcome, VerifiedToken):
        return outcome
    if outcome.unavailable:
        raise ProviderUnavailable(outcome.reason)
    raise TokenError(outcome.reason)


def _plausible(token: object) -> bool:
    return (
        isinstance(token, str) and 0 < len(token) <= MAX_JWT_LENGTH
        and _PRINTABLE.fullmatch(token) is not None
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _import_keys(jwks: object) -> list[Key]:
    """The public signing keys of a JWKS document; other and unreadable keys are skipped."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: list[Key] = []
    for data in jwks["keys"]:
        if not isinstance(data, dict) or data.get("kty") == "oct":
            continue
        if data.get("use") not in (None, "sig"):
            continue
        try:
            keys.append(import_key(data))
        except (JoseError, ValueError, TypeError) as exc:
            log.info("JWKS key %r skipped: %s", data.get("kid"), exc)
    return keys


def _candidates(keys: list[Key], kid: str | None, alg: str) -> list[Key]:
    """The keys that may have signed a token with this ``kid`` (or any, without one) and
    ``alg``."""
    model = JWSRegistry.algorithms[alg]
    out = []
    for key in keys:
        if kid is not None and key.kid != kid:
            continue
        if key.get("alg") not in (None, alg):
            continue
        try:
            model.check_key(key)
        except JoseError:
            continue
        out.append(key)
    return out
