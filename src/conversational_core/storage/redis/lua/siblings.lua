-- A message and its siblings, a page of them by index (tree.lua comes before this).
-- KEYS: c, m, i, b, t, f.  ARGV: owner|'', id, limit, after (an index; -1: from the first)
local L  -- the tree's functions (tree.lua), once needed
local h = redis.call('HMGET', C, 'user', 'lin')
if not h[1] or (ARGV[1] ~= '' and h[1] ~= ARGV[1]) then return {'missing'} end
L = L or tree()
local id = ARGV[2]
local s = L.seq_of(id)
if not s then return {'nomessage'} end
local lin = tonumber(h[2])
local pid = L.parent_of(id, s)
local kids = {id}
if lin then
  local pseq = nil
  if pid ~= '' then pseq = L.seq_of(pid) end
  kids = L.children_of(pid, pseq, lin)
end
local from, limit = math.max(0, tonumber(ARGV[4]) + 1), tonumber(ARGV[3])
from = math.min(from, #kids)  -- (never a walk from a far index: Redis would serve nothing else)
local last = math.min(#kids, from + limit)
local more = 0
if #kids > last then more = 1 end
local out = {'ok', #kids, pid, more}
for k = from + 1, last do out[#out + 1] = kids[k] end
return out
