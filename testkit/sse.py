"""Server-Sent Events (`text/event-stream`) parsed incrementally, for the tests and the
benchmarks: feed it the bytes of a stream as they come, in any pieces, and get its events."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StreamEvent:
    type: str  # "message" when the event has no `event:` field; "" for comments only
    data: bytes
    id: str | None


class EventStreamParser:
    """Lines end with CRLF, CR or LF (sse-starlette writes CRLF); an event ends with a blank
    line; comments and `retry:` are skipped (a block of nothing else is an event of type "")."""

    def __init__(self) -> None:
        self._text = b""  # bytes not yet split into events

    def feed(self, data: bytes) -> list[StreamEvent]:
        text = self._text + data
        if b"\r" in text:
            # A CR at the very end may be the first half of a CRLF: it waits for the next bytes.
            keep = text.endswith(b"\r")
            body = text[:-1] if keep else text
            text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if keep else b"")
        events: list[StreamEvent] = []
        while (end := text.find(b"\n\n")) >= 0:
            block, text = text[:end], text[end + 2 :]
            kind = "message"
            data_lines: list[bytes] = []
            event_id = None
            comment = True  # until a field other than `retry:` shows up
            for line in block.split(b"\n"):
                name, _, value = line.partition(b":")
                value = value.removeprefix(b" ")
                if name == b"event":
                    kind = value.decode()
                elif name == b"data":
                    data_lines.append(value)
                elif name == b"id":
                    event_id = value.decode()
                else:
                    continue  # a comment line, `retry:` or an unknown field
                comment = False
            events.append(StreamEvent("" if comment else kind, b"\n".join(data_lines), event_id))
        self._text = text
        return events
