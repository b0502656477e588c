"""A file of the embedded store written before conversation trees (schema 2) is upgraded when it
is opened: every conversation reads as one branch, with every field of the old answers unchanged,
and can then be appended to, edited and trimmed like any other.

The file is tests/fixtures/legacy/conversational-core.db, written by the released version through
its own API (see make_fixtures.py there); a second, synthetic one is larger than the upgrade's
batches."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from conversational_core.storage.base import MessageQuery
from conversational_core.storage.embedded.database import DB_FILENAME, SCHEMA_VERSION
from conversational_core.storage.embedded.sqlite import SqliteStore, open_sqlite_store
from conversational_core.storage.models import Message, MessageStatus, Role, text_parts, utcnow
from tests.fixtures.legacy.load import copy_sqlite, load_expected
from tests.test_store_contract import message

EXPECTED = load_expected()["sqlite"]


def _user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def _rows(path: Path) -> dict[str, list[Any]]:
    """Every row of the tables that hold data, to compare a file before and after an open."""
    with sqlite3.connect(path) as db:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("conversations", "messages", "branch", "idempotency", "reply_queue")
        }


async def _branch(store: SqliteStore, cid: str, owner: str) -> list[Message]:
    return (await store.list_messages(cid, owner, MessageQuery(500))).items


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    copy_sqlite(tmp_path / "data")
    assert _user_version(tmp_path / "data" / DB_FILENAME) == 2
    return tmp_path / "data"


async def test_the_released_file_reads_as_one_branch_per_conversation(data_dir: Path) -> None:
    async with open_sqlite_store(data_dir) as store:
        for label, recorded in EXPECTED["conversations"].items():
            cid, owner = recorded["id"], recorded["user_id"]
            old = recorded["conversation"]["body"]
            conv = await store.get_conversation(cid, owner)
            now = orjson.loads(conv.to_json())
            assert {k: now[k] for k in old} == old, label
            assert conv.title_source == ("user" if old["title"] is not None else None)
            assert (conv.on_busy, conv.forked_from) == ("queue", None)

            old_items = recorded["messages"]["body"]["items"]
            items = await _branch(store, cid, owner)
            assert len(items) == old["message_count"] == conv.message_count
            assert all(m.parts == text_parts(m.content) for m in items)
            assert (conv.tools, conv.tool_choice) == (None, None)
            for was, got in zip(old_items, items, strict=True):
                fields = orjson.loads(got.to_json())
                assert {k: fields[k] for k in was} == was
            # In creation order, each message follows the one before it (a deleted message's
            # reply follows what came before the deleted one).
            assert [m.parent_id for m in items] == [None, *(m.id for m in items)][: len(items)]
            assert all((m.sibling_count, m.sibling_index) == (1, 0) for m in items)
            assert conv.active_leaf_id == (items[-1].id if items else None)
            everything = await store.list_messages(cid, owner, MessageQuery(500, everything=True))
            assert everything.items == items
            for m in items:
                assert await store.get_message(cid, owner, m.id) == m
    assert _user_version(data_dir / DB_FILENAME) == SCHEMA_VERSION


async def test_an_upgraded_conversation_takes_appends_edits_and_deletes(data_dir: Path) -> None:
    recorded = EXPECTED["conversations"]["A"]
    cid, owner = recorded["id"], recorded["user_id"]
    async with open_sqlite_store(data_dir) as store:
        old = await _branch(store, cid, owner)
        count = len(old)

        # The compare-and-set holds on an upgraded document: it was rewritten as stored now.
        first = old[0]
        edited = first.replace(content="edited", version=first.version + 1)
        assert await store.update_message(cid, owner, edited, first) == edited

        appended = await store.append_messages(cid, owner, [message(cid, "next")], utcnow())
        [follow] = appended.messages
        assert follow.parent_id == old[-1].id and follow.sibling_count == 1

        # An edit of a message in the middle: a sibling, and the branch moves to it.
        middle = old[3]
        [edit] = (
            await store.append_messages(
                cid, owner, [message(cid, "again")], utcnow(), parent=middle.parent_id
            )
        ).messages
        assert (edit.parent_id, edit.sibling_count, edit.sibling_index) == (
            middle.parent_id,
            2,
            1,
        )
        assert [m.id for m in await _branch(store, cid, owner)] == [
            *(m.id for m in old[:3]),
            edit.id,
        ]
        back = await store.set_active_leaf(cid, owner, middle.id, None, utcnow())
        assert back.active_leaf_id == follow.id

        # Deleting the middle message takes what followed it; the branch goes to the edit.
        deleted = await store.delete_message(cid, owner, middle.id)
        assert deleted.deleted_ids == [*(m.id for m in old[3:]), follow.id]
        assert deleted.conversation is not None
        assert deleted.conversation.active_leaf_id == edit.id
        conv = await store.get_conversation(cid, owner)
        assert conv.message_count == count + 2 - len(deleted.deleted_ids)
        reply = message(cid, "", Role.ASSISTANT).replace(status=MessageStatus.PENDING)
        await store.append_messages(cid, owner, [reply], utcnow(), reply_id=reply.id)
        assert await store.reply_queue_head(cid) == reply.id


async def test_an_upgraded_file_opens_unchanged(data_dir: Path) -> None:
    async with open_sqlite_store(data_dir):
        pass
    path = data_dir / DB_FILENAME
    before = _rows(path)
    async with open_sqlite_store(data_dir) as store:
        conv = await store.get_conversation(EXPECTED["conversations"]["B"]["id"], None)
        assert conv.message_count == 2
    assert _rows(path) == before
    assert _user_version(path) == SCHEMA_VERSION


# Schema 2, as the released version created it (storage/embedded/database.py at dfec2a1).
_SCHEMA_2 = """
CREATE TABLE conversations (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, data TEXT NOT NULL, updated_at TEXT NOT NULL,
    activity_ms INTEGER NOT NULL, message_count INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL DEFAULT 0, version INTEGER NOT NULL
);
CREATE INDEX conversations_by_activity ON conversations (user_id, activity_ms DESC, id DESC);
CREATE TABLE messages (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL, id TEXT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
CREATE UNIQUE INDEX messages_by_id ON messages (conversation_id, id);
CREATE TABLE idempotency (
    scope TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, body TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX idempotency_by_expiry ON idempotency (expires_at);
CREATE TABLE reply_queue (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    position INTEGER NOT NULL, message_id TEXT NOT NULL,
    PRIMARY KEY (conversation_id, position)
);
PRAGMA user_version = 2;
"""


def _legacy_doc(m: Message) -> str:
    """A message's JSON as the released version stored it (no tree fields)."""
    doc = orjson.loads(m.to_json())
    for name in ("parent_id", "sibling_count", "sibling_index"):
        del doc[name]
    return orjson.dumps(doc).decode()


async def test_a_large_file_is_upgraded_across_batches(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    # Positions per conversation; gaps are messages deleted before the upgrade.
    positions = {
        "c-big": list(range(1, 2501)),
        "c-one": [1],
        "c-none": [],
        "c-gaps": [1, 4, 5, 7],
    }
    with sqlite3.connect(data / DB_FILENAME) as db:
        db.executescript(_SCHEMA_2)
        for cid, seqs in positions.items():
            settings: dict[str, Any] = {"id": cid, "user_id": "alice", "title": None}
            settings |= {"metadata": {}, "system_prompt": None, "model": None, "temperature": None}
            settings |= {"max_tokens": None, "created_at": utcnow()}
            db.execute(
                "INSERT INTO conversations VALUES (?, 'alice', ?, ?, 0, ?, ?, 1)",
                (cid, orjson.dumps(settings).decode(), utcnow(), len(seqs), max(seqs, default=0)),
            )
            db.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, ?)",
                [(cid, s, (m := message(cid, str(s))).id, _legacy_doc(m)) for s in seqs],
            )
    async with open_sqlite_store(data) as store:
        for cid, seqs in positions.items():
            conv = await store.get_conversation(cid, "alice")
            items = (await store.list_messages(cid, "alice", MessageQuery(5000))).items
            assert [m.content for m in items] == [str(s) for s in seqs]
            assert conv.message_count == len(seqs)
            assert [m.parent_id for m in items] == [None, *(m.id for m in items)][: len(items)]
            assert conv.active_leaf_id == (items[-1].id if items else None)
            assert conv.title_source is None and conv.on_busy == "queue"
        page = await store.list_messages("c-big", "alice", MessageQuery(3, anchor_seq=999))
        assert [m.content for m in page.items] == ["1000", "1001", "1002"]
        assert [m.parent_id for m in page.items[1:]] == [m.id for m in page.items[:-1]]
