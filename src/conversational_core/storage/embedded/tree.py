"""A conversation's tree in the embedded store: the queries that read it and the steps that change
its active branch (the tables are listed in sqlite.py's docstring).

How it is kept:

- Every message row has `parent_seq`, the position (`seq`) of its parent; NULL for a root. The
  children of a message are the rows with its position there, in creation order, which is
  position order: the index (conversation_id, parent_seq, seq) reads them, counts them and finds
  the newest, in O(log n) plus the children counted.
- The active branch, root to leaf, is the `branch` table's rows of the conversation. Positions
  grow along every path from a root, so the branch in position order is the branch in root-to-
  leaf order, and a page of it is a range of its primary key.
- `detour` marks a branch message whose next message on the branch is not its newest child.
  The newest-child rule (set_active_leaf, delete_message) is then a look from the first detour
  at or below a message: above it, the branch already is what the rule would give.

What holds after every change (each one transaction with its caller's other writes): the branch
is a path from a root to the active leaf, empty only when the conversation is; the leaf has no
children; `conversations.active_leaf_id` names it; a branch row's detour is 1 exactly when the
row after it is not the message's newest child (so 0 on the leaf).

Costs, for n messages: a page of the active branch or of every message is a range read, plus the
siblings counted for each message on it; a switch (retarget, then descend) costs the rows of
the branch it removes and adds; a page of another branch costs, in addition, the part of it that
is off the active branch (climb); a subtree costs its size.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiosqlite
import orjson

from conversational_core.storage.embedded.database import first, run, run_many
from conversational_core.storage.embedded.records import (
    INT64_MAX,
    INT64_MIN,
    clamp_int64,
    message_json,
)

# A message as `full` takes it: seq, id, doc, then its sibling count and index, from the
# children of its parent (the roots for a root). Statements add their FROM (`m`: messages).
SELECT_MESSAGE: Final = (
    "SELECT m.seq, m.id, m.doc,"
    " (SELECT COUNT(*) FROM messages AS s"
    " WHERE s.conversation_id = m.conversation_id AND s.parent_seq IS m.parent_seq),"
    " (SELECT COUNT(*) FROM messages AS s"
    " WHERE s.conversation_id = m.conversation_id AND s.parent_seq IS m.parent_seq"
    " AND s.seq < m.seq)"
)

# Pages: rows strictly after a position and up to another, of the branch or of every message,
# keyed by (every message?, ascending?). Whole statements, picked, never assembled. CROSS JOIN:
# SQLite keeps that order (the branch's range, then one lookup each), where a plain join may be
# planned the other way round, reading every message of the range to find the branch's.
_RANGE: Final = {
    (False, True): f"{SELECT_MESSAGE} FROM branch AS b CROSS JOIN messages AS m"
    " ON m.conversation_id = b.conversation_id AND m.seq = b.seq"
    " WHERE b.conversation_id = ? AND b.seq > ? AND b.seq <= ? ORDER BY b.seq ASC LIMIT ?",
    (False, False): f"{SELECT_MESSAGE} FROM branch AS b CROSS JOIN messages AS m"
    " ON m.conversation_id = b.conversation_id AND m.seq = b.seq"
    " WHERE b.conversation_id = ? AND b.seq > ? AND b.seq <= ? ORDER BY b.seq DESC LIMIT ?",
    (True, True): f"{SELECT_MESSAGE} FROM messages AS m"
    " WHERE m.conversation_id = ? AND m.seq > ? AND m.seq <= ? ORDER BY m.seq ASC LIMIT ?",
    (True, False): f"{SELECT_MESSAGE} FROM messages AS m"
    " WHERE m.conversation_id = ? AND m.seq > ? AND m.seq <= ? ORDER BY m.seq DESC LIMIT ?",
}
# Likewise: the positions given, then one lookup each.
_AT: Final = (
    f"{SELECT_MESSAGE} FROM json_each(?) AS j"
    " CROSS JOIN messages AS m ON m.conversation_id = ? AND m.seq = j.value"
)

# From a message up to the first message on the branch (included; none when the path reaches a
# root off the branch), bottom-up: each one's position, whether it is on the branch, and its
# newest child.
_CLIMB: Final = """
WITH RECURSIVE up(depth, seq, parent_seq, on_branch, newest) AS (
    SELECT 0, m.seq, m.parent_seq,
        EXISTS (SELECT 1 FROM branch AS b WHERE b.conversation_id = ?1 AND b.seq = m.seq),
        (SELECT c.seq FROM messages AS c WHERE c.conversation_id = ?1 AND c.parent_seq = m.seq
         ORDER BY c.seq DESC LIMIT 1)
    FROM messages AS m WHERE m.conversation_id = ?1 AND m.seq = ?2
    UNION ALL
    SELECT up.depth + 1, m.seq, m.parent_seq,
        EXISTS (SELECT 1 FROM branch AS b WHERE b.conversation_id = ?1 AND b.seq = m.seq),
        (SELECT c.seq FROM messages AS c WHERE c.conversation_id = ?1 AND c.parent_seq = m.seq
         ORDER BY c.seq DESC LIMIT 1)
    FROM up JOIN messages AS m ON m.conversation_id = ?1 AND m.seq = up.parent_seq
    WHERE NOT up.on_branch
)
SELECT seq, on_branch, newest FROM up ORDER BY depth
"""

# Appends to the branch the newest child of ?2 (of the roots when NULL), its newest child, and
# so on down to a message without children.
_DESCEND: Final = """
WITH RECURSIVE down(seq) AS (
    SELECT (SELECT c.seq FROM messages AS c WHERE c.conversation_id = ?1 AND c.parent_seq IS ?2
            ORDER BY c.seq DESC LIMIT 1)
    UNION ALL
    SELECT (SELECT c.seq FROM messages AS c WHERE c.conversation_id = ?1 AND c.parent_seq = down.seq
            ORDER BY c.seq DESC LIMIT 1)
    FROM down WHERE down.seq IS NOT NULL
)
INSERT INTO branch (conversation_id, seq) SELECT ?1, seq FROM down WHERE seq IS NOT NULL
"""

_SUBTREE: Final = """
WITH RECURSIVE sub(seq, id) AS (
    SELECT ?2, ?3
    UNION ALL
    SELECT m.seq, m.id FROM sub JOIN messages AS m
        ON m.conversation_id = ?1 AND m.parent_seq = sub.seq
)
SELECT seq, id FROM sub ORDER BY seq
"""

# A branch message's detour, from the row after it and its newest child (after a child of it,
# not on the branch, was deleted: the branch may now follow its newest child).
_REFRESH_DETOUR: Final = """
UPDATE branch SET detour = (
    (SELECT n.seq FROM branch AS n WHERE n.conversation_id = ?1 AND n.seq > ?2
     ORDER BY n.seq LIMIT 1)
    IS NOT
    (SELECT c.seq FROM messages AS c WHERE c.conversation_id = ?1 AND c.parent_seq = ?2
     ORDER BY c.seq DESC LIMIT 1)
)
WHERE conversation_id = ?1 AND seq = ?2
"""


def json_list(values: Iterable[int | str]) -> str:
    """A list bound as one parameter, read in SQL with json_each."""
    return orjson.dumps(list(values)).decode()


async def seq_of(db: aiosqlite.Connection, conversation_id: str, message_id: str) -> int | None:
    row = await first(
        db,
        "SELECT seq FROM messages WHERE conversation_id = ? AND id = ?",
        (conversation_id, message_id),
    )
    return None if row is None else int(row[0])


async def on_branch(db: aiosqlite.Connection, conversation_id: str, seq: int) -> bool:
    row = await first(
        db, "SELECT 1 FROM branch WHERE conversation_id = ? AND seq = ?", (conversation_id, seq)
    )
    return row is not None


async def children_count(
    db: aiosqlite.Connection, conversation_id: str, parent_seq: int | None
) -> int:
    row = await first(
        db,
        "SELECT COUNT(*) FROM messages WHERE conversation_id = ? AND parent_seq IS ?",
        (conversation_id, parent_seq),
    )
    return int(row[0]) if row is not None else 0


@dataclass(slots=True)
class Climb:
    """The path from a message up to the active branch."""

    meet: int | None  # where it meets the branch (the message itself if on it); None: never
    meet_newest: int | None  # the newest child of `meet`
    path: list[tuple[int, int | None]]  # (seq, newest child) of the part off the branch, top-down


async def climb(db: aiosqlite.Connection, conversation_id: str, seq: int) -> Climb:
    rows = list(await db.execute_fetchall(_CLIMB, (conversation_id, seq)))
    meet: int | None = None
    meet_newest: int | None = None
    if rows and rows[-1][1]:
        top = rows.pop()
        meet, meet_newest = int(top[0]), top[2]
    return Climb(meet, meet_newest, [(int(r[0]), r[2]) for r in reversed(rows)])


async def retarget(db: aiosqlite.Connection, conversation_id: str, target: int | None) -> None:
    """Make the active branch end at `target` (empty it when None): the rows below where the
    path to `target` meets the branch go, the path's rows come. The target's detour is 0: the
    caller continues the branch by its newest child, or adds one."""
    if target is None:
        await run(db, "DELETE FROM branch WHERE conversation_id = ?", (conversation_id,))
        return
    way = await climb(db, conversation_id, target)
    path = [s for s, _ in way.path]
    if way.meet is None:
        await run(db, "DELETE FROM branch WHERE conversation_id = ?", (conversation_id,))
    else:
        await run(
            db,
            "DELETE FROM branch WHERE conversation_id = ? AND seq > ?",
            (conversation_id, way.meet),
        )
        detour = bool(path) and way.meet_newest != path[0]
        await run(
            db,
            "UPDATE branch SET detour = ? WHERE conversation_id = ? AND seq = ?",
            (int(detour), conversation_id, way.meet),
        )
    rows = [
        (conversation_id, s, int(newest != after))
        for (s, newest), after in zip(way.path, path[1:], strict=False)
    ]
    if path:
        rows.append((conversation_id, path[-1], 0))
    await run_many(db, "INSERT INTO branch (conversation_id, seq, detour) VALUES (?, ?, ?)", rows)


async def descend(db: aiosqlite.Connection, conversation_id: str, start: int | None) -> str | None:
    """Continue the branch, which ends at `start` (is empty when None), by the newest child at
    each step; returns the new active leaf's id (None: the conversation is empty)."""
    await run(db, _DESCEND, (conversation_id, start))
    row = await first(
        db,
        "SELECT m.id FROM branch AS b JOIN messages AS m"
        " ON m.conversation_id = b.conversation_id AND m.seq = b.seq"
        " WHERE b.conversation_id = ? ORDER BY b.seq DESC LIMIT 1",
        (conversation_id,),
    )
    return None if row is None else str(row[0])


async def first_detour(db: aiosqlite.Connection, conversation_id: str, seq: int) -> int | None:
    """The first branch message at or below position `seq` that is a detour."""
    # INDEXED BY: without statistics the planner may walk the primary key instead, reading
    # every branch row below `seq`.
    row = await first(
        db,
        "SELECT seq FROM branch INDEXED BY branch_detours"
        " WHERE conversation_id = ? AND seq >= ? AND detour ORDER BY seq LIMIT 1",
        (conversation_id, seq),
    )
    return None if row is None else int(row[0])


async def refresh_detour(db: aiosqlite.Connection, conversation_id: str, seq: int) -> None:
    await run(db, _REFRESH_DETOUR, (conversation_id, seq))


async def subtree(
    db: aiosqlite.Connection, conversation_id: str, seq: int, message_id: str
) -> list[tuple[int, str]]:
    """(seq, id) of the message and its descendants, in creation order."""
    rows = await db.execute_fetchall(_SUBTREE, (conversation_id, seq, message_id))
    return [(int(r[0]), str(r[1])) for r in rows]


# --- Lists of messages ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listing:
    """A list of messages in position order: those of the branch (or every message, with
    `everything`) up to position `cap`, then those at the positions of `path`."""

    everything: bool = False
    cap: int = INT64_MAX
    path: list[int] = field(default_factory=list)


async def branch_to(db: aiosqlite.Connection, conversation_id: str, leaf: int) -> Listing:
    """The branch from a root to the message at position `leaf`: the active branch down to
    where they part, then the rest of the path."""
    way = await climb(db, conversation_id, leaf)
    return Listing(cap=INT64_MIN if way.meet is None else way.meet, path=[s for s, _ in way.path])


async def contains(
    db: aiosqlite.Connection, conversation_id: str, listing: Listing, seq: int
) -> bool:
    """Whether the message at position `seq` (which exists) is on the list."""
    if listing.everything or seq in listing.path:
        return True
    return seq <= listing.cap and await on_branch(db, conversation_id, seq)


async def at(db: aiosqlite.Connection, conversation_id: str, seqs: list[int]) -> list[sqlite3.Row]:
    """The messages at these positions (SELECT_MESSAGE), in that order."""
    if not seqs:
        return []
    rows = await db.execute_fetchall(_AT, (json_list(seqs), conversation_id))
    by_seq = {int(r[0]): r for r in rows}
    return [by_seq[s] for s in seqs if s in by_seq]


async def read(
    db: aiosqlite.Connection,
    conversation_id: str,
    listing: Listing,
    anchor: int | None,
    n: int,
    up: bool,
) -> list[sqlite3.Row]:
    """Up to `n` messages of the list (SELECT_MESSAGE), nearest to the anchor first: strictly
    after position `anchor` going up (from the start when None), or strictly before it going
    down (from the end)."""
    if up:
        low = INT64_MIN if anchor is None else anchor
        rows = list(
            await db.execute_fetchall(
                _RANGE[(listing.everything, True)], (conversation_id, low, listing.cap, n)
            )
        )
        if len(rows) < n:
            rows += await at(
                db, conversation_id, [s for s in listing.path if s > low][: n - len(rows)]
            )
        return rows
    below = INT64_MAX if anchor is None else anchor - 1
    rows = await at(db, conversation_id, [s for s in reversed(listing.path) if s <= below][:n])
    high = clamp_int64(min(listing.cap, below))
    if len(rows) < n:
        rows += await db.execute_fetchall(
            _RANGE[(listing.everything, False)], (conversation_id, INT64_MIN, high, n - len(rows))
        )
    return rows


def full(conversation_id: str, row: Sequence[Any]) -> bytes:
    """A message's JSON from its SELECT_MESSAGE."""
    return message_json(conversation_id, str(row[1]), str(row[2]), int(row[3]), int(row[4]))
