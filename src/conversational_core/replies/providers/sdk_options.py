"""What every request to a model is given through its official SDK's generic `post`
(base.stream_events): its headers, and an idempotency key."""

from __future__ import annotations

import itertools
import uuid
from types import ModuleType
from typing import Any

# The SDKs make an idempotency key for each POST (`uuid4`: a read of the kernel's random
# source, ~1% of a one-token reply's worker CPU) even though neither client sends one (neither
# names a header for it) nor retries (max_retries=0): one is given instead, unique per request
# as theirs are, should a release start sending it.
_KEY_PREFIX = f"conversational-core-{uuid.uuid4().hex}-"
_KEY_NUMBERS = itertools.count()


def _idempotency_key() -> str:
    return f"{_KEY_PREFIX}{next(_KEY_NUMBERS)}"


# The official SDKs' telemetry headers (their Stainless generator's: the SDK's language and
# version, the OS, the architecture, the Python runtime, sync or async, the retry count), left
# out of every request: no model server acts on them (the read timeout, which a server may,
# stays), and they are 8 of a request's 19 headers, each built, normalized and looked up by
# the SDK's httpx request and again by its aiohttp transport on every reply of a worker.
# `Omit` (both SDKs have it) removes a default header; omitted per request, as the SDK's own
# retry-count header can only be.
_TELEMETRY_HEADERS = (
    "X-Stainless-Lang",
    "X-Stainless-Package-Version",
    "X-Stainless-OS",
    "X-Stainless-Arch",
    "X-Stainless-Runtime",
    "X-Stainless-Runtime-Version",
    "X-Stainless-Async",
    "X-Stainless-Retry-Count",
)
_REQUEST_HEADERS: dict[str, dict[str, Any]] = {}  # by SDK


def request_headers(sdk: ModuleType) -> dict[str, Any]:
    """The headers every streamed request of `sdk` is given (its defaults but telemetry)."""
    headers = _REQUEST_HEADERS.get(sdk.__name__)
    if headers is None:
        omit = sdk.Omit()
        headers = {"Content-Type": "application/json", **dict.fromkeys(_TELEMETRY_HEADERS, omit)}
        _REQUEST_HEADERS[sdk.__name__] = headers
    return headers


def request_options(sdk: ModuleType) -> dict[str, Any]:
    """The SDK's request options (`sdk`: its module) for a streamed completion's POST."""
    return {"headers": request_headers(sdk), "idempotency_key": _idempotency_key()}
