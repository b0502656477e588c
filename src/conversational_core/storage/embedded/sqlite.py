"""The embedded store: one SQLite file, used when REDIS_URL is not set.

It behaves like :class:`~conversational_core.storage.redis.store.RedisStore` from the outside (same
exceptions, pagination, idempotency and ownership rules); only the mechanics differ. Where Redis
would silently do something wrong on a caller bug, this store refuses instead: a conversation or
message id that already exists raises AlreadyExists (Redis overwrites it), and `changes` outside
CONVERSATION_MUTABLE raise ValueError. A conversation creation and its idempotency record are
written in one transaction (Redis writes the record first, in a separate step), and so is a
fork (Redis writes the copies first, then their conversation). An append of no messages raises
ValueError.

Layout (`DATA_DIR/conversational-core.db`, schema 3; database.py has the SQL, upgrade.py how a
file of schema 1 or 2 becomes one):

    conversations  id, user_id, data (JSON of the settings), updated_at, activity_ms,
                   message_count, seq (last position given), version, active_leaf_id
                   + index (user_id, activity_ms DESC, id DESC) for the per-user list
    messages       (conversation_id, seq) primary key, id (unique per conversation),
                   doc (Message.stored_json(): the message without its ids and sibling position),
                   parent_seq (the parent's seq; NULL for a root)
                   + index (conversation_id, parent_seq, seq): each message's children, in order
    branch         (conversation_id, seq) primary key, detour: the active branch, root to leaf
                   + partial index of its detours (tree.py says what they are)
    idempotency    scope, fingerprint, body (JSON of the first result), expires_at (epoch s)
    reply_queue    (conversation_id, position) primary key, message_id: the replies still to
                   write, oldest first (position is the reply's seq)

Every table but idempotency goes with its conversation (ON DELETE CASCADE). Positions (`seq`) are
given in creation order and never reused; sibling positions are computed on every read (tree.py).
The code is split by subject: conversations, the changes to one message and replies here,
messages and their tree in messages.py and tree.py.

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

import contextlib
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import orjson
from loguru import logger

from conversational_core.storage import events as ev
from conversational_core.storage.base import (
    CompareAndSet,
    ConversationCursor,
    Event,
    Idempotency,
    encode_conversation_cursor,
)
from conversational_core.storage.embedded.database import (
    DB_FILENAME,
    Database,
    IdempotencyRecords,
    first,
    run,
)
from conversational_core.storage.embedded.events import MemoryEventLog
from conversational_core.storage.embedded.jobs import MemoryJobQueue, recover
from conversational_core.storage.embedded.lock import data_dir_lock
from conversational_core.storage.embedded.messages import SqliteMessages
from conversational_core.storage.embedded.records import (
    SELECT_CONVERSATION,
    clamp_int64,
    conversation_data,
    conversation_from_row,
    owned,
)
from conversational_core.storage.embedded.replies import ReplyTracker
from conversational_core.storage.embedded.upgrade import settings_with_defaults
from conversational_core.storage.errors import (
    AlreadyExists,
    NotFound,
    ReplyStopped,
    StaleVersion,
)
from conversational_core.storage.models import (
    CONVERSATION_MUTABLE,
    TEXT,
    Conversation,
    Message,
    Page,
    Part,
    rfc3339_to_ms,
)

# A page of a user's conversations: (activity_ms, id) descending, after an exclusive cursor.
# A row-value comparison, so that SQLite seeks the index straight to the cursor (an OR of the
# two columns would scan the user's whole range from the top).
_LIST_CONVERSATIONS: Final = (
    f"{SELECT_CONVERSATION}, activity_ms, id FROM conversations"
    " WHERE user_id = ? ORDER BY activity_ms DESC, id DESC LIMIT ?"
)
_LIST_CONVERSATIONS_AFTER: Final = (
    f"{SELECT_CONVERSATION}, activity_ms, id FROM conversations"
    " WHERE user_id = ? AND (activity_ms, id) < (?, ?)"
    " ORDER BY activity_ms DESC, id DESC LIMIT ?"
)

# The compare-and-set of a message: it writes only if the conversation is visible to the owner
# (NULL: anyone) and the stored document is the expected one; it returns the message's sibling
# position (for its event), so that the whole change is one statement.
_REPLACE: Final = (
    "UPDATE messages SET doc = ?1 WHERE conversation_id = ?2 AND id = ?3 AND doc = ?4"
    " AND EXISTS (SELECT 1 FROM conversations WHERE id = ?2 AND (?5 IS NULL OR user_id = ?5))"
    " RETURNING"
    " (SELECT COUNT(*) FROM messages AS s WHERE s.conversation_id = messages.conversation_id"
    " AND s.parent_seq IS messages.parent_seq),"
    " (SELECT COUNT(*) FROM messages AS s WHERE s.conversation_id = messages.conversation_id"
    " AND s.parent_seq IS messages.parent_seq AND s.seq < messages.seq)"
)


class SqliteStore(SqliteMessages, CompareAndSet):
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
        """The store in the database at `path` (created, or upgraded, if needed)."""
        db = await Database.open(path)
        return cls(db, events=events, on_reply=on_reply, lease_seconds=lease_seconds)

    async def ping(self) -> None:
        await self._db.ping()

    async def close(self) -> None:
        await self._db.close()

    # Conversations -------------------------------------------------------------------------------

    async def create_conversation(
        self, conversation: Conversation, idempotency: Idempotency | None = None
    ) -> tuple[Conversation, bool]:
        scope = f"c:{conversation.user_id}:{idempotency.key}" if idempotency else ""
        async with self._db.session("IMMEDIATE") as db:
            if idempotency is not None:
                previous = await self._idempotency.replay(db, scope, idempotency)
                if previous is not None:
                    # A record may predate the settings added with trees.
                    doc = settings_with_defaults(orjson.loads(previous))
                    return Conversation(**doc), True
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
                        conversation_data(conversation),
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
        return conversation_from_row(row)

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
                        clamp_int64(after.activity_ms),
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
            next_cursor = encode_conversation_cursor(ConversationCursor(int(last[6]), last[7]))
        return Page([conversation_from_row(r) for r in page], next_cursor)

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
            current = conversation_from_row(
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
                    conversation_data(updated),
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
            # Messages, branch and reply queue go by ON DELETE CASCADE.
            await run(db, "DELETE FROM conversations WHERE id = ?", (conversation_id,))
            # Its append idempotency records can never be replayed now (appends to a missing
            # conversation fail first); drop them rather than wait for expiry. ';' follows ':'.
            await run(
                db,
                "DELETE FROM idempotency WHERE scope >= ? AND scope < ?",
                (f"m:{conversation_id}:", f"m:{conversation_id};"),
            )
            # Its replies stop (publish_delta finds them gone) and its event log goes once
            # connected clients have the deletion.
            self._emit(
                conversation_id,
                ev.CONVERSATION_DELETED,
                ev.conversation_deleted_data(conversation_id),
            )
            self._db.after_commit(lambda: self._forget_conversation(conversation_id))
        return conversation_from_row(row)

    def _forget_conversation(self, conversation_id: str) -> None:
        self._replies.conversation_deleted(conversation_id)
        self.events.forget(conversation_id)

    # Changes to a message, each one compare-and-set (see Store) ---------------------------------

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
        forgets the text published so far and lets only that attempt's deltas pass, unless the
        reply was stopped (ReplyStopped)."""
        # The message stays under the parent it is stored with (the one `expected` names, or
        # nothing is written), whatever parent the new copy names.
        parent, expected_body = expected.stored_parts()
        expected_doc = (b'{"parent_id":' + parent + b"," + expected_body + b"}").decode()
        doc = (b'{"parent_id":' + parent + b"," + message.stored_parts()[1] + b"}").decode()
        # Without `ended` the write is one statement, atomic by itself; with it, a transaction.
        async with self._db.session("IMMEDIATE" if ended else None) as db:
            if restart is not None and self._replies.stopped(conversation_id, message.id):
                # Whoever stopped it will cancel it: it must not start again. (A copy that is
                # not the stored one gets None, as without the stop.)
                same = await first(
                    db,
                    "SELECT 1 FROM messages WHERE conversation_id = ? AND id = ? AND doc = ?",
                    (conversation_id, message.id, expected_doc),
                )
                if same is not None:
                    raise ReplyStopped(self._replies.parts(conversation_id, message.id))
            written = await first(
                db,
                _REPLACE,
                (doc, conversation_id, message.id, expected_doc, owner),
            )
            if written is not None:
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
                    placed = message.replace(
                        parent_id=expected.parent_id,
                        sibling_count=int(written[0]),
                        sibling_index=int(written[1]),
                    )
                    self._emit(conversation_id, event, ev.message_data(placed))
                return message
            # Not written: missing (or not owned) or changed meanwhile. Redis answers
            # "Message not found." for a missing conversation here too.
            row = await first(
                db,
                "SELECT c.user_id FROM conversations AS c JOIN messages AS m"
                " ON m.conversation_id = c.id WHERE c.id = ? AND m.id = ?",
                (conversation_id, message.id),
            )
        if row is None or not owned(row[0], owner):
            raise NotFound("Message not found.")
        return None

    # Events and replies --------------------------------------------------------------------

    async def publish_delta(
        self,
        conversation_id: str,
        message_id: str,
        delta: str,
        attempt: int | None = None,
        *,
        part_index: int = 0,
        part_type: str = TEXT,
        start: dict[str, Any] | None = None,
        urgent: bool = False,
    ) -> bool:
        # Called for every token: no write to the file, and usually no read either.
        if not self._replies.allows(conversation_id, message_id, attempt):
            return False
        published = self._replies.published(conversation_id, message_id)
        if published is None:
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
                published = self._replies.known(conversation_id, message_id)
        data = ev.delta_data(message_id, delta, part_index, part_type, start)
        published.append(data)
        self._publish(conversation_id, ev.MESSAGE_DELTA, data)
        return True

    async def published_parts(
        self, conversation_id: str, message_ids: list[str]
    ) -> dict[str, list[Part]]:
        found = {mid: self._replies.parts(conversation_id, mid) for mid in message_ids}
        return {mid: parts for mid, parts in found.items() if parts is not None}

    async def stop_reply(self, conversation_id: str, message_id: str) -> list[Part] | None:
        # Synchronous: no delta can pass between the stop and the read of the parts.
        self._replies.stop(conversation_id, message_id)
        return self._replies.parts(conversation_id, message_id)

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

    async def replies_waiting_for_tools(self) -> list[tuple[str, str]]:
        """(conversation id, message id) of every reply waiting for tool results (on start, to
        look again at their deadlines: read from a partial index, not by a scan)."""
        async with self._db.session() as db:
            rows = await db.execute_fetchall(
                "SELECT conversation_id, id FROM messages"
                " WHERE json_extract(doc, '$.status') = 'requires_action'"
            )
        return [(str(r[0]), str(r[1])) for r in rows]


@contextlib.asynccontextmanager
async def open_sqlite_store(
    data_dir: Path,
    *,
    events_max_len: int = 10_000,
    client_buffer: int = 1000,
    lease_seconds: float = 15.0,
    recover_jobs: bool = True,
) -> AsyncIterator[SqliteStore]:
    """The store in `data_dir` (created if needed; held by this process alone: DataDirInUse
    otherwise), with its event log (`store.events`) and job queue (`store.jobs`, signalled by
    every queued reply); closed on exit. With `recover_jobs`, a job is signalled at once for
    every conversation with replies left by an earlier run."""
    with contextlib.ExitStack() as locked:
        # One process per data directory (lock.py says why); DataDirInUse otherwise.
        locked.enter_context(data_dir_lock(data_dir))  # (non-blocking: no thread needed)
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
