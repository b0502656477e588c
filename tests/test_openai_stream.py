"""The OpenAI provider reads the stream's server-sent events itself (providers/openai.py):
events split anywhere across network chunks, CRLF line ends, comments and other fields, and a
chunk that reports an error."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from conversational_core.replies.providers.base import Piece, ProviderError, Usage, sse_data
from conversational_core.replies.providers.openai import chunk_items


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _all(*parts: bytes) -> list[bytes]:
    return [d async for d in sse_data(_chunks(*parts))]


async def test_events_are_whole_wherever_the_chunks_split() -> None:
    stream = (
        b': keep-alive\n\nevent: x\ndata: {"a": 1}\n\ndata:{"b":\ndata: 2}\r\n\r\ndata: [DONE]\n\n'
    )
    expected = [b'{"a": 1}', b'{"b":\n2}', b"[DONE]"]
    assert await _all(stream) == expected
    for size in (1, 2, 3, 7):
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert await _all(*pieces) == expected
    assert await _all(b"data: last") == [b"last"]  # no blank line at the end


def test_a_chunk_gives_text_reasoning_calls_and_usage() -> None:
    chunk = {
        "choices": [
            {
                "delta": {
                    "reasoning_content": "hm",
                    "content": "Hi",
                    "tool_calls": [{"index": 1, "id": "c", "function": {"name": "f"}}],
                }
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
    }
    assert chunk_items(chunk) == [
        Piece("reasoning", "hm", key="reasoning"),
        "Hi",
        Piece("tool_call", "", key=1, id="c", name="f"),
        Usage(3, 4),
    ]
    assert chunk_items({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == []
    with pytest.raises(ProviderError):
        chunk_items({"error": {"message": "the engine died"}})
