-- tokenlimit: live overrides (brownout), one hash per prefix. Mirrors MemoryBackend's overrides.
-- KEYS[1]: the hash; field = a limit's label, value = "<expiry, ms of server time> <payload>"
-- (the payload is tokenlimit/_overrides.py's JSON; this script never reads it).
-- ARGV[1]: 'list', or 'set' with ARGV[2] name, ARGV[3] payload, ARGV[4] ttl (whole ms), or
-- 'clear' with ARGV[2] name.
-- Reply: {changed (1 if set or clear changed the hash, else 0), then per live override: name,
-- payload, ms left}. Expired (or unreadable) entries are deleted by whichever call meets them
-- first; the hash itself expires with its last entry, so nothing outlives every override.

local key, op = KEYS[1], ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) -- ~1.8e12: exact

local changed = 0
if op == 'set' then
    if #ARGV ~= 4 then return redis.error_reply('tokenlimit: wrong number of arguments') end
    local ttl = ARGV[4]
    if not string.match(ttl, '^%d+$') or #ttl > 12 or tonumber(ttl) < 1 then
        return redis.error_reply('tokenlimit: bad ttl')
    end
    redis.call('HSET', key, ARGV[2], string.format('%.0f', now + tonumber(ttl)) .. ' ' .. ARGV[3])
    changed = 1
elseif op == 'clear' then
    if #ARGV ~= 2 then return redis.error_reply('tokenlimit: wrong number of arguments') end
    changed = redis.call('HDEL', key, ARGV[2])
elseif op ~= 'list' or #ARGV ~= 1 then
    return redis.error_reply('tokenlimit: bad override operation')
end

local all = redis.call('HGETALL', key)
local out, last, dropped = {changed}, 0, false
for i = 1, #all, 2 do
    local raw = all[i + 1]
    local space = string.find(raw, ' ', 1, true)
    local expiry = space and tonumber(string.sub(raw, 1, space - 1))
    if not expiry or expiry <= now then
        redis.call('HDEL', key, all[i])
        dropped = true
    else
        out[#out + 1] = all[i]
        out[#out + 1] = string.sub(raw, space + 1)
        out[#out + 1] = expiry - now
        if expiry > last then last = expiry end
    end
end
if last > 0 and (changed == 1 or dropped) then
    redis.call('PEXPIRE', key, string.format('%.0f', last - now))
end
return out
