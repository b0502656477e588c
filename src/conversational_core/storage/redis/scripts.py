"""The Lua scripts of the Redis backend: each runs atomically and touches the keys of one slot
(one conversation's, one user's, the jobs', or one counter's), so that it works on a cluster.

Scripts are called by SHA; a server that does not have one (NOSCRIPT: restarted, or a replica
promoted by a failover) is sent the source instead, which caches it there (client.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class Script:
    """A Lua script, called by SHA (or by its source on a server that lacks it)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def command(
        self, keys: Sequence[str], args: Sequence[Any], *, by_source: bool = False
    ) -> tuple[Any, ...]:
        if by_source:
            return ("EVAL", self.source, len(keys), *keys, *args)
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


# --- Messages and the tree (messages.py, replies.py) -------------------------------------------
# In lua/: each prefixed with lua/tree.lua, the tree's shared functions (its comments say how a
# conversation's tree is kept). KEYS of each begin with the conversation's c, m, i, b, t, f.
_LUA = Path(__file__).with_name("lua")


def _tree_script(name: str) -> Script:
    prelude = (_LUA / "tree.lua").read_text()
    return Script(prelude + "\n" + (_LUA / f"{name}.lua").read_text())


APPEND = _tree_script("append")
PAGE = _tree_script("page")
GET_MESSAGE = _tree_script("get_message")
SIBLINGS = _tree_script("siblings")
SWITCH = _tree_script("switch")
DELETE_MESSAGE = _tree_script("delete_message")
REPLACE = _tree_script("replace")

# KEYS: msgs, events, stop flag, published deltas, attempt.
# ARGV: id, event data, maxlen, ttl, attempt|''
# The reply's published deltas are kept as their event data, one per line (JSON has no raw
# newline), so that a cancelled reply keeps precisely the parts its clients received. A writer
# of an older attempt (a worker that lost the reply to another) is refused.
DELTA = Script(
    """
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if ARGV[5] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[5] then return 0 end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 't', 'message.delta',
                    'd', ARGV[2])
redis.call('SPUBLISH', KEYS[2], id .. '\\nmessage.delta\\n' .. ARGV[2])
local line = ARGV[2] .. '\\n'
if redis.call('APPEND', KEYS[4], line) == string.len(line) then
  redis.call('EXPIRE', KEYS[4], ARGV[4])
end
return 1
"""
)

# KEYS: stop flag, published deltas.  ARGV: ttl.  Stops deltas; returns the deltas emitted so far.
STOP = Script(
    """
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
return redis.call('GET', KEYS[2])
"""
)

# --- Conversations (store.py) --------------------------------------------------------------------
# KEYS: conv[, msgs, index].  ARGV: user, data json, updated_at, version, on_busy[, count, leaf].
# Creates only if absent. A fork's messages are written first (FORK_COPY, keys that expire) and
# kept (PERSIST) once their conversation exists. `busy` repeats the on_busy setting of `data`
# for the append script (which reads hash fields, not JSON); `v` 2 marks a conversation created
# since trees (all its documents name their parent: pages need not look). Its page version
# (pages.py) starts at the server's clock in microseconds: a conversation deleted and created
# again with the same id (an idempotent create retried) cannot reach a version of before (it
# would need more writes than microseconds went by).
CREATE = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'data', ARGV[2], 'updated_at', ARGV[3],
           'count', ARGV[6] or 0, 'seq', ARGV[6] or 0, 'version', ARGV[4], 'busy', ARGV[5],
           'v', 2, 'pv', now[1] .. string.format('%06d', tonumber(now[2])))
if ARGV[7] then
  redis.call('HSET', KEYS[1], 'leaf', ARGV[7])
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[3])
end
return 1
"""
)

# KEYS: msgs, index.  ARGV: first position, ttl, n, ids…, documents…
FORK_COPY = Script(
    """
local n = tonumber(ARGV[3])
for k = 1, n do
  redis.call('HSET', KEYS[1], ARGV[3 + k], ARGV[3 + n + k])
  redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + k - 1, ARGV[3 + k])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return n
"""
)

# KEYS: conv, events, index.
# ARGV: owner|'', expected version|'', data json, updated_at, event data up to the active leaf's
#       value, maxlen, events ttl, on_busy
# The active leaf moves with every new message (which does not change the version): the event
# gets it as it is now. Returns it ('' : none).
UPDATE_CONVERSATION = Script(
    """
local cur = redis.call('HMGET', KEYS[1], 'user', 'version', 'leaf')
if not cur[1] or (ARGV[1] ~= '' and cur[1] ~= ARGV[1]) then return {'missing'} end
if ARGV[2] ~= '' and cur[2] ~= ARGV[2] then return {'changed'} end
local leaf = cur[3]
if not leaf then leaf = redis.call('ZRANGE', KEYS[3], -1, -1)[1] or '' end
local leaf_json = 'null'
if leaf ~= '' then leaf_json = '"' .. leaf .. '"' end
redis.call('HSET', KEYS[1], 'data', ARGV[3], 'updated_at', ARGV[4], 'busy', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'version', 1)
local data = ARGV[5] .. leaf_json .. '}}'
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 't', 'conversation.updated',
                      'd', data)
redis.call('SPUBLISH', KEYS[2], id .. '\\nconversation.updated\\n' .. data)
redis.call('EXPIRE', KEYS[2], ARGV[7])
return {'ok', leaf}
"""
)

# KEYS: conv, msgs, index, events, queue, branch, tree, forks, idempotency records' names.
# ARGV: owner|'', event data, maxlen, linger seconds, the conversation's key prefix
# Everything that holds the conversation's text goes: its keys, its idempotency records, the
# deltas of replies being written (their keys, in the same slot, are named from the prefix),
# and its past events. The event stream outlives the conversation briefly, holding only
# `conversation.deleted`, so that connected clients get it; nobody new can subscribe (the
# conversation is gone). (The stop flags and attempt numbers of ended replies, which hold no
# text, expire on their own.)
DELETE_CONVERSATION = Script(
    """
local cur = redis.call('HMGET', KEYS[1], 'user', 'data', 'updated_at', 'count', 'version',
                       'leaf')
if not cur[1] or (ARGV[1] ~= '' and cur[1] ~= ARGV[1]) then return {'missing'} end
for _, mid in ipairs(redis.call('LRANGE', KEYS[5], 0, -1)) do  -- replies being written
  redis.call('UNLINK', ARGV[5] .. 'p:' .. mid, ARGV[5] .. 'x:' .. mid, ARGV[5] .. 'a:' .. mid)
end
local records = redis.call('SMEMBERS', KEYS[9])
for i = 1, #records, 1000 do
  redis.call('UNLINK', unpack(records, i, math.min(i + 999, #records)))
end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9])
redis.call('XTRIM', KEYS[4], 'MAXLEN', 0)  -- the events hold the messages too
local id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 't', 'conversation.deleted',
                      'd', ARGV[2])
redis.call('SPUBLISH', KEYS[4], id .. '\\nconversation.deleted\\n' .. ARGV[2])
redis.call('EXPIRE', KEYS[4], ARGV[4])
return {'ok', cur[2], cur[3], cur[4], cur[5], cur[6]}
"""
)

# --- Leases of the job queue (queue.py) -----------------------------------------------------------
# KEYS: lease, queue.  ARGV: token, ttl ms.
# 1 released; 0 the queue has work (lease kept, or taken back if it had lapsed); -1 not ours
RELEASE = Script(
    """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return -1 end
if redis.call('LLEN', KEYS[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"""
)

# KEYS: lease.  ARGV: token
GIVE_BACK = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
)

# KEYS: the job stream.  ARGV: group, entry id.  A job done: acknowledged, and deleted (the
# stream keeps only jobs to do); one command where two took a round trip each or two tasks.
ACK = Script(
    """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
"""
)

# KEYS: lease.  ARGV: token, ttl ms
RENEW = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
)

# --- Rate-limit counters (limiter.py) -------------------------------------------------------------
# KEYS: counter.  ARGV: window ms, the rate's amount, hits wanted (a lease: RateLimiter).
# Counts the hits wanted, fewer when that would pass the amount (at least one: the request
# itself, counted even over the limit). Returns {hits in this window, ms until it resets,
# hits counted}.
HIT = Script(
    """
local want = tonumber(ARGV[3])
if want > 1 then
  local room = tonumber(ARGV[2]) - tonumber(redis.call('GET', KEYS[1]) or '0')
  if room < want then want = math.max(1, room) end
end
local n = redis.call('INCRBY', KEYS[1], want)
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl, want}
"""
)

# KEYS: counter.  A refund never creates a window.
REFUND = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECR', KEYS[1]) end
return 0
"""
)
