"""The state of replies being written, kept by the embedded store in this process's memory: what
the Redis backend keeps in a reply's `x:`, `p:` and `a:` keys (storage/redis/keys.py).

- which replies are stopped (ended or cancelled: their deltas are refused), for a day;
- the deltas each reply published since it (re)started (a cancel keeps exactly those parts);
- the attempt that may publish (a worker that lost the reply to another is refused).

A reply this process does not know yet (it started before a restart) is looked up once in the
file by the store; from then on a delta costs no I/O.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Final

from conversational_core.storage.events import parts_from_deltas
from conversational_core.storage.models import Part

# How long a stopped reply keeps refusing deltas (Redis: the stop flag's TTL); far longer than any
# reply takes to notice.
STOP_TTL_SECONDS: Final = 86_400.0


class ReplyTracker:
    def __init__(self) -> None:
        # conversation id -> message id -> deltas published since the reply (re)started.
        # Dropped when the message or its conversation is deleted, so that the next delta
        # finds it gone.
        self._published: dict[str, dict[str, list[bytes]]] = {}
        # Stopped replies (conversation id, message id) -> until when (monotonic), oldest first.
        self._stopped: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._attempts: dict[tuple[str, str], int] = {}

    def published(self, conversation_id: str, message_id: str) -> list[bytes] | None:
        """The deltas the reply published (their event data), when this process knows the reply
        exists."""
        replies = self._published.get(conversation_id)
        return replies.get(message_id) if replies is not None else None

    def known(self, conversation_id: str, message_id: str) -> list[bytes]:
        """The reply exists (just checked): its published deltas, from now on kept here."""
        return self._published.setdefault(conversation_id, {}).setdefault(message_id, [])

    def allows(self, conversation_id: str, message_id: str, attempt: int | None) -> bool:
        """Whether a delta of `attempt` may pass (not stopped, the attempt current)."""
        if self.stopped(conversation_id, message_id):
            return False
        return attempt is None or self._attempts.get((conversation_id, message_id)) == attempt

    def stopped(self, conversation_id: str, message_id: str) -> bool:
        """Whether the reply was stopped (or ended) and still refuses deltas."""
        until = self._stopped.get((conversation_id, message_id))
        return until is not None and until > time.monotonic()

    def parts(self, conversation_id: str, message_id: str) -> list[Part] | None:
        """The parts the reply's deltas published since it (re)started; None when nothing."""
        published = self.published(conversation_id, message_id)
        return parts_from_deltas(published) if published else None

    def stop(self, conversation_id: str, message_id: str) -> None:
        now = time.monotonic()
        key = (conversation_id, message_id)
        self._stopped[key] = now + STOP_TTL_SECONDS
        self._stopped.move_to_end(key)
        # Same TTL for all, so the oldest entries expire first.
        while self._stopped:
            first_key, until = next(iter(self._stopped.items()))
            if until > now:
                break
            del self._stopped[first_key]

    def restarted(self, conversation_id: str, message_id: str, attempt: int) -> None:
        """A new attempt starts from nothing; only its deltas pass from now on."""
        self._published.setdefault(conversation_id, {})[message_id] = []
        self._attempts[(conversation_id, message_id)] = attempt

    def ended(self, conversation_id: str, message_id: str) -> None:
        """The reply ended or was cancelled: it refuses deltas, its text is forgotten (a later
        delta checks the file again)."""
        self.stop(conversation_id, message_id)
        self._drop_text(conversation_id, message_id)
        self._attempts.pop((conversation_id, message_id), None)

    def deleted(self, conversation_id: str, message_id: str) -> None:
        """The message is gone: its next delta finds it gone in the file and is refused."""
        self._drop_text(conversation_id, message_id)
        self._stopped.pop((conversation_id, message_id), None)
        self._attempts.pop((conversation_id, message_id), None)

    def conversation_deleted(self, conversation_id: str) -> None:
        self._published.pop(conversation_id, None)

    def _drop_text(self, conversation_id: str, message_id: str) -> None:
        replies = self._published.get(conversation_id)
        if replies is not None:
            replies.pop(message_id, None)
            if not replies:
                del self._published[conversation_id]
