-- Delete a message and its subtree (tree.lua comes before this).
-- KEYS: c, m, i, b, t, f, events, reply queue
-- ARGV: owner|'', id, updated_at, conversation id, maxlen, events ttl
local L  -- the tree's functions (tree.lua), once needed
local E, Q = KEYS[7], KEYS[8]
local h = redis.call('HMGET', C, 'user', 'lin', 'cut', 'leaf', 'version', 'data', 'count')
if not h[1] or (ARGV[1] ~= '' and h[1] ~= ARGV[1]) then return {'missing'} end
L = L or tree()
local id = ARGV[2]
local doc = redis.call('HGET', M, id)
if not doc then return {'missing'} end
local lin, cut = tonumber(h[2]), tonumber(h[3])
local s = L.seq_of(id)
local pid = L.parent_of(id, s)
local pseq = nil
if pid ~= '' then pseq = L.seq_of(pid) end
local was_count, was_index = L.siblings_of(id, s, pid, pseq, lin)
local active = lin == nil or s <= cut or redis.call('ZSCORE', B, id)

-- The subtree: on the first chain, the rest of the chain and what forks from it; elsewhere,
-- the explicit children, breadth first.
local ids, seqs, todo = {}, {}, {}
if L.on_chain(s, lin) then
  local rows = redis.call('ZRANGE', I, s, lin or '+inf', 'BYSCORE', 'WITHSCORES')
  for k = 1, #rows, 2 do
    ids[#ids + 1] = rows[k]
    seqs[rows[k]] = tonumber(rows[k + 1])
  end
  if lin then todo = redis.call('ZRANGE', F, s, lin, 'BYSCORE') end
else
  ids[1] = id
  seqs[id] = s
  todo[1] = id
end
local k = 1
while k <= #todo do
  local listed = redis.call('HGET', T, todo[k])
  if listed then
    for kid in string.gmatch(listed, '[^,]+') do
      ids[#ids + 1] = kid
      seqs[kid] = L.seq_of(kid)
      todo[#todo + 1] = kid
    end
  end
  k = k + 1
end
table.sort(ids, function(a, b) return seqs[a] < seqs[b] end)

pages_changed()
L.del_all('HDEL', M, ids)
L.del_all('ZREM', I, ids)
L.del_all('ZREM', B, ids)
L.del_all('HDEL', T, ids)
L.del_all('ZREM', F, ids)
local field = L.kids_field(pid)
local listed = redis.call('HGET', T, field)
if listed then
  local rest = {}
  for kid in string.gmatch(listed, '[^,]+') do
    if kid ~= id then rest[#rest + 1] = kid end
  end
  if #rest == 0 then
    redis.call('HDEL', T, field)
    if pid ~= '' then redis.call('ZREM', F, pid) end
  else
    redis.call('HSET', T, field, table.concat(rest, ','))
  end
end
local queued = redis.call('LRANGE', Q, 0, -1)
if #queued > 0 then
  local kept = {}
  for _, q in ipairs(queued) do
    if not seqs[q] then kept[#kept + 1] = q end
  end
  if #kept < #queued then
    redis.call('DEL', Q)
    if #kept > 0 then L.del_all('RPUSH', Q, kept) end
  end
end
local count = redis.call('HINCRBY', C, 'count', -#ids)
L.emit(E, ARGV[5], ARGV[6], 'message.deleted',
     '{"message_id":"' .. id .. '","deleted_message_ids":["' .. table.concat(ids, '","') .. '"]}')

local conv = ''
if active then
  local leaf = pid
  if lin then
    cut = L.retarget(pid, lin, cut)
    leaf, cut = L.descend(pid, lin, cut)
    redis.call('HSET', C, 'cut', cut)
  end
  if leaf == '' then redis.call('HDEL', C, 'leaf') else redis.call('HSET', C, 'leaf', leaf) end
  redis.call('HSET', C, 'updated_at', ARGV[3])
  local version = redis.call('HINCRBY', C, 'version', 1)
  conv = L.conversation_json(h[6], ARGV[3], count, version, leaf)
  L.emit(E, ARGV[5], ARGV[6], 'conversation.updated',
       '{"conversation_id":"' .. ARGV[4] .. '","conversation":' .. conv .. '}')
end
return {'ok', doc, pid, was_count, was_index, conv, ids}
