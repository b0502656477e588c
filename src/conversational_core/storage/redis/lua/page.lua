-- A page of a branch, or of every message (tree.lua comes before this).
-- KEYS: c, m, i, b, t, f
-- ARGV: owner|'', limit, descending, anchor position|'', anchor id|'', backward, leaf|'',
--       everything
-- Returns ids and positions in list order, with each one's sibling position once the
-- conversation has branched (before, every message is an only child). The documents are read
-- by the caller with one HMGET: building a large reply from Lua strings costs Redis ~5 us a
-- message.
local h = redis.call('HMGET', C, 'user', 'lin', 'cut')
if not h[1] or (ARGV[1] ~= '' and h[1] ~= ARGV[1]) then return {'missing'} end
local lin, cut = tonumber(h[2]), tonumber(h[3])
local segs, path
if ARGV[8] == '1' then
  segs, path = {{I, nil}}, {}
elseif ARGV[7] ~= '' then
  local ls = seq_of(ARGV[7])
  if not ls then return {'noleaf'} end
  segs, path = branch_to(ARGV[7], ls, lin, cut)
else
  segs, path = branch_to(nil, nil, lin, cut)
end
local anchor = nil
if ARGV[5] ~= '' then
  anchor = seq_of(ARGV[5])
  if not anchor or not on_branch(ARGV[5], anchor, segs, path) then return {'noanchor'} end
elseif ARGV[4] ~= '' then
  anchor = tonumber(ARGV[4])
end
local limit = tonumber(ARGV[2])
local up = (ARGV[3] == '1') == (ARGV[6] == '1')
local rows = read(segs, path, anchor, limit + 1, up)
local count = #rows / 2
local more = 0
if count > limit then more = 1; count = limit end
local out = {'ok', more, 0}
if lin then out[3] = 1 end
local first, last, step = 1, count, 1
if ARGV[6] == '1' then first, last, step = count, 1, -1 end  -- read backward: list order
-- On a branch, a message's parent is the one before it (read just before it going up, just
-- after it going down): only the page's first message needs its parent looked up.
local branch = ARGV[8] ~= '1'
local before = up and -1 or 1
for k = first, last, step do
  local id, s = rows[2 * k - 1], tonumber(rows[2 * k])
  out[#out + 1] = id
  out[#out + 1] = s
  if lin then
    local pid, pseq
    local near = k + before
    if branch and near >= 1 and near <= count then
      pid, pseq = rows[2 * near - 1], tonumber(rows[2 * near])
    else
      pid = parent_of(id, s)
      if pid ~= '' then pseq = seq_of(pid) end
    end
    local c, x = siblings_of(id, s, pid, pseq, lin)
    out[#out + 1] = c
    out[#out + 1] = x
  end
end
return out
