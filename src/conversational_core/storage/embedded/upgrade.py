"""Upgrading a file written before conversation trees (schema 1 or 2) to schema 3, when it is
opened (database.py runs these steps inside the transaction that creates the schema, so the file
is upgraded whole or not at all, and there is nothing for an operator to do).

Before trees, a conversation's messages were one list in creation order (`seq`). That list is
now a single branch: each message's parent is the message before it (gaps left by deleted
messages included), the branch is the active one, and its last message is the active leaf.
Each stored document is rewritten the way the store now keeps it (Message.stored_json: with its
`parent_id`, without ids), because the compare-and-set of a message compares those bytes.
Conversations get the settings added with trees (title_source, on_busy, forked_from).

The work is in batches, in key order, so that memory stays flat whatever the file holds.
"""

from __future__ import annotations

from typing import Any, Final

import aiosqlite
import orjson

from conversational_core.storage.models import Message

_BATCH: Final = 1000
_INT64_MIN: Final = -(2**63)


def settings_with_defaults(doc: dict[str, Any]) -> dict[str, Any]:
    """A conversation's JSON written before trees, completed with the newer settings: a title it
    has was given by a user (the Redis store reads old conversations the same way)."""
    if "on_busy" not in doc:
        doc["title_source"] = "user" if doc.get("title") is not None else None
        doc["on_busy"] = "queue"
        doc["forked_from"] = None
    return doc


async def add_tree_columns(db: aiosqlite.Connection) -> None:
    """The columns of schema 3 on the tables of schema 1 or 2 (before SCHEMA, which indexes
    them)."""
    await _run(db, "ALTER TABLE messages ADD COLUMN parent_seq INTEGER")
    await _run(db, "ALTER TABLE conversations ADD COLUMN active_leaf_id TEXT")


async def fill_trees(db: aiosqlite.Connection) -> None:
    """Every conversation as one branch (after SCHEMA has created the `branch` table)."""
    await _link_messages(db)
    await _run(
        db, "INSERT INTO branch (conversation_id, seq) SELECT conversation_id, seq FROM messages"
    )
    await _run(
        db,
        "UPDATE conversations SET active_leaf_id = (SELECT m.id FROM messages AS m"
        " WHERE m.conversation_id = conversations.id ORDER BY m.seq DESC LIMIT 1)",
    )
    await _complete_settings(db)


async def _run(db: aiosqlite.Connection, sql: str) -> None:
    async with db.execute(sql):
        pass


async def _link_messages(db: aiosqlite.Connection) -> None:
    key: tuple[str, int] = ("", _INT64_MIN)
    previous: tuple[str, int, str] | None = None  # (conversation id, seq, id) of the last row
    while True:
        rows = list(
            await db.execute_fetchall(
                "SELECT conversation_id, seq, id, doc FROM messages"
                " WHERE (conversation_id, seq) > (?, ?) ORDER BY conversation_id, seq LIMIT ?",
                (*key, _BATCH),
            )
        )
        if not rows:
            return
        updates: list[tuple[str, int | None, str, int]] = []
        for cid, seq, mid, doc in rows:
            parent = previous if previous is not None and previous[0] == cid else None
            data = orjson.loads(doc)
            data["parent_id"] = parent[2] if parent is not None else None
            stored = Message.from_dict(data).stored_json().decode()
            updates.append((stored, parent[1] if parent is not None else None, cid, seq))
            previous = (cid, seq, mid)
        async with db.executemany(
            "UPDATE messages SET doc = ?, parent_seq = ? WHERE conversation_id = ? AND seq = ?",
            updates,
        ):
            pass
        key = (rows[-1][0], rows[-1][1])


async def _complete_settings(db: aiosqlite.Connection) -> None:
    last = ""
    while True:
        rows = list(
            await db.execute_fetchall(
                "SELECT id, data FROM conversations WHERE id > ? ORDER BY id LIMIT ?",
                (last, _BATCH),
            )
        )
        if not rows:
            return
        async with db.executemany(
            "UPDATE conversations SET data = ? WHERE id = ?",
            [
                (orjson.dumps(settings_with_defaults(orjson.loads(data))).decode(), cid)
                for cid, data in rows
            ],
        ):
            pass
        last = rows[-1][0]
