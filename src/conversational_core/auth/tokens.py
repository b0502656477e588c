"""JWT verification with PyJWT: an explicit algorithm allow-list, one key per algorithm family.

- HS256 is verified with `JWT_SECRET` only; RS256/ES256 only with `JWT_PUBLIC_KEY` or a key from
  `JWT_JWKS_URL`. The algorithm named in the token header picks the key family, and the token is
  then decoded with that single algorithm, so `alg: none` and algorithm confusion (an RS256 public
  key used as an HMAC secret) are rejected.
- The JWKS document is fetched with an async HTTP client (never blocking the event loop), in
  at most 5 s and 1 MiB, and cached; an unknown `kid` triggers at most one refetch per 30 s. A
  known key past the cache's time is used while the document is fetched again beside the
  request (a slow identity provider holds no request).
- Verified tokens are cached (bounded LRU) until they expire: a client sends the same token on
  every request and HMAC/RSA verification is the largest fixed cost of a request. `exp` and `nbf`
  are re-checked against the clock on every use. A token verified with a JWKS key is verified
  again once the document is due to be fetched anew (JWT_JWKS_CACHE_SECONDS), and after: a key
  the identity provider withdrew stops opening tokens once the new document is in.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import orjson
from jwt import PyJWK, PyJWKSet
from loguru import logger

from conversational_core.errors import Unauthorized
from conversational_core.settings import Settings

_ASYMMETRIC = {"RS256", "ES256"}
_JWKS_MIN_REFRESH_SECONDS = 30.0
_JWKS_FETCH_SECONDS = 5.0  # a fetch in all (the client's timeout is per read)
_JWKS_MAX_BYTES = 1024 * 1024  # a JWKS document of hundreds of keys is tens of kB


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    roles: frozenset[str]
    exp: float
    nbf: float | None
    # The JWKS document its key came from (its generation), -1 for the other keys: a token is
    # verified again once the document is fetched anew (or is due to be).
    jwks_generation: int = -1


class JwksCache:
    """Signing keys from a JWKS URL, fetched asynchronously and kept for `ttl` seconds."""

    def __init__(self, url: str, ttl: float, client: httpx.AsyncClient) -> None:
        self._url = url
        self._ttl = ttl
        self._client = client
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at = -math.inf  # the last fetch that succeeded (monotonic)
        self._tried_at = -math.inf  # the last fetch begun, whatever came of it
        self._lock = asyncio.Lock()
        self._refreshing: asyncio.Future[None] | None = None  # (a reference: kept alive)
        self.generation = 0  # documents fetched so far

    def fresh(self) -> bool:
        """Fetched within the cache's time, or tried within the last 30 s (a failed fetch:
        the keys held are used meanwhile, and not fetched again on every request)."""
        now = time.monotonic()
        return (
            now - self._fetched_at < self._ttl or now - self._tried_at < _JWKS_MIN_REFRESH_SECONDS
        )

    async def key(self, kid: str | None) -> PyJWK:
        now = time.monotonic()
        found = self._lookup(kid)
        if found is not None:
            if not self.fresh() and (self._refreshing is None or self._refreshing.done()):
                self._refreshing = asyncio.ensure_future(self._refresh_once(now))
            return found
        if now - self._tried_at < _JWKS_MIN_REFRESH_SECONDS:
            # At most one fetch per 30 s for kids it does not know, whether the last one
            # succeeded or not (tokens with made-up kids must not make it fetch each time).
            raise Unauthorized("Unknown signing key.")
        await self._refresh_once(now)
        found = self._lookup(kid)
        if found is None:
            raise Unauthorized("Unknown signing key.")
        return found

    async def _refresh_once(self, asked_at: float) -> None:
        async with self._lock:
            if self._tried_at <= asked_at:  # nobody fetched while we waited
                await self._refresh()

    def _lookup(self, kid: str | None) -> PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        self._tried_at = time.monotonic()
        try:
            async with asyncio.timeout(_JWKS_FETCH_SECONDS):
                body = await self._fetch()
            jwks = PyJWKSet.from_dict(orjson.loads(body))
        except (httpx.HTTPError, ValueError, jwt.PyJWTError, TimeoutError) as exc:
            # Keep serving the keys we had; the next fetch after the minimum delay (`fresh`).
            logger.warning("JWKS fetch failed: {}", type(exc).__name__)
            return
        self._keys = {k.key_id or str(i): k for i, k in enumerate(jwks.keys)}
        self._fetched_at = time.monotonic()
        self.generation += 1

    async def _fetch(self) -> bytes:
        """The document, read to at most _JWKS_MAX_BYTES (ValueError past it)."""
        async with self._client.stream("GET", self._url) as response:
            response.raise_for_status()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > _JWKS_MAX_BYTES:
                    raise ValueError("JWKS document too large")
            return bytes(body)


class TokenVerifier:
    def __init__(
        self, settings: Settings, http: httpx.AsyncClient | None = None, cache_size: int = 10_000
    ) -> None:
        self._algorithms = set(settings.JWT_ALGORITHMS)
        self._secret = settings.jwt_secret
        self._public_key = settings.JWT_PUBLIC_KEY
        self._audience = settings.JWT_AUDIENCE
        self._issuer = settings.JWT_ISSUER
        self._leeway = settings.JWT_LEEWAY_SECONDS
        self._jwks = (
            JwksCache(
                settings.JWT_JWKS_URL,
                settings.JWT_JWKS_CACHE_SECONDS,
                http or httpx.AsyncClient(timeout=5.0),
            )
            if settings.JWT_JWKS_URL
            else None
        )
        self._owns_http = http is None
        self._http = self._jwks._client if self._jwks is not None else None
        self._cache: OrderedDict[str, Claims] = OrderedDict()
        self._cache_size = cache_size

    async def aclose(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.aclose()

    async def verify(self, token: str) -> Claims:
        now = time.time()
        claims = self._cache.get(token)
        if claims is None:
            claims = await self._decode(token)
            self._cache[token] = claims
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        jwks = self._jwks
        if (
            claims.jwks_generation >= 0
            and jwks is not None
            and (claims.jwks_generation != jwks.generation or not jwks.fresh())
        ):
            # Verified with a key of an older (or stale) document: is it still published?
            self._cache.pop(token, None)
            claims = await self._decode(token)
            self._cache[token] = claims
        if claims.exp + self._leeway < now:
            self._cache.pop(token, None)
            raise Unauthorized("The token has expired.", expired=True)
        if claims.nbf is not None and claims.nbf - self._leeway > now:
            raise Unauthorized("The token is not valid yet.")
        return claims

    async def _decode(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("Malformed token.") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise Unauthorized("Token algorithm not accepted.")
        key: Any
        if alg in _ASYMMETRIC:
            if self._jwks is not None:
                kid = header.get("kid")
                jwk = await self._jwks.key(kid if isinstance(kid, str) else None)
                if jwk.algorithm_name != alg:
                    raise Unauthorized("Token algorithm does not match its key.")
                key = jwk.key
            elif self._public_key is not None:
                key = self._public_key
            else:
                raise Unauthorized("Token algorithm not accepted.")
        else:
            key = self._secret
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self._audience is not None,
                    "verify_iss": self._issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("The token has expired.", expired=True) from None
        except jwt.PyJWTError:
            raise Unauthorized("Invalid token.") from None
        sub = payload.get("sub")
        roles = payload.get("roles", [])
        if not isinstance(sub, str) or not sub or len(sub) > 256 or not _is_text(sub):
            raise Unauthorized("Invalid token subject.")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthorized("Invalid roles claim.")
        nbf = payload.get("nbf")
        try:
            exp = float(payload["exp"])
            not_before = float(nbf) if isinstance(nbf, (int, float)) else None
        except (OverflowError, TypeError, ValueError):  # e.g. exp: 10**400 (PyJWT took it)
            raise Unauthorized("Invalid token.") from None
        if not math.isfinite(exp) or (not_before is not None and not math.isfinite(not_before)):
            raise Unauthorized("Invalid token.")
        generation = -1
        if alg in _ASYMMETRIC and self._jwks is not None:
            generation = self._jwks.generation
        return Claims(sub=sub, roles=frozenset(roles), exp=exp, nbf=not_before,
                      jwks_generation=generation)  # fmt: skip


def issue_token(
    settings: Settings, sub: str, roles: list[str] | None = None, ttl_seconds: int = 3600
) -> str:
    """A token signed with the configured HS256 key (for `run.py token` and tests)."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "nbf": now, "exp": now + ttl_seconds}
    if roles:
        payload["roles"] = roles
    if settings.JWT_AUDIENCE:
        payload["aud"] = settings.JWT_AUDIENCE
    if settings.JWT_ISSUER:
        payload["iss"] = settings.JWT_ISSUER
    return jwt.encode(payload, settings.jwt_secret, algorithm="HS256")


def _is_text(value: str) -> bool:
    """Whether `value` is text (UTF-8 encodable): JSON's escapes can make a lone surrogate
    (`\\ud800`), which names no user a store can key."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
