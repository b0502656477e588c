"""How a reply's parts are put together from streamed pieces (replies/assembly.py): parallel tool
calls whose arguments interleave, a signature that arrives after its thinking, and the merging
of a batch's deltas."""

from __future__ import annotations

from conversational_core.replies.assembly import PartsBuilder
from conversational_core.replies.providers.base import Piece


def test_interleaved_calls_each_keep_their_arguments() -> None:
    built = PartsBuilder()
    deltas = [
        built.add("Checking "),
        built.add(Piece("tool_call", "", key=0, id="a", name="f")),
        built.add(Piece("tool_call", "", key=1, id="b", name="g")),
        built.add(Piece("tool_call", '{"x"', key=0)),
        built.add(Piece("tool_call", '{"y": 2}', key=1)),
        built.add(Piece("tool_call", ": 1}", key=0)),
        built.add("both."),
    ]
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


def test_a_signature_after_its_thinking_goes_on_that_part() -> None:
    built = PartsBuilder()
    built.add(Piece("reasoning", "Hm.", key=0))
    assert built.add(Piece("reasoning", "", key=0, provider_data={"signature": "s"})) is None
    built.add(Piece("text", "Yes.", key=1))
    assert built.parts == [
        {"type": "reasoning", "text": "Hm.", "provider_data": {"signature": "s"}},
        {"type": "text", "text": "Yes."},
    ]


def test_a_batch_sends_one_delta_per_part_in_order() -> None:
    from conversational_core.replies.assembly import merged

    built = PartsBuilder()
    deltas = [
        built.add(p)
        for p in (
            "a",
            "b",
            Piece("tool_call", "{", key=0, id="c", name="f"),
            Piece("tool_call", "}", key=0),
            "c",
        )
    ]
    sent = merged([d for d in deltas if d is not None])
    assert [(d.part_index, d.text, d.start) for d in sent] == [
        (0, "ab", None),
        (1, "{}", {"tool_call_id": "c", "name": "f"}),
        (2, "c", None),
    ]
