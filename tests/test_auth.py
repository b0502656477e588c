"""Token verification: allow-listed algorithms, keys per family, claims, JWKS."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from conversational_core.app import create_app
from conversational_core.settings import Settings
from conversational_core.storage.base import Store
from tests.conftest import backend_for, make_settings
from tests.fixtures.app import app_client
from tests.fixtures.http_server import QuietHandler, local_http_server


def _token(key: Any, alg: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "alice", "iat": now, "exp": now + 600, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=alg)


async def _status(store: Store, settings: Settings, token: str) -> int:
    async with app_client(create_app(settings, backend=backend_for(store, settings))) as client:
        response = await client.get("/conversations", headers={"Authorization": f"Bearer {token}"})
        return response.status_code


@pytest.fixture
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


async def test_hs256_claims(sqlite_store: Store) -> None:
    settings = make_settings(JWT_SECRET="s" * 40, JWT_AUDIENCE="core", JWT_ISSUER="https://idp")
    good = {"aud": "core", "iss": "https://idp"}
    assert await _status(sqlite_store, settings, _token("s" * 40, "HS256", **good)) == 200
    rejected = {
        "wrong key": _token("t" * 40, "HS256", **good),
        "expired": _token("s" * 40, "HS256", exp=int(time.time()) - 3600, **good),
        "no exp": _token("s" * 40, "HS256", exp=None, **good),
        "no sub": _token("s" * 40, "HS256", sub=None, **good),
        "wrong audience": _token("s" * 40, "HS256", aud="other", iss="https://idp"),
        "no audience": _token("s" * 40, "HS256", iss="https://idp"),
        "wrong issuer": _token("s" * 40, "HS256", aud="core", iss="https://evil"),
        "not yet valid": _token("s" * 40, "HS256", nbf=int(time.time()) + 3600, **good),
        "alg none": jwt.encode(
            {"sub": "alice", "exp": int(time.time()) + 600, **good}, "", algorithm="none"
        ),
        "garbage": "abc.def.ghi",
    }
    for name, token in rejected.items():
        assert await _status(sqlite_store, settings, token) == 401, name


async def test_roles_claim_must_be_a_list_of_strings(sqlite_store: Store) -> None:
    settings = make_settings(JWT_SECRET="s" * 40)
    assert await _status(sqlite_store, settings, _token("s" * 40, "HS256", roles="admin")) == 401
    assert await _status(sqlite_store, settings, _token("s" * 40, "HS256", roles=["admin"])) == 200


async def test_rs256_public_key_and_algorithm_confusion(
    sqlite_store: Store, rsa_key: rsa.RSAPrivateKey
) -> None:
    pem = _public_pem(rsa_key)
    settings = make_settings(JWT_ALGORITHMS="RS256", JWT_PUBLIC_KEY=pem)
    assert await _status(sqlite_store, settings, _token(rsa_key, "RS256")) == 200
    # HS256 signed with the public key as secret: the classic confusion attack.
    forged = jwt.api_jws.PyJWS()
    forged._algorithms["HS256"].prepare_key = lambda key: key  # type: ignore[method-assign]
    header_payload = {"sub": "alice", "exp": int(time.time()) + 600}
    confused = forged.encode(json.dumps(header_payload).encode(), pem.encode(), algorithm="HS256")
    assert await _status(sqlite_store, settings, confused) == 401
    # HS256 is not in this allow-list at all, even with the right development secret.
    assert await _status(sqlite_store, settings, _token(settings.jwt_secret, "HS256")) == 401
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert await _status(sqlite_store, settings, _token(other, "RS256")) == 401


class _Jwks:
    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.hits = 0
        self.failing = False


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, _Jwks]]:
    state = _Jwks()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            state.hits += 1
            body = json.dumps({"keys": state.keys}).encode()
            self.send_response(503 if state.failing else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with local_http_server(Handler) as base:
        yield f"{base}/jwks.json", state


async def test_jwks_rs256_and_es256(
    sqlite_store: Store, rsa_key: rsa.RSAPrivateKey, jwks_server: tuple[str, _Jwks]
) -> None:
    url, state = jwks_server
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    state.keys = [
        {**rsa_jwk, "kid": "r1", "alg": "RS256", "use": "sig"},
        {**ec_jwk, "kid": "e1", "alg": "ES256", "use": "sig"},
    ]
    settings = make_settings(JWT_ALGORITHMS="RS256,ES256", JWT_JWKS_URL=url)
    async with app_client(
        create_app(settings, backend=backend_for(sqlite_store, settings))
    ) as client:

        async def status(token: str) -> int:
            r = await client.get("/conversations", headers={"Authorization": f"Bearer {token}"})
            return r.status_code

        rs = jwt.encode(
            {"sub": "a", "exp": int(time.time()) + 60}, rsa_key, "RS256", headers={"kid": "r1"}
        )
        es = jwt.encode(
            {"sub": "a", "exp": int(time.time()) + 60}, ec_key, "ES256", headers={"kid": "e1"}
        )
        assert await status(rs) == 200
        assert await status(es) == 200
        assert state.hits == 1  # fetched once, then cached
        # A token whose header names the RSA key but claims ES256 is refused.
        mixed = jwt.encode(
            {"sub": "a", "exp": int(time.time()) + 60}, ec_key, "ES256", headers={"kid": "r1"}
        )
        assert await status(mixed) == 401
        unknown = jwt.encode(
            {"sub": "a", "exp": int(time.time()) + 60}, rsa_key, "RS256", headers={"kid": "nope"}
        )
        assert await status(unknown) == 401


async def test_token_command_output_is_accepted(sqlite_store: Store) -> None:
    from conversational_core.auth.tokens import issue_token

    settings = make_settings()
    token = issue_token(settings, "alice", ["admin"])
    claims = jwt.decode(token, settings.jwt_secret, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["roles"] == ["admin"]
    assert await _status(sqlite_store, settings, token) == 200


def test_verifier_does_not_accept_unlisted_algorithms() -> None:
    with pytest.raises(ValueError, match="JWT_ALGORITHMS"):
        make_settings(JWT_ALGORITHMS="HS512")


async def test_a_signed_token_with_absurd_times_is_a_401(sqlite_store: Store) -> None:
    """PyJWT takes `exp: 10**400` (JSON has no bound); the service answers it as any invalid
    token: 401, never a 500."""
    settings = make_settings()
    for claims in ({"exp": 10**400}, {"nbf": -(10**400)}):
        token = _token(settings.jwt_secret, "HS256", **claims)
        assert await _status(sqlite_store, settings, token) == 401, claims


async def test_a_withdrawn_jwks_key_stops_opening_tokens(
    rsa_key: rsa.RSAPrivateKey, jwks_server: tuple[str, _Jwks]
) -> None:
    """A verified token is not trusted forever: once the key set is due to be fetched again it
    is verified again, with the stale key while the new set is fetched beside the request,
    and not at all once the new set no longer has its key."""
    from conversational_core.auth.tokens import TokenVerifier
    from conversational_core.errors import Unauthorized

    url, state = jwks_server
    state.keys = [{**json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "r1"}]
    settings = make_settings(JWT_ALGORITHMS="RS256", JWT_JWKS_URL=url)
    verifier = TokenVerifier(settings)
    token = jwt.encode({"sub": "a", "exp": int(time.time()) + 600}, rsa_key, "RS256",
                       headers={"kid": "r1"})  # fmt: skip
    try:
        assert (await verifier.verify(token)).sub == "a"
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        rotated = json.loads(RSAAlgorithm.to_jwk(other.public_key()))
        state.keys = [{**rotated, "kid": "r2"}]  # r1 withdrawn by the identity provider
        jwks = verifier._jwks
        assert jwks is not None
        # (The cache's time has passed.)
        jwks._fetched_at -= settings.JWT_JWKS_CACHE_SECONDS
        jwks._tried_at -= settings.JWT_JWKS_CACHE_SECONDS
        assert (await verifier.verify(token)).sub == "a"  # the stale set, while it refetches
        assert jwks._refreshing is not None
        await jwks._refreshing
        assert state.hits == 2
        with pytest.raises(Unauthorized):
            await verifier.verify(token)
    finally:
        await verifier.aclose()


async def test_a_jwks_document_is_read_to_a_bound(
    sqlite_store: Store, rsa_key: rsa.RSAPrivateKey, jwks_server: tuple[str, _Jwks]
) -> None:
    """A key set of megabytes (a broken or hostile server) is not read whole: the fetch fails,
    the token is refused (401), the process stays up."""
    url, state = jwks_server
    key = {**json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "r1"}
    state.keys = [key, *({**key, "kid": f"pad{i}"} for i in range(5000))]  # ~2.5 MB
    settings = make_settings(JWT_ALGORITHMS="RS256", JWT_JWKS_URL=url)
    token = jwt.encode({"sub": "a", "exp": int(time.time()) + 600}, rsa_key, "RS256",
                       headers={"kid": "r1"})  # fmt: skip
    assert await _status(sqlite_store, settings, token) == 401
    state.keys = [key]


async def test_tokens_with_unknown_kids_do_not_make_it_fetch_each_time(
    sqlite_store: Store, rsa_key: rsa.RSAPrivateKey, jwks_server: tuple[str, _Jwks]
) -> None:
    """Whether the identity provider answers or not, kids it does not know cost at most one
    fetch per 30 s: a flood of made-up kids (or an outage of the provider) is not a fetch per
    request, each holding the next."""
    url, state = jwks_server
    state.failing = True
    settings = make_settings(JWT_ALGORITHMS="RS256", JWT_JWKS_URL=url)
    async with app_client(
        create_app(settings, backend=backend_for(sqlite_store, settings))
    ) as client:
        for i in range(5):
            token = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, rsa_key, "RS256",
                               headers={"kid": f"made-up-{i}"})  # fmt: skip
            answer = await client.get(
                "/conversations", headers={"Authorization": f"Bearer {token}"}
            )
            assert answer.status_code == 401
    assert state.hits == 1


async def test_a_subject_that_is_not_text_is_a_401(store: Store) -> None:
    """A `sub` with a lone surrogate (JSON's `\\ud800` escape: valid JSON, signed by the
    issuer) names no user a store can key: 401, never a 500."""
    settings = make_settings()
    token = _token(settings.jwt_secret, "HS256", sub="a\ud800b")
    assert await _status(store, settings, token) == 401
    assert await _status(store, settings, _token(settings.jwt_secret, "HS256", sub="ünï")) == 200
