"""The Redis store's compare-and-set of one message (one script, with its event; the named
changes over it are base.CompareAndSet's), the deltas of replies being written, and the reading
of a conversation's events."""

from __future__ import annotations

import re
from typing import Any

from conversational_core.storage import events
from conversational_core.storage.base import CompareAndSet, Event
from conversational_core.storage.errors import NotFound, ReplyStopped
from conversational_core.storage.models import TEXT, Message, Part
from conversational_core.storage.redis import scripts
from conversational_core.storage.redis.codec import RedisParts

_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


class RedisReplies(RedisParts, CompareAndSet):
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
        """Store `message` if the stored one is still `expected` (else None: it changed). With
        `event`, emit it; `ended` takes the reply off the queue and refuses its later deltas;
        `restart` forgets the text published so far and lets only that attempt's deltas pass."""
        keys = self.keys
        expected_parent, expected_body = expected.stored_parts()
        parent, body = message.stored_parts()
        result = await self.redis.script(
            scripts.REPLACE,
            [
                *keys.tree_keys(conversation_id),
                keys.events(conversation_id),
                keys.replies(conversation_id),
                keys.stopped(conversation_id, message.id),
                keys.published(conversation_id, message.id),
                keys.attempt(conversation_id, message.id),
            ],
            [
                owner or "",
                message.id,
                expected_parent,
                expected_body,
                parent,
                body,
                event or "",
                conversation_id,
                "1" if ended else "0",
                self._max_len,
                self._events_ttl,
                "" if restart is None else restart,
            ],
        )
        if result[0] == b"missing":
            raise NotFound("Message not found.")
        if result[0] == b"changed":
            return None
        if result[0] == b"stopped":
            log = result[1]
            raise ReplyStopped(events.parts_from_deltas(log) if log is not None else None)
        return message

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
        keys = self.keys
        published = await self.redis.script(
            scripts.DELTA,
            [
                keys.messages(conversation_id),
                keys.events(conversation_id),
                keys.stopped(conversation_id, message_id),
                keys.published(conversation_id, message_id),
                keys.attempt(conversation_id, message_id),
            ],
            [
                message_id,
                events.delta_data(message_id, delta, part_index, part_type, start),
                self._max_len,
                self._events_ttl,
                "" if attempt is None else attempt,
            ],
            urgent=urgent,
        )
        return bool(published)

    async def stop_reply(self, conversation_id: str, message_id: str) -> list[Part] | None:
        log = await self.redis.script(
            scripts.STOP,
            [
                self.keys.stopped(conversation_id, message_id),
                self.keys.published(conversation_id, message_id),
            ],
            [self._events_ttl],
        )
        return events.parts_from_deltas(log) if log is not None else None

    async def read_events(self, conversation_id: str, after: str | None, limit: int) -> list[Event]:
        if after is not None and not _STREAM_ID.fullmatch(after):
            raise ValueError("not an event id")
        return await self._xrange(conversation_id, f"({after}" if after else "-", limit)

    async def read_events_from(self, conversation_id: str, start: str, limit: int) -> list[Event]:
        """Retained events from the id `start` on, itself included when it is retained: the
        event hub tells by the first one whether what followed `start` is all there."""
        if not _STREAM_ID.fullmatch(start):
            raise ValueError("not an event id")
        return await self._xrange(conversation_id, start, limit)

    async def _xrange(self, conversation_id: str, start: str, limit: int) -> list[Event]:
        rows = await self.redis.call(
            "XRANGE", self.keys.events(conversation_id), start, "+", "COUNT", limit
        )
        return [stream_event(entry_id, fields) for entry_id, fields in rows]

    async def last_event_id(self, conversation_id: str) -> str | None:
        newest = await self.newest_event(conversation_id)
        return newest.id if newest is not None else None

    async def newest_event(self, conversation_id: str) -> Event | None:
        rows = await self.redis.call(
            "XREVRANGE", self.keys.events(conversation_id), "+", "-", "COUNT", 1
        )
        return stream_event(*rows[0]) if rows else None

    async def reply_queue_head(self, conversation_id: str) -> str | None:
        head = await self.redis.call("LINDEX", self.keys.replies(conversation_id), 0)
        return head.decode() if head is not None else None


def stream_event(entry_id: bytes, fields: list[bytes]) -> Event:
    """An event from a raw XRANGE/XREAD entry (its fields as a flat [k, v, …] list)."""
    values = dict(zip(fields[::2], fields[1::2], strict=True))
    return Event(entry_id.decode(), values[b"t"].decode(), values[b"d"])
