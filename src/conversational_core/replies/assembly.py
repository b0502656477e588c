"""A reply's parts, put together from the pieces a provider streams (providers/base.py: `str`
text and Piece), and the delta each piece becomes.

A piece continues the part before it when it has the same type and key; a tool call's pieces
go to that call's part even when others came between (OpenAI-compatible servers may interleave
the arguments of parallel calls). Every delta names the part it belongs to (`part_index`,
`part_type`), so that a client concatenating the deltas of one part gets exactly its text (a
tool call's `arguments`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from conversational_core.replies.providers.base import Piece, Usage
from conversational_core.storage.models import REASONING, TEXT, TOOL_CALL, Part


@dataclass(slots=True)
class Delta:
    """What to publish for one piece, or for consecutive pieces of one part (`start`: the first
    delta of a tool call names it)."""

    text: str
    part_index: int
    part_type: str
    start: dict[str, Any] | None = None


_PLAIN: tuple[str, Hashable] = (TEXT, None)  # the key of plain-text pieces (a provider's `str`)
# Where a piece goes: its part's index and type, its text, and the start of a tool call.
_Placed = tuple[int, str, str, dict[str, Any] | None]


class PartsBuilder:
    def __init__(self) -> None:
        self._parts: list[Part] = []
        # A part's text as it grows: its pieces, joined when the parts are read. (`+=` on a
        # dict's value copies the whole text each time: a reply written alone, a delta per
        # token, cost time quadratic in its length: 2.6 µs a token against 0.8 at 32,000.)
        self._grown: dict[int, list[str]] = {}
        self._last_key: tuple[str, Hashable] | None = None
        self._calls: dict[Hashable, int] = {}  # a tool call's key -> its part's index

    def add_all(self, items: Iterable[str | Piece]) -> list[Delta]:
        """Add the pieces of a batch; the deltas to publish, consecutive pieces of one part as
        one (a tool call's first delta names it). A part's text grows once per delta, not once
        per piece: under load a batch holds tens of a reply's tokens, and this is the path
        every token takes (a Delta per token and merging them measured as a tenth of the
        worker's CPU at 500 streams, bench/relay.py)."""
        out: list[Delta] = []
        texts: list[str] = []  # the open delta's pieces
        at, kind, start = -1, TEXT, None
        for item in items:
            placed: _Placed | None
            if isinstance(item, str) and self._last_key is _PLAIN:
                # Plain text after plain text, most tokens: it continues the last part.
                placed = (len(self._parts) - 1, TEXT, item, None) if item else None
            else:
                placed = self._place(item)
            if placed is None:
                continue
            index, piece_kind, text, begin = placed
            if index == at and begin is None:
                texts.append(text)
                continue
            if texts:
                out.append(self._grow(at, kind, texts, start))
            at, kind, start, texts = index, piece_kind, begin, [text]
        if texts:
            out.append(self._grow(at, kind, texts, start))
        return out

    def _grow(self, index: int, kind: str, texts: list[str], start: dict[str, Any] | None) -> Delta:
        text = texts[0] if len(texts) == 1 else "".join(texts)
        grown = self._grown.get(index)
        if grown is None:
            self._grown[index] = [text]
        else:
            grown.append(text)
        return Delta(text, index, kind, start)

    @property
    def parts(self) -> list[Part]:
        """The parts so far, each with its whole text (the builder's own: they keep growing)."""
        for index, grown in self._grown.items():
            part = self._parts[index]
            part["arguments" if part["type"] == TOOL_CALL else "text"] += "".join(grown)
        self._grown.clear()
        return self._parts

    def _place(self, item: str | Piece) -> _Placed | None:
        """The part a piece goes to (made when it is the first of its part); None when it has
        nothing to tell clients."""
        data: dict[str, Any] | None
        key: tuple[str, Hashable]
        if isinstance(item, str):
            kind, text, key, data = TEXT, item, _PLAIN, None
        elif item.type == TOOL_CALL:
            return self._tool_call(item)
        else:
            kind, text, key, data = item.type, item.text, (item.type, item.key), item.provider_data
        if self._parts and key == self._last_key:
            index = len(self._parts) - 1
        elif not text and data is None:
            return None
        else:
            self._parts.append({"type": kind, "text": ""})
            index = len(self._parts) - 1
            self._last_key = _PLAIN if key == _PLAIN else key
        part = self._parts[index]
        if data is not None and kind == REASONING:
            part["provider_data"] = {**part.get("provider_data", {}), **data}
        if not text:
            return None
        return index, kind, text, None

    def _tool_call(self, item: Piece) -> _Placed | None:
        key = item.key
        if key is None:  # (a piece that names no call continues the last one)
            key = next(reversed(self._calls), None)
        index = self._calls.get(key)
        start = None
        if index is not None:
            if item.name and not self._parts[index]["name"]:
                self._parts[index]["name"] = item.name  # a name sent after the call's start
        else:
            call_id = item.id or f"call_{len(self._calls) + 1}"
            self._parts.append(
                {"type": TOOL_CALL, "id": call_id, "name": item.name or "", "arguments": ""}
            )
            index = len(self._parts) - 1
            self._calls[key] = index
            start = {"tool_call_id": call_id, "name": item.name or ""}
        self._last_key = (TOOL_CALL, key)
        if not item.text and start is None:
            return None
        return index, TOOL_CALL, item.text, start

    def snapshot(self) -> list[Part]:
        """The parts so far (copies: the builder keeps growing its own)."""
        return [dict(p) for p in self.parts]

    @property
    def tool_calls(self) -> list[Part]:
        return [p for p in self.parts if p["type"] == TOOL_CALL]


T = TypeVar("T")


async def batched(
    reads: AsyncIterator[list[T]], window: Callable[[], float] = lambda: 0.0
) -> AsyncGenerator[list[T], None]:
    """The items of a provider's reads (Provider.reads: what each read of its connection
    held) as batches, one per read. While `window()` (seconds) is 0 — a reply written alone —
    every read follows the one before at once: a delta per token as the model writes them.
    Otherwise the next read waits until `window()` after the one before: meanwhile the
    connection's buffer gathers what the model writes, and one read takes it all, so that the
    tokens of a window are read, parsed and published as one delta, and none of them costs a
    wakeup of its own. The first read is not held back, nor the one after a read that ends
    with the usage (a provider's last item: the stream ends there); a stream that reports none
    is seen to end at most one window late. Closing this generator closes `reads` (which stops
    the provider)."""
    source: Any = reads  # an async generator (a provider's reads): it has aclose
    loop = asyncio.get_running_loop()
    async with contextlib.aclosing(source):
        iterator = aiter(source)
        while True:
            try:
                items = await anext(iterator)
            except StopAsyncIteration:
                return
            read_at = loop.time()
            yield items
            if items and isinstance(items[-1], Usage):
                continue  # the end: no wait for it
            pause = read_at + window() - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)  # the pace of the reads: time is the point
