-- Make the active branch the one reached from a message by its newest children (tree.lua
-- comes before this).
-- KEYS: c, m, i, b, t, f, events
-- ARGV: owner|'', id, expected version|'', updated_at, conversation id, maxlen, events ttl
local L  -- the tree's functions (tree.lua), once needed
local h = redis.call('HMGET', C, 'user', 'lin', 'cut', 'version', 'data', 'count')
if not h[1] or (ARGV[1] ~= '' and h[1] ~= ARGV[1]) then return {'missing'} end
L = L or tree()
if ARGV[3] ~= '' and h[4] ~= ARGV[3] then return {'changed'} end
local id = ARGV[2]
if redis.call('HEXISTS', M, id) == 0 then return {'nomessage'} end
local lin, cut = tonumber(h[2]), tonumber(h[3])
local leaf
if lin == nil then
  leaf = L.last_of_chain(nil)  -- one chain: every message leads to its end
else
  cut = L.retarget(id, lin, cut)
  leaf, cut = L.descend(id, lin, cut)
  redis.call('HSET', C, 'cut', cut)
end
redis.call('HSET', C, 'leaf', leaf, 'updated_at', ARGV[4])
pages_changed()
local version = redis.call('HINCRBY', C, 'version', 1)
local conv = L.conversation_json(h[5], ARGV[4], h[6], version, leaf)
L.emit(KEYS[7], ARGV[6], ARGV[7], 'conversation.updated',
     '{"conversation_id":"' .. ARGV[5] .. '","conversation":' .. conv .. '}')
return {'ok', conv}
