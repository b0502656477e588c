"""How the embedded store's rows become records, and what every part of the store holds (the
store is split by subject: conversations and replies in sqlite.py, messages and their tree in
messages.py and tree.py)."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Final

import aiosqlite
import orjson

from conversational_core.storage.embedded.database import Database, IdempotencyRecords, first
from conversational_core.storage.embedded.events import MemoryEventLog
from conversational_core.storage.embedded.replies import ReplyTracker
from conversational_core.storage.errors import NotFound
from conversational_core.storage.models import Conversation

# The conversation's columns that are not in its `data` JSON (they change on their own).
COLUMN_FIELDS: Final = frozenset({"updated_at", "message_count", "version", "active_leaf_id"})
# A conversation row as conversation_from_row takes it; statements add their FROM.
SELECT_CONVERSATION: Final = (
    "SELECT user_id, data, updated_at, message_count, version, active_leaf_id"
)

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


def owned(user_id: str, owner: str | None) -> bool:
    return owner is None or user_id == owner


def clamp_int64(value: int) -> int:
    # A position outside SQLite's integer range would raise OverflowError on binding; clamping
    # keeps its meaning (an exclusive bound beyond every stored seq).
    return max(INT64_MIN, min(INT64_MAX, value))


def conversation_data(conversation: Conversation) -> str:
    """The `data` column: every field of the conversation but those with a column of their own."""
    doc = {
        f.name: getattr(conversation, f.name)
        for f in dataclasses.fields(conversation)
        if f.name not in COLUMN_FIELDS
    }
    return orjson.dumps(doc).decode()


def conversation_from_row(row: Sequence[Any]) -> Conversation:
    """From SELECT_CONVERSATION's columns (and maybe more after them)."""
    doc = orjson.loads(row[1])
    doc["updated_at"] = row[2]
    doc["message_count"] = int(row[3])
    doc["version"] = int(row[4])
    doc["active_leaf_id"] = row[5]
    return Conversation(**doc)


def message_json(conversation_id: str, message_id: str, doc: str, count: int, index: int) -> bytes:
    """A message as clients see it (exactly Message.to_json()), from its stored document
    (Message.stored_json(): `{"parent_id":…,<the fields from role to context>}`), its ids and
    its sibling position, by concatenation: a page is built without decoding JSON."""
    head = (
        '{"id":'
        + orjson.dumps(message_id).decode()
        + ',"conversation_id":'
        + orjson.dumps(conversation_id).decode()
        + ","
    )
    return (head + doc[1:-1] + f',"sibling_count":{count},"sibling_index":{index}}}').encode()


class SqliteParts:
    """What every part of the embedded store holds, and its plumbing."""

    _db: Database
    _idempotency: IdempotencyRecords
    _replies: ReplyTracker
    _on_reply: Callable[[str], None]
    events: MemoryEventLog

    def _emit(self, conversation_id: str, type: str, data: bytes) -> None:
        """Publish an event once the current operation has committed."""
        self._db.after_commit(lambda: self._publish(conversation_id, type, data))

    def _publish(self, conversation_id: str, type: str, data: bytes) -> None:
        self.events.publish(conversation_id, type, data)

    async def _conversation_row(
        self, db: aiosqlite.Connection, conversation_id: str, owner: str | None
    ) -> sqlite3.Row:
        row = await first(
            db, f"{SELECT_CONVERSATION} FROM conversations WHERE id = ?", (conversation_id,)
        )
        if row is None or not owned(row[0], owner):
            raise NotFound("Conversation not found.")
        return row
