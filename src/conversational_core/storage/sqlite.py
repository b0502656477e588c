"""The embedded store: one SQLite file, used when REDIS_URL is not set.

It behaves like :class:`~conversational_core.storage.redis.RedisStore` from the outside (same
exceptions, pagination, idempotency and ownership rules); only the mechanics differ. Where Redis
would silently do something wrong on a caller bug, this store refuses instead: a conversation or
message id that already exists raises Conflict (Redis overwrites it), and `changes` outside
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

Events, jobs and the state of replies being written live in this process's memory (see
`storage/memory.py`): `store.events` (a MemoryEventLog, which is also the process's EventHub) and
`store.jobs` (a MemoryJobQueue). A write's events are published, and a queued reply signalled,
right after its COMMIT and before the next operation starts (still under the store's lock), so
that events are in commit order and never emitted for a write that rolled back. `publish_delta`
writes nothing to the file: it checks in memory that the reply was neither stopped nor deleted
(the first delta of a reply this process does not know yet costs one primary-key read).
Consequence: the embedded store supports one process (one uvicorn worker, the reply worker in
the API process); several processes on one file would keep their data consistent but would not
see each other's events, jobs or cancellations.

Concurrency. aiosqlite runs every statement of a connection on one worker thread, so a single
connection gives no parallelism to lose, and it spares us cross-connection locking inside one
process. But statements of one connection share its transaction: a statement issued by one
coroutine while another coroutine's transaction is open would run *inside* that transaction
(reading its uncommitted rows, or being rolled back with it). So every operation, reads included,
holds one asyncio.Lock for its duration; writes that read before they write run in
`BEGIN IMMEDIATE ... COMMIT`, which takes SQLite's write lock up front so that the
read-modify-write cannot interleave with another process (several uvicorn workers may share the
file; the busy timeout makes them queue instead of failing at once).

Durability: WAL journal with `synchronous=NORMAL`. A committed transaction survives a crash of
the process; a power loss may lose the last few commits but never corrupts the file. That is the
same promise as Redis with `appendfsync everysec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import aiosqlite
import orjson
from loguru import logger

from conversational_core.errors import Conflict, NotFound, PreconditionFailed, StoreUnavailable
from conversational_core.storage import events as ev
from conversational_core.storage.base import (
    ConversationCursor,
    Event,
    Idempotency,
    IdempotencyMismatch,
    MessageQuery,
    MessageSlice,
    Store,
    UnknownAnchor,
    encode_conversation_cursor,
)
from conversational_core.storage.memory import MemoryEventLog, MemoryJobQueue, recover
from conversational_core.storage.models import (
    CONVERSATION_MUTABLE,
    Conversation,
    Message,
    Page,
    rfc3339_to_ms,
)

DB_FILENAME: Final = "conversational-core.db"

# How long a statement waits for another process's write lock before SQLite reports it busy
# (then the caller gets StoreUnavailable, a 503 with Retry-After).
BUSY_TIMEOUT_MS: Final = 5000

# Expired idempotency rows are invisible (every lookup filters on expires_at) and only take
# space, so deleting them is housekeeping: at most once a minute, piggybacked on an insert.
_PURGE_INTERVAL_S: Final = 60.0

# Bumped when the schema changes incompatibly; a file written by a newer version is refused
# rather than misread.
_SCHEMA_VERSION: Final = 2  # 2: reply_queue

# How long a stopped (cancelled) reply keeps refusing deltas (Redis: the stop flag's TTL); far
# longer than any reply takes to notice.
_STOP_TTL_S: Final = 86_400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    data          TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    activity_ms   INTEGER NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0,
    seq           INTEGER NOT NULL DEFAULT 0,
    version       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_activity
    ON conversations (user_id, activity_ms DESC, id DESC);

CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    id              TEXT NOT NULL,
    doc             TEXT NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_id ON messages (conversation_id, id);

CREATE TABLE IF NOT EXISTS idempotency (
    scope       TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    body        TEXT NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_by_expiry ON idempotency (expires_at);

CREATE TABLE IF NOT EXISTS reply_queue (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    position        INTEGER NOT NULL,
    message_id      TEXT NOT NULL,
    PRIMARY KEY (conversation_id, position)
);
"""

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

# SQLite's primary result codes that mean "the database cannot be used right now" (locked by
# another process past the busy timeout, I/O failure, file gone or unwritable, disk full), as
# opposed to a bug in a statement, which must surface as one.
_UNAVAILABLE_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_READONLY,
    }
)

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

TransactionMode = Literal["IMMEDIATE", "DEFERRED"]


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF in _UNAVAILABLE_CODES:
            raise StoreUnavailable() from exc
        raise
    except sqlite3.ProgrammingError as exc:
        # "Cannot operate on a closed database": the store is shutting down.
        if "closed" in str(exc):
            raise StoreUnavailable() from exc
        raise


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


async def _first(db: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> sqlite3.Row | None:
    rows = await db.execute_fetchall(sql, params)
    return next(iter(rows), None)


async def _run(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """Execute one statement; returns the number of rows it changed."""
    async with db.execute(sql, params) as cursor:
        return cursor.rowcount


async def _run_many(db: aiosqlite.Connection, sql: str, params: Iterable[Sequence[Any]]) -> None:
    async with db.executemany(sql, params):
        pass


class SqliteStore(Store):
    backend = "sqlite"

    def __init__(
        self,
        db: aiosqlite.Connection,
        *,
        events: MemoryEventLog | None = None,
        on_reply: Callable[[str], None] | None = None,
        lease_seconds: float = 15.0,
    ) -> None:
        """`events` receives every event (a default log when None); `on_reply` is called with
        the conversation id after a commit that queued a reply (default: `self.jobs.signal`)."""
        self._db: aiosqlite.Connection | None = db
        self._lock = asyncio.Lock()
        self._last_purge = float("-inf")
        self.events = events if events is not None else MemoryEventLog()
        self.jobs = MemoryJobQueue(self.reply_queue_head, lease_seconds=lease_seconds)
        self._on_reply = on_reply if on_reply is not None else self.jobs.signal
        # Effects of the operation in progress, run once it has committed (see _session).
        self._effects: list[Callable[[], None]] = []
        # Replies known to exist (conversation id -> message id -> deltas published since the
        # reply (re)started): publish_delta's fast path. Dropped when the message or its
        # conversation is deleted, so that the next delta finds it gone.
        self._replies: dict[str, dict[str, list[str]]] = {}
        # Stopped replies (conversation id, message id) -> until when (monotonic), oldest first.
        self._stopped: OrderedDict[tuple[str, str], float] = OrderedDict()
        # The attempt being written of each reply in progress (see replace_message(restart)).
        self._attempts: dict[tuple[str, str], int] = {}

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        events: MemoryEventLog | None = None,
        on_reply: Callable[[str], None] | None = None,
        lease_seconds: float = 15.0,
    ) -> SqliteStore:
        """Connect to (creating if needed) the database at `path` and ensure the schema."""
        # isolation_level=None: the sqlite3 module must not open transactions behind our back;
        # every transaction here is an explicit BEGIN.
        db = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            rows = await db.execute_fetchall("PRAGMA journal_mode=WAL")
            mode = next(iter(rows))[0]
            if str(mode).lower() != "wal":
                # E.g. a network filesystem without shared memory: still correct, less concurrent.
                logger.warning("SQLite store at {} runs in journal mode {}, not WAL", path, mode)
            await _run(db, "PRAGMA synchronous=NORMAL")
            await _run(db, "PRAGMA foreign_keys=ON")
            await _run(db, f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            row = await _first(db, "PRAGMA user_version", ())
            found = int(row[0]) if row is not None else 0
            if found > _SCHEMA_VERSION:
                raise RuntimeError(
                    f"{path} was written by a newer version (schema {found}, this one knows "
                    f"{_SCHEMA_VERSION}); refusing to open it"
                )
            # One IMMEDIATE transaction so that workers starting together do not race on it.
            await db.executescript(
                f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={_SCHEMA_VERSION};COMMIT;"
            )
        except BaseException:
            await db.close()
            raise
        return cls(db, events=events, on_reply=on_reply, lease_seconds=lease_seconds)

    # Plumbing ------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _session(
        self, mode: TransactionMode | None = None
    ) -> AsyncIterator[aiosqlite.Connection]:
        """Exclusive use of the connection, optionally inside a transaction (see module doc).

        `IMMEDIATE` for read-modify-write, `DEFERRED` for several reads that must agree (another
        process may write between them), None for a single statement (atomic by itself).

        Effects registered with :meth:`_after_commit` run once the operation has committed,
        still under the lock (so in commit order); they are dropped if it fails.
        """
        async with self._lock:
            db = self._db
            if db is None:
                raise StoreUnavailable()
            self._effects = []
            try:
                with _guard():
                    if mode is None:
                        yield db
                    else:
                        await self._begin(db, mode)
                        try:
                            yield db
                            await _run(db, "COMMIT")
                        except BaseException:
                            # Also on cancellation: the ROLLBACK is queued on the worker thread
                            # before any later statement, so the next holder of the lock starts
                            # clean.
                            with contextlib.suppress(sqlite3.Error, ValueError):
                                await db.rollback()
                            raise
                effects, self._effects = self._effects, []
                for effect in effects:
                    try:
                        effect()
                    except Exception:  # a bug; the write itself is done, report it as such
                        logger.exception("effect of a committed write failed")
            finally:
                self._effects = []

    def _after_commit(self, effect: Callable[[], None]) -> None:
        self._effects.append(effect)

    def _emit(self, conversation_id: str, type: str, data: bytes) -> None:
        """Publish an event once the current operation has committed."""
        self._after_commit(lambda: self._publish(conversation_id, type, data))

    def _publish(self, conversation_id: str, type: str, data: bytes) -> None:
        self.events.publish(conversation_id, type, data)

    @staticmethod
    async def _begin(db: aiosqlite.Connection, mode: TransactionMode) -> None:
        try:
            await _run(db, f"BEGIN {mode}")
        except sqlite3.OperationalError as exc:
            # Only if an earlier ROLLBACK failed and left a transaction open: end it, retry once.
            if "within a transaction" not in str(exc):
                raise
            await db.rollback()
            await _run(db, f"BEGIN {mode}")

    async def _conversation_row(
        self, db: aiosqlite.Connection, conversation_id: str, owner: str | None
    ) -> sqlite3.Row:
        row = await _first(db, f"{_CONV_SELECT} WHERE id = ?", (conversation_id,))
        if row is None or not _owned(row[0], owner):
            raise NotFound("Conversation not found.")
        return row

    async def _replay(
        self, db: aiosqlite.Connection, scope: str, idempotency: Idempotency
    ) -> str | None:
        """The stored result for this key, None if there is none (or it expired); raises
        IdempotencyMismatch if the key was used with another request body."""
        row = await _first(
            db,
            "SELECT fingerprint, body FROM idempotency WHERE scope = ? AND expires_at > ?",
            (scope, time.time()),
        )
        if row is None:
            return None
        if row[0] != idempotency.fingerprint:
            raise IdempotencyMismatch()
        return str(row[1])

    async def _remember(
        self, db: aiosqlite.Connection, scope: str, idempotency: Idempotency, body: str
    ) -> None:
        now = time.time()
        # REPLACE: an expired record of the same scope may still be there, not yet purged.
        await _run(
            db,
            "INSERT OR REPLACE INTO idempotency (scope, fingerprint, body, expires_at)"
            " VALUES (?, ?, ?, ?)",
            (scope, idempotency.fingerprint, body, now + idempotency.ttl_seconds),
        )
        # Wall clock for expiry (it must mean the same after a restart), monotonic for cadence.
        if time.monotonic() - self._last_purge >= _PURGE_INTERVAL_S:
            await _run(db, "DELETE FROM idempotency WHERE expires_at <= ?", (now,))
            self._last_purge = time.monotonic()

    # Store ---------------------------------------------------------------------------------------

    async def ping(self) -> None:
        # Without the lock: SELECT 1 reads no table, so it cannot observe another coroutine's
        # open transaction, and a health check should not queue behind writes.
        db = self._db
        if db is None:
            raise StoreUnavailable()
        with _guard():
            await db.execute_fetchall("SELECT 1")

    async def close(self) -> None:
        # Under the lock so that an operation in progress finishes (or rolls back) first; those
        # waiting behind it find the store closed and raise StoreUnavailable.
        async with self._lock:
            db, self._db = self._db, None
            if db is None:
                return
            with contextlib.suppress(sqlite3.Error):
                # Recommended before closing a long-lived connection: refreshes planner stats.
                await _run(db, "PRAGMA optimize")
            await db.close()

    # Conversations -----------------------------------------------------------------------------

    async def create_conversation(
        self, conversation: Conversation, idempotency: Idempotency | None = None
    ) -> tuple[Conversation, bool]:
        scope = f"c:{conversation.user_id}:{idempotency.key}" if idempotency else ""
        async with self._session("IMMEDIATE") as db:
            if idempotency is not None:
                previous = await self._replay(db, scope, idempotency)
                if previous is not None:
                    return Conversation(**orjson.loads(previous)), True
            try:
                # Like Redis, a new conversation starts with no messages whatever it says.
                await _run(
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
                raise Conflict("A conversation with this id already exists.") from exc
            if idempotency is not None:
                await self._remember(db, scope, idempotency, conversation.to_json().decode())
        return conversation, False

    async def get_conversation(self, conversation_id: str, owner: str | None) -> Conversation:
        async with self._session() as db:
            row = await self._conversation_row(db, conversation_id, owner)
        return _conversation_from_row(row)

    async def list_conversations(
        self, user_id: str, limit: int, after: ConversationCursor | None
    ) -> Page[Conversation]:
        async with self._session() as db:
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
        async with self._session("IMMEDIATE") as db:
            current = _conversation_from_row(
                await self._conversation_row(db, conversation_id, owner)
            )
            if expected_version is not None and current.version != expected_version:
                raise PreconditionFailed()
            updated = dataclasses.replace(
                current, **changes, updated_at=now, version=current.version + 1
            )
            # MAX: activity only moves forward (Redis: ZADD GT), even if the clock steps back.
            await _run(
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
        async with self._session("IMMEDIATE") as db:
            row = await self._conversation_row(db, conversation_id, owner)
            # Messages go by ON DELETE CASCADE.
            await _run(db, "DELETE FROM conversations WHERE id = ?", (conversation_id,))
            # Its append idempotency records can never be replayed now (appends to a missing
            # conversation fail first); drop them rather than wait for expiry. ';' follows ':'.
            await _run(
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
            self._after_commit(lambda: self._forget_conversation(conversation_id))
        return _conversation_from_row(row)

    def _forget_conversation(self, conversation_id: str) -> None:
        self._replies.pop(conversation_id, None)
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
        async with self._session("IMMEDIATE") as db:
            row = await _first(
                db, "SELECT user_id, seq FROM conversations WHERE id = ?", (conversation_id,)
            )
            if row is None or not _owned(row[0], owner):
                raise NotFound("Conversation not found.")
            if idempotency is not None:
                previous = await self._replay(db, scope, idempotency)
                if previous is not None:
                    return [Message.from_dict(d) for d in orjson.loads(previous)], True
            last_seq = int(row[1])
            try:
                await _run_many(
                    db,
                    "INSERT INTO messages (conversation_id, seq, id, doc) VALUES (?, ?, ?, ?)",
                    (
                        (conversation_id, last_seq + i, m.id, doc)
                        for i, (m, doc) in enumerate(zip(messages, docs, strict=True), start=1)
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict("A message with this id already exists.") from exc
            n = len(messages)
            await _run(
                db,
                "UPDATE conversations SET seq = seq + ?, message_count = message_count + ?,"
                " updated_at = ?, activity_ms = MAX(activity_ms, ?) WHERE id = ?",
                (n, n, now, rfc3339_to_ms(now), conversation_id),
            )
            if reply_index is not None:
                await _run(
                    db,
                    "INSERT INTO reply_queue (conversation_id, position, message_id)"
                    " VALUES (?, ?, ?)",
                    (conversation_id, last_seq + reply_index + 1, reply_id),
                )
            if idempotency is not None:
                await self._remember(db, scope, idempotency, "[" + ",".join(docs) + "]")
            for m in messages:
                self._emit(conversation_id, ev.MESSAGE_CREATED, ev.message_data(m))
            if reply_index is not None:
                self._after_commit(lambda: self._on_reply(conversation_id))
        return messages, False

    async def get_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Message:
        async with self._session() as db:
            # One statement: the owner check and the message read see the same state.
            row = await _first(
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
        async with self._session("DEFERRED") as db:
            row = await _first(
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

    async def replace_message(
        self,
        conversation_id: str,
        owner: str | None,
        message: Message,
        expected: Message,
        *,
        event: str | None = ev.MESSAGE_UPDATED,
        dequeue: bool = False,
        stop: bool = False,
        restart: int | None = None,
    ) -> Message | None:
        # Without `dequeue` the write is one statement, atomic by itself; with it, a transaction.
        async with self._session("IMMEDIATE" if dequeue else None) as db:
            # The compare-and-set: it writes only if the conversation is visible to `owner` and
            # the stored JSON is `expected`.
            changed = await _run(
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
                if dequeue:
                    await _run(
                        db,
                        "DELETE FROM reply_queue WHERE conversation_id = ? AND message_id = ?",
                        (conversation_id, message.id),
                    )
                self._after_commit(
                    lambda: self._reply_changed(
                        conversation_id, message.id, stop=stop, restart=restart, dequeue=dequeue
                    )
                )
                if event is not None:
                    self._emit(conversation_id, event, ev.message_data(message))
                return message
            # Not written: missing (or not owned) or changed meanwhile. Redis answers
            # "Message not found." for a missing conversation here too.
            row = await _first(
                db,
                "SELECT c.user_id FROM conversations AS c JOIN messages AS m"
                " ON m.conversation_id = c.id WHERE c.id = ? AND m.id = ?",
                (conversation_id, message.id),
            )
        if row is None or not _owned(row[0], owner):
            raise NotFound("Message not found.")
        return None

    def _reply_changed(
        self,
        conversation_id: str,
        message_id: str,
        *,
        stop: bool,
        restart: int | None,
        dequeue: bool,
    ) -> None:
        if stop:
            self._stop(conversation_id, message_id)
        if dequeue:
            # The reply has ended: forget its text (a later delta re-checks that it exists).
            replies = self._replies.get(conversation_id)
            if replies is not None:
                replies.pop(message_id, None)
                if not replies:
                    del self._replies[conversation_id]
            self._attempts.pop((conversation_id, message_id), None)
        elif restart is not None:
            # A new attempt starts from nothing; the message exists (it was just written).
            # Only that attempt's deltas pass from now on.
            self._replies.setdefault(conversation_id, {})[message_id] = []
            self._attempts[(conversation_id, message_id)] = restart

    async def delete_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Message:
        async with self._session("IMMEDIATE") as db:
            row = await _first(
                db,
                "SELECT c.user_id, m.doc FROM conversations AS c JOIN messages AS m"
                " ON m.conversation_id = c.id WHERE c.id = ? AND m.id = ?",
                (conversation_id, message_id),
            )
            # As in Redis, a missing conversation reads "Message not found." here.
            if row is None or not _owned(row[0], owner):
                raise NotFound("Message not found.")
            await _run(
                db,
                "DELETE FROM messages WHERE conversation_id = ? AND id = ?",
                (conversation_id, message_id),
            )
            # Only the count: the seq counter never goes back, so positions are never reused.
            await _run(
                db,
                "UPDATE conversations SET message_count = message_count - 1 WHERE id = ?",
                (conversation_id,),
            )
            await _run(
                db,
                "DELETE FROM reply_queue WHERE conversation_id = ? AND message_id = ?",
                (conversation_id, message_id),
            )
            self._after_commit(lambda: self._forget_reply(conversation_id, message_id))
            self._emit(conversation_id, ev.MESSAGE_DELETED, ev.message_deleted_data(message_id))
        return Message.from_json(row[1])

    def _forget_reply(self, conversation_id: str, message_id: str) -> None:
        # Its next delta (if it was being written) finds it gone in the file and is refused.
        replies = self._replies.get(conversation_id)
        if replies is not None:
            replies.pop(message_id, None)
            if not replies:
                del self._replies[conversation_id]
        self._stopped.pop((conversation_id, message_id), None)
        self._attempts.pop((conversation_id, message_id), None)

    # Events and replies --------------------------------------------------------------------

    def _stop(self, conversation_id: str, message_id: str) -> None:
        now = time.monotonic()
        key = (conversation_id, message_id)
        self._stopped[key] = now + _STOP_TTL_S
        self._stopped.move_to_end(key)
        # Same TTL for all, so the oldest entries expire first.
        while self._stopped:
            first_key, until = next(iter(self._stopped.items()))
            if until > now:
                break
            del self._stopped[first_key]

    def _is_stopped(self, conversation_id: str, message_id: str) -> bool:
        until = self._stopped.get((conversation_id, message_id))
        return until is not None and until > time.monotonic()

    async def publish_delta(
        self, conversation_id: str, message_id: str, delta: str, attempt: int | None = None
    ) -> bool:
        # Called for every token: no write to the file, and usually no read either.
        if self._is_stopped(conversation_id, message_id):
            return False
        if attempt is not None and self._attempts.get((conversation_id, message_id)) != attempt:
            return False  # a writer of an older attempt
        replies = self._replies.get(conversation_id)
        parts = replies.get(message_id) if replies is not None else None
        if parts is not None:
            parts.append(delta)
            self._publish(conversation_id, ev.MESSAGE_DELTA, ev.delta_data(message_id, delta))
            return True
        # A reply this process does not know as existing: check the file once. Under the lock,
        # so that a delete committing later also drops what is registered here.
        async with self._session() as db:
            row = await _first(
                db,
                "SELECT 1 FROM messages WHERE conversation_id = ? AND id = ?",
                (conversation_id, message_id),
            )
            if row is None or self._is_stopped(conversation_id, message_id):
                return False
            parts = self._replies.setdefault(conversation_id, {}).setdefault(message_id, [])
            parts.append(delta)
            self._publish(conversation_id, ev.MESSAGE_DELTA, ev.delta_data(message_id, delta))
        return True

    async def stop_reply(self, conversation_id: str, message_id: str) -> str | None:
        # Synchronous: no delta can pass between the stop and the read of the text.
        self._stop(conversation_id, message_id)
        replies = self._replies.get(conversation_id)
        parts = replies.get(message_id) if replies is not None else None
        return "".join(parts) if parts else None

    async def read_events(self, conversation_id: str, after: str | None, limit: int) -> list[Event]:
        return self.events.read(conversation_id, after, limit)

    async def last_event_id(self, conversation_id: str) -> str | None:
        return self.events.last_id(conversation_id)

    async def reply_queue_head(self, conversation_id: str) -> str | None:
        async with self._session() as db:
            row = await _first(
                db,
                "SELECT message_id FROM reply_queue WHERE conversation_id = ?"
                " ORDER BY position LIMIT 1",
                (conversation_id,),
            )
        return None if row is None else str(row[0])

    async def conversations_with_replies(self) -> list[str]:
        """Every conversation whose reply queue is not empty (to signal their jobs on start)."""
        async with self._session() as db:
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
