-- tokenlimit: what every bucket script shares, mirroring tokenlimit/_model.py operation for
-- operation: the constants, argument checks, reading a stored TAT as a debt, and storing one.
-- Composed in front of bucket.lua (acquire, peek) and holdback.lua by tokenlimit/_scripts.py.
-- State per key: one integer, the TAT (ns of server time when the bucket is full again): 19
-- digits, which Redis 7 stores with its int encoding and Valkey 9 as a short embedded string
-- (~97 B per key in all, key and TTL included). Lua's doubles cannot hold ~1.8e18 exactly, so it
-- is read as whole seconds and nanoseconds and only differences are taken.

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

