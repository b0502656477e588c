"""The caller's identity: who calls, for whom, with which roles."""

from __future__ import annotations

from dataclasses import dataclass

from conversational_core.auth.tokens import TokenVerifier
from conversational_core.errors import BadRequest, Forbidden, Unauthorized


@dataclass(slots=True)  # not frozen: made per request; frozen, each field costs 10x to set
class Principal:
    """Who is calling and for whom.

    `user_id` is the user whose conversations the request acts on: the token's `sub`, or for a
    token with role `service` the user named in the `X-On-Behalf-Of` header.
    """

    user_id: str
    subject: str
    roles: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def is_service(self) -> bool:
        return "service" in self.roles

    @property
    def may_write_any_role(self) -> bool:
        """May add `system`, `assistant` and `tool` messages."""
        return self.is_admin or self.is_service


async def authenticate(
    verifier: TokenVerifier, header: str | None, on_behalf: str | None
) -> Principal:
    """The caller of a request with this Authorization (and X-On-Behalf-Of) header; raises
    Unauthorized or Forbidden."""
    if not header:
        raise Unauthorized("Missing bearer token.", missing=True)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Expected 'Authorization: Bearer <token>'.", missing=True)
    claims = await verifier.verify(token.strip())
    user_id = claims.sub
    if on_behalf is not None:
        if "service" not in claims.roles:
            raise Forbidden("X-On-Behalf-Of needs a token with the 'service' role.")
        on_behalf = on_behalf.strip()
        if not on_behalf or len(on_behalf) > 256:
            raise BadRequest("X-On-Behalf-Of must name a user id (1-256 characters).")
        user_id = on_behalf
    return Principal(user_id=user_id, subject=claims.sub, roles=claims.roles)
