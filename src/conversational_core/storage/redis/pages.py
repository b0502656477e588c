"""The pages of messages a process served lately, kept to be served again while their
conversation has not changed.

Every script that changes what a page of a conversation can show (append, replace, switch,
delete a message: lua/) gives the conversation a new page version (`pv` in its hash), in the
same script as the change: the server's clock in microseconds, or one more than the last when
the clock is not past it (lua/tree.lua), so that no version is ever given twice, not even after
a failover or a restart that lost the last writes. A page read names the version of the copy
held here, if any; the page script answers `same` when the conversation is at that version and
no reply of it is queued or being written (those pages carry live text), and this copy is
served: one script call that answers a word, instead of the page's index reads, the documents'
HMGET, ~50 KB of reply parsed and the JSON array assembled again (for a page of 50 messages,
about a third of what the request cost the API; README, benchmarks). The version is read by Redis
where every writer writes it, so a page is never older than a write that answered before the
read began, whichever process wrote it: read-your-writes holds across processes, as without
copies.

Bounded: at most about PAGE_CACHE_MB in all (least recently used go first; a page
larger than an eighth of it is not kept), and a copy is offered for at most MAX_AGE_SECONDS, so
that a change made by a process that does not count versions (a version before this one,
during a rolling upgrade) is seen at most that late. Conversations never written since this version
have no `pv`: their pages are not kept. Nor are pages read without an owner (a worker reads the
branch of the reply it writes once; an admin's reads are rare).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Hashable
from dataclasses import dataclass

from conversational_core.storage.base import MessageSlice

MAX_AGE_SECONDS = 30.0
# What a kept page costs beyond its documents (its pieces list, the slice, the key): a rough
# figure, so that a budget full of small pages is not far over its size.
_OVERHEAD_BYTES = 1_024


@dataclass(slots=True)
class PageCopy:
    version: bytes
    page: MessageSlice
    size: int
    kept_at: float


class PageCopies:
    """Pages by (conversation id, query), least recently used first."""

    def __init__(self, max_bytes: int, max_age: float = MAX_AGE_SECONDS) -> None:
        self._copies: collections.OrderedDict[Hashable, PageCopy] = collections.OrderedDict()
        self._max_bytes = max_bytes
        self._max_page = max_bytes // 8
        self._max_age = max_age
        self.size = 0
        # Page reads by their owners, for the metrics (app.py reads them now and then): served
        # from a copy still current, and read from Redis.
        self.served = 0
        self.read = 0

    def __len__(self) -> int:
        return len(self._copies)

    def get(self, key: Hashable) -> PageCopy | None:
        """The copy of the page, if one is held and young enough to be offered."""
        copy = self._copies.get(key)
        if copy is None:
            return None
        if time.monotonic() - copy.kept_at > self._max_age:
            self._drop(key)
            return None
        self._copies.move_to_end(key)
        return copy

    def put(self, key: Hashable, version: bytes, page: MessageSlice, size: int) -> None:
        """Keep `page`, read at `version`, in place of any copy of it held before."""
        size += _OVERHEAD_BYTES
        if key in self._copies:
            self._drop(key)
        if size > self._max_page:
            return
        self._copies[key] = PageCopy(version, page, size, time.monotonic())
        self.size += size
        while self.size > self._max_bytes:
            self._drop(next(iter(self._copies)))

    def _drop(self, key: Hashable) -> None:
        self.size -= self._copies.pop(key).size
