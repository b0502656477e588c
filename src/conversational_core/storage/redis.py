"""The Redis store.

Key layout (`P` is REDIS_KEY_PREFIX; `{cid}` is a hash tag so that all keys of one conversation
live in one cluster slot and every multi-key write is one Lua script on that slot):

    P:{cid}:c        hash   user, data (JSON of the conversation's settings), updated_at,
                            count (messages), seq (last position given), version
    P:{cid}:m        hash   message id -> message JSON
    P:{cid}:i        zset   message id scored by its position (seq) in the conversation
    P:{cid}:k:<key>  string idempotency record: fingerprint, newline, JSON of the first result
    P:{u:uid}:convs  zset   the user's conversation ids scored by last activity (ms)
    P:{u:uid}:k:<key> string idempotency record of a conversation creation

Appending a message is O(log N) (HSET + ZADD) and reading a page is O(log N + page) (ZRANGE
BYSCORE LIMIT + HMGET), so both cost the same at 10 and at 100,000 messages. Deleting a
conversation UNLINKs its keys: Redis frees them in a background thread, never blocking.

The per-user index lives in the user's slot, so it is updated beside the conversation's script in
the same pipeline (one round trip; `ZADD XX GT` so that it can only move an existing entry
forward). It is an index: a conversation id found there whose hash is gone is skipped and pruned.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from conversational_core.errors import NotFound, PreconditionFailed, StoreUnavailable
from conversational_core.storage.base import (
    ConversationCursor,
    Idempotency,
    IdempotencyMismatch,
    MessageQuery,
    MessageSlice,
    Store,
    UnknownAnchor,
    encode_conversation_cursor,
)
from conversational_core.storage.models import Conversation, Message, Page, rfc3339_to_ms

# --- Lua scripts (each touches keys of one conversation only) -----------------------------------

# KEYS: conv, msgs, index, idem.  ARGV: owner|'', updated_at, ttl, idem payload|'', n, ids…, jsons…
_APPEND = """
local owner = redis.call('HGET', KEYS[1], 'user')
if not owner or (ARGV[1] ~= '' and owner ~= ARGV[1]) then return {'missing'} end
if ARGV[4] ~= '' then
  local prev = redis.call('GET', KEYS[4])
  if prev then return {'replay', prev} end
end
local n = tonumber(ARGV[5])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', n) - n
for i = 1, n do
  redis.call('HSET', KEYS[2], ARGV[5 + i], ARGV[5 + n + i])
  redis.call('ZADD', KEYS[3], seq + i, ARGV[5 + i])
end
redis.call('HINCRBY', KEYS[1], 'count', n)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
if ARGV[4] ~= '' then redis.call('SET', KEYS[4], ARGV[4], 'EX', tonumber(ARGV[3])) end
return {'ok', seq + 1}
"""

# KEYS: conv, msgs, index.  ARGV: owner|'', limit, descending, anchor_seq|'', anchor_id|'', backward
_PAGE = """
local owner = redis.call('HGET', KEYS[1], 'user')
if not owner or (ARGV[1] ~= '' and owner ~= ARGV[1]) then return {'missing'} end
local anchor = nil
if ARGV[5] ~= '' then
  local s = redis.call('ZSCORE', KEYS[3], ARGV[5])
  if not s then return {'noanchor'} end
  anchor = s
elseif ARGV[4] ~= '' then
  anchor = ARGV[4]
end
local limit = tonumber(ARGV[2])
local rows
if (ARGV[3] == '1') == (ARGV[6] == '1') then
  local min = anchor and ('(' .. anchor) or '-inf'
  rows = redis.call('ZRANGE', KEYS[3], min, '+inf', 'BYSCORE', 'LIMIT', 0, limit + 1, 'WITHSCORES')
else
  local max = anchor and ('(' .. anchor) or '+inf'
  rows = redis.call('ZRANGE', KEYS[3], max, '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, limit + 1,
                    'WITHSCORES')
end
local count = #rows / 2
local more = 0
if count > limit then more = 1; count = limit end
local out = {'ok', more}
if count == 0 then return out end
local ids = {}
for i = 1, count do ids[i] = rows[2 * i - 1] end
local docs = redis.call('HMGET', KEYS[2], unpack(ids))
for i = 1, count do
  out[#out + 1] = rows[2 * i]
  out[#out + 1] = docs[i]
end
return out
"""

# KEYS: conv, msgs.  ARGV: owner|'', id, expected json, new json
_REPLACE = """
local owner = redis.call('HGET', KEYS[1], 'user')
if not owner or (ARGV[1] ~= '' and owner ~= ARGV[1]) then return {'missing'} end
local cur = redis.call('HGET', KEYS[2], ARGV[2])
if not cur then return {'missing'} end
if cur ~= ARGV[3] then return {'changed'} end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
return {'ok'}
"""

# KEYS: conv, msgs, index.  ARGV: owner|'', id
_DELETE_MESSAGE = """
local owner = redis.call('HGET', KEYS[1], 'user')
if not owner or (ARGV[1] ~= '' and owner ~= ARGV[1]) then return {'missing'} end
local cur = redis.call('HGET', KEYS[2], ARGV[2])
if not cur then return {'missing'} end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'count', -1)
return {'ok', cur}
"""

# KEYS: conv.  ARGV: user, data json, updated_at, version.  Creates only if absent.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'data', ARGV[2], 'updated_at', ARGV[3],
           'count', 0, 'seq', 0, 'version', ARGV[4])
return 1
"""

# KEYS: conv.  ARGV: owner|'', expected version|'', data json, updated_at
_UPDATE_CONVERSATION = """
local cur = redis.call('HMGET', KEYS[1], 'user', 'version')
if not cur[1] or (ARGV[1] ~= '' and cur[1] ~= ARGV[1]) then return {'missing'} end
if ARGV[2] ~= '' and cur[2] ~= ARGV[2] then return {'changed'} end
redis.call('HSET', KEYS[1], 'data', ARGV[3], 'updated_at', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'version', 1)
return {'ok'}
"""

# KEYS: conv, msgs, index.  ARGV: owner|''
_DELETE_CONVERSATION = """
local cur = redis.call('HMGET', KEYS[1], 'user', 'data', 'updated_at', 'count', 'version')
if not cur[1] or (ARGV[1] ~= '' and cur[1] ~= ARGV[1]) then return {'missing'} end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3])
return {'ok', cur[2], cur[3], cur[4], cur[5]}
"""

_CONV_FIELDS = ("user", "data", "updated_at", "count", "version")


class _Script:
    """A Lua script called by SHA, reloaded transparently after a Redis restart (NOSCRIPT)."""

    def __init__(self, source: str) -> None:
        import hashlib

        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


def build_client(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int,
    client_name: str = "conversational-core",
) -> aioredis.Redis:
    """The one place a Redis client is built: explicit timeouts, bounded retry with jittered
    backoff on connection errors and timeouts, health checks of idle connections."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        socket_keepalive=True,
        health_check_interval=15,
        client_name=client_name,
        retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.25), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        # Maintenance notifications are a Redis Enterprise/Cloud feature; probing for them costs
        # a round trip per new connection against open-source Redis.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    return aioredis.Redis(connection_pool=pool)


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StoreUnavailable() from exc


def _conversation_from_fields(conversation_id: str, fields: Sequence[Any]) -> Conversation | None:
    user, data, updated_at, count, version = fields
    if user is None or data is None:
        return None
    doc = orjson.loads(data)
    doc["updated_at"] = updated_at.decode() if isinstance(updated_at, bytes) else updated_at
    doc["message_count"] = int(count)
    doc["version"] = int(version)
    return Conversation(**doc)


def _conversation_data(conversation: Conversation) -> bytes:
    doc = {
        "id": conversation.id,
        "user_id": conversation.user_id,
        "title": conversation.title,
        "metadata": conversation.metadata,
        "system_prompt": conversation.system_prompt,
        "model": conversation.model,
        "temperature": conversation.temperature,
        "max_tokens": conversation.max_tokens,
        "created_at": conversation.created_at,
    }
    return orjson.dumps(doc)


class RedisStore(Store):
    backend = "redis"

    def __init__(self, client: aioredis.Redis, prefix: str = "cc") -> None:
        self._redis = client
        self._prefix = prefix
        self._create = _Script(_CREATE)
        self._append = _Script(_APPEND)
        self._page = _Script(_PAGE)
        self._replace = _Script(_REPLACE)
        self._delete_message = _Script(_DELETE_MESSAGE)
        self._update_conversation = _Script(_UPDATE_CONVERSATION)
        self._delete_conversation = _Script(_DELETE_CONVERSATION)

    @property
    def client(self) -> aioredis.Redis:
        return self._redis

    # Keys ----------------------------------------------------------------------------------------

    def _conv_keys(self, cid: str) -> tuple[str, str, str]:
        base = f"{self._prefix}:{{{cid}}}"
        return f"{base}:c", f"{base}:m", f"{base}:i"

    def _user_index(self, user_id: str) -> str:
        return f"{self._prefix}:{{u:{user_id}}}:convs"

    def _user_idem(self, user_id: str, key: str) -> str:
        return f"{self._prefix}:{{u:{user_id}}}:k:{key}"

    def _conv_idem(self, cid: str, scope: str, key: str) -> str:
        return f"{self._prefix}:{{{cid}}}:k:{scope}:{key}"

    # Script plumbing -------------------------------------------------------------------------

    async def _run(self, build: Callable[[Pipeline], object]) -> list[Any]:
        """Run a pipeline (one round trip) whose EVALSHAs are reloaded once on NOSCRIPT."""
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            build(pipe)
            with _guard():
                results: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                await self._load_scripts()
                continue
            for result in results:
                if isinstance(result, (RedisConnectionError, RedisTimeoutError)):
                    raise StoreUnavailable() from result
                if isinstance(result, RedisError):
                    raise result
            return results
        raise AssertionError("unreachable")

    async def _load_scripts(self) -> None:
        with _guard():
            for script in (
                self._create,
                self._append,
                self._page,
                self._replace,
                self._delete_message,
                self._update_conversation,
                self._delete_conversation,
            ):
                await self._redis.script_load(script.source)

    async def _eval(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        results = await self._run(lambda p: p.evalsha(script.sha, len(keys), *keys, *args))
        return results[0]

    # Store ---------------------------------------------------------------------------------------

    async def ping(self) -> None:
        with _guard():
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)

    async def create_conversation(
        self, conversation: Conversation, idempotency: Idempotency | None = None
    ) -> tuple[Conversation, bool]:
        # With an Idempotency-Key the record (in the user's slot) is claimed first, marked
        # pending ("0"), and marked done ("1") once the conversation exists. A retry that finds
        # a pending record finishes the first attempt's work with the same id: the conversation
        # is created only if absent, so a retry can never reset or duplicate it.
        replayed = False
        key, tail = None, b""
        if idempotency is not None:
            key = self._user_idem(conversation.user_id, idempotency.key)
            tail = idempotency.fingerprint.encode() + b"\n" + conversation.to_json()
            with _guard():
                claimed = await self._redis.set(
                    key, b"0" + tail, nx=True, ex=idempotency.ttl_seconds
                )
                previous: bytes | None = None if claimed else await self._redis.get(key)  # type: ignore[assignment]
            if not claimed:
                if previous is None:  # expired in between: a new request after all
                    return await self.create_conversation(conversation, idempotency)
                state, rest = previous[:1], previous[1:]
                fingerprint, _, body = rest.partition(b"\n")
                if fingerprint.decode() != idempotency.fingerprint:
                    raise IdempotencyMismatch()
                conversation, replayed = Conversation(**orjson.loads(body)), True
                if state == b"1":
                    return conversation, True
        conv_key, _, _ = self._conv_keys(conversation.id)
        score = rfc3339_to_ms(conversation.updated_at)
        user_index = self._user_index(conversation.user_id)
        data = _conversation_data(conversation)

        def build(pipe: Pipeline) -> None:
            pipe.evalsha(
                self._create.sha,
                1,
                conv_key,
                conversation.user_id,
                data,
                conversation.updated_at,
                conversation.version,
            )
            pipe.zadd(user_index, {conversation.id: score}, nx=True)
            if key is not None:
                pipe.set(key, b"1" + tail, xx=True, keepttl=True)

        await self._run(build)
        return conversation, replayed

    async def get_conversation(self, conversation_id: str, owner: str | None) -> Conversation:
        conv_key, _, _ = self._conv_keys(conversation_id)
        with _guard():
            fields = await self._redis.hmget(conv_key, list(_CONV_FIELDS))
        conv = _conversation_from_fields(conversation_id, fields)
        if conv is None or (owner is not None and conv.user_id != owner):
            raise NotFound("Conversation not found.")
        return conv

    async def list_conversations(
        self, user_id: str, limit: int, after: ConversationCursor | None
    ) -> Page[Conversation]:
        index = self._user_index(user_id)

        def build(pipe: Pipeline) -> None:
            if after is None:
                pipe.zrange(
                    index,
                    "+inf",
                    "-inf",
                    byscore=True,
                    desc=True,
                    offset=0,
                    num=limit + 1,
                    withscores=True,
                )
            else:
                # Equal scores are ordered by member; REV gives ids descending, as the cursor.
                pipe.zrange(
                    index,
                    after.activity_ms,
                    after.activity_ms,
                    byscore=True,
                    desc=True,
                    withscores=True,
                )
                pipe.zrange(
                    index,
                    f"({after.activity_ms}",
                    "-inf",
                    byscore=True,
                    desc=True,
                    offset=0,
                    num=limit + 1,
                    withscores=True,
                )

        results = await self._run(build)
        rows: list[tuple[str, int]] = []
        if after is not None:
            rows.extend(
                (m.decode(), int(s)) for m, s in results[0] if m.decode() < after.conversation_id
            )
            rows.extend((m.decode(), int(s)) for m, s in results[1])
        else:
            rows.extend((m.decode(), int(s)) for m, s in results[0])
        rows = rows[: limit + 1]
        if not rows:
            return Page([], None)

        def fetch(pipe: Pipeline) -> None:
            for cid, _ in rows:
                pipe.hmget(self._conv_keys(cid)[0], list(_CONV_FIELDS))

        docs = await self._run(fetch)
        items: list[tuple[Conversation, int]] = []
        stale: list[str] = []
        for (cid, score), fields in zip(rows, docs, strict=True):
            conv = _conversation_from_fields(cid, fields)
            if conv is None or conv.user_id != user_id:
                stale.append(cid)
                continue
            items.append((conv, score))
        if stale:
            with _guard():
                await self._redis.zrem(index, *stale)
        has_more = len(rows) > limit
        page = items[:limit]
        next_cursor = None
        if has_more and page:
            last, score = page[-1]
            next_cursor = encode_conversation_cursor(ConversationCursor(score, last.id))
        return Page([c for c, _ in page], next_cursor)

    async def update_conversation(
        self,
        conversation_id: str,
        owner: str | None,
        changes: dict[str, Any],
        expected_version: int | None,
        now: str,
    ) -> Conversation:
        conv_key = self._conv_keys(conversation_id)[0]
        score = rfc3339_to_ms(now)
        while True:
            current = await self.get_conversation(conversation_id, owner)
            if expected_version is not None and current.version != expected_version:
                raise PreconditionFailed()
            updated = Conversation(
                **{
                    **_as_dict(current),
                    **changes,
                    "updated_at": now,
                    "version": current.version + 1,
                }
            )
            data = _conversation_data(updated)
            version = str(current.version)
            index = self._user_index(current.user_id)

            def build(
                pipe: Pipeline, version: str = version, data: bytes = data, index: str = index
            ) -> None:
                pipe.evalsha(
                    self._update_conversation.sha, 1, conv_key, owner or "", version, data, now
                )
                pipe.zadd(index, {conversation_id: score}, xx=True, gt=True)

            result = (await self._run(build))[0]
            status = result[0].decode()
            if status == "ok":
                return updated
            if status == "missing":
                raise NotFound("Conversation not found.")
            if expected_version is not None:
                raise PreconditionFailed()
            # Changed by someone else between read and write: apply on the new state.

    async def delete_conversation(self, conversation_id: str, owner: str | None) -> Conversation:
        keys = self._conv_keys(conversation_id)
        result = await self._eval(self._delete_conversation, keys, [owner or ""])
        if result[0] == b"missing":
            raise NotFound("Conversation not found.")
        conv = _conversation_from_fields(conversation_id, [b"-", *result[1:]])
        assert conv is not None
        with _guard():
            await self._redis.zrem(self._user_index(conv.user_id), conversation_id)
        return conv

    async def append_messages(
        self,
        conversation_id: str,
        owner: str | None,
        messages: list[Message],
        now: str,
        idempotency: Idempotency | None = None,
    ) -> tuple[list[Message], bool]:
        conv_key, msgs_key, index_key = self._conv_keys(conversation_id)
        docs = [m.to_json() for m in messages]
        if idempotency is not None:
            idem_key = self._conv_idem(conversation_id, owner or "*", idempotency.key)
            payload = idempotency.fingerprint.encode() + b"\n[" + b",".join(docs) + b"]"
            ttl = idempotency.ttl_seconds
        else:
            idem_key, payload, ttl = conv_key, b"", 0
        score = rfc3339_to_ms(now)

        def build(pipe: Pipeline) -> None:
            pipe.evalsha(
                self._append.sha,
                4,
                conv_key,
                msgs_key,
                index_key,
                idem_key,
                owner or "",
                now,
                ttl,
                payload,
                len(messages),
                *(m.id for m in messages),
                *docs,
            )
            if owner is not None:
                pipe.zadd(self._user_index(owner), {conversation_id: score}, xx=True, gt=True)

        result = (await self._run(build))[0]
        status = result[0]
        if status == b"missing":
            raise NotFound("Conversation not found.")
        if status == b"replay":
            fingerprint, _, body = result[1].partition(b"\n")
            if idempotency is None or fingerprint.decode() != idempotency.fingerprint:
                raise IdempotencyMismatch()
            return [Message.from_dict(d) for d in orjson.loads(body)], True
        if owner is None:
            # The service wrote on someone else's behalf (admin): the owner's index is unknown
            # here without a read, so refresh it from the conversation.
            conv = await self.get_conversation(conversation_id, None)
            with _guard():
                await self._redis.zadd(
                    self._user_index(conv.user_id), {conversation_id: score}, xx=True, gt=True
                )
        return messages, False

    async def get_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Message:
        conv_key, msgs_key, _ = self._conv_keys(conversation_id)

        def build(pipe: Pipeline) -> None:
            pipe.hget(conv_key, "user")
            pipe.hget(msgs_key, message_id)

        user, doc = await self._run(build)
        if user is None or (owner is not None and user.decode() != owner):
            raise NotFound("Conversation not found.")
        if doc is None:
            raise NotFound("Message not found.")
        return Message.from_json(doc)

    async def list_messages(
        self, conversation_id: str, owner: str | None, query: MessageQuery
    ) -> MessageSlice:
        keys = self._conv_keys(conversation_id)
        args = [
            owner or "",
            query.limit,
            "1" if query.descending else "0",
            "" if query.anchor_seq is None else query.anchor_seq,
            query.anchor_id or "",
            "1" if query.backward else "0",
        ]
        result = await self._eval(self._page, keys, args)
        status = result[0]
        if status == b"missing":
            raise NotFound("Conversation not found.")
        if status == b"noanchor":
            raise UnknownAnchor()
        rows = [
            (int(s), d) for s, d in zip(result[2::2], result[3::2], strict=True) if d is not None
        ]
        seqs = [s for s, _ in rows]
        items = [Message.from_json(d) for _, d in rows]
        if query.backward:
            seqs.reverse()
            items.reverse()
        return MessageSlice(items, seqs, bool(result[1]))

    async def replace_message(
        self,
        conversation_id: str,
        owner: str | None,
        message: Message,
        expected: Message,
    ) -> Message | None:
        conv_key, msgs_key, _ = self._conv_keys(conversation_id)
        result = await self._eval(
            self._replace,
            (conv_key, msgs_key),
            [owner or "", message.id, expected.to_json(), message.to_json()],
        )
        if result[0] == b"missing":
            raise NotFound("Message not found.")
        if result[0] == b"changed":
            return None
        return message

    async def delete_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Message:
        keys = self._conv_keys(conversation_id)
        result = await self._eval(self._delete_message, keys, [owner or "", message_id])
        if result[0] == b"missing":
            raise NotFound("Message not found.")
        return Message.from_json(result[1])


def _as_dict(conv: Conversation) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(conv, f.name) for f in dataclasses.fields(conv)}


@contextlib.asynccontextmanager
async def open_redis_store(
    url: str, *, prefix: str, socket_timeout: float, connect_timeout: float, max_connections: int
) -> AsyncIterator[RedisStore]:
    client = build_client(
        url,
        socket_timeout=socket_timeout,
        connect_timeout=connect_timeout,
        max_connections=max_connections,
    )
    store = RedisStore(client, prefix)
    try:
        yield store
    finally:
        await store.close()
