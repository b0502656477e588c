"""The Redis store's messages and their tree: appending, reading a branch or every message,
siblings, switching branches, deleting subtrees, forking. Each operation is one script of lua/
(the tree's layout and algorithms are described in keys.py and lua/tree.lua) plus, for a page,
one HMGET of the documents.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import operator
from typing import Any

import orjson

from conversational_core.storage import events
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
from conversational_core.storage.errors import (
    BranchChanged,
    Busy,
    Changed,
    IdempotencyMismatch,
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
from conversational_core.storage.redis import scripts
from conversational_core.storage.redis.codec import (
    ONLY_CHILD,
    PARENT_HEAD,
    RedisParts,
    conversation_data,
    conversation_from,
    id_head,
    legacy_body,
    message_from,
    parent_json,
    sibling_tail,
)

_INNER = operator.itemgetter(slice(1, -1))  # a stored document without its braces (no copy)
# A fork's messages are written in batches before their conversation exists; keys of a fork
# that never finished expire.
_FORK_BATCH = 500
_FORK_UNFINISHED_TTL = 3600
# Where the page script's rows begin: after its status, more, width, pre-tree documents, queued
# reply and page version (lua/page.lua).
_ROWS = 6


class RedisMessages(RedisParts):
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
        keys = self.keys
        if idempotency is not None:
            record = keys.append_idempotency(conversation_id, owner or "*", idempotency.key)
            fingerprint, ttl = idempotency.fingerprint, idempotency.ttl_seconds
        else:
            record, fingerprint, ttl = keys.conversation(conversation_id), "", 0
        score = rfc3339_to_ms(now)
        if isinstance(parent, ActiveLeaf):
            parent_arg = ""
        elif parent is None:
            parent_arg = "-"
        else:
            parent_arg = parent
        script_keys = [
            *keys.tree_keys(conversation_id),
            record,
            keys.events(conversation_id),
            keys.replies(conversation_id),
        ]
        # On a single Redis server the user's index and the job signal are written by the same
        # script: one round trip, and a queued reply always has its signal.
        one_script = not self.redis.cluster and owner is not None
        if one_script:
            script_keys += [keys.user_conversations(owner or ""), keys.jobs]
        # The scalars as one JSON argument; those only handed on to Redis as strings (append.lua
        # says why).
        scalars = [
            owner or "",
            now,
            str(ttl),
            fingerprint,
            len(messages),
            str(self._max_len),
            str(self._events_ttl),
            reply_id or "",
            str(score),
            conversation_id,
            parent_arg,
            on_busy or "",
        ]
        args: list[Any] = [
            orjson.dumps(scalars),
            *(m.id for m in messages),
            *(m.stored_parts()[1] for m in messages),
        ]
        if answering is not None:
            answered, expected = answering
            parent_doc, body = answered.stored_parts()
            args += [
                answered.id,
                parent_doc,
                # (no stored document is empty: None never matches, the script says changed)
                "" if expected is None else expected.stored_parts()[1],
                body,
                events.message_data(answered),
            ]
        if one_script or owner is None:
            result = await self.redis.script(scripts.APPEND, script_keys, args)
        else:
            # On a cluster the user's index is in another slot: updated at the same time.
            result, _ = await asyncio.gather(
                self.redis.script(scripts.APPEND, script_keys, args),
                self.redis.call(
                    "ZADD", keys.user_conversations(owner), "XX", "GT", score, conversation_id
                ),
            )
        status = result[0]
        if status == b"missing":
            raise NotFound("Conversation not found.")
        if status == b"noparent":
            raise UnknownMessage("parent_id")
        if status == b"busy":
            raise Busy()
        if status == b"changed":
            raise Changed()
        if reply_id is not None and not one_script:
            # The reply was queued by the script (the conversation's slot); this signals the
            # workers, in the jobs' slot, only once the script has run: a signal sent alongside
            # could be taken before the reply is queued, and acknowledged as work already done.
            # (Also on a replay: the first attempt may have failed just before its signal.) A
            # process that dies right here leaves a queued reply without a signal: the workers'
            # sweep (queue.py) signals it again.
            await self.redis.call("XADD", keys.jobs, "*", "c", conversation_id)
        if status == b"replay":
            fingerprint_stored, _, body = result[1].partition(b"\n")
            if idempotency is None or fingerprint_stored.decode() != idempotency.fingerprint:
                raise IdempotencyMismatch()
            docs = orjson.loads(body)
            return Appended(
                await replayed_messages(self, conversation_id, docs),  # type: ignore[arg-type]
                replayed=True,
            )
        # The store sets each message's parent and sibling position.
        above = result[-1].decode() or None
        for k, m in enumerate(messages):
            m.parent_id = above
            m.sibling_count, m.sibling_index = int(result[3 + 2 * k]), int(result[4 + 2 * k])
            above = m.id
        if owner is None:
            # Written on someone else's behalf: refresh the owner's index from the conversation.
            user = await self.redis.call("HGET", keys.conversation(conversation_id), "user")
            if user is not None:
                await self.redis.call(
                    "ZADD",
                    keys.user_conversations(user.decode()),
                    "XX",
                    "GT",
                    score,
                    conversation_id,
                )
        return Appended(messages, interrupted=[i.decode() for i in result[2]])

    async def get_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Message:
        result = await self.redis.script(
            scripts.GET_MESSAGE, self.keys.tree_keys(conversation_id), [owner or "", message_id]
        )
        if result[0] == b"missing":
            raise NotFound("Conversation not found.")
        if result[0] == b"nomessage":
            raise NotFound("Message not found.")
        if len(result) == 2:  # one chain, a document that names its parent
            return message_from(result[1], message_id, conversation_id)
        return message_from(
            result[1], message_id, conversation_id, result[2], int(result[3]), int(result[4])
        )

    async def list_messages(
        self, conversation_id: str, owner: str | None, query: MessageQuery
    ) -> MessageSlice:
        messages = self.keys.messages(conversation_id)
        # Pages read without an owner (a worker's, an admin's) are not kept: a worker reads
        # the branch of the reply it writes once, and an admin's reads are rare.
        pages = self.pages if owner is not None else None
        key = (conversation_id, *query.key())
        copy = pages.get(key) if pages is not None else None
        result = await self.redis.script(
            scripts.PAGE,
            [*self.keys.tree_keys(conversation_id), self.keys.replies(conversation_id)],
            [
                owner or "",
                query.limit,
                "1" if query.descending else "0",
                "" if query.anchor_seq is None else query.anchor_seq,
                query.anchor_id or "",
                "1" if query.backward else "0",
                query.leaf or "",
                "1" if query.everything else "0",
                b"" if copy is None else copy.version,
            ],
        )
        status = result[0]
        if status == b"same":
            assert copy is not None  # (only a copy's version is answered so)
            assert pages is not None
            pages.served += 1
            page = copy.page
            if page.array is not None and len(page.array) > 1:
                # Served again: its pieces joined once, so that each later serving copies one.
                page.array = (b"".join(page.array),)
            return page
        if status == b"missing":
            raise NotFound("Conversation not found.")
        if status == b"noanchor":
            raise UnknownAnchor()
        if status == b"noleaf":
            raise UnknownMessage("leaf", "query")
        if pages is not None:
            pages.read += 1
        more = bool(result[1])
        width = 4 if result[2] else 2  # id, position[, sibling count, sibling index]
        queued = bool(result[4])  # a reply queued or being written: it may be on this page
        version = result[_ROWS - 1]
        rows = result[_ROWS:]
        ids = rows[::width]
        if not ids:
            return MessageSlice([], [], more)
        docs = await self.redis.call("HMGET", messages, *ids)
        seqs = rows[1::width]
        # Only the edges' positions make cursors: those of the page as the index gave it, so
        # that messages deleted in between are walked past, not taken for the end.
        edges = [int(seqs[0]), int(seqs[-1])] if len(seqs) > 1 else [int(seqs[0])]
        tails: Any
        if width == 4:
            tails = [
                sibling_tail(int(c), int(x)) for c, x in zip(rows[2::4], rows[3::4], strict=True)
            ]
        else:
            tails = itertools.repeat(ONLY_CHILD)
        # result[3]: documents written before trees may be here (they name no parent).
        if None in docs or (result[3] and not all(d.startswith(PARENT_HEAD) for d in docs)):
            return await self._irregular_page(
                conversation_id, ids, [int(s) for s in seqs], docs, tails, more, edges
            )
        # The stored documents, each given back its ids and sibling position: the pieces of the
        # JSON array, joined once when the page is written (a page is the hottest read: no
        # decoding, no per-message copy). Built by map/zip in C: a Python loop over the page
        # measured as 5% of the request.
        head = b'","conversation_id":"' + conversation_id.encode() + b'",'
        separators = itertools.chain((b'[{"id":"',), itertools.repeat(b',{"id":"'))
        inner = map(_INNER, map(memoryview, docs))  # type: ignore[arg-type]  # (generic)
        array = [
            *itertools.chain.from_iterable(
                zip(separators, ids, itertools.repeat(head), inner, tails)
            ),
            b"]",
        ]
        page = MessageSlice(None, edges, more, array=array, queued=queued)
        if pages is not None and version and not queued:
            # What it holds: the documents, and per message its id and pieces (~250 bytes).
            pages.put(key, version, page, sum(map(len, docs)) + 250 * len(ids))
        return page

    async def _irregular_page(
        self,
        conversation_id: str,
        ids: list[bytes],
        seqs: list[int],
        docs: list[bytes | None],
        tails: Any,
        more: bool,
        edges: list[int],
    ) -> MessageSlice:
        """A page with messages deleted since the index was read, or documents written before
        trees (without parent_id: each follows the message before it in creation order, which
        is the message before it on any branch it is on)."""
        tails = list(itertools.islice(tails, len(ids)))
        by_seq = dict(zip(seqs, ids, strict=True))
        raw: list[bytes] = []
        for mid, seq, doc, tail in zip(ids, seqs, docs, tails, strict=True):
            if doc is None:  # deleted in between
                continue
            if doc.startswith(PARENT_HEAD):
                raw.append(id_head(mid, conversation_id) + doc[1:-1] + tail)
                continue
            before = max((s for s in by_seq if s < seq), default=None)
            if before is None:
                rows = await self.redis.call(
                    "ZRANGE",
                    self.keys.index(conversation_id),
                    f"({seq}",
                    "-inf",
                    "BYSCORE",
                    "REV",
                    "LIMIT",
                    0,
                    1,
                )
                parent = rows[0] if rows else None
            else:
                parent = by_seq[before]
            raw.append(
                id_head(mid, conversation_id)
                + b'"parent_id":'
                + parent_json(parent)
                + b","
                + legacy_body(doc)
                + tail
            )
        return MessageSlice(None, edges, more, raw=raw)

    async def list_siblings(
        self, conversation_id: str, owner: str | None, message_id: str, limit: int, after: int
    ) -> MessageSlice:
        result = await self.redis.script(
            scripts.SIBLINGS,
            self.keys.tree_keys(conversation_id),
            [owner or "", message_id, limit, after],
        )
        if result[0] == b"missing":
            raise NotFound("Conversation not found.")
        if result[0] == b"nomessage":
            raise NotFound("Message not found.")
        count, parent, more = int(result[1]), result[2] or None, bool(result[3])
        ids = result[4:]
        if not ids:
            return MessageSlice([], [], more)
        docs = await self.redis.call("HMGET", self.keys.messages(conversation_id), *ids)
        items = [
            message_from(doc, mid, conversation_id, parent, count, after + 1 + k)
            for k, (mid, doc) in enumerate(zip(ids, docs, strict=True))
            if doc is not None
        ]
        return MessageSlice(items, [m.sibling_index for m in items], more)

    async def set_active_leaf(
        self,
        conversation_id: str,
        owner: str | None,
        message_id: str,
        expected_version: int | None,
        now: str,
    ) -> Conversation:
        result = await self.redis.script(
            scripts.SWITCH,
            [*self.keys.tree_keys(conversation_id), self.keys.events(conversation_id)],
            [
                owner or "",
                message_id,
                "" if expected_version is None else expected_version,
                now,
                conversation_id,
                self._max_len,
                self._events_ttl,
            ],
        )
        status = result[0]
        if status == b"missing":
            raise NotFound("Conversation not found.")
        if status == b"changed":
            raise StaleVersion()
        if status == b"nomessage":
            raise UnknownMessage("active_leaf_id")
        conversation = conversation_from(orjson.loads(result[1]))
        await self.redis.call(
            "ZADD",
            self.keys.user_conversations(conversation.user_id),
            "XX",
            "GT",
            rfc3339_to_ms(now),
            conversation_id,
        )
        return conversation

    async def delete_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Deleted:
        keys = self.keys
        result = await self.redis.script(
            scripts.DELETE_MESSAGE,
            [
                *keys.tree_keys(conversation_id),
                keys.events(conversation_id),
                keys.replies(conversation_id),
            ],
            [
                owner or "",
                message_id,
                utcnow(),
                conversation_id,
                self._max_len,
                self._events_ttl,
            ],
        )
        if result[0] == b"missing":
            raise NotFound("Message not found.")
        _, doc, parent, count, index, conv, gone = result
        message = message_from(doc, message_id, conversation_id, parent, int(count), int(index))
        moved = conversation_from(orjson.loads(conv)) if conv else None
        return Deleted(message, [g.decode() for g in gone], moved)

    async def fork(
        self, conversation_id: str, owner: str | None, message_id: str | None, new: Conversation
    ) -> Conversation:
        keys = self.keys
        # The source's branch is read first (ids only; its documents a batch at a time), then
        # written into the new conversation's keys, which exist (PERSIST) only once complete.
        branch: list[str] = []
        exists = await self.redis.call("HGET", keys.conversation(conversation_id), "user")
        if exists is None or (owner is not None and exists.decode() != owner):
            raise NotFound("Conversation not found.")
        if message_id is not None:
            anchor: int | None = None
            while True:
                page = await self.redis.script(
                    scripts.PAGE,
                    keys.tree_keys(conversation_id),
                    [
                        owner or "",
                        _FORK_BATCH,
                        "0",
                        "" if anchor is None else anchor,
                        "",
                        "0",
                        message_id,
                        "0",
                    ],
                )
                if page[0] == b"missing":
                    raise NotFound("Conversation not found.")
                if page[0] == b"noleaf":
                    raise UnknownMessage("message_id")
                width = 4 if page[2] else 2
                rows = page[_ROWS:]
                branch.extend(i.decode() for i in rows[::width])
                if not page[1]:
                    break
                anchor = int(rows[-width + 1])
        copies = {old: new_id() for old in branch}
        messages_key, index_key = keys.messages(new.id), keys.index(new.id)
        above: str | None = None
        for start in range(0, len(branch), _FORK_BATCH):
            batch = branch[start : start + _FORK_BATCH]
            docs = await self.redis.call("HMGET", keys.messages(conversation_id), *batch)
            if None in docs:
                raise BranchChanged()
            written: list[bytes] = []
            originals = [
                message_from(doc, old, conversation_id)
                for old, doc in zip(batch, docs, strict=True)
            ]
            # A reply being written keeps the text its deltas published (its document is not
            # rewritten as it streams).
            published = await self.published_parts(
                conversation_id, [m.id for m in originals if not m.status.is_final]
            )
            for old, original in zip(batch, originals, strict=True):
                copy = original.replace(
                    id=copies[old],
                    conversation_id=new.id,
                    parent_id=above,
                    reply_message_id=copies.get(original.reply_message_id or ""),
                )
                if not copy.status.is_final:
                    if old in published:
                        copy = copy.with_parts(published[old])
                    copy.status = MessageStatus.CANCELLED
                written.append(copy.stored_json())
                above = copy.id
            await self.redis.script(
                scripts.FORK_COPY,
                [messages_key, index_key],
                [
                    start + 1,
                    _FORK_UNFINISHED_TTL,
                    len(batch),
                    *(copies[o] for o in batch),
                    *written,
                ],
            )
        forked = dataclasses.replace(
            new, message_count=len(branch), version=1, active_leaf_id=above
        )
        args: list[Any] = [
            forked.user_id,
            conversation_data(forked),
            forked.updated_at,
            1,
            forked.on_busy,
        ]
        if branch:
            args += [len(branch), above]
        await self.redis.script(
            scripts.CREATE, [keys.conversation(new.id), messages_key, index_key], args
        )
        await self.redis.call(
            "ZADD",
            keys.user_conversations(forked.user_id),
            "NX",
            rfc3339_to_ms(forked.updated_at),
            forked.id,
        )
        return forked
