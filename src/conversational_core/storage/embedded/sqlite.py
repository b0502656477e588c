"""The embedded store: one SQLite file, used when REDIS_URL is not set.

It behaves like :class:`~conversational_core.storage.redis.store.RedisStore` from the outside (same
exceptions, pagination, idempotency and ownership rules); only the mechanics differ. Where Redis
would silently do something wrong on a caller bug, this store refuses instead: a conversation or
message id that already exists raises AlreadyExists (Redis overwrites it), and `changes` outside
CONVERSATION_MUTABLE raise ValueError. A conversation creation and its idempotency record are
written in one transaction (Redis writes the record first, in a separate step).

Layout (`DATA_DIR/conversational-core.db`):

    conversations  id, user_id, data (JSON of the settings), updated_at, activity_ms,
                   message_count, seq (last position given), version
                   + index (user_id, activity_ms DESC, id DESC) for the per-user list
    messages       (conversation_id, seq) primary key, id (unique per conversation),
                   doc (the exact JSON of Message.to_json()); deleted with their conversation
    idempotency    scope, fingerprint, body (JSON of the first result), expires_at (epoch s)
    reply_queue    (conversation_id, position) primary key, message_id: the replies still to
                   write, oldest first (position is the reply's seq); deleted with their
                   conversation

Events, jobs and the state of replies being written live in this process's memory (events.py,
jobs.py, replies.py): `store.events` (a MemoryEventLog, which is also the process's EventHub) and
`store.jobs` (a MemoryJobQueue). A write's events are published, and a queued reply signalled,
right after its COMMIT and before the next operation starts (still under the store's lock), so
that events are in commit order and never emitted for a write that rolled back. `publish_delta`
writes nothing to the file: it checks in memory that the reply was neither stopped nor deleted
(the first delta of a reply this process does not know yet costs one primary-key read).
Consequence: the embedded store supports one process (one uvicorn worker, the reply worker in
the API process); several processes on one file would keep their data consistent but would not
see each other's events, jobs or cancellations.

How a connection is opened and shared, and what durability it gives: database.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import aiosqlite
import orjson
from loguru import logger

from conversational_core.storage import events as ev
from conversational_core.storage.base import (
    ConversationCursor,
    Event,
    Idempotency,
    MessageQuery,
    MessageSlice,
    Store,
    encode_conversation_cursor,
)
from conversational_core.storage.embedded.database import (
    DB_FILENAME,
    Database,
    IdempotencyRecords,
    first,
    run,
    run_many,
)
from conversational_core.storage.embedded.events import MemoryEventLog
from conversational_core.storage.embedded.jobs import MemoryJobQueue, recover
from conversational_core.storage.embedded.replies import ReplyTracker
from conversational_core.storage.errors import (
    AlreadyExists,
    NotFound,
    StaleVersion,
    UnknownAnchor,
)
from conversational_core.storage.models import (
    CONVERSATION_MUTABLE,
    Conversation,
    Message,
    MessageStatus,
    Page,
    rfc3339_to_ms,
)

# The conversation's columns that are not in its `data` JSON (they change on their own).
_COLUMN_FIELDS: Final = frozenset({"updated_at", "message_count", "version"})
_CONV_SELECT: Final = "SELECT user_id, data, updated_at, message_count, version FROM conversations"

# A page of a user's conversations: (activity_ms, id) descending, after an exclusive cursor.
# A row-value comparison, so that SQLite seeks the index straight to the cursor (an OR of the
# two columns would scan the user's whole range from the top).
_LIST_CONVERSATIONS: Final = (
    "SELECT user_id, data, updated_at, message_count, version, activity_ms, id"
    " FROM conversations"
    " WHERE user_id = ? ORDER BY activity_ms DESC, id DESC LIMIT ?"
)
_LIST_CONVERSATIONS_AFTER: Final = (
    "SELECT user_id, data, updated_at, message_count, version, activity_ms, id"
    " FROM conversations"
    " WHERE user_id = ? AND (activity_ms, id) < (?, ?)"
    " ORDER BY activity_ms DESC, id DESC LIMIT ?"
)

# A page of messages, keyed by (ascending?, anchored?): whole statements, picked, never assembled.
_PAGE: Final = {
    (True, False): "SELECT seq, doc FROM messages WHERE conversation_id = ?"
    " ORDER BY seq ASC LIMIT ?",
    (True, True): "SELECT seq, doc FROM messages WHERE conversation_id = ? AND seq > ?"
    " ORDER BY seq ASC LIMIT ?",
    (False, False): "SELECT seq, doc FROM messages WHERE conversation_id = ?"
    " ORDER BY seq DESC LIMIT ?",
    (False, True): "SELECT seq, doc FROM messages WHERE conversation_id = ? AND seq < ?"
    " ORDER BY seq DESC LIMIT ?",
}

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

_ENDS: Final = {
    MessageStatus.COMPLETED: ev.MESSAGE_COMPLETED,
    MessageStatus.FAILED: ev.MESSAGE_FAILED,
    MessageStatus.CANCELLED: ev.MESSAGE_CANCELLED,
}


def _owned(user_id: str, owner: str | None) -> bool:
    return owner is None or user_id == owner


def _conversation_data(conversation: Conversation) -> str:
    doc = {
        f.name: getattr(conversation, f.name)
        for f in dataclasses.fields(conversation)
        if f.name not in _COLUMN_FIELDS
    }
    return orjson.dumps(doc).decode()


def _conversation_from_row(row: Sequence[Any]) -> Conversation:
    """From (user_id, data, updated_at, message_count, version, ...)."""
    doc = orjson.loads(row[1])
    doc["updated_at"] = row[2]
    doc["message_count"] = int(row[3])
    doc["version"] = int(row[4])
    return Conversation(**doc)


def _clamp_int64(value: int) -> int:
    # An anchor outside SQLite's integer range would raise OverflowError on binding; clamping
    # keeps its meaning (an exclusive bound beyond every stored seq).
    return max(_INT64_MIN, min(_INT64_MAX, value))


class SqliteStore(Store):
    backend = "sqlite"

    def __init__(
        self,
        db: Database,
        *,
        events: MemoryEventLog | None = None,
        on_reply: Callable[[str], None] | None = None,
        lease_seconds: float = 15.0,
    ) -> None:
        """`events` receives every event (a default log when None); `on_reply` is called with
        the conversation id after a commit that queued a reply (default: `self.jobs.signal`)."""
        self._db = db
        self._idempotency = IdempotencyRecords()
        self.events = events if events is not None else MemoryEventLog()
        self.jobs = MemoryJobQueue(self.reply_queue_head, lease_seconds=lease_seconds)
        self._on_reply = on_reply if on_reply is not None else self.jobs.signal
        self._replies = ReplyTracker()

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        events: MemoryEventLog | None = None,
        on_reply: Callable[[str], None] | None = None,
        lease_seconds: float = 15.0,
    ) -> SqliteStore:
        """The store in the database at `path` (created if needed)."""
        db = await Database.open(path)
        return cls(db, events=events, on_reply=on_reply, lease_seconds=lease_seconds)

    # Plumbing ------------------------------------------------------------------------------------

    def _emit(self, conversation_id: str, type: str, data: bytes) -> None:
        """Publish an event once the current operation has committed."""
        self._db.after_commit(lambda: self._publish(conversation_id, type, data))

    def _publish(self, conversation_id: str, type: str, data: bytes) -> None:
        self.events.publish(conversation_id, type, data)

    async def _conversation_row(
        self, db: aiosqlite.Connection, conversation_id: str, owner: str | None
    ) -> sqlite3.Row:
        row = await first(db, f"{_CONV_SELECT} WHERE id = ?", (conversation_id,))
        if row is None or not _owned(row[0], owner):
            raise NotFound("Conversation not found.")
        return row

    # Store ---------------------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._db.ping()

    async def close(self) -> None:
        await self._db.close()

    async def create_conversation(
        self, conversation: Conversation, idempotency: Idempotency | None = None
    ) -> tuple[Conversation, bool]:
        scope = f"c:{conversation.user_id}:{idempotency.key}" if idempotency else ""
        async with self._db.session("IMMEDIATE") as db:
            if idempotency is not None:
                previous = await self._idempotency.replay(db, scope, idempotency)
                if previous is not None:
                    return Conversation(**orjson.loads(previous)), True
            try:
                # Like Redis, a new conversation starts with no messages whatever it says.
                await run(
                    db,
                    "INSERT INTO conversations"
                    " (id, user_id, data, updated_at, activity_ms, message_count, seq, version)"
                    " VALUES (?, ?, ?, ?, ?, 0, 0, ?)",
                    (
                        conversation.id,
                        conversation.user_id,
                        _conversation_data(conversation),
                        conversation.updated_at,
                        rfc3339_to_ms(conversation.updated_at),
                        conversation.version,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists("A conversation with this id already exists.") from exc
            if idempotency is not None:
                await self._idempotency.remember(
                    db, scope, idempotency, conversation.to_json().decode()
                )
        return conversation, False

    async def get_conversation(self, conversation_id: str, owner: str | None) -> Conversation:
        async with self._db.session() as db:
            row = await self._conversation_row(db, conversation_id, owner)
        return _conversation_from_row(row)

    async def list_conversations(
        self, user_id: str, limit: int, after: ConversationCursor | None
    ) -> Page[Conversation]:
        async with self._db.session() as db:
            if after is None:
                rows = await db.execute_fetchall(_LIST_CONVERSATIONS, (user_id, limit + 1))
            else:
                rows = await db.execute_fetchall(
                    _LIST_CONVERSATIONS_AFTER,
                    (
                        user_id,
                        _clamp_int64(after.activity_ms),
                        after.conversation_id,
                        limit + 1,
                    ),
                )
        found = list(rows)
        has_more = len(found) > limit
        page = found[:limit]
        next_cursor = None
        if has_more and page:
            last = page[-1]
            # The cursor is the stored activity (what the order is by), as Redis uses the score.
            next_cursor = encode_conversation_cursor(ConversationCursor(int(last[5]), last[6]))
        return Page([_conversation_from_row(r) for r in page], next_cursor)

    async def update_conversation(
        self,
        conversation_id: str,
        owner: str | None,
        changes: dict[str, Any],
        expected_version: int | None,
        now: str,
    ) -> Conversation:
        unknown = set(changes) - set(CONVERSATION_MUTABLE)
        if unknown:
            # A caller bug, not a client error: the HTTP layer only passes mutable fields.
            raise ValueError(f"not mutable conversation fields: {sorted(unknown)}")
        async with self._db.session("IMMEDIATE") as db:
            current = _conversation_from_row(
                await self._conversation_row(db, conversation_id, owner)
            )
            if expected_version is not None and current.version != expected_version:
                raise StaleVersion()
            updated = dataclasses.replace(
                current, **changes, updated_at=now, version=current.version + 1
            )
            # MAX: activity only moves forward (Redis: ZADD GT), even if the clock steps back.
            await run(
                db,
                "UPDATE conversations SET data = ?, updated_at = ?,"
                " activity_ms = MAX(activity_ms, ?), version = ? WHERE id = ?",
                (
                    _conversation_data(updated),
                    now,
                    rfc3339_to_ms(now),
                    updated.version,
                    conversation_id,
                ),
            )
            self._emit(conversation_id, ev.CONVERSATION_UPDATED, ev.conversation_data(updated))
        return updated

    async def delete_conversation(self, conversation_id: str, owner: str | None) -> Conversation:
        async with self._db.session("IMMEDIATE") as db:
            row = await self._conversation_row(db, conversation_id, owner)
            # Messages go by ON DELETE CASCADE.
            await run(db, "DELETE FROM conversations WHERE id = ?", (conversation_id,))
            # Its append idempotency records can never be replayed now (appends to a missing
            # conversation fail first); drop them rather than wait for expiry. ';' follows ':'.
            await run(
                db,
                "DELETE FROM idempotency WHERE scope >= ? AND scope < ?",
                (f"m:{conversation_id}:", f"m:{conversation_id};"),
            )
            # Its reply queue goes by ON DELETE CASCADE; its replies stop (publish_delta finds
            # them gone) and its event log goes once connected clients have the deletion.
            self._emit(
                conversation_id,
                ev.CONVERSATION_DELETED,
                ev.conversation_deleted_data(conversation_id),
            )
            self._db.after_commit(lambda: self._forget_conversation(conversation_id))
        return _conversation_from_row(row)

    def _forget_conversation(self, conversation_id: str) -> None:
        self._replies.conversation_deleted(conversation_id)
        self.events.forget(conversation_id)

    # Messages ------------------------------------------------------------------------------------

    async def append_messages(
        self,
        conversation_id: str,
        owner: str | None,
        messages: list[Message],
        now: str,
        idempotency: Idempotency | None = None,
        reply_id: str | None = None,
    ) -> tuple[list[Message], bool]:
        reply_index: int | None = None
        if reply_id is not None:
            reply_index = next((i for i, m in enumerate(messages) if m.id == reply_id), None)
            if reply_index is None:  # a caller bug: Redis would queue an id with no message
                raise ValueError("reply_id is not one of the messages")
        docs = [m.to_json().decode() for m in messages]
        scope = f"m:{conversation_id}:{owner or '*'}:{idempotency.key}" if idempotency else ""
        async with self._db.session("IMMEDIATE") as db:
            row = await first(
                db, "SELECT user_id, seq FROM conversations WHERE id = ?", (conversation_id,)
            )
            if row is None or not _owned(row[0], owner):
                raise NotFound("Conversation not found.")
            if idempotency is not None:
                previous = await self._idempotency.replay(db, scope, idempotency)
                if previous is not None:
                    return [Message.from_dict(d) for d in orjson.loads(previous)], True
            last_seq = int(row[1])
            try:
                await run_many(
                    db,
                    "INSERT INTO messages (conversation_id, seq, id, doc) VALUES (?, ?, ?, ?)",
                    (
                        (conversation_id, last_seq + i, m.id, doc)
                        for i, (m, doc) in enumerate(zip(messages, docs, strict=True), start=1)
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists("A message with this id already exists.") from exc
            n = len(messages)
            await run(
                db,
                "UPDATE conversations SET seq = seq + ?, message_count = message_count + ?,"
                " updated_at = ?, activity_ms = MAX(activity_ms, ?) WHERE id = ?",
                (n, n, now, rfc3339_to_ms(now), conversation_id),
            )
            if reply_index is not None:
                await run(
                    db,
                    "INSERT INTO reply_queue (conversation_id, position, message_id)"
                    " VALUES (?, ?, ?)",
                    (conversation_id, last_seq + reply_index + 1, reply_id),
                )
            if idempotency is not None:
                await self._idempotency.remember(db, scope, idempotency, "[" + ",".join(docs) + "]")
            for m in messages:
                self._emit(conversation_id, ev.MESSAGE_CREATED, ev.message_data(m))
            if reply_index is not None:
                self._db.after_commit(lambda: self._on_reply(conversation_id))
        return messages, False

    async def get_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Message:
        async with self._db.session() as db:
            # One statement: the owner check and the message read see the same state.
            row = await first(
                db,
                "SELECT c.user_id, m.doc FROM conversations AS c"
                " LEFT JOIN messages AS m ON m.conversation_id = c.id AND m.id = ?"
                " WHERE c.id = ?",
                (message_id, conversation_id),
            )
        if row is None or not _owned(row[0], owner):
            raise NotFound("Conversation not found.")
        if row[1] is None:
            raise NotFound("Message not found.")
        return Message.from_json(row[1])

    async def list_messages(
        self, conversation_id: str, owner: str | None, query: MessageQuery
    ) -> MessageSlice:
        async with self._db.session("DEFERRED") as db:
            row = await first(
                db,
                "SELECT c.user_id,"
                " (SELECT seq FROM messages WHERE conversation_id = c.id AND id = ?)"
                " FROM conversations AS c WHERE c.id = ?",
                (query.anchor_id or "", conversation_id),
            )
            if row is None or not _owned(row[0], owner):
                raise NotFound("Conversation not found.")
            anchor: int | None = None
            if query.anchor_id:  # an id takes precedence over a position, as in Redis
                if row[1] is None:
                    raise UnknownAnchor()
                anchor = int(row[1])
            elif query.anchor_seq is not None:
                anchor = _clamp_int64(query.anchor_seq)
            # Walking forward through an ascending list, or backward through a descending one,
            # reads seqs upwards; the other two combinations read them downwards.
            ascending = query.descending == query.backward
            sql = _PAGE[(ascending, anchor is not None)]
            params: tuple[Any, ...] = (
                (conversation_id, query.limit + 1)
                if anchor is None
                else (conversation_id, anchor, query.limit + 1)
            )
            rows = list(await db.execute_fetchall(sql, params))
        has_more = len(rows) > query.limit
        rows = rows[: query.limit]
        if query.backward:
            # Read nearest-first from the anchor; the page is returned in list order.
            rows.reverse()
        # The stored documents are exactly Message.to_json(): handed over undecoded.
        return MessageSlice(
            None, [int(r[0]) for r in rows], has_more, raw=[str(r[1]).encode() for r in rows]
        )

    # Changes to a message, each one compare-and-set (see Store) ---------------------------------

    async def update_message(
        self, conversation_id: str, owner: str | None, message: Message, expected: Message
    ) -> Message | None:
        return await self._replace(conversation_id, owner, message, expected, ev.MESSAGE_UPDATED)

    async def start_attempt(
        self, conversation_id: str, reply: Message, expected: Message, attempt: int
    ) -> Message | None:
        stored = await self._replace(
            conversation_id, None, reply, expected, ev.MESSAGE_UPDATED, restart=attempt
        )
        return stored

    async def flush_reply(
        self, conversation_id: str, reply: Message, expected: Message
    ) -> Message | None:
        return await self._replace(conversation_id, None, reply, expected, None)

    async def finish_reply(
        self, conversation_id: str, reply: Message, expected: Message
    ) -> Message | None:
        return await self._replace(
            conversation_id, None, reply, expected, _ENDS[reply.status], ended=True
        )

    async def cancel_reply(
        self, conversation_id: str, owner: str | None, reply: Message, expected: Message
    ) -> Message | None:
        return await self._replace(
            conversation_id, owner, reply, expected, ev.MESSAGE_CANCELLED, ended=True
        )

    async def _replace(
        self,
        conversation_id: str,
        owner: str | None,
        message: Message,
        expected: Message,
        event: str | None,
        *,
        ended: bool = False,
        restart: int | None = None,
    ) -> Message | None:
        """Store `message` if the stored one is still `expected` (else None). With `event`,
        emit it; `ended` takes the reply off the queue and refuses its later deltas; `restart`
        forgets the text published so far and lets only that attempt's deltas pass."""
        # Without `ended` the write is one statement, atomic by itself; with it, a transaction.
        async with self._db.session("IMMEDIATE" if ended else None) as db:
            # The compare-and-set: it writes only if the conversation is visible to `owner` and
            # the stored JSON is `expected`.
            changed = await run(
                db,
                "UPDATE messages SET doc = ? WHERE conversation_id = ? AND id = ? AND doc = ?"
                " AND EXISTS (SELECT 1 FROM conversations"
                " WHERE id = ? AND (? IS NULL OR user_id = ?))",
                (
                    message.to_json().decode(),
                    conversation_id,
                    message.id,
                    expected.to_json().decode(),
                    conversation_id,
                    owner,
                    owner,
                ),
            )
            if changed:
                if ended:
                    await run(
                        db,
                        "DELETE FROM reply_queue WHERE conversation_id = ? AND message_id = ?",
                        (conversation_id, message.id),
                    )
                    self._db.after_commit(lambda: self._replies.ended(conversation_id, message.id))
                elif restart is not None:
                    self._db.after_commit(
                        lambda: self._replies.restarted(conversation_id, message.id, restart)
                    )
                if event is not None:
                    self._emit(conversation_id, event, ev.message_data(message))
                return message
            # Not written: missing (or not owned) or changed meanwhile. Redis answers
            # "Message not found." for a missing conversation here too.
            row = await first(
                db,
                "SELECT c.user_id FROM conversations AS c JOIN messages AS m"
                " ON m.conversation_id = c.id WHERE c.id = ? AND m.id = ?",
                (conversation_id, message.id),
            )
        if row is None or not _owned(row[0], owner):
            raise NotFound("Message not found.")
        return None

    async def delete_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Message:
        async with self._db.session("IMMEDIATE") as db:
            row = await first(
                db,
                "SELECT c.user_id, m.doc FROM conversations AS c JOIN messages AS m"
                " ON m.conversation_id = c.id WHERE c.id = ? AND m.id = ?",
                (conversation_id, message_id),
            )
            # As in Redis, a missing conversation reads "Message not found." here.
            if row is None or not _owned(row[0], owner):
                raise NotFound("Message not found.")
            await run(
                db,
                "DELETE FROM messages WHERE conversation_id = ? AND id = ?",
                (conversation_id, message_id),
            )
            # Only the count: the seq counter never goes back, so positions are never reused.
            await run(
                db,
                "UPDATE conversations SET message_count = message_count - 1 WHERE id = ?",
                (conversation_id,),
            )
            await run(
                db,
                "DELETE FROM reply_queue WHERE conversation_id = ? AND message_id = ?",
                (conversation_id, message_id),
            )
            self._db.after_commit(lambda: self._replies.deleted(conversation_id, message_id))
            self._emit(conversation_id, ev.MESSAGE_DELETED, ev.message_deleted_data(message_id))
        return Message.from_json(row[1])

    # Events and replies --------------------------------------------------------------------

    async def publish_delta(
        self, conversation_id: str, message_id: str, delta: str, attempt: int | None = None
    ) -> bool:
        # Called for every token: no write to the file, and usually no read either.
        if not self._replies.allows(conversation_id, message_id, attempt):
            return False
        parts = self._replies.published(conversation_id, message_id)
        if parts is None:
            # A reply this process does not know as existing: check the file once. Under the
            # lock, so that a delete committing later also drops what is registered here.
            async with self._db.session() as db:
                row = await first(
                    db,
                    "SELECT 1 FROM messages WHERE conversation_id = ? AND id = ?",
                    (conversation_id, message_id),
                )
                if row is None or not self._replies.allows(conversation_id, message_id, attempt):
                    return False
                parts = self._replies.known(conversation_id, message_id)
        parts.append(delta)
        self._publish(conversation_id, ev.MESSAGE_DELTA, ev.delta_data(message_id, delta))
        return True

    async def stop_reply(self, conversation_id: str, message_id: str) -> str | None:
        # Synchronous: no delta can pass between the stop and the read of the text.
        self._replies.stop(conversation_id, message_id)
        parts = self._replies.published(conversation_id, message_id)
        return "".join(parts) if parts else None

    async def read_events(self, conversation_id: str, after: str | None, limit: int) -> list[Event]:
        return self.events.read(conversation_id, after, limit)

    async def last_event_id(self, conversation_id: str) -> str | None:
        return self.events.last_id(conversation_id)

    async def reply_queue_head(self, conversation_id: str) -> str | None:
        async with self._db.session() as db:
            row = await first(
                db,
                "SELECT message_id FROM reply_queue WHERE conversation_id = ?"
                " ORDER BY position LIMIT 1",
                (conversation_id,),
            )
        return None if row is None else str(row[0])

    async def conversations_with_replies(self) -> list[str]:
        """Every conversation whose reply queue is not empty (to signal their jobs on start)."""
        async with self._db.session() as db:
            rows = await db.execute_fetchall("SELECT DISTINCT conversation_id FROM reply_queue")
        return [str(r[0]) for r in rows]


@contextlib.asynccontextmanager
async def open_sqlite_store(
    data_dir: Path,
    *,
    events_max_len: int = 10_000,
    client_buffer: int = 1000,
    lease_seconds: float = 15.0,
    recover_jobs: bool = True,
) -> AsyncIterator[SqliteStore]:
    """The store in `data_dir` (created if needed), with its event log (`store.events`) and job
    queue (`store.jobs`, signalled by every queued reply); closed on exit. With `recover_jobs`,
    a job is signalled at once for every conversation with replies left by an earlier run."""
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    events = MemoryEventLog(events_max_len, client_buffer)
    store = await SqliteStore.open(
        data_dir / DB_FILENAME, events=events, lease_seconds=lease_seconds
    )
    try:
        if recover_jobs:
            found = await recover(store)
            if found:
                logger.info("{} conversation(s) have replies left to write", found)
        yield store
    finally:
        await events.close()
        await store.jobs.close()
        await store.close()
