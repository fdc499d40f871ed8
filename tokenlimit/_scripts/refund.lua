-- tokenlimit: give tokens back, after gcra.lua's helpers. Mirrors _model.refund.
-- Each bucket's debt shrinks by cost * interval, never below 0 (TAT = max(now, TAT - cost *
-- interval)), so no bucket ever holds more than burst; an absent bucket is full and stays
-- absent, and one already full is left as it is.
-- KEYS[i]: one bucket per limit, all in one hash slot (the keys of a decision).
-- ARGV: as bucket.lua's, the decision's own: cost (whole tokens, at most every burst), then per
-- limit: interval (ns per token), burst.
-- Reply: as bucket.lua's for a peek of one token right after: {now µs, all_allowed, then per
-- limit: allowed, remaining, retry_us, reset_us}, integers only.

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

-- Every state is read and checked before anything is written: a corrupt one touches nothing.
local debts = {}
for i = 1, n do
    local debt = false -- absent: a full bucket
    local raw = redis.call('GET', KEYS[i])
    if raw then
        debt = debt_of(raw, now_s, now_ns)
        if not debt then return redis.error_reply('tokenlimit: corrupt bucket state') end
    end
    debts[i] = debt
end

local all_ok = true
local parts = {}
for i = 1, n do
    local interval = intervals[i]
    local tau = bursts[i] * interval
    local after = 0
    local debt = debts[i]
    if debt then
        after = debt - cost * interval
        if after < 0 then after = 0 end
        if after < debt then store(KEYS[i], now_s, now_ns, after) end
    end
    local need = after + interval
    local ok = need <= tau + interval * SLACK
    all_ok = all_ok and ok
    local remaining = math.floor((tau - after) / interval + SLACK)
    if remaining < 0 then remaining = 0 end
    if remaining > bursts[i] then remaining = bursts[i] end
    local retry = 0
    if not ok then retry = math.ceil((need - tau) / 1000) end
    parts[i] = { ok and 1 or 0, remaining, retry, math.ceil(after / 1000) }
end

local reply = { now_s * 1000000 + now_ns / 1000, all_ok and 1 or 0 }
for i = 1, n do
    for _, v in ipairs(parts[i]) do reply[#reply + 1] = v end
end
return reply
