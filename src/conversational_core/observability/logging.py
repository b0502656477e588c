"""Loguru set-up: readable lines in development, JSON lines in production; the standard library's
loggers (uvicorn, asyncio, …) are routed through it."""

from __future__ import annotations

import inspect
import logging
import sys

from loguru import logger

from conversational_core.settings import Settings


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


def configure_logging(settings: Settings) -> None:
    logger.remove()
    logger.add(
        sys.stderr,
        level=settings.LOG_LEVEL,
        serialize=settings.is_production,
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
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "fastapi"):
        std = logging.getLogger(name)
        std.handlers = [InterceptHandler()]
        std.propagate = False
    # One access line per request is the middleware's job (issue: observability); uvicorn's own
    # access log would duplicate it.
    logging.getLogger("uvicorn.access").disabled = True
