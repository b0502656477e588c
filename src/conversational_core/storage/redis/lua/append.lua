-- Append messages under a parent; the last becomes the active leaf (tree.lua comes before this).
-- KEYS: c, m, i, b, t, f, idempotency record, events, reply queue[, user index, job stream]
-- ARGV: the scalars as one JSON array (A below: one argument instead of twelve; a command's
--       every argument costs its client ~1,200 instructions to pack), ids…, bodies…
--       (a body: the message's JSON from `role` to `context`, without braces)[, answered id,
--       its parent json, expected body, new body, event data]: tool results (the answered
--       message is the parent; compare-and-set, with its `message.completed`)
-- A: owner|'', updated_at, idem ttl, idem fingerprint|'', n, maxlen, events ttl, reply id|'',
--    activity score, conversation id, parent ('' the active leaf, '-' a new root, else a
--    message id), on_busy ('' : the conversation's own, field `busy`); the numbers that are
--    only handed to Redis as strings: a Lua number given to redis.call, or joined to a string,
--    is printed by the C library's printf (2,000-3,000 instructions each, ~9% of an append)
-- On a single Redis server the user's index and the job signal are written here too (KEYS 10
-- and 11): one round trip, and a queued reply always has its signal. On a cluster they live in
-- other slots: the index is updated beside the script, the signal sent after it.
local A = cjson.decode(ARGV[1])
local L  -- the tree's functions (tree.lua), once needed
local E, Q = KEYS[8], KEYS[9]
-- c's fields are read here and written once at the end (pv, seq and count too: a call of
-- Redis's costs more than the little arithmetic done here instead).
local h = redis.call('HMGET', C, 'user', 'lin', 'cut', 'leaf', 'busy', 'pv', 'seq', 'count')
if not h[1] or (A[1] ~= '' and h[1] ~= A[1]) then return {'missing'} end
if A[4] ~= '' then
  local prev = redis.call('GET', KEYS[7])
  if prev then return {'replay', prev} end
end
local n = tonumber(A[5])
local answered = 1 + 2 * n
if ARGV[answered + 1] then
  local aid, apj = ARGV[answered + 1], ARGV[answered + 2]
  if redis.call('HGET', M, aid) ~= '{"parent_id":' .. apj .. ',' .. ARGV[answered + 3] .. '}' then
    return {'changed'}
  end
  redis.call('HSET', M, aid, '{"parent_id":' .. apj .. ',' .. ARGV[answered + 4] .. '}')
  h[6] = next_pv(h[6])  -- written now: the append may still be refused below
  redis.call('HSET', C, 'pv', h[6])
  local eid = redis.call('XADD', E, 'MAXLEN', '~', A[6], '*', 't', 'message.completed', 'd',
                        ARGV[answered + 5])
  redis.call('SPUBLISH', E, eid .. '\nmessage.completed\n' .. ARGV[answered + 5])
end
local policy = A[12]
if policy == '' then policy = h[5] or 'queue' end
local busy = {}
if policy ~= 'queue' and redis.call('LLEN', Q) > 0 then
  if policy == 'reject' then return {'busy'} end
  busy = redis.call('LRANGE', Q, 0, -1)
end
local lin, cut = tonumber(h[2]), tonumber(h[3])
local leaf = h[4]
if not leaf then  -- a new conversation, or one written before trees
  L = L or tree()
  leaf = L.last_of_chain(lin)
end
local parent = A[11]
if parent == '' then
  parent = leaf
elseif parent == '-' then
  parent = ''
elseif redis.call('HEXISTS', M, parent) == 0 then
  return {'noparent'}
end
local pv = next_pv(h[6])
local seq = tonumber(h[7] or '0')
local branched = lin ~= nil or parent ~= leaf
if branched then
  L = L or tree()
  if lin == nil then  -- the first branch: the chain so far keeps its implicit links
    lin, cut = seq, seq
    redis.call('HSET', C, 'lin', lin)
  end
  if parent ~= leaf then cut = L.retarget(parent, lin, cut) end
  redis.call('HSET', C, 'cut', cut)
end
local cid = A[10]
local out = {'ok', seq + 1, busy}
local last = h[7] or '0'  -- c's `seq` after the append, as a string
local record = {}
local prev, pseq = parent, nil
if parent ~= '' and branched then pseq = L.seq_of(parent) end
for k = 1, n do
  local id, body = ARGV[1 + k], ARGV[1 + n + k]
  local pj = 'null'
  if prev ~= '' then pj = '"' .. prev .. '"' end
  local s = seq + k
  last = tostring(s)  -- printed once, for the index and c's `seq`
  redis.call('HSET', M, id, '{"parent_id":' .. pj .. ',' .. body .. '}')
  redis.call('ZADD', I, last, id)
  local count, index = 1, 0
  if branched then
    local field = L.kids_field(prev)
    local listed = redis.call('HGET', T, field)
    if listed then listed = listed .. ',' .. id else listed = id end
    redis.call('HSET', T, field, listed)
    if k == 1 then
      if prev ~= '' and L.on_chain(pseq, lin) then redis.call('ZADD', F, pseq, prev) end
      count, index = L.siblings_of(id, s, prev, pseq, lin)
    end
    redis.call('ZADD', B, s, id)
  end
  -- The event carries the message as clients see it (one concatenation: a reply's document is
  -- the largest string a script builds).
  local head = '{"id":"' .. id .. '","conversation_id":"' .. cid .. '","parent_id":' .. pj .. ','
  local tail = ',"sibling_count":1,"sibling_index":0}'  -- (the common case, not printed)
  if count ~= 1 or index ~= 0 then
    tail = ',"sibling_count":' .. count .. ',"sibling_index":' .. index .. '}'
  end
  local data = '{"message_id":"' .. id .. '","message":' .. head .. body .. tail .. '}'
  local eid = redis.call('XADD', E, 'MAXLEN', '~', A[6], '*', 't', 'message.created', 'd', data)
  redis.call('SPUBLISH', E, eid .. '\nmessage.created\n' .. data)
  if A[4] ~= '' then record[k] = head .. body .. tail end
  out[#out + 1] = count
  out[#out + 1] = index
  prev, pseq = id, s
end
redis.call('EXPIRE', E, A[7])
out[#out + 1] = parent
if A[8] ~= '' then redis.call('RPUSH', Q, A[8]) end
if #KEYS >= 11 then
  redis.call('ZADD', KEYS[10], 'XX', 'GT', A[9], cid)
  if A[8] ~= '' then redis.call('XADD', KEYS[11], '*', 'c', cid) end
end
redis.call('HSET', C, 'updated_at', A[2], 'leaf', prev, 'pv', pv, 'seq', last,
           'count', tonumber(h[8] or '0') + n)
if A[4] ~= '' then
  local ttl = tonumber(A[3])
  redis.call('SET', KEYS[7], A[4] .. '\n[' .. table.concat(record, ',') .. ']', 'EX', A[3])
  -- Listed in the conversation's `r` (its key beside `c`), so that deleting the conversation
  -- deletes them: they hold the messages' text. The list lives as long as its newest record.
  local R = string.sub(C, 1, -2) .. 'r'
  redis.call('SADD', R, KEYS[7])
  if redis.call('TTL', R) < ttl then redis.call('EXPIRE', R, A[3]) end
end
return out
