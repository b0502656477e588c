-- A page of a branch, or of every message (tree.lua comes before this).
-- KEYS: c, m, i, b, t, f[, replies]
-- ARGV: owner|'', limit, descending, anchor position|'', anchor id|'', backward, leaf|'',
--       everything, the page version of a copy the caller holds|''
-- With the conversation's reply queue (KEYS[7]), the 5th value says whether a reply is queued
-- or being written (a page then may hold one streaming, whose text so far the caller adds).
-- Answers {'same'} when the caller's copy is of this version (storage/redis/pages.py) and no
-- reply is queued or being written. Otherwise the 6th value is the page version ('' : none).
-- Returns ids and positions in list order, with each one's sibling position once the
-- conversation has branched (before, every message is an only child). The documents are read
-- by the caller with one HMGET: building a large reply from Lua strings costs Redis ~5 us a
-- message.
local L  -- the tree's functions (tree.lua), once needed
local h = redis.call('HMGET', C, 'user', 'lin', 'cut', 'v', 'pv')
if not h[1] or (ARGV[1] ~= '' and h[1] ~= ARGV[1]) then return {'missing'} end
local lin, cut = tonumber(h[2]), tonumber(h[3])
local function queued()
  if KEYS[7] and redis.call('LLEN', KEYS[7]) > 0 then return 1 end
  return 0
end
if ARGV[9] and ARGV[9] ~= '' and h[5] == ARGV[9] and queued() == 0 then return {'same'} end
local limit = tonumber(ARGV[2])
local up = (ARGV[3] == '1') == (ARGV[6] == '1')
local anchor = nil
if ARGV[4] ~= '' then anchor = tonumber(ARGV[4]) end
local rows
if (ARGV[8] == '1' or not lin) and ARGV[7] == '' and ARGV[5] == '' then
  -- Every message, or the one chain, from a position: one range of `i` (the hot path: no
  -- function of tree.lua is needed).
  if up then
    local lo = anchor and ('(' .. anchor) or '-inf'
    rows = redis.call('ZRANGE', I, lo, '+inf', 'BYSCORE', 'LIMIT', 0, limit + 1, 'WITHSCORES')
  else
    local hi = anchor and ('(' .. anchor) or '+inf'
    rows = redis.call('ZRANGE', I, hi, '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, limit + 1,
                      'WITHSCORES')
  end
else
  L = L or reader()
  local segs, path
  if ARGV[8] == '1' or (not lin and ARGV[7] == '') then
    segs, path = {{I, nil}}, {}
  elseif ARGV[7] ~= '' then
    local ls = L.seq_of(ARGV[7])
    if not ls then return {'noleaf'} end
    segs, path = L.branch_to(ARGV[7], ls, lin, cut)
  else
    segs, path = L.branch_to(nil, nil, lin, cut)
  end
  if ARGV[5] ~= '' then
    anchor = L.seq_of(ARGV[5])
    if not anchor or not L.on_branch(ARGV[5], anchor, segs, path) then return {'noanchor'} end
  end
  rows = L.read(segs, path, anchor, limit + 1, up)
end
local count = #rows / 2
local more = 0
if count > limit then more = 1; count = limit end
local backward = ARGV[6] == '1'
if not lin then  -- one chain: ids and positions, in list order (backward reads reversed here)
  -- (3rd: whether documents written before trees may be here: a conversation created since
  -- has `v`.)
  local out, n = {'ok', more, 0, h[4] and 0 or 1, queued(), h[5] or ''}, 6
  local first, last, step = 1, count, 1
  if backward then first, last, step = count, 1, -1 end
  for k = first, last, step do
    out[n + 1] = rows[2 * k - 1]
    out[n + 2] = rows[2 * k]
    n = n + 2
  end
  return out
end
-- With each one's sibling position. On a branch, a message's parent is the one before it
-- (read just before it going up, just after it going down): only the page's first message
-- needs its parent looked up; the parents' children lists are read with one HMGET.
L = L or reader()
local out, n = {'ok', more, 1, h[4] and 0 or 1, queued(), h[5] or ''}, 6
local first, last, step = 1, count, 1
if backward then first, last, step = count, 1, -1 end
local branch = ARGV[8] ~= '1'
local before = up and -1 or 1
local pids, pseqs, fields = {}, {}, {}
for k = 1, count do
  local near = k + before
  if branch and near >= 1 and near <= count then
    pids[k], pseqs[k] = rows[2 * near - 1], tonumber(rows[2 * near])
  else
    local s = tonumber(rows[2 * k])
    pids[k] = L.parent_of(rows[2 * k - 1], s)
    if pids[k] ~= '' then pseqs[k] = L.seq_of(pids[k]) end
  end
  fields[k] = L.kids_field(pids[k])
end
local listed = {}
if count > 0 then listed = redis.call('HMGET', T, unpack(fields)) end
for k = first, last, step do
  local id, s = rows[2 * k - 1], tonumber(rows[2 * k])
  local c, x = L.siblings_of(id, s, pids[k], pseqs[k], lin, listed[k])
  out[n + 1] = id
  out[n + 2] = s
  out[n + 3] = c
  out[n + 4] = x
  n = n + 4
end
return out
