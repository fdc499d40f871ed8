-- tokenlimit: give back one slot of a concurrency limit. Mirrors release() in
-- tokenlimit/_concurrency.py.
-- KEYS[1]: the key's holders (see slot_hold.lua); ARGV[1]: holder id (hex).
-- Reply: 1 if the holder still held its slot, 0 if its lease had already ended.

if #KEYS ~= 1 or #ARGV ~= 1 then
    return redis.error_reply('tokenlimit: wrong number of arguments')
end
local holder = ARGV[1]
if #holder < 1 or #holder > 64 or not string.match(holder, '^%x+$') then
    return redis.error_reply('tokenlimit: bad holder')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local score = redis.call('ZSCORE', KEYS[1], holder)
if not score then return 0 end
redis.call('ZREM', KEYS[1], holder)
local held = tonumber(score) > now
-- Still the longest lease's lifetime, no longer (an empty set is deleted by the server).
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
    local ttl = math.ceil((tonumber(last[2]) - now) / 1000)
    if ttl < 1 then
        redis.call('DEL', KEYS[1])
    else
        redis.call('PEXPIRE', KEYS[1], ttl)
    end
end
return held and 1 or 0
