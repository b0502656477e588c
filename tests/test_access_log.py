"""Access lines (observability/logging.py:AccessLog): the fields and formats Loguru's sink
writes, rendered by hand and written in batches."""

from __future__ import annotations

import asyncio
import io
import json
import re
from datetime import datetime

import pytest

from conversational_core.observability.logging import REQUEST_ID, AccessLog, redact


def _written(log: AccessLog, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    token = REQUEST_ID.set("req-7")
    try:
        log.write(
            "GET", "/conversations/c1/messages", "/conversations/{id}/messages", 200, 1.25, "al"
        )
        log.write("POST", "/x?token=eyJhbGciOiJI.eyJzdWIiOiJh.c2ln", "/x", 201, 3.5, None)
    finally:
        REQUEST_ID.reset(token)
    assert out.getvalue() == ""  # buffered (in a running loop): nothing written per request
    log.flush()
    return out.getvalue().splitlines()


async def test_production_lines_are_json_with_an_iso_time(monkeypatch: pytest.MonkeyPatch) -> None:
    log = AccessLog()
    log.production = True
    first, second = (json.loads(line) for line in _written(log, monkeypatch))
    when = datetime.fromisoformat(first["time"])
    assert when.tzinfo is not None
    assert abs((datetime.now().astimezone() - when).total_seconds()) < 60
    assert {k: first[k] for k in ("level", "message", "access", "status", "user_id")} == {
        "level": "INFO",
        "message": "GET /conversations/c1/messages 200 1.2ms",
        "access": True,
        "status": 200,
        "user_id": "al",
    }
    assert (first["request_id"], first["endpoint"]) == ("req-7", "/conversations/{id}/messages")
    assert "eyJ" not in json.dumps(second)  # a token in a path never reaches a line


async def test_lines_go_out_together_by_one_timed_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a running loop, the lines of many requests are written by one flush, FLUSH_SECONDS
    after the first; a line after that flush is written by the next one (none is left
    buffered for want of a timer)."""
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    log = AccessLog()
    log.FLUSH_SECONDS = 0.01
    flushed = asyncio.Event()
    flush = log.flush

    def flush_and_tell() -> None:
        flush()
        flushed.set()

    monkeypatch.setattr(log, "flush", flush_and_tell)
    for status in (200, 201, 202):
        log.write("GET", "/x", "/x", status, 1.0, "al")
    assert out.getvalue() == ""
    await asyncio.wait_for(flushed.wait(), 5)
    assert [line.split()[-2] for line in out.getvalue().splitlines()] == ["200", "201", "202"]
    flushed.clear()
    log.write("GET", "/x", "/x", 203, 1.0, "al")
    await asyncio.wait_for(flushed.wait(), 5)
    assert out.getvalue().splitlines()[-1].split()[-2] == "203"


async def test_development_lines_are_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    log = AccessLog()
    first, _ = _written(log, monkeypatch)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| INFO     \| req-7 \| "
        r"GET /conversations/c1/messages 200 1\.2ms",
        first,
    ), first


async def test_a_path_cannot_forge_a_development_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A path decoded from %0a or %1b (any anonymous caller's) stays on its line, escaped: no
    forged log line, no terminal escape codes."""
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    log = AccessLog()
    log.write("GET", "/x\n2026-01-01 | INFO | forged\x1b[2J", "/x", 404, 0.5, None)
    log.flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\x1b" not in lines[0]
    assert lines[0].endswith("GET /x\\n2026-01-01 | INFO | forged\\x1b[2J 404 0.5ms")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/x?t=eyJhbGciOiJI.eyJzdWIiOiJh.c2ln&a=1", "/x?t=[redacted]&a=1"),
        ("Authorization: Bearer abc.def-ghi_jkl", "Authorization: [redacted]"),
        ("auth BEARER abcdefgh12345", "auth [redacted]"),
        ("auth bEaReR\tabcdefgh12345", "auth [redacted]"),
        ("key=sk-proj-abcdefghijkl0123", "key=[redacted]"),
        ("rk-abcdefghijkl0123 and pk-abcdefghijkl0123", "[redacted] and [redacted]"),
        # nothing shaped like a secret: unchanged (and no regex run, the common case)
        ("/conversations/01a22fed-76a6-764c-8d7b-c15d90913781/messages", None),
        ("ask-me later; the bearer of news; eyJ", None),
        ("", None),
    ],
)
def test_redact_masks_every_kind_of_secret_and_nothing_else(
    text: str, expected: str | None
) -> None:
    assert redact(text) == (text if expected is None else expected)
