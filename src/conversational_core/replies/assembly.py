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
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from conversational_core.replies.providers.base import Piece
from conversational_core.storage.models import REASONING, TEXT, TOOL_CALL, Part


@dataclass(frozen=True, slots=True)
class Delta:
    """What to publish for one piece (`start`: the first delta of a tool call names it)."""

    text: str
    part_index: int
    part_type: str
    start: dict[str, Any] | None = None


_PLAIN: tuple[str, Hashable] = (TEXT, None)  # the key of plain-text pieces (a provider's `str`)


class PartsBuilder:
    def __init__(self) -> None:
        self.parts: list[Part] = []
        self._last_key: tuple[str, Hashable] | None = None
        self._calls: dict[Hashable, int] = {}  # a tool call's key -> its part's index

    def add(self, item: str | Piece) -> Delta | None:
        """Add a piece; the delta to publish (None when there is nothing to tell clients)."""
        data: dict[str, Any] | None
        key: tuple[str, Hashable]
        if isinstance(item, str):  # plain text, most tokens: no Piece made for it
            kind, text, key, data = TEXT, item, _PLAIN, None
        elif item.type == TOOL_CALL:
            return self._tool_call(item)
        else:
            kind, text, key, data = item.type, item.text, (item.type, item.key), item.provider_data
        if self.parts and key == self._last_key:
            index = len(self.parts) - 1
        elif not text and data is None:
            return None
        else:
            self.parts.append({"type": kind, "text": ""})
            index = len(self.parts) - 1
            self._last_key = key
        part = self.parts[index]
        if data is not None and kind == REASONING:
            part["provider_data"] = {**part.get("provider_data", {}), **data}
        if not text:
            return None
        part["text"] += text
        return Delta(text, index, kind)

    def _tool_call(self, item: Piece) -> Delta | None:
        index = self._calls.get(item.key)
        start = None
        if index is None:
            call_id = item.id or f"call_{len(self._calls) + 1}"
            self.parts.append(
                {"type": TOOL_CALL, "id": call_id, "name": item.name or "", "arguments": ""}
            )
            index = len(self.parts) - 1
            self._calls[item.key] = index
            start = {"tool_call_id": call_id, "name": item.name or ""}
        self._last_key = (TOOL_CALL, item.key)
        part = self.parts[index]
        part["arguments"] += item.text
        if not item.text and start is None:
            return None
        return Delta(item.text, index, TOOL_CALL, start)

    def snapshot(self) -> list[Part]:
        """The parts so far (copies: the builder keeps growing its own)."""
        return [dict(p) for p in self.parts]

    @property
    def tool_calls(self) -> list[Part]:
        return [p for p in self.parts if p["type"] == TOOL_CALL]


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


_END = object()


async def batched(
    stream: AsyncIterator[T], window: Callable[[], float] = lambda: 0.0
) -> AsyncGenerator[list[T], None]:
    """The items of `stream` in batches: each batch is every item that arrived while the
    consumer was busy with the one before (at least one), and, when `window()` (seconds) is
    not 0, every item until `window()` after the batch before: a reply written alone gets one
    item a batch — a delta a token; one written beside others (or whose writes fall behind the
    model) gets the tokens of a window as one delta. The first batch and the last (the stream
    ended) are not held back. The stream is read by a task of its own, closed (which stops the
    provider) when this generator is closed; its errors are raised here, after the items
    before them."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    finished = asyncio.Event()  # the stream ended or failed: nothing more to wait for

    async def pump() -> None:
        try:
            source: Any = stream  # an async generator (a provider's stream): it has aclose
            async with contextlib.aclosing(source):
                async for item in source:
                    queue.put_nowait(item)
        except Exception as exc:
            queue.put_nowait(_Failed(exc))
            finished.set()
            return
        queue.put_nowait(_END)
        finished.set()

    reader = asyncio.create_task(pump(), name="provider-stream")
    loop = asyncio.get_running_loop()
    last: float | None = None  # loop.time() of the batch before
    try:
        while True:
            batch = [await queue.get()]
            if last is not None and not finished.is_set():
                remaining = last + window() - loop.time()
                if remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await finished.wait()
            while not queue.empty():
                batch.append(queue.get_nowait())
            last = loop.time()
            items = [i for i in batch if i is not _END and not isinstance(i, _Failed)]
            if items:
                yield items
            end = batch[-1]
            if isinstance(end, _Failed):
                raise end.error
            if end is _END:
                return
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


def merged(deltas: list[Delta]) -> list[Delta]:
    """Consecutive deltas of one part as one (the first's `start` kept): what a batch sends."""
    out: list[Delta] = []
    for delta in deltas:
        if out and out[-1].part_index == delta.part_index and delta.start is None:
            out[-1] = replace(out[-1], text=out[-1].text + delta.text)
        else:
            out.append(delta)
    return out
