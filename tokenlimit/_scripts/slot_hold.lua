-- tokenlimit: take one of max_in_flight slots of a key (a concurrency limit). Mirrors hold() in
-- tokenlimit/_concurrency.py, which the memory backend runs and the tests compare against.
-- KEYS[1]: the key's holders, a sorted set: member = holder id, score = end of its lease (µs of
-- server time). One key per call, so it works on a cluster as it is.
-- ARGV[1]: holder id (hex); ARGV[2]: max_in_flight (int >= 1); ARGV[3]: lease (µs, int >= 1).
-- Reply: {admitted 0/1, holders now, µs until the earliest lease ends (refused only; else 0)},
-- integers only (Lua floats returned to Redis are truncated: redis rule).

local MAX_IN_FLIGHT = 1000000000  -- tokenlimit/_concurrency.py MAX_IN_FLIGHT
local MAX_LEASE_US = 2592000000000 -- 30 days, tokenlimit/_concurrency.py MAX_LEASE

-- Python validates first; the script validates again (tonumber("nan") is a number, "0x10"
-- parses as 16), so a bad call is an error reply and touches nothing.
local function whole(s, top)
    if type(s) ~= 'string' or not string.match(s, '^%d+$') then return nil end
    local v = tonumber(s)
    if v == nil or v < 1 or v > top then return nil end
    return v
end

if #KEYS ~= 1 or #ARGV ~= 3 then
    return redis.error_reply('tokenlimit: wrong number of arguments')
end
local holder = ARGV[1]
if #holder < 1 or #holder > 64 or not string.match(holder, '^%x+$') then
    return redis.error_reply('tokenlimit: bad holder')
end
local most = whole(ARGV[2], MAX_IN_FLIGHT)
if not most then return redis.error_reply('tokenlimit: bad max_in_flight') end
local lease = whole(ARGV[3], MAX_LEASE_US)
if not lease then return redis.error_reply('tokenlimit: bad lease') end

-- Server time only: every host's decisions share one clock. µs since the epoch (~1.8e15) and
-- leases up to 30 days stay below 2^53, exact in Lua's doubles and in the set's scores.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- Holders whose lease has ended lose their slot: a killed process never leaks capacity.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
if count >= most then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return { 0, count, tonumber(first[2]) - now }
end
redis.call('ZADD', KEYS[1], now + lease, holder)
-- The key lives exactly as long as its longest lease (never 0: PEXPIRE 0 deletes).
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(last[2]) - now) / 1000))
return { 1, count + 1, 0 }
