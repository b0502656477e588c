"""The embedded store's messages and their tree: appending, reading a branch or every message,
siblings, switching branches, deleting subtrees, forking. Each operation is one transaction;
the tree's queries and the steps that move the active branch are in tree.py."""

from __future__ import annotations

import dataclasses
import sqlite3
from typing import Any, Final

import orjson

from conversational_core.storage import events as ev
from conversational_core.storage.base import (
    ACTIVE_LEAF,
    ActiveLeaf,
    Appended,
    Deleted,
    Idempotency,
    MessageQuery,
    MessageSlice,
    OnBusy,
    replayed_messages,
)
from conversational_core.storage.embedded import tree
from conversational_core.storage.embedded.database import first, run, run_many
from conversational_core.storage.embedded.records import (
    INT64_MAX,
    SqliteParts,
    clamp_int64,
    conversation_data,
    conversation_from_row,
    message_json,
    owned,
)
from conversational_core.storage.errors import (
    AlreadyExists,
    Busy,
    Changed,
    NotFound,
    StaleVersion,
    UnknownAnchor,
    UnknownMessage,
)
from conversational_core.storage.models import (
    Conversation,
    Message,
    MessageStatus,
    new_id,
    rfc3339_to_ms,
    utcnow,
)

_INSERT_MESSAGE: Final = (
    "INSERT INTO messages (conversation_id, seq, id, parent_seq, doc) VALUES (?, ?, ?, ?, ?)"
)
_INSERT_BRANCH: Final = "INSERT INTO branch (conversation_id, seq) VALUES (?, ?)"


class SqliteMessages(SqliteParts):
    async def append_messages(
        self,
        conversation_id: str,
        owner: str | None,
        messages: list[Message],
        now: str,
        idempotency: Idempotency | None = None,
        reply_id: str | None = None,
        *,
        parent: str | ActiveLeaf | None = ACTIVE_LEAF,
        on_busy: OnBusy | None = "queue",
        answering: tuple[Message, Message | None] | None = None,
    ) -> Appended:
        if not messages:  # a caller bug: there would be no new leaf
            raise ValueError("no messages to append")
        reply_index: int | None = None
        if reply_id is not None:
            reply_index = next((i for i, m in enumerate(messages) if m.id == reply_id), None)
            if reply_index is None:  # a caller bug: Redis would queue an id with no message
                raise ValueError("reply_id is not one of the messages")
        scope = f"m:{conversation_id}:{owner or '*'}:{idempotency.key}" if idempotency else ""
        replayed: list[dict[str, Any]] | None = None
        interrupted: list[str] = []
        async with self._db.session("IMMEDIATE") as db:
            row = await first(
                db,
                "SELECT c.user_id, c.seq, c.active_leaf_id, l.seq,"
                " json_extract(c.data, '$.on_busy') FROM conversations AS c"
                " LEFT JOIN messages AS l ON l.conversation_id = c.id AND l.id = c.active_leaf_id"
                " WHERE c.id = ?",
                (conversation_id,),
            )
            if row is None or not owned(row[0], owner):
                raise NotFound("Conversation not found.")
            if idempotency is not None:
                previous = await self._idempotency.replay(db, scope, idempotency)
                if previous is not None:
                    replayed = orjson.loads(previous)
            if replayed is None and answering is not None:
                answered, expected = answering
                if expected is None:  # not waiting, and no replay
                    raise Changed()
                updated = await run(
                    db,
                    "UPDATE messages SET doc = ? WHERE conversation_id = ? AND id = ? AND doc = ?",
                    (
                        answered.stored_json().decode(),
                        conversation_id,
                        answered.id,
                        expected.replace(parent_id=answered.parent_id).stored_json().decode(),
                    ),
                )
                if updated != 1:
                    raise Changed()
                self._emit(conversation_id, ev.MESSAGE_COMPLETED, ev.message_data(answered))
            if replayed is None:
                if on_busy is None:
                    on_busy = row[4] or "queue"
                if on_busy != "queue":
                    queued = await db.execute_fetchall(
                        "SELECT message_id FROM reply_queue WHERE conversation_id = ?"
                        " ORDER BY position",
                        (conversation_id,),
                    )
                    interrupted = [str(r[0]) for r in queued]
                    if interrupted and on_busy == "reject":
                        raise Busy()
                last_seq, leaf_seq = int(row[1]), row[3]
                parent_id: str | None
                parent_seq: int | None
                if isinstance(parent, ActiveLeaf):
                    parent_id, parent_seq = row[2], leaf_seq
                elif parent is None:
                    parent_id, parent_seq = None, None
                else:
                    parent_id, parent_seq = parent, await tree.seq_of(db, conversation_id, parent)
                    if parent_seq is None:
                        raise UnknownMessage("parent_id")
                if parent_seq != leaf_seq:
                    await tree.retarget(db, conversation_id, parent_seq)
                siblings = await tree.children_count(db, conversation_id, parent_seq)
                rows: list[tuple[str, int, str, int | None, str]] = []
                for i, m in enumerate(messages, start=1):
                    # The store places the messages: each under the one before it.
                    m.parent_id = parent_id
                    m.sibling_count, m.sibling_index = (
                        (siblings + 1, siblings) if i == 1 else (1, 0)
                    )
                    rows.append(
                        (conversation_id, last_seq + i, m.id, parent_seq, m.stored_json().decode())
                    )
                    parent_id, parent_seq = m.id, last_seq + i
                try:
                    await run_many(db, _INSERT_MESSAGE, rows)
                except sqlite3.IntegrityError as exc:
                    raise AlreadyExists("A message with this id already exists.") from exc
                await run_many(db, _INSERT_BRANCH, ((conversation_id, r[1]) for r in rows))
                n = len(messages)
                await run(
                    db,
                    "UPDATE conversations SET seq = seq + ?, message_count = message_count + ?,"
                    " updated_at = ?, activity_ms = MAX(activity_ms, ?), active_leaf_id = ?"
                    " WHERE id = ?",
                    (n, n, now, rfc3339_to_ms(now), messages[-1].id, conversation_id),
                )
                if reply_index is not None:
                    await run(
                        db,
                        "INSERT INTO reply_queue (conversation_id, position, message_id)"
                        " VALUES (?, ?, ?)",
                        (conversation_id, last_seq + reply_index + 1, reply_id),
                    )
                if idempotency is not None:
                    record = b"[" + b",".join(m.to_json() for m in messages) + b"]"
                    await self._idempotency.remember(db, scope, idempotency, record.decode())
                for m in messages:
                    self._emit(conversation_id, ev.MESSAGE_CREATED, ev.message_data(m))
                if reply_index is not None:
                    self._db.after_commit(lambda: self._on_reply(conversation_id))
        if replayed is not None:
            # Outside the transaction: an old record's messages are read as they are now.
            return Appended(
                await replayed_messages(self, conversation_id, replayed),  # type: ignore[arg-type]
                replayed=True,
            )
        return Appended(messages, interrupted=interrupted)

    async def get_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Message:
        async with self._db.session() as db:
            # One statement: the owner check and the message read see the same state.
            row = await first(
                db,
                f"{tree.SELECT_MESSAGE}, c.user_id FROM conversations AS c"
                " LEFT JOIN messages AS m ON m.conversation_id = c.id AND m.id = ?"
                " WHERE c.id = ?",
                (message_id, conversation_id),
            )
        if row is None or not owned(row[5], owner):
            raise NotFound("Conversation not found.")
        if row[0] is None:
            raise NotFound("Message not found.")
        return Message.from_json(tree.full(conversation_id, row))

    async def list_messages(
        self, conversation_id: str, owner: str | None, query: MessageQuery
    ) -> MessageSlice:
        async with self._db.session("DEFERRED") as db:
            row = await first(
                db,
                "SELECT c.user_id,"
                " (SELECT seq FROM messages WHERE conversation_id = c.id AND id = ?),"
                " (SELECT seq FROM messages WHERE conversation_id = c.id AND id = ?)"
                " FROM conversations AS c WHERE c.id = ?",
                (query.anchor_id or "", query.leaf or "", conversation_id),
            )
            if row is None or not owned(row[0], owner):
                raise NotFound("Conversation not found.")
            if query.everything:
                listing = tree.Listing(everything=True)
            elif query.leaf:
                if row[2] is None:
                    raise UnknownMessage("leaf", "query")
                listing = await tree.branch_to(db, conversation_id, int(row[2]))
            else:
                listing = tree.Listing()
            anchor: int | None = None
            if query.anchor_id:  # an id takes precedence over a position, as in Redis
                if row[1] is None or not await tree.contains(
                    db, conversation_id, listing, int(row[1])
                ):
                    raise UnknownAnchor()
                anchor = int(row[1])
            elif query.anchor_seq is not None:
                anchor = clamp_int64(query.anchor_seq)
            # Walking forward through an ascending list, or backward through a descending one,
            # reads positions upwards; the other two combinations read them downwards.
            ascending = query.descending == query.backward
            rows = await tree.read(db, conversation_id, listing, anchor, query.limit + 1, ascending)
        has_more = len(rows) > query.limit
        rows = rows[: query.limit]
        if query.backward:
            # Read nearest-first from the anchor; the page is returned in list order.
            rows.reverse()
        return MessageSlice(
            None,
            [int(r[0]) for r in rows],
            has_more,
            raw=[tree.full(conversation_id, r) for r in rows],
        )

    async def list_siblings(
        self, conversation_id: str, owner: str | None, message_id: str, limit: int, after: int
    ) -> MessageSlice:
        start = max(after + 1, 0)
        async with self._db.session("DEFERRED") as db:
            row = await first(
                db,
                "SELECT c.user_id, m.seq, m.parent_seq FROM conversations AS c"
                " LEFT JOIN messages AS m ON m.conversation_id = c.id AND m.id = ?"
                " WHERE c.id = ?",
                (message_id, conversation_id),
            )
            if row is None or not owned(row[0], owner):
                raise NotFound("Conversation not found.")
            if row[1] is None:
                raise NotFound("Message not found.")
            count = await tree.children_count(db, conversation_id, row[2])
            rows = list(
                await db.execute_fetchall(
                    "SELECT id, doc FROM messages WHERE conversation_id = ? AND parent_seq IS ?"
                    " ORDER BY seq LIMIT ? OFFSET ?",
                    (conversation_id, row[2], limit + 1, start),
                )
            )
        has_more = len(rows) > limit
        rows = rows[:limit]
        return MessageSlice(
            None,
            [start + k for k in range(len(rows))],
            has_more,
            raw=[
                message_json(conversation_id, str(r[0]), str(r[1]), count, start + k)
                for k, r in enumerate(rows)
            ],
        )

    async def set_active_leaf(
        self,
        conversation_id: str,
        owner: str | None,
        message_id: str,
        expected_version: int | None,
        now: str,
    ) -> Conversation:
        async with self._db.session("IMMEDIATE") as db:
            current = conversation_from_row(
                await self._conversation_row(db, conversation_id, owner)
            )
            if expected_version is not None and current.version != expected_version:
                raise StaleVersion()
            seq = await tree.seq_of(db, conversation_id, message_id)
            if seq is None:
                raise UnknownMessage("active_leaf_id")
            # Off the branch, the branch changes from the message down; on it, from its first
            # detour below (none: the newest-child rule leads where the branch already goes).
            start: int | None = seq
            if await tree.on_branch(db, conversation_id, seq):
                start = await tree.first_detour(db, conversation_id, seq)
            leaf = current.active_leaf_id
            if start is not None:
                await tree.retarget(db, conversation_id, start)
                leaf = await tree.descend(db, conversation_id, start)
            updated = dataclasses.replace(
                current, active_leaf_id=leaf, updated_at=now, version=current.version + 1
            )
            # MAX: activity only moves forward (Redis: ZADD GT), even if the clock steps back.
            await run(
                db,
                "UPDATE conversations SET active_leaf_id = ?, updated_at = ?,"
                " activity_ms = MAX(activity_ms, ?), version = ? WHERE id = ?",
                (leaf, now, rfc3339_to_ms(now), updated.version, conversation_id),
            )
            self._emit(conversation_id, ev.CONVERSATION_UPDATED, ev.conversation_data(updated))
        return updated

    async def delete_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Deleted:
        async with self._db.session("IMMEDIATE") as db:
            row = await first(
                db,
                f"{tree.SELECT_MESSAGE}, c.user_id, m.parent_seq"
                " FROM conversations AS c JOIN messages AS m ON m.conversation_id = c.id"
                " WHERE c.id = ? AND m.id = ?",
                (conversation_id, message_id),
            )
            # As in Redis, a missing conversation reads "Message not found." here.
            if row is None or not owned(row[5], owner):
                raise NotFound("Message not found.")
            seq, parent_seq = int(row[0]), row[6]
            message = Message.from_json(tree.full(conversation_id, row))
            gone = await tree.subtree(db, conversation_id, seq, message_id)
            ids = [mid for _, mid in gone]
            # The active leaf is in the subtree exactly when the message is on the branch.
            active = await tree.on_branch(db, conversation_id, seq)
            await run(
                db,
                "DELETE FROM messages WHERE conversation_id = ?"
                " AND seq IN (SELECT value FROM json_each(?))",
                (conversation_id, tree.json_list(s for s, _ in gone)),
            )
            await run(
                db,
                "DELETE FROM reply_queue WHERE conversation_id = ?"
                " AND message_id IN (SELECT value FROM json_each(?))",
                (conversation_id, tree.json_list(ids)),
            )
            # Only the count: the seq counter never goes back, so positions are never reused.
            moved: Conversation | None = None
            if active:
                # The branch below the parent was the subtree's: it continues by the rule.
                await run(
                    db,
                    "DELETE FROM branch WHERE conversation_id = ? AND seq >= ?",
                    (conversation_id, seq),
                )
                if parent_seq is not None:
                    await run(
                        db,
                        "UPDATE branch SET detour = 0 WHERE conversation_id = ? AND seq = ?",
                        (conversation_id, parent_seq),
                    )
                leaf = await tree.descend(db, conversation_id, parent_seq)
                await run(
                    db,
                    "UPDATE conversations SET message_count = message_count - ?,"
                    " active_leaf_id = ?, updated_at = ?, version = version + 1 WHERE id = ?",
                    (len(gone), leaf, utcnow(), conversation_id),
                )
                moved = conversation_from_row(
                    await self._conversation_row(db, conversation_id, None)
                )
            else:
                await run(
                    db,
                    "UPDATE conversations SET message_count = message_count - ? WHERE id = ?",
                    (len(gone), conversation_id),
                )
                if parent_seq is not None:
                    await tree.refresh_detour(db, conversation_id, parent_seq)
            self._emit(
                conversation_id, ev.MESSAGE_DELETED, ev.message_deleted_data(message_id, ids)
            )
            if moved is not None:
                self._emit(conversation_id, ev.CONVERSATION_UPDATED, ev.conversation_data(moved))
            self._db.after_commit(lambda: self._forget_replies(conversation_id, ids))
        return Deleted(message, ids, moved)

    def _forget_replies(self, conversation_id: str, message_ids: list[str]) -> None:
        for mid in message_ids:
            self._replies.deleted(conversation_id, mid)

    async def fork(
        self, conversation_id: str, owner: str | None, message_id: str | None, new: Conversation
    ) -> Conversation:
        async with self._db.session("IMMEDIATE") as db:
            await self._conversation_row(db, conversation_id, owner)
            branch: list[sqlite3.Row] = []
            if message_id is not None:
                seq = await tree.seq_of(db, conversation_id, message_id)
                if seq is None:
                    raise UnknownMessage("message_id")
                listing = await tree.branch_to(db, conversation_id, seq)
                branch = await tree.read(db, conversation_id, listing, None, INT64_MAX, True)
            copies = {str(r[1]): new_id() for r in branch}
            rows: list[tuple[str, int, str, int | None, str]] = []
            above: str | None = None
            for k, r in enumerate(branch, start=1):
                doc = orjson.loads(r[2])
                doc.update(id=copies[str(r[1])], conversation_id=new.id, parent_id=above)
                copy = Message.from_dict(doc)
                copy.reply_message_id = copies.get(copy.reply_message_id or "")
                if not copy.status.is_final:
                    # Nothing will write it any more: it keeps the text its deltas published
                    # (its document is not rewritten as it streams).
                    published = self._replies.parts(conversation_id, str(r[1]))
                    if published is not None:
                        copy = copy.with_parts(published)
                    copy.status = MessageStatus.CANCELLED
                rows.append(
                    (new.id, k, copy.id, k - 1 if k > 1 else None, copy.stored_json().decode())
                )
                above = copy.id
            forked = dataclasses.replace(
                new, message_count=len(rows), version=1, active_leaf_id=above
            )
            try:
                await run(
                    db,
                    "INSERT INTO conversations (id, user_id, data, updated_at, activity_ms,"
                    " message_count, seq, version, active_leaf_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)",
                    (
                        forked.id,
                        forked.user_id,
                        conversation_data(forked),
                        forked.updated_at,
                        rfc3339_to_ms(forked.updated_at),
                        len(rows),
                        len(rows),
                        above,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists("A conversation with this id already exists.") from exc
            await run_many(db, _INSERT_MESSAGE, rows)
            await run_many(db, _INSERT_BRANCH, ((new.id, r[1]) for r in rows))
        return forked
