"""How a reply's parts are put together from streamed pieces (replies/assembly.py): parallel tool
calls whose arguments interleave, a signature that arrives after its thinking, and the merging
of a batch's deltas."""

from __future__ import annotations

import orjson

from conversational_core.replies.assembly import PartsBuilder
from conversational_core.replies.providers.base import Piece


def test_interleaved_calls_each_keep_their_arguments() -> None:
    pieces: list[str | Piece] = [
        "Checking ",
        Piece("tool_call", "", key=0, id="a", name="f"),
        Piece("tool_call", "", key=1, id="b", name="g"),
        Piece("tool_call", '{"x"', key=0),
        Piece("tool_call", '{"y": 2}', key=1),
        Piece("tool_call", ": 1}", key=0),
        "both.",
    ]
    built = PartsBuilder()
    deltas = [next(iter(built.add_all([p])), None) for p in pieces]  # a piece at a time
    assert built.parts == [
        {"type": "text", "text": "Checking "},
        {"type": "tool_call", "id": "a", "name": "f", "arguments": '{"x": 1}'},
        {"type": "tool_call", "id": "b", "name": "g", "arguments": '{"y": 2}'},
        {"type": "text", "text": "both."},
    ]
    assert [(d.part_index, d.text) for d in deltas if d] == [
        (0, "Checking "), (1, ""), (2, ""), (1, '{"x"'), (2, '{"y": 2}'), (1, ": 1}"), (3, "both."),
    ]  # fmt: skip
    assert deltas[1] is not None and deltas[1].start == {"tool_call_id": "a", "name": "f"}

    # The same pieces in one batch: the same parts, and the same deltas (no two in a row of
    # one part here, so none merged).
    batch = PartsBuilder()
    assert batch.add_all(pieces) == [d for d in deltas if d]
    assert batch.parts == built.parts


def test_the_parts_read_at_any_point_hold_exactly_the_deltas_so_far() -> None:
    """What a reply stopped mid-stream saves (the builder's snapshot): each part's text is the
    concatenation of the deltas it had, read as often as it is, between deltas too."""
    pieces: list[str | Piece] = [
        *(f"t{i} " for i in range(300)),
        Piece("tool_call", '{"n": ', key=0, id="a", name="f"),
        *(Piece("tool_call", f"{i}", key=0) for i in range(50)),
        "after",
    ]
    built = PartsBuilder()
    sent: dict[int, str] = {}
    for i, piece in enumerate(pieces):
        for delta in built.add_all([piece]):
            sent[delta.part_index] = sent.get(delta.part_index, "") + delta.text
        if i % 7 == 0 or i == len(pieces) - 1:
            snapshot = built.snapshot()
            assert {n: p.get("text", p.get("arguments")) for n, p in enumerate(snapshot)} == sent
    assert built.parts[0]["text"] == "".join(f"t{i} " for i in range(300))
    assert built.parts[1]["arguments"] == '{"n": ' + "".join(str(i) for i in range(50))


def test_a_signature_after_its_thinking_goes_on_that_part() -> None:
    built = PartsBuilder()
    built.add_all([Piece("reasoning", "Hm.", key=0)])
    assert built.add_all([Piece("reasoning", "", key=0, provider_data={"signature": "s"})]) == []
    built.add_all([Piece("text", "Yes.", key=1)])
    assert built.parts == [
        {"type": "reasoning", "text": "Hm.", "provider_data": {"signature": "s"}},
        {"type": "text", "text": "Yes."},
    ]


def test_a_batch_sends_one_delta_per_part_in_order() -> None:
    built = PartsBuilder()
    sent = built.add_all(
        [
            "a",
            "b",
            Piece("tool_call", "{", key=0, id="c", name="f"),
            Piece("tool_call", "}", key=0),
            "c",
            Piece("text", "d"),  # (a text piece without a key continues plain text)
            Piece("reasoning", "", key=0),  # (nothing to tell: no part, no delta)
        ]
    )
    assert [(d.part_index, d.text, d.start) for d in sent] == [
        (0, "ab", None),
        (1, "{}", {"tool_call_id": "c", "name": "f"}),
        (2, "cd", None),
    ]
    assert built.parts == [
        {"type": "text", "text": "ab"},
        {"type": "tool_call", "id": "c", "name": "f", "arguments": "{}"},
        {"type": "text", "text": "cd"},
    ]


def test_calls_streamed_without_an_index_are_told_apart_by_their_ids() -> None:
    """Servers that send no `index` (Gemini's OpenAI-compatible endpoint) start each call with
    its id; pieces naming neither continue the last call, and a name sent after a call's first
    piece is kept."""
    from conversational_core.replies.providers.openai import chunk_items, decode_chunk

    def call(**fields: object) -> dict[str, object]:
        return {"choices": [{"index": 0, "delta": {"tool_calls": [fields]}}]}

    chunks = [
        call(id="call_x", type="function", function={"name": "get_weather", "arguments": ""}),
        call(function={"arguments": '{"city": '}),
        call(function={"arguments": '"Lisbon"}'}),
        call(id="call_y", function={"name": "get_weather", "arguments": '{"city": "Porto"}'}),
        call(id="call_z", function={"arguments": "{}"}),
        call(function={"name": "get_time"}),
    ]
    built = PartsBuilder()
    for chunk in chunks:
        built.add_all(chunk_items(decode_chunk(orjson.dumps(chunk))))  # type: ignore[arg-type]
    assert [(p["id"], p["name"], p["arguments"]) for p in built.parts] == [
        ("call_x", "get_weather", '{"city": "Lisbon"}'),
        ("call_y", "get_weather", '{"city": "Porto"}'),
        ("call_z", "get_time", "{}"),
    ]
