-- The conversation tree, shared by the scripts that read or change it (prepended to each).
--
-- KEYS[1..6] of every such script: c (conversation hash), m (documents), i (every message by its
-- creation position), b (branch), t (tree), f (forks). See keys.py for the layout and why it is
-- shaped so: a conversation nobody edited costs nothing more than a list.
--
-- The first chain. Until a conversation first branches, its messages form one chain in creation
-- order, and that chain is its active branch: `i` alone says everything (parent = the message
-- before, one child each). When it first branches, `lin` (in c) records the last position of that
-- chain: messages up to `lin` keep those implicit links, and every message created later is
-- linked explicitly, as a child in `t`. Documents written before trees existed have no parent_id:
-- they are on the first chain, so their parent is the message before them.
--
-- The active branch is the first chain's messages up to position `cut` (in c), then the members
-- of `b` in position order (positions grow along every branch). Without `lin`, it is all of `i`.

local C, M, I, B, T, F = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]

-- What a page of the conversation shows changed (storage/redis/pages.py): its page version
-- becomes the server's clock in microseconds, or one more than before when that is not past it.
-- So a version is never given twice, not even after a failover or a restart that lost the last
-- writes (and the version with them): the clock has moved past every version given before.
-- (The clock's digits are joined as strings: a number made a string goes through the C
-- library's printf, a few thousand instructions, in Lua as in a number given to redis.call.)
local function next_pv(pv)  -- the version after `pv` (c's field, or nil)
  local now = redis.call('TIME')
  local at = tonumber(now[1]) * 1000000 + tonumber(now[2])
  pv = tonumber(pv or '0')
  if pv >= at then return string.format('%.0f', pv + 1) end
  return now[1] .. string.sub('00000', #now[2]) .. now[2]
end

local function pages_changed()
  redis.call('HSET', C, 'pv', next_pv(redis.call('HGET', C, 'pv')))
end

-- The tree's functions, made only when a script needs them: an append or a page of a
-- conversation that never branched makes none. `reader()` makes those that read it (all a page
-- needs), `tree()` all of them: making the functions costs every call that needs them (tree()
-- about 2 us of a page, reader() too little to measure). Neither captures anything of the
-- script: a closure over many of its locals costs Redis an allocation each, on every call,
-- measured as a fifth of an append.
local function reader()
  local C, M, I, B, T, F = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
  local ROOT = '-'  -- t's field for the roots (no message id is '-')
  local seq_of, on_chain, read, parent_of, chain_child, kids_field, siblings_of, branch_to
  local on_branch
  seq_of = function(id)
    local s = redis.call('ZSCORE', I, id)
    if s then return tonumber(s) end
    return nil
  end

  on_chain = function(seq, lin)
    return lin == nil or seq <= lin
  end

  -- Up to `n` messages of the branch (segs, path) strictly after position `anchor` (nil: from the
  -- start) going up, or strictly before it going down: a flat list {id, seq, id, seq, ...} (seqs
  -- as ZRANGE gives them, strings, or numbers from the path).
  read = function(segs, path, anchor, n, up)
    if #segs == 1 and #path == 0 then  -- one range (a conversation that never branched): as is
      local seg = segs[1]
      if up then
        local lo = anchor and ('(' .. anchor) or '-inf'
        return redis.call('ZRANGE', seg[1], lo, seg[2] or '+inf', 'BYSCORE', 'LIMIT', 0, n,
                          'WITHSCORES')
      end
      local hi = seg[2] or '+inf'
      if anchor and (seg[2] == nil or anchor <= seg[2]) then hi = '(' .. anchor end
      return redis.call('ZRANGE', seg[1], hi, '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, n,
                        'WITHSCORES')
    end
    local out, size = {}, 0
    local function take(rows)
      for k = 1, #rows do out[size + k] = rows[k] end
      size = size + #rows
    end
    if up then
      for _, seg in ipairs(segs) do
        local left = n - size / 2
        if left <= 0 then return out end
        local lo = anchor and ('(' .. anchor) or '-inf'
        take(redis.call('ZRANGE', seg[1], lo, seg[2] or '+inf', 'BYSCORE', 'LIMIT', 0, left,
                        'WITHSCORES'))
      end
      for _, entry in ipairs(path) do
        if size / 2 >= n then return out end
        if not anchor or entry[2] > anchor then
          out[size + 1] = entry[1]
          out[size + 2] = entry[2]
          size = size + 2
        end
      end
      return out
    end
    for k = #path, 1, -1 do
      if size / 2 >= n then return out end
      if not anchor or path[k][2] < anchor then
        out[size + 1] = path[k][1]
        out[size + 2] = path[k][2]
        size = size + 2
      end
    end
    for k = #segs, 1, -1 do
      local seg = segs[k]
      local left = n - size / 2
      if left <= 0 then return out end
      local hi = seg[2] or '+inf'
      if anchor and (seg[2] == nil or anchor <= seg[2]) then hi = '(' .. anchor end
      take(redis.call('ZRANGE', seg[1], hi, '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, left,
                      'WITHSCORES'))
    end
    return out
  end

  -- The parent of a message ('' for a root), from its document.
  parent_of = function(id, seq)
    local doc = redis.call('HGET', M, id)
    if string.sub(doc, 1, 13) == '{"parent_id":' then
      if string.sub(doc, 14, 14) == 'n' then return '' end
      return string.sub(doc, 15, string.find(doc, '"', 15, true) - 1)
    end
    local before = redis.call('ZRANGE', I, '(' .. seq, '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, 1)
    return before[1] or ''
  end

  -- The child of `pid` on the first chain (pid '' : the chain's root), with its position.
  chain_child = function(pid, pseq, lin)
    local rows
    if pid == '' then
      rows = redis.call('ZRANGE', I, 0, 0, 'WITHSCORES')
    else
      if not on_chain(pseq, lin) then return nil end
      rows = redis.call('ZRANGE', I, '(' .. pseq, '+inf', 'BYSCORE', 'LIMIT', 0, 1, 'WITHSCORES')
    end
    if rows[1] and on_chain(tonumber(rows[2]), lin) then return rows[1], tonumber(rows[2]) end
    return nil
  end

  kids_field = function(pid)
    if pid == '' then return ROOT end
    return pid
  end

  -- (sibling_count, sibling_index) of message `id` (position `seq`) under `pid` (position `pseq`).
  -- `listed`: pid's field of `t` when the caller read it already (false: none).
  siblings_of = function(id, seq, pid, pseq, lin, listed)
    if lin == nil then return 1, 0 end
    if listed == nil then listed = redis.call('HGET', T, kids_field(pid)) end
    local n, at = 0, 0
    if listed then
      for kid in string.gmatch(listed, '[^,]+') do
        if kid == id then at = n end
        n = n + 1
      end
    end
    if on_chain(seq, lin) then return n + 1, 0 end  -- it is the first-chain child
    if chain_child(pid, pseq, lin) then return n + 1, at + 1 end
    return n, at
  end

  -- The branch that ends at `leaf` (position `lseq`; nil : the active branch) as the segments a
  -- page is read from, in root-to-leaf order: {key, max position (nil: any)}, then the messages
  -- of the path that are in neither (a list of {id, seq}, root side first).
  branch_to = function(leaf, lseq, lin, cut)
    if lin == nil then
      return {{I, lseq}}, {}
    end
    if leaf == nil then
      return {{I, cut}, {B, nil}}, {}
    end
    local path = {}
    local id, s = leaf, lseq
    local segs
    while true do
      if s <= lin then
        segs = {{I, s}}
        break
      end
      if redis.call('ZSCORE', B, id) then
        segs = {{I, cut}, {B, s}}
        break
      end
      table.insert(path, 1, {id, s})
      local p = parent_of(id, s)
      if p == '' then
        segs = {}
        break
      end
      id, s = p, seq_of(p)
    end
    return segs, path
  end

  -- Whether message `id` (position `s`) is on the branch of (segs, path).
  on_branch = function(id, s, segs, path)
    for _, seg in ipairs(segs) do
      if seg[2] == nil or s <= seg[2] then
        if seg[1] == I or redis.call('ZSCORE', seg[1], id) then return true end
      end
    end
    for _, entry in ipairs(path) do
      if entry[1] == id then return true end
    end
    return false
  end
  return {
    seq_of = seq_of,
    on_chain = on_chain,
    read = read,
    parent_of = parent_of,
    chain_child = chain_child,
    kids_field = kids_field,
    siblings_of = siblings_of,
    branch_to = branch_to,
    on_branch = on_branch,
  }
end

-- Every function of the tree: the reader's, and those that change it or build answers.
local function tree()
  local L = reader()
  local I, B, T, F = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
  local BATCH = 500  -- arguments per command when a script writes many members at once
  local seq_of, on_chain, parent_of, chain_child = L.seq_of, L.on_chain, L.parent_of, L.chain_child
  local kids_field, siblings_of = L.kids_field, L.siblings_of
  local message_json, parent_json, emit, children_of, zadd_all, del_all, last_of_chain, retarget
  local descend, conversation_json
  -- A message as clients see it, from its pieces (ids, parent, stored body, sibling position).
  message_json = function(id, cid, pj, body, count, index)
    return '{"id":"' .. id .. '","conversation_id":"' .. cid .. '","parent_id":' .. pj .. ','
      .. body .. ',"sibling_count":' .. count .. ',"sibling_index":' .. index .. '}'
  end

  parent_json = function(pid)
    if pid == '' then return 'null' end
    return '"' .. pid .. '"'
  end

  emit = function(events, maxlen, ttl, kind, data)
    local id = redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 't', kind, 'd', data)
    redis.call('SPUBLISH', events, id .. '\n' .. kind .. '\n' .. data)
    redis.call('EXPIRE', events, ttl)
  end

  -- Every child of `pid` in creation order: its first-chain child, then its explicit ones.
  children_of = function(pid, pseq, lin)
    local out = {}
    local first = chain_child(pid, pseq, lin)
    if first then out[1] = first end
    local listed = redis.call('HGET', T, kids_field(pid))
    if listed then
      for kid in string.gmatch(listed, '[^,]+') do out[#out + 1] = kid end
    end
    return out
  end

  zadd_all = function(key, pairs)  -- pairs: {score, member, score, member, ...}
    for k = 1, #pairs, BATCH do
      redis.call('ZADD', key, unpack(pairs, k, math.min(k + BATCH - 1, #pairs)))
    end
  end

  del_all = function(cmd, key, members)
    for k = 1, #members, BATCH do
      redis.call(cmd, key, unpack(members, k, math.min(k + BATCH - 1, #members)))
    end
  end

  -- The last message of the first chain (or of everything without `lin`): the active leaf of a
  -- conversation written before trees, which has no `leaf` field.
  last_of_chain = function(lin)
    local rows = redis.call('ZRANGE', I, lin or '+inf', '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, 1,
                            'WITHSCORES')
    if rows[1] then return rows[1], tonumber(rows[2]) end
    return '', nil
  end

  -- Make the active branch end at `x` ('' : empty), from where it meets the current one: walks up
  -- from x only through messages that are not on it. Returns the new cut.
  retarget = function(x, lin, cut)
    if x == '' then
      redis.call('DEL', B)
      return 0
    end
    local adds = {}
    local id, s = x, seq_of(x)
    while true do
      if s <= lin then  -- the first chain, up to s, is the rest of the branch
        redis.call('DEL', B)
        cut = s
        break
      end
      if redis.call('ZSCORE', B, id) then
        redis.call('ZREMRANGEBYSCORE', B, '(' .. s, '+inf')
        break
      end
      adds[#adds + 1] = s
      adds[#adds + 1] = id
      local p = parent_of(id, s)
      if p == '' then  -- a root off the branch: the branch is this path alone
        redis.call('DEL', B)
        cut = 0
        break
      end
      id, s = p, seq_of(p)
    end
    zadd_all(B, adds)
    return cut
  end

  -- Extend the active branch, which ends at `x` ('' : empty), by the newest child at each step.
  -- Stretches of the first chain are crossed in one step each (to its next fork, kept in f).
  -- Returns the new leaf ('' : none) and cut.
  descend = function(x, lin, cut)
    local adds = {}
    local cur, cs = x, nil
    if x ~= '' then cs = seq_of(x) end
    while true do
      local listed = redis.call('HGET', T, kids_field(cur))
      if listed then
        local newest = string.match(listed, '([^,]+)$')
        cs = seq_of(newest)
        cur = newest
        adds[#adds + 1] = cs
        adds[#adds + 1] = cur
      else
        local nxt, ns = chain_child(cur, cs, lin)
        if not nxt then break end
        local fork = redis.call('ZRANGE', F, ns, lin, 'BYSCORE', 'LIMIT', 0, 1, 'WITHSCORES')
        if fork[1] then
          cur, cs = fork[1], tonumber(fork[2])
        else
          cur, cs = last_of_chain(lin)
        end
        cut = cs
      end
    end
    zadd_all(B, adds)
    return cur, cut
  end

  -- The conversation as clients see it, from its hash (h: data, updated_at, count, version) and
  -- its active leaf. Conversations written before trees lack the newer settings: their defaults
  -- are added (a title they have was given by a user; no tools).
  conversation_json = function(data, updated_at, count, version, leaf)
    local extra = ''
    if not string.find(data, '"tool_choice":', 1, true) then
      local at = string.find(data, '"title":', 1, true)
      local source = '"user"'
      if string.sub(data, at + 8, at + 8) == 'n' then source = 'null' end
      extra = ',"title_source":' .. source .. ',"on_busy":"queue","forked_from":null'
        .. ',"tools":null,"tool_choice":null'
    end
    return string.sub(data, 1, -2) .. extra .. ',"updated_at":"' .. updated_at
      .. '","message_count":' .. count .. ',"version":' .. version .. ',"active_leaf_id":'
      .. parent_json(leaf) .. '}'
  end
  L.message_json = message_json
  L.parent_json = parent_json
  L.emit = emit
  L.children_of = children_of
  L.zadd_all = zadd_all
  L.del_all = del_all
  L.last_of_chain = last_of_chain
  L.retarget = retarget
  L.descend = descend
  L.conversation_json = conversation_json
  return L
end
