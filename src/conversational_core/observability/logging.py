"""Loguru set-up: readable lines in development, one JSON object per line in production; the
standard library's loggers (uvicorn, asyncio, httpx, …) are routed through it.

Every line carries the request id (and the user id once authenticated) of the request it was
written for (EdgeMiddleware and AuthMiddleware bind them). Tokens and keys never reach a line:
anything shaped like a JWT, a bearer credential or an API key is masked in the message and in
tracebacks, whatever wrote it. Message text is never logged unless LOG_CONTENT is on.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import sys
import time
import traceback
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from loguru import logger

from conversational_core.observability.batch import Batched
from conversational_core.settings import Settings

if TYPE_CHECKING:
    from loguru import Message, Record

_SECRETS = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # JWT
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}"  # a bearer credential
    r"|\b(?:sk|pk|rk)-[A-Za-z0-9_-]{12,}"  # provider API keys (OpenAI, Anthropic, …)
)
_MASK = "[redacted]"


def redact(text: str) -> str:
    # Each alternative of _SECRETS holds one of these literals ("earer" of "bearer" in any
    # case): text without any (a path, most messages) skips the regex, 10x dearer.
    if not text or ("eyJ" not in text and "k-" not in text and "earer" not in text.lower()):
        return text
    return _SECRETS.sub(_MASK, text)


class InterceptHandler(logging.Handler):
    """The recipe from Loguru's documentation for taking over standard logging."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = inspect.currentframe(), 0
        while frame and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame = frame.f_back
            depth += 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


# The request (and its user) a line is written for: set by EdgeMiddleware and AuthMiddleware,
# read by the patcher below. Plain context variables rather than `logger.contextualize`, which
# copies its whole context on every request (twice a request, on the hot path).
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
USER_ID: ContextVar[str] = ContextVar("user_id", default="-")


def _patch_record(record: Record) -> None:
    extra = record["extra"]
    if "request_id" not in extra:
        extra["request_id"] = REQUEST_ID.get()
    if "user_id" not in extra or extra["user_id"] is None:
        extra["user_id"] = USER_ID.get()
    record["message"] = redact(record["message"])


def _json_sink(message: Message) -> None:
    """One JSON object per line. Hand-written rather than Loguru's `serialize=True`, whose
    objects nest the whole record (file, process, thread, …) under "record" and repeat the
    formatted text: four times the bytes for what a log pipeline wants at the top level."""
    record = message.record
    line: dict[str, Any] = {
        "time": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        "logger": record["name"],
    }
    for key, value in record["extra"].items():
        if value == "-":  # no request (or user) to name
            value = None
        elif isinstance(value, str):
            value = redact(value)
        line[key] = value
    exception = record["exception"]
    if exception is not None and exception.type is not None:
        line["exception"] = {
            "type": exception.type.__name__,
            "value": redact(str(exception.value)),
            "traceback": redact(
                "".join(
                    traceback.format_exception(exception.type, exception.value, exception.traceback)
                )
            ),
        }
    sys.stderr.write(orjson.dumps(line, default=str).decode() + "\n")


_READABLE = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
    "<cyan>{extra[request_id]}</cyan> | {message}"
)


class AccessLog(Batched):
    """The access line of every request, rendered here and written in batches, at most one
    write every FLUSH_SECONDS: through Loguru a line cost ~27 us of the request (a record, its
    patcher, the sink, a write), measured, several percent of a page's time. The lines are
    those Loguru would write (the same JSON fields in production, the same readable line in
    development), a little later; buffered lines are written at exit too. The time is rendered
    once a second (a `datetime` formatted per line was a fifth of the line's cost)."""

    FLUSH_SECONDS = 0.05
    FLUSH_BYTES = 65_536
    LOGGER = "conversational_core.observability.middleware"

    def __init__(self) -> None:
        self.production = False
        self._pending: list[str] = []
        self._size = 0
        self._second = -1  # the second the cached renderings below are of
        self._iso = self._offset = self._readable = ""
        super().__init__()

    def write(
        self,
        method: str,
        path: str,
        endpoint: str,
        status: int,
        duration_ms: float,
        user_id: str | None,
    ) -> None:
        path = redact(path)
        request_id = REQUEST_ID.get()
        now = time.time()
        second = int(now)
        if second != self._second:  # the date, time and offset, rendered once a second
            local = datetime.fromtimestamp(second).astimezone()
            self._second = second
            self._iso = local.strftime("%Y-%m-%dT%H:%M:%S")
            self._offset = local.strftime("%z")
            self._offset = f"{self._offset[:3]}:{self._offset[3:]}"
            self._readable = local.strftime("%Y-%m-%d %H:%M:%S")
        fraction = int((now - second) * 1_000_000)
        if self.production:
            line = orjson.dumps(
                {
                    "time": f"{self._iso}.{fraction:06d}{self._offset}",
                    "level": "INFO",
                    "message": f"{method} {path} {status} {duration_ms:.1f}ms",
                    "logger": self.LOGGER,
                    "access": True,
                    "method": method,
                    "path": path,
                    "endpoint": endpoint,
                    "status": status,
                    "duration_ms": duration_ms,
                    "user_id": user_id if user_id is not None else _or_none(USER_ID.get()),
                    "request_id": _or_none(request_id),
                }
            ).decode()
        else:
            if not path.isprintable():  # (a path decoded from %0a or %1b: one line, no escapes)
                path = path.encode("unicode_escape").decode("ascii")
            line = (
                f"{self._readable}.{_MILLISECONDS[fraction // 1000]} | INFO     | {request_id} | "
                f"{method} {path} {status} {duration_ms:.1f}ms"
            )
        self._pending.append(line)
        self._size += len(line)
        if self._size >= self.FLUSH_BYTES:
            self.flush()
        else:
            self._flush_soon()

    def flush(self) -> None:
        super().flush()
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        self._size = 0
        with contextlib.suppress(OSError, ValueError):  # (stderr closed at exit)
            sys.stderr.write(text)
            sys.stderr.flush()


_MILLISECONDS = [f"{ms:03d}" for ms in range(1000)]  # (a format spec per line cost ~5% of it)


def _or_none(value: str) -> str | None:
    return None if value == "-" else value


ACCESS_LOG = AccessLog()


def configure_logging(settings: Settings) -> None:
    ACCESS_LOG.production = settings.is_production
    logger.remove()
    logger.configure(patcher=_patch_record)
    if settings.is_production:
        logger.add(_json_sink, level=settings.LOG_LEVEL, backtrace=False, diagnose=False)
    else:
        logger.add(
            sys.stderr,
            level=settings.LOG_LEVEL,
            format=_READABLE,
            backtrace=False,
            diagnose=False,  # never print local variables (they may hold tokens or message text)
        )
    # The standard library's level follows LOG_LEVEL: a root logger at level 0 would make
    # uvicorn wrap the app in its per-message trace logger, a large cost on every request.
    std_level = (
        logging.getLevelName(settings.LOG_LEVEL)
        if settings.LOG_LEVEL not in ("TRACE", "SUCCESS")
        else (5 if settings.LOG_LEVEL == "TRACE" else logging.INFO)
    )
    logging.basicConfig(handlers=[InterceptHandler()], level=std_level, force=True)
    for name in ("uvicorn", "uvicorn.error", "fastapi"):
        std = logging.getLogger(name)
        std.handlers = [InterceptHandler()]
        std.propagate = False
    # One access line per request is EdgeMiddleware's; uvicorn's own would duplicate it. With
    # no handler anywhere up its tree, uvicorn does not even build its arguments (it asks
    # `hasHandlers()` once a connection; a disabled logger with a handler cost ~1% of a page).
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False
    access.disabled = True
