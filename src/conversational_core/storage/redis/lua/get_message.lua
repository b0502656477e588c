-- One message with its parent and sibling position (tree.lua comes before this).
-- KEYS: c, m, i, b, t, f.  ARGV: owner|'', id
local L  -- the tree's functions (tree.lua), once needed
local h = redis.call('HMGET', C, 'user', 'lin')
if not h[1] or (ARGV[1] ~= '' and h[1] ~= ARGV[1]) then return {'missing'} end
local id = ARGV[2]
local doc = redis.call('HGET', M, id)
if not doc then return {'nomessage'} end
local lin = tonumber(h[2])
if lin == nil and string.sub(doc, 1, 13) == '{"parent_id":' then return {'ok', doc} end
L = L or reader()
local s = L.seq_of(id)
local pid = L.parent_of(id, s)
local c, x = 1, 0
if lin then
  local pseq = nil
  if pid ~= '' then pseq = L.seq_of(pid) end
  c, x = L.siblings_of(id, s, pid, pseq, lin)
end
return {'ok', doc, pid, c, x}
