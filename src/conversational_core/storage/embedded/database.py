"""The embedded store's SQLite file: its schema, how it is opened, and one session at a time.

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
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import aiosqlite
from loguru import logger

from conversational_core.storage.base import Idempotency
from conversational_core.storage.embedded import upgrade
from conversational_core.storage.errors import IdempotencyMismatch, Unavailable

DB_FILENAME: Final = "conversational-core.db"

# How long a statement waits for another process's write lock before SQLite reports it busy
# (then the caller gets Unavailable, a 503 with Retry-After).
BUSY_TIMEOUT_MS: Final = 5000

# Bumped when the schema changes; a file written by a newer version is refused rather than
# misread, and one written by an older version is upgraded when it is opened (upgrade.py).
SCHEMA_VERSION: Final = 3  # 2: reply_queue; 3: trees (parent_seq, branch, active_leaf_id)

# The tables and indexes of a file at SCHEMA_VERSION, one statement each. Columns added by an
# upgrade come last, so that a file has the same shape whichever version first wrote it.
SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS conversations (
    id             TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    data           TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    activity_ms    INTEGER NOT NULL,
    message_count  INTEGER NOT NULL DEFAULT 0,
    seq            INTEGER NOT NULL DEFAULT 0,
    version        INTEGER NOT NULL,
    active_leaf_id TEXT
)""",
    """CREATE INDEX IF NOT EXISTS conversations_by_activity
    ON conversations (user_id, activity_ms DESC, id DESC)""",
    """CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    id              TEXT NOT NULL,
    doc             TEXT NOT NULL,
    parent_seq      INTEGER,
    PRIMARY KEY (conversation_id, seq)
)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_by_id ON messages (conversation_id, id)",
    """CREATE INDEX IF NOT EXISTS messages_by_parent
    ON messages (conversation_id, parent_seq, seq)""",
    """CREATE TABLE IF NOT EXISTS branch (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    detour          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS branch_detours ON branch (conversation_id, seq) WHERE detour",
    """CREATE TABLE IF NOT EXISTS idempotency (
    scope       TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    body        TEXT NOT NULL,
    expires_at  REAL NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS idempotency_by_expiry ON idempotency (expires_at)",
    # The few replies waiting for tool results, found without a scan when the store opens
    # (jobs.recover; the query repeats this WHERE so that SQLite uses the index).
    """CREATE INDEX IF NOT EXISTS messages_waiting ON messages (conversation_id)
       WHERE json_extract(doc, '$.status') = 'requires_action'""",
    """CREATE TABLE IF NOT EXISTS reply_queue (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    position        INTEGER NOT NULL,
    message_id      TEXT NOT NULL,
    PRIMARY KEY (conversation_id, position)
)""",
)

# SQLite's primary result codes that mean "the database cannot be used right now" (locked by
# another process past the busy timeout, I/O failure, file gone or unwritable, disk full), as
# opposed to a bug in a statement, which must surface as one.
UNAVAILABLE_CODES: Final = frozenset(
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

TransactionMode = Literal["IMMEDIATE", "DEFERRED"]


@contextlib.contextmanager
def guard() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF in UNAVAILABLE_CODES:
            raise Unavailable() from exc
        raise
    except sqlite3.ProgrammingError as exc:
        # "Cannot operate on a closed database": the store is shutting down.
        if "closed" in str(exc):
            raise Unavailable() from exc
        raise


async def first(db: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> sqlite3.Row | None:
    rows = await db.execute_fetchall(sql, params)
    return next(iter(rows), None)


async def run(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """Execute one statement; returns the number of rows it changed."""
    async with db.execute(sql, params) as cursor:
        return cursor.rowcount


async def run_many(db: aiosqlite.Connection, sql: str, params: Iterable[Sequence[Any]]) -> None:
    async with db.executemany(sql, params):
        pass


async def _ensure_schema(db: aiosqlite.Connection, path: Path) -> None:
    """Create the schema of a new file, or upgrade an older one, in one IMMEDIATE transaction:
    processes starting together queue on it, and the one that comes second finds the work done
    (the version is read inside the transaction for that reason)."""
    await run(db, "BEGIN IMMEDIATE")
    try:
        row = await first(db, "PRAGMA user_version", ())
        found = int(row[0]) if row is not None else 0
        if found > SCHEMA_VERSION:
            raise RuntimeError(
                f"{path} was written by a newer version (schema {found}, this one knows "
                f"{SCHEMA_VERSION}); refusing to open it"
            )
        if found < SCHEMA_VERSION:
            # 1 and 2 differ only by reply_queue, which SCHEMA creates if missing.
            legacy = found in (1, 2)
            if legacy:
                await upgrade.add_tree_columns(db)
            for statement in SCHEMA:
                await run(db, statement)
            if legacy:
                await upgrade.fill_trees(db)
                logger.info("SQLite store at {} upgraded from schema {}", path, found)
            await run(db, f"PRAGMA user_version={SCHEMA_VERSION}")
        await run(db, "COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error, ValueError):
            await db.rollback()
        raise


class Database:
    """The store's one connection, used by one operation at a time (see the module docstring),
    with effects that run once an operation has committed."""

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection: aiosqlite.Connection | None = connection
        self._lock = asyncio.Lock()
        # Effects of the operation in progress, run once it has committed (see session).
        self._effects: list[Callable[[], None]] = []

    @classmethod
    async def open(cls, path: Path) -> Database:
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
            await run(db, "PRAGMA synchronous=NORMAL")
            await run(db, "PRAGMA foreign_keys=ON")
            await run(db, f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            await _ensure_schema(db, path)
        except BaseException:
            await db.close()
            raise
        return cls(db)

    @contextlib.asynccontextmanager
    async def session(
        self, mode: TransactionMode | None = None
    ) -> AsyncIterator[aiosqlite.Connection]:
        """Exclusive use of the connection, optionally inside a transaction (see module doc).

        `IMMEDIATE` for read-modify-write, `DEFERRED` for several reads that must agree (another
        process may write between them), None for a single statement (atomic by itself).

        Effects registered with :meth:`after_commit` run once the operation has committed,
        still under the lock (so in commit order); they are dropped if it fails.
        """
        async with self._lock:
            db = self._connection
            if db is None:
                raise Unavailable()
            self._effects = []
            try:
                with guard():
                    if mode is None:
                        yield db
                    else:
                        await self._begin(db, mode)
                        try:
                            yield db
                            await run(db, "COMMIT")
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

    def after_commit(self, effect: Callable[[], None]) -> None:
        self._effects.append(effect)

    @staticmethod
    async def _begin(db: aiosqlite.Connection, mode: TransactionMode) -> None:
        try:
            await run(db, f"BEGIN {mode}")
        except sqlite3.OperationalError as exc:
            # Only if an earlier ROLLBACK failed and left a transaction open: end it, retry once.
            if "within a transaction" not in str(exc):
                raise
            await db.rollback()
            await run(db, f"BEGIN {mode}")

    async def ping(self) -> None:
        # Without the lock: SELECT 1 reads no table, so it cannot observe another coroutine's
        # open transaction, and a health check should not queue behind writes.
        db = self._connection
        if db is None:
            raise Unavailable()
        with guard():
            await db.execute_fetchall("SELECT 1")

    async def close(self) -> None:
        # Under the lock so that an operation in progress finishes (or rolls back) first; those
        # waiting behind it find the store closed and raise Unavailable.
        async with self._lock:
            db, self._connection = self._connection, None
            if db is None:
                return
            with contextlib.suppress(sqlite3.Error):
                # Recommended before closing a long-lived connection: refreshes planner stats.
                await run(db, "PRAGMA optimize")
            await db.close()


# Expired idempotency rows are invisible (every lookup filters on expires_at) and only take
# space, so deleting them is housekeeping: at most once a minute, piggybacked on an insert.
_PURGE_INTERVAL_S: Final = 60.0


class IdempotencyRecords:
    """The `idempotency` table: the first result of a request made with an Idempotency-Key."""

    def __init__(self) -> None:
        self._last_purge = float("-inf")

    async def replay(
        self, db: aiosqlite.Connection, scope: str, idempotency: Idempotency
    ) -> str | None:
        """The stored result for this key, None if there is none (or it expired); raises
        IdempotencyMismatch if the key was used with another request body."""
        row = await first(
            db,
            "SELECT fingerprint, body FROM idempotency WHERE scope = ? AND expires_at > ?",
            (scope, time.time()),
        )
        if row is None:
            return None
        if row[0] != idempotency.fingerprint:
            raise IdempotencyMismatch()
        return str(row[1])

    async def remember(
        self, db: aiosqlite.Connection, scope: str, idempotency: Idempotency, body: str
    ) -> None:
        now = time.time()
        # REPLACE: an expired record of the same scope may still be there, not yet purged.
        await run(
            db,
            "INSERT OR REPLACE INTO idempotency (scope, fingerprint, body, expires_at)"
            " VALUES (?, ?, ?, ?)",
            (scope, idempotency.fingerprint, body, now + idempotency.ttl_seconds),
        )
        # Wall clock for expiry (it must mean the same after a restart), monotonic for cadence.
        if time.monotonic() - self._last_purge >= _PURGE_INTERVAL_S:
            await run(db, "DELETE FROM idempotency WHERE expires_at <= ?", (now,))
            self._last_purge = time.monotonic()
