-- tokenlimit: the shared bucket arithmetic. Mirrors tokenlimit/_model.py operation for operation.
-- Runs after acquire.lua or peek.lua, which set `consume` (whether an admission takes tokens).
-- KEYS[i]: one bucket per limit, all in one hash slot.
-- ARGV[1]: cost (whole tokens >= 1); then per limit: interval (whole ns per token), burst (int >= 1).
-- State per key: one integer, the TAT (ns of server time when the bucket is full again): 19
-- digits, which Redis 7 stores with its int encoding and Valkey 9 as a short embedded string
-- (~97 B per key in all, key and TTL included). Lua's doubles cannot hold ~1.8e18 exactly, so it
-- is read as whole seconds and nanoseconds and only differences are taken.
-- Reply: {now µs, all_allowed, then per limit: allowed, remaining, retry_us, reset_us}, integers
-- only (Lua floats returned to Redis are truncated: redis rule).

local SLACK = 1e-6
local MAX_EXACT = 9007199254740992 -- 2^53
local MAX_BURST = 1000000000        -- tokenlimit/_limit.py MAX_BURST
local MAX_FILL_NS = 1e21            -- 1e12 s, tokenlimit/_limit.py _MAX_FILL_SECONDS
local NS = 1000000000

-- Python validates first; the script validates again (tonumber("nan") is a number, "0x10"
-- parses as 16, "1e400" as inf), so a bad call is an error reply and touches nothing.
-- `big`: past 2^53 too, up to MAX_FILL_NS, if the double holds the number exactly (intervals:
-- Python rounds a long one up to such a number).
local function whole(s, what, big)
    if type(s) ~= 'string' or not string.match(s, '^%d+$') then
        return nil, 'tokenlimit: bad ' .. what
    end
    local v = tonumber(s)
    if v == nil or v < 1 then
        return nil, 'tokenlimit: bad ' .. what
    end
    -- ">=": tonumber rounds 2^53 + 1 down to 2^53, so 2^53 itself may stand for a larger value
    if v >= MAX_EXACT and not (big and v <= MAX_FILL_NS and string.format('%.0f', v) == s) then
        return nil, 'tokenlimit: bad ' .. what
    end
    return v
end

-- Why a valid cost and limit still cannot be decided (out of range), or nil.
local function limit_error(cost, interval, burst)
    if burst > MAX_BURST or burst * interval > MAX_FILL_NS then
        return 'tokenlimit: limit out of range'
    end
    if cost > burst then return 'tokenlimit: cost exceeds burst' end
    return nil
end

-- A bucket's debt at now (ns until it is full again, >= 0) from its stored TAT; nil if the
-- state is not a TAT this script wrote.
local function debt_of(raw, now_s, now_ns)
    if type(raw) ~= 'string' or #raw > 24 or not string.match(raw, '^%d+$') then return nil end
    local tat_s, tat_ns = 0, tonumber(raw)
    if #raw > 9 then
        tat_s, tat_ns = tonumber(string.sub(raw, 1, -10)), tonumber(string.sub(raw, -9))
    end
    local debt = (tat_s - now_s) * NS + (tat_ns - now_ns)
    if debt < 0 then debt = 0 end -- a clock step back only makes debt larger
    return debt
end

-- Store the TAT `after` ns past now, for as long as the bucket takes to be full again.
local function store(key, now_s, now_ns, after)
    -- TTL = time until full, rounded up to whole ms, never 0 (PEXPIRE 0 deletes).
    local ttl = math.ceil(after / 1000000)
    if ttl < 1 then ttl = 1 end
    local total = now_ns + after
    local carry = math.floor(total / NS)
    local nanos = total - carry * NS
    -- only past 2^53 ns of debt can rounding push this out of range; the model clamps alike
    if nanos < 0 then nanos = 0 elseif nanos > NS - 1 then nanos = NS - 1 end
    redis.call('SET', key, string.format('%d%09d', now_s + carry, nanos), 'PX', ttl)
end

-- One limit, the common call: decide() below for n = 1, step for step on the same doubles, but
-- written out flat. Without decide()'s loops and tables the server spends 18-20 us per call
-- instead of 22-25 (INFO commandstats, pipelined, median of 12 rounds); the tests hold both
-- paths to the model. Both check, read and write through the helpers above.
if #KEYS == 1 and #ARGV == 3 then
    local cost, e1 = whole(ARGV[1], 'cost')
    if not cost then return redis.error_reply(e1) end
    local interval, e2 = whole(ARGV[2], 'interval', true)
    if not interval then return redis.error_reply(e2) end
    local burst, e3 = whole(ARGV[3], 'burst')
    if not burst then return redis.error_reply(e3) end
    local bad = limit_error(cost, interval, burst)
    if bad then return redis.error_reply(bad) end

    local t = redis.call('TIME')
    local now_s, now_ns = tonumber(t[1]), tonumber(t[2]) * 1000
    local debt = 0
    local raw = redis.call('GET', KEYS[1])
    if raw then
        debt = debt_of(raw, now_s, now_ns)
        if not debt then return redis.error_reply('tokenlimit: corrupt bucket state') end
    end
    local tau = burst * interval
    local need = debt + cost * interval
    local ok = need <= tau + interval * SLACK
    local after, retry = debt, 0
    if not ok then
        retry = math.ceil((need - tau) / 1000)
    elseif consume then
        after = need
        store(KEYS[1], now_s, now_ns, after)
    end
    local remaining = math.floor((tau - after) / interval + SLACK)
    if remaining < 0 then remaining = 0 end
    if remaining > burst then remaining = burst end
    local flag = ok and 1 or 0
    return { now_s * 1000000 + now_ns / 1000, flag, flag, remaining, retry, math.ceil(after / 1000) }
end

-- Any number of limits, all or none.
local function decide()
    local n = #KEYS
    if n < 1 or #ARGV ~= 1 + 2 * n then
        return redis.error_reply('tokenlimit: wrong number of arguments')
    end
    local cost, err = whole(ARGV[1], 'cost')
    if not cost then return redis.error_reply(err) end
    local intervals, bursts = {}, {}
    for i = 1, n do
        local interval, e1 = whole(ARGV[2 * i], 'interval', true)
        if not interval then return redis.error_reply(e1) end
        local burst, e2 = whole(ARGV[2 * i + 1], 'burst')
        if not burst then return redis.error_reply(e2) end
        local bad = limit_error(cost, interval, burst)
        if bad then return redis.error_reply(bad) end
        intervals[i], bursts[i] = interval, burst
    end

    local t = redis.call('TIME')
    local now_s, now_ns = tonumber(t[1]), tonumber(t[2]) * 1000

    local debts, needs, oks = {}, {}, {}
    local all_ok = true
    for i = 1, n do
        local debt = 0
        local raw = redis.call('GET', KEYS[i])
        if raw then
            debt = debt_of(raw, now_s, now_ns)
            if not debt then return redis.error_reply('tokenlimit: corrupt bucket state') end
        end
        local interval = intervals[i]
        local tau = bursts[i] * interval
        local need = debt + cost * interval
        local ok = need <= tau + interval * SLACK
        all_ok = all_ok and ok
        debts[i], needs[i], oks[i] = debt, need, ok
    end

    local write = consume and all_ok
    local reply = { now_s * 1000000 + now_ns / 1000, all_ok and 1 or 0 }
    for i = 1, n do
        local interval = intervals[i]
        local tau = bursts[i] * interval
        local after = debts[i]
        if write then after = needs[i] end
        local remaining = math.floor((tau - after) / interval + SLACK)
        if remaining < 0 then remaining = 0 end
        if remaining > bursts[i] then remaining = bursts[i] end
        local retry = 0
        if not oks[i] then retry = math.ceil((needs[i] - tau) / 1000) end
        local reset = math.ceil(after / 1000)
        if write then store(KEYS[i], now_s, now_ns, after) end
        reply[#reply + 1] = oks[i] and 1 or 0
        reply[#reply + 1] = remaining
        reply[#reply + 1] = retry
        reply[#reply + 1] = reset
    end
    return reply
end
return decide()
