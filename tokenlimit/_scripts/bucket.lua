-- tokenlimit: the shared bucket arithmetic. Mirrors tokenlimit/_model.py operation for operation.
-- KEYS[i]: one bucket per limit, all in one hash slot.
-- ARGV[1]: cost (whole tokens >= 1); then per limit: interval (µs per token), burst (int >= 1).
-- State per key: "<debt µs> <stamp µs>", debt = time until full as of server time stamp.
-- Reply: {now, all_allowed, then per limit: allowed, remaining, retry_us, reset_us}, integers
-- only (Lua floats returned to Redis are truncated: redis rule).

local SLACK = 1e-6
local MAX_EXACT = 9007199254740992 -- 2^53
local MAX_BURST = 1000000000        -- tokenlimit/_limit.py MAX_BURST
local MAX_FILL_US = 1e18            -- 1e12 s, tokenlimit/_limit.py _MAX_FILL_SECONDS

-- Python validates first; the script validates again (tonumber("nan") is a number, "0x10"
-- parses as 16, "1e400" as inf), so a bad call is an error reply and touches nothing.
local function positive_number(s, what)
    if type(s) ~= 'string' or not (string.match(s, '^%d+%.?%d*$') or
            string.match(s, '^%d+%.?%d*[eE][%+%-]?%d+$')) then
        return nil, 'tokenlimit: bad ' .. what
    end
    local v = tonumber(s)
    if v == nil or v ~= v or v >= math.huge or v <= 0 then
        return nil, 'tokenlimit: bad ' .. what
    end
    return v
end

local function whole(s, what)
    if type(s) ~= 'string' or not string.match(s, '^%d+$') then
        return nil, 'tokenlimit: bad ' .. what
    end
    local v = tonumber(s)
    -- ">=": tonumber rounds 2^53 + 1 down to 2^53, so 2^53 itself may stand for a larger value
    if v == nil or v < 1 or v >= MAX_EXACT then
        return nil, 'tokenlimit: bad ' .. what
    end
    return v
end

local function decide(consume)
    local n = #KEYS
    if n < 1 or #ARGV ~= 1 + 2 * n then
        return redis.error_reply('tokenlimit: wrong number of arguments')
    end
    local cost, err = whole(ARGV[1], 'cost')
    if not cost then return redis.error_reply(err) end
    local intervals, bursts = {}, {}
    for i = 1, n do
        local interval, e1 = positive_number(ARGV[2 * i], 'interval')
        if not interval then return redis.error_reply(e1) end
        local burst, e2 = whole(ARGV[2 * i + 1], 'burst')
        if not burst then return redis.error_reply(e2) end
        if burst > MAX_BURST or burst * interval > MAX_FILL_US then
            return redis.error_reply('tokenlimit: limit out of range')
        end
        if cost > burst then return redis.error_reply('tokenlimit: cost exceeds burst') end
        intervals[i], bursts[i] = interval, burst
    end

    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

    local debts, stamps, needs, oks = {}, {}, {}, {}
    local all_ok = true
    for i = 1, n do
        local debt, stamp = 0, now
        local raw = redis.call('GET', KEYS[i])
        if raw then
            local d, s = string.match(raw, '^(%S+) (%S+)$')
            debt, stamp = tonumber(d), tonumber(s)
            if debt == nil or stamp == nil or debt ~= debt or stamp ~= stamp
                    or debt < 0 or debt >= math.huge or stamp < 0 or stamp >= math.huge then
                return redis.error_reply('tokenlimit: corrupt bucket state')
            end
        end
        local elapsed = now - stamp
        if elapsed < 0 then
            elapsed = 0 -- the clock stepped back: pause refill until it catches up
        else
            stamp = now
        end
        debt = debt - elapsed
        if debt < 0 then debt = 0 end
        local interval = intervals[i]
        local tau = bursts[i] * interval
        local need = debt + cost * interval
        local ok = need <= tau + interval * SLACK
        all_ok = all_ok and ok
        debts[i], stamps[i], needs[i], oks[i] = debt, stamp, need, ok
    end

    local write = consume and all_ok
    local reply = { now, all_ok and 1 or 0 }
    for i = 1, n do
        local interval = intervals[i]
        local tau = bursts[i] * interval
        local after = debts[i]
        if write then after = needs[i] end
        local remaining = math.floor((tau - after) / interval + SLACK)
        if remaining < 0 then remaining = 0 end
        if remaining > bursts[i] then remaining = bursts[i] end
        local retry = 0
        if not oks[i] then retry = math.ceil(needs[i] - tau) end
        local reset = math.ceil(after)
        if write then
            -- TTL = time until full, rounded up to whole ms, never 0 (PEXPIRE 0 deletes).
            local ttl = math.ceil(after / 1000)
            if ttl < 1 then ttl = 1 end
            redis.call('SET', KEYS[i], string.format('%.17g %.17g', after, stamps[i]), 'PX', ttl)
        end
        reply[#reply + 1] = oks[i] and 1 or 0
        reply[#reply + 1] = remaining
        reply[#reply + 1] = retry
        reply[#reply + 1] = reset
    end
    return reply
end
