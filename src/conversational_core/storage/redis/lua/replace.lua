-- Compare-and-set of one message, with its event (tree.lua comes before this).
-- KEYS: c, m, i, b, t, f, events, reply queue, stop flag, published text, attempt
-- ARGV: owner|'', id, expected parent json, expected body, new parent json, new body,
--       event|'', conversation id, ended, maxlen, ttl, restart attempt|''
-- A document written before trees (no parent_id, no parts) matches on its body without the
-- `parts` its reader added (only a text part, made from `content`: the first `,"status":` after
-- it ends it), and is written back with its parent.
local L  -- the tree's functions (tree.lua), once needed
local h = redis.call('HMGET', C, 'user', 'lin')
if not h[1] or (ARGV[1] ~= '' and h[1] ~= ARGV[1]) then return {'missing'} end
local id = ARGV[2]
local cur = redis.call('HGET', M, id)
if not cur then return {'missing'} end
if cur ~= '{"parent_id":' .. ARGV[3] .. ',' .. ARGV[4] .. '}' then
  local old = string.sub(cur, 1, 13) ~= '{"parent_id":'
  local at = old and string.find(ARGV[4], ',"parts":', 1, true)
  local status = at and string.find(ARGV[4], ',"status":', at, true)
  if not status or cur ~= '{' .. string.sub(ARGV[4], 1, at - 1)
      .. string.sub(ARGV[4], status) .. '}' then
    return {'changed'}
  end
end
if ARGV[12] ~= '' and redis.call('EXISTS', KEYS[9]) == 1 then
  return {'stopped', redis.call('GET', KEYS[10])}
end
redis.call('HSET', M, id, '{"parent_id":' .. ARGV[5] .. ',' .. ARGV[6] .. '}')
pages_changed()
if ARGV[9] == '1' then
  redis.call('LREM', KEYS[8], 0, id)
  redis.call('SET', KEYS[9], '1', 'EX', ARGV[11])
end
if ARGV[12] ~= '' or ARGV[9] == '1' then redis.call('DEL', KEYS[10]) end
if ARGV[12] ~= '' then redis.call('SET', KEYS[11], ARGV[12], 'EX', ARGV[11]) end
if ARGV[7] ~= '' then
  L = L or tree()
  local lin = tonumber(h[2])
  local c, x = 1, 0
  if lin then
    local pid, pseq = '', nil
    if ARGV[5] ~= 'null' then
      pid = string.sub(ARGV[5], 2, -2)
      pseq = L.seq_of(pid)
    end
    c, x = L.siblings_of(id, L.seq_of(id), pid, pseq, lin)
  end
  L.emit(KEYS[7], ARGV[10], ARGV[11], ARGV[7], '{"message_id":"' .. id .. '","message":'
       .. L.message_json(id, ARGV[8], ARGV[5], ARGV[6], c, x) .. '}')
end
return {'ok'}
