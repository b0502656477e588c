"""Sentry, when SENTRY_DSN is set (off otherwise): unhandled errors of the API and the worker,
with the request id, never a token, a key or message text."""

from __future__ import annotations

from typing import Any

import sentry_sdk

from conversational_core import __version__
from conversational_core.observability.logging import redact
from conversational_core.settings import Settings

_SECRET_HEADERS = {"authorization", "cookie", "x-api-key", "proxy-authorization"}


def _scrub(event: dict[str, Any], _: dict[str, Any]) -> dict[str, Any]:
    request = event.get("request") or {}
    headers = request.get("headers")
    if isinstance(headers, dict):
        for name in list(headers):
            if name.lower() in _SECRET_HEADERS:
                headers[name] = "[redacted]"
    request.pop("data", None)  # request bodies hold message text
    request.pop("query_string", None)
    for value in (event.get("exception") or {}).get("values", []):
        if isinstance(value.get("value"), str):
            value["value"] = redact(value["value"])
    if isinstance(event.get("message"), str):
        event["message"] = redact(event["message"])
    return event


def configure_sentry(settings: Settings, component: str) -> None:
    if not settings.SENTRY_DSN:
        return
    sentry_sdk.init(
        dsn=settings.SENTRY_DSN,
        environment=settings.ENVIRONMENT.value,
        release=f"conversational-core@{__version__}",
        server_name=component,
        # No user identity, cookies, bodies, query strings or local variables (locals and
        # bodies hold tokens and message text); headers go through the SDK's denylist.
        data_collection={
            "user_info": False,
            "http_bodies": [],
            "stack_frame_variables": False,
            "cookies": {"mode": "off"},
            "url_query_params": {"mode": "off"},
        },
        traces_sample_rate=settings.SENTRY_TRACES_SAMPLE_RATE,
        before_send=_scrub,  # type: ignore[arg-type]
    )


def report(exc: BaseException) -> None:
    """Send an error that the service answered itself (a 500 problem): a no-op without Sentry."""
    sentry_sdk.capture_exception(exc)
