"""The storage interfaces. Only `storage/` knows key layouts or SQL; everything above uses these.

A backend (factory.py) is four objects: the :class:`Store` of conversations and messages, the
:class:`EventHub` that streams their events to this process's clients, the :class:`JobQueue` of
the reply workers, and the :class:`Counters` of the rate limits. There are two backends: Redis
(`storage/redis/`, also a Redis Cluster) and the embedded one (`storage/embedded/`: SQLite and
in-process parts). One contract suite runs over both (tests/test_store_contract.py and its
neighbours); where they differ, one of them is wrong.

Ownership is a rule of the service layer, but the check itself happens inside the store's atomic
operation (the `owner` argument) so that a request costs one round trip and nothing can change
between the check and the write. `owner=None` skips the check (the service decides who may).

Errors (storage/errors.py, nothing HTTP): every method raises `Unavailable` when the backend
cannot serve right now, `NotFound` for a missing (or not owned) object and `StaleVersion` when
`expected_version` does not match.

Trees. A conversation's messages form a tree (each message has a `parent_id`; roots have none)
and the conversation has an active leaf: the last message of the branch its user sees. A new
message is appended under a parent (by default the active leaf) and becomes the active leaf with
the messages that come with it. Children are ordered by creation; the "newest child" rule
(set_active_leaf, delete_message) follows the last-created child at each step. Every tree
operation is one atomic step, and costs what it changes, not what the conversation holds:
appending, reading a page of a branch and regenerating cost the same at 10 messages as at
100,000, and a switch of branch costs the length of the part that changes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from conversational_core.storage import events
from conversational_core.storage.errors import NotFound
from conversational_core.storage.models import (
    TEXT,
    Conversation,
    Message,
    MessageStatus,
    Page,
    Part,
)

OnBusy = Literal["queue", "reject", "interrupt"]


class ActiveLeaf:
    """The parent of a new message when none is named: the conversation's active leaf."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ACTIVE_LEAF"


ACTIVE_LEAF: Final = ActiveLeaf()


@dataclass(frozen=True, slots=True)
class Idempotency:
    """A client's Idempotency-Key, scoped to the caller, with a fingerprint of the request body."""

    key: str
    fingerprint: str
    ttl_seconds: int


@dataclass(frozen=True, slots=True)
class ConversationCursor:
    """Position in a user's conversation list: (activity in ms, id), exclusive."""

    activity_ms: int
    conversation_id: str


def encode_conversation_cursor(cursor: ConversationCursor) -> str:
    raw = orjson.dumps([cursor.activity_ms, cursor.conversation_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_conversation_cursor(value: str) -> ConversationCursor:
    """Raises ValueError for anything that is not a cursor this service made."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        activity_ms, conversation_id = orjson.loads(raw)
    except (binascii.Error, orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError("invalid cursor") from exc
    # (not a bool: JSON's true is a Python int too; nor past what Redis takes)
    if type(activity_ms) is not int or not isinstance(conversation_id, str):
        raise ValueError("invalid cursor")
    if not -(2**63) <= activity_ms < 2**63:
        raise ValueError("invalid cursor")
    return ConversationCursor(activity_ms, conversation_id)


@dataclass(slots=True)  # not frozen: made per page read; frozen, each field costs 10x to set
class MessageQuery:
    """A page of a conversation's messages.

    The list is a branch of the conversation's tree, root to leaf: the active branch, or with
    `leaf` the branch that ends at that message; with `everything`, every message of the tree in
    creation order instead. It is read in that order (`descending=False`) or from the end.
    Without an anchor the page starts at the list's beginning. With an anchor (a position
    `anchor_seq`, or a message id `anchor_id`, which must be in the list), `backward=False`
    returns the messages that follow the anchor in list order and `backward=True` the `limit`
    messages closest before it (still in list order). Positions are creation positions: they
    grow along every branch, so a position is a cursor in any of these lists.
    """

    limit: int
    descending: bool = False
    anchor_seq: int | None = None
    anchor_id: str | None = None
    backward: bool = False
    leaf: str | None = None
    everything: bool = False

    def key(self) -> tuple[object, ...]:
        """Every field, as a tuple of plain values (hashed and compared in C, where the
        dataclass's own __hash__ and __eq__ are Python functions): a kept page's key."""
        return (
            self.limit,
            self.descending,
            self.anchor_seq,
            self.anchor_id,
            self.backward,
            self.leaf,
            self.everything,
        )


@dataclass(slots=True)
class Appended:
    """What append_messages stored: the messages (with their parents and sibling positions), or
    on an idempotent replay those of the first request."""

    messages: list[Message]
    replayed: bool = False
    # With on_busy="interrupt": the replies that were pending or being written when these were
    # added. The store stopped none of them; the caller cancels them (they are ahead in the
    # reply queue, so the new reply is written only once they have ended).
    interrupted: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Deleted:
    """What delete_message removed: the message, as it was, and the ids of its whole subtree
    (itself first). `conversation` is the conversation as it is now when its active branch
    moved (its active leaf was in the subtree), else None."""

    message: Message
    deleted_ids: list[str]
    conversation: Conversation | None = None


class MessageSlice:
    """A page of messages. A backend that holds the messages' JSON may hand it over instead of
    decoded messages — as a list of documents (`raw`) or as one JSON array (`array`) — so that an
    HTTP page is assembled from the stored bytes (the hot path of reading a conversation) and
    messages are decoded only if someone asks for `items`."""

    __slots__ = ("_items", "array", "has_more", "queued", "raw", "seqs")

    # `array`: the pieces of one JSON array (bytes-like), joined only once they are written.
    # `queued`: whether the conversation has a reply queued or being written, when the backend
    # tells (None: unknown): False means no message of the page is streaming.

    def __init__(
        self,
        items: list[Message] | None,
        seqs: list[int],
        has_more: bool,
        raw: list[bytes] | None = None,
        array: Sequence[bytes | memoryview] | None = None,
        queued: bool | None = None,
    ) -> None:
        if items is None and raw is None and array is None:
            raise ValueError("a slice needs items, raw documents or a JSON array")
        self._items = items
        self.seqs = seqs
        self.has_more = has_more
        self.raw = raw
        self.array = array
        self.queued = queued

    @property
    def items(self) -> list[Message]:
        if self._items is None:
            if self.array is not None:
                self._items = [Message.from_dict(d) for d in orjson.loads(b"".join(self.array))]
            else:
                assert self.raw is not None
                self._items = [Message.from_json(doc) for doc in self.raw]
        return self._items

    def json_array(self, head: bytes = b"", tail: bytes = b"") -> bytes:
        """The messages as one JSON array, in page order, between `head` and `tail` (joined in
        one copy: a page is tens of kilobytes, and every extra concatenation copies it)."""
        if self.array is not None:
            pieces: Iterable[bytes | memoryview] = self.array
        else:
            docs = self.raw if self.raw is not None else [m.to_json() for m in self.items]
            pieces = (b"[", b",".join(docs), b"]")
        return b"".join(itertools.chain((head,), pieces, (tail,)))


@dataclass(frozen=True, slots=True)
class PageCopyStats:
    """A process's kept pages (Redis store: storage/redis/pages.py), counted since it began:
    page reads served from a copy still current, and read from the store; the copies' size."""

    served: int
    read: int
    bytes: int


class Store(ABC):
    """Persistent storage of conversations and their messages."""

    backend: str

    def page_copy_stats(self) -> PageCopyStats | None:
        """What this process's kept pages did, when it keeps pages (for the metrics)."""
        return None

    @abstractmethod
    async def ping(self) -> None:
        """Check the backend answers; raise Unavailable if not."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""

    # Conversations -----------------------------------------------------------------------------

    @abstractmethod
    async def create_conversation(
        self, conversation: Conversation, idempotency: Idempotency | None = None
    ) -> tuple[Conversation, bool]:
        """Store a new conversation. Returns it and whether this was a replay of an earlier
        request with the same idempotency key (then the first result is returned, nothing is
        created)."""

    @abstractmethod
    async def get_conversation(self, conversation_id: str, owner: str | None) -> Conversation:
        """The conversation, if it exists and belongs to `owner` (any owner when None)."""

    @abstractmethod
    async def list_conversations(
        self, user_id: str, limit: int, after: ConversationCursor | None
    ) -> Page[Conversation]:
        """The user's conversations, most recent activity first, `limit` at a time; the page's
        `next_cursor` is an encoded :class:`ConversationCursor`
        (see :func:`encode_conversation_cursor`)."""

    @abstractmethod
    async def update_conversation(
        self,
        conversation_id: str,
        owner: str | None,
        changes: dict[str, Any],
        expected_version: int | None,
        now: str,
    ) -> Conversation:
        """Apply `changes` (fields of CONVERSATION_MUTABLE) atomically, bumping the version."""

    @abstractmethod
    async def delete_conversation(self, conversation_id: str, owner: str | None) -> Conversation:
        """Delete a conversation and all its messages; returns what was deleted."""

    # Messages ------------------------------------------------------------------------------------

    @abstractmethod
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
        """Append messages in one atomic step: the first under `parent` (a message id, None for
        a new root, or the active leaf), each next one under the one before (a user message and
        the assistant message that will hold its reply go together). The last becomes the
        active leaf. Bumps `message_count` and the conversation's activity, and emits
        `message.created` for each (with its parent and sibling position). With `reply_id`
        (one of `messages`, a pending assistant message) the reply is put on the conversation's
        reply queue and the job queue is told, in the same step: never a message without its
        job. The `parent_id` and `reply_message_id` the messages carry are ignored/kept as
        given: the store sets `parent_id`, `sibling_count` and `sibling_index`.

        While a reply is pending or being written (the reply queue is not empty), `on_busy`
        decides (None: the conversation's own `on_busy`, read in the same atomic step): "queue"
        appends, "reject" raises Busy and stores nothing, "interrupt" appends and returns the
        replies ahead in `Appended.interrupted`.

        With `answering` = (answered, expected) — tool results: `parent` is the id of an
        assistant message waiting for them — that message is first replaced, in the same step,
        by `answered` (a compare-and-set against `expected`, its event `message.completed`);
        Changed is raised, and nothing written, when it is no longer `expected` - or at once
        when `expected` is None (the message was not waiting: only an idempotent replay of the
        request that answered it returns).

        Raises NotFound (conversation), UnknownMessage("parent_id") when `parent` is not a
        message of the conversation, IdempotencyMismatch. On an idempotent replay the messages
        of the first request are returned and nothing is written."""

    @abstractmethod
    async def get_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Message:
        """One message of a conversation that `owner` may see."""

    @abstractmethod
    async def list_messages(
        self, conversation_id: str, owner: str | None, query: MessageQuery
    ) -> MessageSlice:
        """A page of messages (see :class:`MessageQuery`); raises UnknownAnchor, and
        UnknownMessage("leaf") when `query.leaf` is not a message of the conversation."""

    @abstractmethod
    async def list_siblings(
        self, conversation_id: str, owner: str | None, message_id: str, limit: int, after: int
    ) -> MessageSlice:
        """The message and its siblings (its parent's children) in creation order, from index
        `after + 1` (-1: from the first), at most `limit`; the slice's `seqs` are their indexes.
        Raises NotFound when the message is not in the conversation."""

    @abstractmethod
    async def set_active_leaf(
        self,
        conversation_id: str,
        owner: str | None,
        message_id: str,
        expected_version: int | None,
        now: str,
    ) -> Conversation:
        """Make the active branch the one reached from `message_id` by following the newest
        child at each step; bumps the version and emits `conversation.updated`. Raises
        UnknownMessage("active_leaf_id"), StaleVersion."""

    @abstractmethod
    async def fork(
        self, conversation_id: str, owner: str | None, message_id: str | None, new: Conversation
    ) -> Conversation:
        """Create `new` (its settings and `forked_from` filled in by the caller) holding copies,
        with new ids, of the branch from the root to `message_id` (None: an empty copy). The
        copies keep their content, metadata, usage and times; a reply that had not ended is
        copied `cancelled` with its text so far; `reply_message_id` points to the copy. Returns
        `new` as stored. Raises NotFound, UnknownMessage("message_id")."""

    # Changes to one message. Each is a compare-and-set: it stores `message` if the stored one
    # still equals `expected` and returns it, or returns None when it changed meanwhile (the
    # caller re-reads and retries, or answers 412 when the client asked for a version). Each is
    # one atomic step with its event.

    @abstractmethod
    async def update_message(
        self, conversation_id: str, owner: str | None, message: Message, expected: Message
    ) -> Message | None:
        """A client's edit (content, metadata): `message.updated`."""

    @abstractmethod
    async def start_attempt(
        self, conversation_id: str, reply: Message, expected: Message, attempt: int
    ) -> Message | None:
        """A worker starts writing the reply (again): `message.updated`. The text published
        so far is forgotten, and from now on only deltas of `attempt` pass (a worker that lost
        the reply to another is refused). Raises ReplyStopped (writing nothing) when the reply
        was stopped: whoever stopped it did not get to cancel it, and the caller should."""

    @abstractmethod
    async def flush_reply(
        self, conversation_id: str, reply: Message, expected: Message
    ) -> Message | None:
        """Store the reply being written as it is now (its text so far, readable with a GET),
        without an event: its clients follow the deltas."""

    @abstractmethod
    async def finish_reply(
        self, conversation_id: str, reply: Message, expected: Message
    ) -> Message | None:
        """The reply ended (`reply.status` completed, failed, or requires_action: it waits for
        tool results): its event, the reply leaves the reply queue, and no later delta passes
        (not even a stale writer's)."""

    @abstractmethod
    async def release_ended_reply(self, conversation_id: str, reply: Message) -> None:
        """A reply that has ended (`reply` as stored) but is still on the reply queue leaves
        it, with no event: no path should leave one there, and the conversation's next replies
        would wait behind it for good."""

    @abstractmethod
    async def cancel_reply(
        self, conversation_id: str, owner: str | None, reply: Message, expected: Message
    ) -> Message | None:
        """The reply was cancelled (`reply.status` cancelled): `message.cancelled`, it leaves
        the reply queue, and no later delta passes."""

    @abstractmethod
    async def delete_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Deleted:
        """Delete a message and its whole subtree in one step. Emits one `message.deleted`
        (`message_id`, and `deleted_message_ids`: the whole subtree); replies of the subtree that
        were pending or streaming leave the reply queue and their generation stops
        (publish_delta returns False). When the active leaf was in the subtree, the active
        branch moves to the message's parent by the newest-child rule and
        `conversation.updated` is emitted."""

    # Events and replies --------------------------------------------------------------------

    @abstractmethod
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
        """Emit `message.delta` (events.delta_data) for a reply being written: a piece of its
        part `part_index`. False (and nothing emitted) when the reply ended, was cancelled or
        deleted, or its conversation deleted, or when `attempt` is not the reply's current
        one: the writer must stop. The store keeps a reply's published deltas (stop_reply).
        `urgent` (a reply's first delta, which its client waits for): sent at once rather than
        with the writes of the moment (a hint; a store may ignore it)."""

    @abstractmethod
    async def published_parts(
        self, conversation_id: str, message_ids: list[str]
    ) -> dict[str, list[Part]]:
        """The parts the deltas of replies being written published so far (their current
        attempt's), for the ids that published any: what a GET shows of a streaming reply. A
        reply's stored document is not rewritten while it streams (that would cost a whole
        document per save); its deltas are kept as they go (publish_delta), appended."""

    @abstractmethod
    async def stop_reply(self, conversation_id: str, message_id: str) -> list[Part] | None:
        """Refuse every later delta of the reply (atomically), and return exactly the parts its
        deltas published so far (events.parts_from_deltas; None when none was published)."""

    @abstractmethod
    async def read_events(self, conversation_id: str, after: str | None, limit: int) -> list[Event]:
        """Retained events of a conversation strictly after the id `after` (from the oldest
        retained one when None), oldest first, at most `limit`. A malformed id raises
        ValueError."""

    @abstractmethod
    async def last_event_id(self, conversation_id: str) -> str | None:
        """The id of the newest event of the conversation, or None when it has none."""

    @abstractmethod
    async def reply_queue_head(self, conversation_id: str) -> str | None:
        """The id of the oldest reply of the conversation still to be written (or being
        written), or None. Replies of one conversation are written one after the other."""


async def replayed_messages(
    store: Store, conversation_id: str, docs: list[dict[str, Any]]
) -> list[Message]:
    """The messages of an append's idempotency record. A record written before trees has no
    parent or sibling position: such a message is given as it is stored now (or as recorded,
    once it is gone), rather than as a root it never was."""
    out: list[Message] = []
    for doc in docs:
        if "parent_id" not in doc:
            try:
                out.append(await store.get_message(conversation_id, None, doc["id"]))
                continue
            except NotFound:
                pass
        out.append(Message.from_dict(doc))
    return out


_ENDS = {
    MessageStatus.COMPLETED: events.MESSAGE_COMPLETED,
    MessageStatus.FAILED: events.MESSAGE_FAILED,
    MessageStatus.CANCELLED: events.MESSAGE_CANCELLED,
    MessageStatus.REQUIRES_ACTION: events.MESSAGE_REQUIRES_ACTION,
}


class CompareAndSet(Store):
    """The named changes to one message, for a backend that has one compare-and-set
    (`_replace`) doing each with its event."""

    async def update_message(
        self, conversation_id: str, owner: str | None, message: Message, expected: Message
    ) -> Message | None:
        return await self._replace(
            conversation_id, owner, message, expected, events.MESSAGE_UPDATED
        )

    async def start_attempt(
        self, conversation_id: str, reply: Message, expected: Message, attempt: int
    ) -> Message | None:
        return await self._replace(
            conversation_id, None, reply, expected, events.MESSAGE_UPDATED, restart=attempt
        )

    async def flush_reply(
        self, conversation_id: str, reply: Message, expected: Message
    ) -> Message | None:
        return await self._replace(conversation_id, None, reply, expected, None)

    async def finish_reply(
        self, conversation_id: str, reply: Message, expected: Message
    ) -> Message | None:
        return await self._replace(
            conversation_id, None, reply, expected, _ENDS[reply.status], ended=True
        )

    async def release_ended_reply(self, conversation_id: str, reply: Message) -> None:
        await self._replace(conversation_id, None, reply, reply, None, ended=True)

    async def cancel_reply(
        self, conversation_id: str, owner: str | None, reply: Message, expected: Message
    ) -> Message | None:
        return await self._replace(
            conversation_id, owner, reply, expected, events.MESSAGE_CANCELLED, ended=True
        )

    @abstractmethod
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
        """Store `message` if the stored one is still `expected` (else None: it changed; the
        message keeps the parent it is stored with). With `event`, emit it; `ended` takes the
        reply off the queue and refuses its later deltas; `restart` forgets the text published
        so far and lets only that attempt's deltas pass, unless the reply was stopped
        (ReplyStopped, nothing written). Raises NotFound."""


@dataclass(slots=True)  # not frozen: made per event; frozen, each field costs 10x to set
class Event:
    """One event of a conversation's stream: `id` orders events within the conversation."""

    id: str
    type: str
    data: bytes  # a JSON object


class Counters(ABC):
    """Fixed-window counters (of the rate limits), shared by every process of the backend."""

    @abstractmethod
    async def hit(
        self, scope: str, identity: str, amount: int, seconds: int, want: int = 1
    ) -> tuple[int, float, int]:
        """Count hits of `identity` in `scope` for the rate `amount` per `seconds`: `want` of
        them, or fewer where that would pass `amount` (never fewer than one). Returns (hits in
        the current window, these included, seconds until the window resets, hits counted).
        A window starts at its first hit."""

    @abstractmethod
    async def refund(self, scope: str, identity: str, amount: int, seconds: int) -> None:
        """Take one hit back (never below zero, never starting a window)."""


class SlowConsumer(Exception):
    """The client's buffer overflowed; it should reconnect with Last-Event-ID."""


class EventHub(ABC):
    """Fans out conversation events to the clients connected to this process."""

    @abstractmethod
    def subscribe(
        self, conversation_id: str, after: str | None
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[list[Event]]]:
        """Live events of one conversation for one client, strictly after `after` (retained ones
        first, then live ones, without gaps or duplicates); when `after` is None, only events
        that happen from now on. Each item is a batch, never empty: the events there were at
        once (a client writes them in one go). When events after `after` are no longer retained
        (it is older than the oldest one kept: trimmed, the stream expired, a restart of the
        embedded store; also when that happens while the client catches up), the client gets a
        `conversation.resync` event instead of them (events.resync_data; its id the newest
        event's, or `after` when none is retained; the deletion instead, when that is the
        newest), then the events after it: it reads the conversation again rather than going
        on with a gap. Iteration raises :class:`SlowConsumer` when the client fell further
        behind than its buffer allows, and ends when the hub closes."""

    @abstractmethod
    async def resumes(self, conversation_id: str, after: str) -> bool:
        """Whether `after` can be the id of an event of the conversation (in this hub's form of
        ids, and not later than its newest event): resuming after anything else would hide
        every event until the conversation's passed it (an id from another store, or from the
        future). Events that aged out of retention do not make an id unknown (subscribe tells
        the client to resync)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop fanning out and end every subscription."""


@dataclass(slots=True)  # not frozen: made per job; frozen, each field costs 10x to set
class Job:
    """A signal that a conversation has replies to write. `id` acknowledges it."""

    id: str
    conversation_id: str
    consumer: str = ""  # who took it (backends that track consumers)


class JobQueue(ABC):
    """Durable signals of work, plus per-conversation leases so that one worker at a time writes
    a conversation's replies, in order.

    Protocol of a worker: :meth:`take` jobs; for each, :meth:`acquire` the conversation's lease
    (if another worker holds it, leave the job unacknowledged: it is delivered again after the
    lease time should that worker die); write replies while :meth:`Store.reply_queue_head`
    gives one, calling :meth:`renew` at least every third of the lease time; then
    :meth:`release` (False: new replies arrived meanwhile, keep going) and :meth:`ack`."""

    @abstractmethod
    async def take(self, consumer: str, count: int, wait_seconds: float) -> list[Job]:
        """Up to `count` jobs: new ones, or ones whose worker stopped renewing for longer than
        the lease time. Waits up to `timeout` seconds when there are none."""

    @abstractmethod
    async def acquire(self, conversation_id: str, token: str) -> bool:
        """Take the conversation's lease (False when another holder has it)."""

    @abstractmethod
    async def renew(self, conversation_id: str, token: str, job: Job) -> bool:
        """Extend the lease and keep the job from being handed to another worker; False when
        the lease was lost."""

    @abstractmethod
    async def release(self, conversation_id: str, token: str) -> bool:
        """Give the lease back if the conversation has no reply left to write (atomically with
        that check); False, keeping the lease, when it has."""

    @abstractmethod
    async def ack(self, job: Job) -> None:
        """The job is done: forget it."""

    @abstractmethod
    async def hand_back(self, job: Job, token: str) -> None:
        """A stopping worker gives its job back unfinished: the lease is freed (if still the
        caller's) and the job can be taken by another worker at once, not after the lease time."""

    @abstractmethod
    async def stats(self) -> tuple[int, float]:
        """(jobs waiting or running, age in seconds of the oldest one), for metrics."""

    @abstractmethod
    async def waiting(self) -> int:
        """Jobs no worker has taken yet (waiting for admission), for metrics."""

    # Deadlines: messages to look at again at a given time (a reply waiting for tool results
    # fails once TOOL_RESULT_TIMEOUT_SECONDS have passed), shared by every worker. A deadline
    # is registered before the state it guards is written and removed only once handled, so
    # that none is lost to a worker that dies; handling one twice must be harmless.

    @abstractmethod
    async def add_deadline(self, conversation_id: str, message_id: str, at: float) -> None:
        """Look at the message again at `at` (seconds since the epoch)."""

    @abstractmethod
    async def due_deadlines(self, now: float, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` (conversation id, message id) whose time has come, oldest first."""

    @abstractmethod
    async def remove_deadline(self, conversation_id: str, message_id: str) -> None:
        """The deadline was handled (or is moot)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""
