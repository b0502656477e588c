"""The Lua scripts of the Redis backend: each runs atomically and touches the keys of one slot
(one conversation's, one user's, the jobs', or one counter's), so that it works on a cluster.

Scripts are called by SHA; a server that does not have one (NOSCRIPT: restarted, or a replica
promoted by a failover) is sent the source instead, which caches it there (client.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
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


# --- Conversations and messages (store.py) --------------------------------------------------------
# KEYS: conv, msgs, index, idem, events, queue[, user index, job stream].
# ARGV: owner|'', updated_at, idem ttl, idem payload|'', n, maxlen, events ttl, reply id|'',
#       activity score, conversation id, ids…, jsons…, event data…
# On a single Redis server the user's index and the job signal are written by the same script
# (KEYS 7 and 8): one round trip, and a queued reply always has its signal. On a cluster they
# live in other slots: the index is updated beside the script, the signal sent after it.
APPEND = Script(
    """
local owner = redis.call('HGET', KEYS[1], 'user')
if not owner or (ARGV[1] ~= '' and owner ~= ARGV[1]) then return {'missing'} end
if ARGV[4] ~= '' then
  local prev = redis.call('GET', KEYS[4])
  if prev then return {'replay', prev} end
end
local n = tonumber(ARGV[5])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', n) - n
for i = 1, n do
  redis.call('HSET', KEYS[2], ARGV[10 + i], ARGV[10 + n + i])
  redis.call('ZADD', KEYS[3], seq + i, ARGV[10 + i])
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 't', 'message.created',
             'd', ARGV[10 + 2 * n + i])
end
redis.call('EXPIRE', KEYS[5], ARGV[7])
if ARGV[8] ~= '' then redis.call('RPUSH', KEYS[6], ARGV[8]) end
if #KEYS >= 8 then
  redis.call('ZADD', KEYS[7], 'XX', 'GT', ARGV[9], ARGV[10])
  if ARGV[8] ~= '' then redis.call('XADD', KEYS[8], '*', 'c', ARGV[10]) end
end
redis.call('HINCRBY', KEYS[1], 'count', n)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
if ARGV[4] ~= '' then redis.call('SET', KEYS[4], ARGV[4], 'EX', tonumber(ARGV[3])) end
return {'ok', seq + 1}
"""
)

# KEYS: conv, msgs, index.
# ARGV: owner|'', limit, descending, anchor_seq|'', anchor_id|'', backward
PAGE = Script(
    """
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
-- Ids and positions in list order (backward reads reversed here). The documents are read by the
-- caller with one HMGET: building a large reply from Lua strings costs Redis ~5 us a message.
local out = {'ok', more}
local first, last, step = 1, count, 1
if ARGV[6] == '1' then first, last, step = count, 1, -1 end
for i = first, last, step do
  out[#out + 1] = rows[2 * i - 1]
  out[#out + 1] = rows[2 * i]
end
return out
"""
)

# KEYS: conv, msgs, events, queue, stop flag, partial text, attempt.
# ARGV: owner|'', id, expected json, new json, event type|'', event data, dequeue, stop,
#       maxlen, events ttl, stop ttl, restart attempt|''
REPLACE = Script(
    """
local owner = redis.call('HGET', KEYS[1], 'user')
if not owner or (ARGV[1] ~= '' and owner ~= ARGV[1]) then return {'missing'} end
local cur = redis.call('HGET', KEYS[2], ARGV[2])
if not cur then return {'missing'} end
if cur ~= ARGV[3] then return {'changed'} end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
if ARGV[7] == '1' then redis.call('LREM', KEYS[4], 0, ARGV[2]) end
if ARGV[8] == '1' then redis.call('SET', KEYS[5], '1', 'EX', ARGV[11]) end
if ARGV[12] ~= '' or ARGV[7] == '1' then redis.call('DEL', KEYS[6]) end
if ARGV[12] ~= '' then redis.call('SET', KEYS[7], ARGV[12], 'EX', ARGV[11]) end
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[9], '*', 't', ARGV[5], 'd', ARGV[6])
  redis.call('EXPIRE', KEYS[3], ARGV[10])
end
return {'ok'}
"""
)

# KEYS: conv, msgs, index, events, queue.  ARGV: owner|'', id, event data, maxlen, events ttl
DELETE_MESSAGE = Script(
    """
local owner = redis.call('HGET', KEYS[1], 'user')
if not owner or (ARGV[1] ~= '' and owner ~= ARGV[1]) then return {'missing'} end
local cur = redis.call('HGET', KEYS[2], ARGV[2])
if not cur then return {'missing'} end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('LREM', KEYS[5], 0, ARGV[2])
redis.call('HINCRBY', KEYS[1], 'count', -1)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 't', 'message.deleted', 'd', ARGV[3])
redis.call('EXPIRE', KEYS[4], ARGV[5])
return {'ok', cur}
"""
)

# KEYS: msgs, events, stop flag, partial text, attempt.
# ARGV: id, event data, maxlen, delta, ttl, attempt|''
# The partial text is exactly the concatenation of the deltas emitted, so that a cancelled
# reply keeps precisely what its clients received. A writer of an older attempt (a worker that
# lost the reply to another) is refused.
DELTA = Script(
    """
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if ARGV[6] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[6] then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 't', 'message.delta', 'd', ARGV[2])
if redis.call('APPEND', KEYS[4], ARGV[4]) == string.len(ARGV[4]) then
  redis.call('EXPIRE', KEYS[4], ARGV[5])
end
return 1
"""
)

# KEYS: stop flag, partial text.  ARGV: ttl.  Stops deltas; returns the text emitted so far.
STOP = Script(
    """
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
return redis.call('GET', KEYS[2])
"""
)

# KEYS: conv.  ARGV: user, data json, updated_at, version.  Creates only if absent.
CREATE = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'data', ARGV[2], 'updated_at', ARGV[3],
           'count', 0, 'seq', 0, 'version', ARGV[4])
return 1
"""
)

# KEYS: conv, events.
# ARGV: owner|'', expected version|'', data json, updated_at, event data, maxlen, events ttl
UPDATE_CONVERSATION = Script(
    """
local cur = redis.call('HMGET', KEYS[1], 'user', 'version')
if not cur[1] or (ARGV[1] ~= '' and cur[1] ~= ARGV[1]) then return {'missing'} end
if ARGV[2] ~= '' and cur[2] ~= ARGV[2] then return {'changed'} end
redis.call('HSET', KEYS[1], 'data', ARGV[3], 'updated_at', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 't', 'conversation.updated',
           'd', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[7])
return {'ok'}
"""
)

# KEYS: conv, msgs, index, events, queue.  ARGV: owner|'', event data, maxlen, linger seconds
# The event stream outlives the conversation briefly so that connected clients get
# `conversation.deleted`; nobody new can subscribe (the conversation is gone).
DELETE_CONVERSATION = Script(
    """
local cur = redis.call('HMGET', KEYS[1], 'user', 'data', 'updated_at', 'count', 'version')
if not cur[1] or (ARGV[1] ~= '' and cur[1] ~= ARGV[1]) then return {'missing'} end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[5])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 't', 'conversation.deleted',
           'd', ARGV[2])
redis.call('EXPIRE', KEYS[4], ARGV[4])
return {'ok', cur[2], cur[3], cur[4], cur[5]}
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
# KEYS: counter.  ARGV: window ms.  Returns {hits in this window, ms until it resets}.
HIT = Script(
    """
local n = redis.call('INCR', KEYS[1])
local ttl = -1
if n > 1 then ttl = redis.call('PTTL', KEYS[1]) end
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""
)

# KEYS: counter.  A refund never creates a window.
REFUND = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECR', KEYS[1]) end
return 0
"""
)
