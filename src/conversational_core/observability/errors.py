"""Sentry, when SENTRY_DSN is set (off otherwise): unhandled errors of the API and the worker,
with the request id, never a token, a key or message text."""

from __future__ import annotations

from typing import Any

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
    crumbs = event.get("breadcrumbs")
    if isinstance(crumbs, dict):
        crumbs["values"] = [c for c in crumbs.get("values", []) if _no_breadcrumb(c, {})]
    return event


def _no_breadcrumb(crumb: dict[str, Any], _: dict[str, Any]) -> dict[str, Any] | None:
    """Breadcrumbs of the libraries that see message text (store commands, HTTP bodies of
    provider calls) are dropped; the others (e.g. log lines, already redacted) are kept."""
    if crumb.get("category") in ("redis", "httplib", "http", "query"):
        return None
    return crumb


_enabled = False


def configure_sentry(settings: Settings, component: str) -> None:
    """Imported only when used: the SDK's integrations import the provider SDKs (~70 MB)."""
    global _enabled
    if not settings.SENTRY_DSN:
        return
    import sentry_sdk
    from sentry_sdk.integrations.anthropic import AnthropicIntegration
    from sentry_sdk.integrations.loguru import LoguruIntegration
    from sentry_sdk.integrations.openai import OpenAIIntegration
    from sentry_sdk.integrations.redis import RedisIntegration

    _enabled = True
    sentry_sdk.init(
        dsn=settings.SENTRY_DSN,
        environment=settings.ENVIRONMENT.value,
        release=f"conversational-core@{__version__}",
        server_name=component,
        # No user identity, cookies, bodies, query strings or local variables (locals and
        # bodies hold tokens and message text); headers go through the SDK's denylist.
        # Every category is named: one left out falls back to "collect" (and passing
        # data_collection at all turns the SDK's default scrubber off).
        data_collection={
            "user_info": False,
            "http_bodies": [],
            "http_headers": {"request": {"mode": "denylist"}},
            "stack_frame_variables": False,
            "cookies": {"mode": "off"},
            "url_query_params": {"mode": "off"},
            "database_query_data": False,
            "gen_ai": {"inputs": False, "outputs": False},
            "graphql": {"document": False, "variables": False},
            "queues": False,
        },
        # Redis commands and provider calls carry message text: no breadcrumbs or spans of them.
        # Loguru's integration adds a handler that prints local variables into the event (and
        # would duplicate `report`): errors are sent by `report` only.
        disabled_integrations=[
            RedisIntegration(),
            OpenAIIntegration(),
            AnthropicIntegration(),
            LoguruIntegration(),
        ],
        before_breadcrumb=_no_breadcrumb,
        traces_sample_rate=settings.SENTRY_TRACES_SAMPLE_RATE,
        before_send=_scrub,  # type: ignore[arg-type]
    )


def report(exc: BaseException) -> None:
    """Send an error that the service answered itself (a 500 problem): a no-op without Sentry."""
    if _enabled:
        import sentry_sdk

        sentry_sdk.capture_exception(exc)
