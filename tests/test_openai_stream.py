"""The OpenAI provider reads the stream's server-sent events itself (providers/openai.py):
events split anywhere across network chunks, CRLF line ends, comments and other fields, and a
chunk that reports an error."""

from __future__ import annotations

import orjson
import pytest

from conversational_core.replies.providers.base import (
    EventTooLong,
    Item,
    Piece,
    ProviderError,
    SSEData,
    Usage,
)
from conversational_core.replies.providers.openai import add_items, chunk_items, decode_chunk


def _items(chunk: object) -> list[object]:
    """What a chunk, sent as this JSON, holds for the reply."""
    return list(chunk_items(decode_chunk(orjson.dumps(chunk))))


def _all(*parts: bytes) -> list[bytes]:
    decoder = SSEData()
    events = [data for part in parts for data in decoder.feed(part)]
    return events + decoder.end()


def test_events_are_whole_wherever_the_chunks_split() -> None:
    stream = (
        b': keep-alive\n\nevent: x\ndata: {"a": 1}\n\ndata:{"b":\ndata: 2}\r\n\r\ndata: [DONE]\n\n'
    )
    expected = [b'{"a": 1}', b'{"b":\n2}', b"[DONE]"]
    assert _all(stream) == expected
    for size in (1, 2, 3, 7):
        pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert _all(*pieces) == expected
    assert _all(b"data: last") == [b"last"]  # no blank line at the end
    assert _all(b"data: a\n\n\n\ndata: b\n\n: only a comment\n\n") == [b"a", b"b"]
    assert _all(b"data: a\r\r\n\r\n") == [b"a\r"]  # a CR in the data, then CRLF


def test_an_event_that_never_ends_is_refused() -> None:
    decoder = SSEData()
    assert decoder.feed(b"data: " + b"x" * (SSEData.MAX_EVENT_BYTES - 6)) == []  # at the limit
    with pytest.raises(EventTooLong):  # (the provider's stream fails as unreadable)
        decoder.feed(b"x")


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
    assert _items(chunk) == [
        Piece("reasoning", "hm", key="reasoning"),
        "Hi",
        Piece("tool_call", "", key=1, id="c", name="f"),
        Usage(3, 4),
    ]
    assert _items({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == []
    with pytest.raises(ProviderError):
        _items({"error": {"message": "the engine died"}})


def test_a_read_s_chunks_give_what_each_gives_in_order() -> None:
    """add_items reads plain-text chunks itself (most tokens): what it adds is what chunk_items
    gives for each chunk, in order, whatever the chunks hold; and the items of the chunks
    before one that fails are added before it fails."""
    bodies: list[object] = [
        {"id": "x", "object": "chat.completion.chunk", "model": "m",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "logprobs": None}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
        {"choices": [{"delta": {"reasoning_content": "hm", "content": None}}]},
        {"choices": [{"delta": {"reasoning": "so", "content": "!"}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c", "function": {
            "name": "f", "arguments": "{}"}}]}}]},
        {"choices": [{"delta": {"content": "a"}}, {"delta": {"content": "b"}}]},
        {"choices": [{"delta": {"content": " cut"}, "finish_reason": "length"}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 6}},
        {"choices": [{"delta": None}]},
        {"choices": None},
    ]  # fmt: skip
    chunks = [decode_chunk(orjson.dumps(body)) for body in bodies]
    items: list[Item] = []
    add_items(items, chunks)
    assert items == [item for chunk in chunks for item in chunk_items(chunk)]
    assert items[:4] == ["Hel", "lo", Piece("reasoning", "hm", key="reasoning"),
                         Piece("reasoning", "so", key="reasoning")]  # fmt: skip
    failing = [chunks[1], decode_chunk(b'{"error": {"message": "died"}}'), chunks[2]]
    items = []
    with pytest.raises(ProviderError):
        add_items(items, failing)
    assert items == ["Hel"]
