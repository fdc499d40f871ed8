-- tokenlimit: leased tokens (issue 18), after gcra.lua's helpers. Mirrors _model.lease.
-- Gives `back` tokens back (refund.lua's arithmetic: never above full, an absent bucket stays
-- absent), then takes the same number of tokens from every bucket, all or none: as many as the
-- fullest-constrained bucket holds, at least `need` and at most `want`. `need` is admitted
-- exactly when bucket.lua would admit it after the give-back.
-- KEYS[i]: one bucket per limit, all in one hash slot (the keys of a decision).
-- ARGV: need (whole tokens >= 1), want (>= need), back (whole tokens >= 0); then per limit:
-- interval (ns per token), burst.
-- Reply: {now µs, all_allowed, then per limit: allowed, remaining, retry_us, reset_us, and last
-- the tokens granted (0: refused)}, integers only.

local n = #KEYS
if n < 1 or #ARGV ~= 3 + 2 * n then
    return redis.error_reply('tokenlimit: wrong number of arguments')
end
local need, e1 = whole(ARGV[1], 'cost')
if not need then return redis.error_reply(e1) end
local want, e2 = whole(ARGV[2], 'lease')
if not want then return redis.error_reply(e2) end
if want < need then return redis.error_reply('tokenlimit: bad lease') end
local back = 0
if ARGV[3] ~= '0' then
    local v, e3 = whole(ARGV[3], 'back')
    if not v then return redis.error_reply(e3) end
    back = v
end
local intervals, bursts = {}, {}
for i = 1, n do
    local interval, e4 = whole(ARGV[3 + 2 * i - 1], 'interval', true)
    if not interval then return redis.error_reply(e4) end
    local burst, e5 = whole(ARGV[3 + 2 * i], 'burst')
    if not burst then return redis.error_reply(e5) end
    local bad = limit_error(want, interval, burst)
    if bad then return redis.error_reply(bad) end
    if back > burst then return redis.error_reply('tokenlimit: bad back') end
    intervals[i], bursts[i] = interval, burst
end

local t = redis.call('TIME')
local now_s, now_ns = tonumber(t[1]), tonumber(t[2]) * 1000

-- Every state is read and checked before anything is written: a corrupt one touches nothing.
local owed, debts, oks = {}, {}, {}
local all_ok = true
local fewest = want
for i = 1, n do
    local debt = 0
    local raw = redis.call('GET', KEYS[i])
    if raw then
        debt = debt_of(raw, now_s, now_ns)
        if not debt then return redis.error_reply('tokenlimit: corrupt bucket state') end
    end
    owed[i] = debt
    local interval = intervals[i]
    if back > 0 then
        debt = debt - back * interval
        if debt < 0 then debt = 0 end
    end
    local tau = bursts[i] * interval
    local ok = debt + need * interval <= tau + interval * SLACK
    all_ok = all_ok and ok
    local held = math.floor((tau - debt) / interval + SLACK)
    if held < 0 then held = 0 end
    if held < fewest then fewest = held end
    debts[i], oks[i] = debt, ok
end

local granted = 0
if all_ok then
    granted = fewest
    if granted < need then granted = need end
end

local reply = { now_s * 1000000 + now_ns / 1000, all_ok and 1 or 0 }
for i = 1, n do
    local interval = intervals[i]
    local tau = bursts[i] * interval
    local after = debts[i] + granted * interval
    local remaining = math.floor((tau - after) / interval + SLACK)
    if remaining < 0 then remaining = 0 end
    if remaining > bursts[i] then remaining = bursts[i] end
    local retry = 0
    if not oks[i] then retry = math.ceil((debts[i] + need * interval - tau) / 1000) end
    if granted > 0 or after < owed[i] then store(KEYS[i], now_s, now_ns, after) end
    reply[#reply + 1] = oks[i] and 1 or 0
    reply[#reply + 1] = remaining
    reply[#reply + 1] = retry
    reply[#reply + 1] = math.ceil(after / 1000)
end
reply[#reply + 1] = granted
return reply
