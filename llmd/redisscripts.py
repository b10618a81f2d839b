"""The Lua scripts that keep per-key limit state in Redis (redislimits.py). Each runs atomically
in Redis, so N llmd admitting for one key at once see one sequence of decisions, exactly as the
in-process Limiter (limits.py) decides them, with the same windows:

- requests_per_minute / _hour: a sorted set of admission times (a sliding log); an entry
  leaves when it is ``<= now - window`` old.
- tokens_per_minute: a sorted set of reservations by time plus a hash grant -> tokens and its
  running sum (field ``#sum``); settle replaces a live reservation by the real usage, and a
  request that outlived its window adds only what it used beyond its reservation, now.
- max_concurrent: a sorted set of leases, grant -> expiry. The llmd holding a grant pushes its
  expiry forward while the request runs; a killed llmd's leases expire on their own.
- monthly_tokens: a counter per key and UTC month (``used``) plus the tokens reserved by requests
  still running, leased like concurrency slots (a sorted set grant -> expiry and a hash grant ->
  tokens with its ``#sum``), so a killed llmd's reservations lapse too; admission refuses when
  used + reserved >= the quota.

Times are Redis's own clock (TIME), so hosts whose clocks differ still share one window.
Keys of one API key share a hash tag ``{key id}`` (Redis Cluster keeps them on one node).
"""

from __future__ import annotations

# Lua's unary minus of 0 is -0, which Redis sends as "-0" and HINCRBY refuses ("not an
# integer"): every decrement goes through decr(), which skips a zero.
_COMMON = """
local function decr(h, field, n)
  if n ~= 0 then redis.call('HINCRBY', h, field, 0 - n) end
end

local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Drop the entries of z scored <= cutoff (their tokens in h with them); the sum of what is left.
local function prune_tokens(z, h, cutoff)
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff)
  if #old > 0 then
    local drop = 0
    for i = 1, #old, 500 do
      local part = {unpack(old, i, math.min(i + 499, #old))}
      for _, v in ipairs(redis.call('HMGET', h, unpack(part))) do
        if v then drop = drop + tonumber(v) end
      end
      redis.call('HDEL', h, unpack(part))
    end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
    decr(h, '#sum', drop)
  end
  return tonumber(redis.call('HGET', h, '#sum') or '0')
end

local function oldest(z)
  local o = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
  if #o == 0 then return '0' end
  return o[2]
end
"""

# KEYS: conc, rpm, rph, tpm, tpmv, used (this month), mlease, mres
# ARGV: grant id, lease_s, max_concurrent, rpm, rph, tpm, reserve, monthly (0 = no such limit)
# Returns {admitted (1/0), reason, retry_after_s or detail, now, req_count, req_oldest, tok_sum, tok_oldest}
ADMIT = (
    _COMMON
    + """
local gid = ARGV[1]
local lease = tonumber(ARGV[2])
local maxc, rpm, rph = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tpm, reserve, monthly = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local now = clock()

local tsum = 0
if tpm > 0 then tsum = prune_tokens(KEYS[4], KEYS[5], now - 60) end
local rcount, rkey, rwin = 0, nil, 60
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60)
  rkey = KEYS[2]
end
if rph > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 3600)
  if not rkey then rkey, rwin = KEYS[3], 3600 end
end

local function view()
  local rc, ro, to = 0, '0', '0'
  if rkey then rc = redis.call('ZCARD', rkey); ro = oldest(rkey) end
  if tpm > 0 then to = oldest(KEYS[4]) end
  return {tostring(now), rc, ro, tsum, to}
end

local function refuse(reason, detail)
  local v = view()
  return {0, reason, tostring(detail), v[1], v[2], v[3], v[4], v[5]}
end

if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= maxc then return refuse('concurrency', 1) end
end
for _, w in ipairs({{rpm, KEYS[2], 60, 'requests_per_minute'}, {rph, KEYS[3], 3600, 'requests_per_hour'}}) do
  if w[1] > 0 then
    local n = redis.call('ZCARD', w[2])
    if n >= w[1] then
      local at = redis.call('ZRANGE', w[2], n - w[1], n - w[1], 'WITHSCORES')
      return refuse(w[4], tonumber(at[2]) + w[3] - now)
    end
  end
end
if tpm > 0 then
  if reserve > tpm then return refuse('tokens_too_large', 60) end
  if tsum + reserve > tpm then
    -- When will enough of the window have left? Oldest first, a page at a time (a busy key's
    -- window may hold many entries; usually the first few suffice).
    local excess, reset, from = tsum + reserve - tpm, 60, 0
    while excess > 0 do
      local entries = redis.call('ZRANGE', KEYS[4], from, from + 99, 'WITHSCORES')
      if #entries == 0 then break end
      for i = 1, #entries, 2 do
        excess = excess - tonumber(redis.call('HGET', KEYS[5], entries[i]) or '0')
        if excess <= 0 then reset = tonumber(entries[i + 1]) + 60 - now; break end
      end
      from = from + 100
    end
    return refuse('tokens_per_minute', reset)
  end
end
if monthly > 0 then
  local used = tonumber(redis.call('GET', KEYS[6]) or '0') + prune_tokens(KEYS[7], KEYS[8], now)
  if used >= monthly then return refuse('monthly_tokens', used) end
end

-- Admitted: take everything at once.
if maxc > 0 then
  redis.call('ZADD', KEYS[1], now + lease, gid)
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 2000))
end
if rpm > 0 then redis.call('ZADD', KEYS[2], now, gid); redis.call('EXPIRE', KEYS[2], 61) end
if rph > 0 then redis.call('ZADD', KEYS[3], now, gid); redis.call('EXPIRE', KEYS[3], 3601) end
if tpm > 0 then
  redis.call('ZADD', KEYS[4], now, gid)
  redis.call('HSET', KEYS[5], gid, reserve)
  tsum = redis.call('HINCRBY', KEYS[5], '#sum', reserve)
  redis.call('EXPIRE', KEYS[4], 120); redis.call('EXPIRE', KEYS[5], 120)
end
if monthly > 0 then
  redis.call('ZADD', KEYS[7], now + lease, gid)
  redis.call('HSET', KEYS[8], gid, reserve)
  redis.call('HINCRBY', KEYS[8], '#sum', reserve)
  redis.call('EXPIRE', KEYS[7], 3456000); redis.call('EXPIRE', KEYS[8], 3456000)
end
local v = view()
return {1, '', '', v[1], v[2], v[3], v[4], v[5]}
"""
)

# KEYS: conc, tpm, tpmv, used (the month it settles in), mlease, mres
# ARGV: grant id, used tokens, reserved in the token window (0: none), reserved against the month (0: none)
SETTLE = (
    _COMMON
    + """
local gid, used = ARGV[1], tonumber(ARGV[2])
local entry, mres = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = clock()
redis.call('ZREM', KEYS[1], gid)
if entry > 0 then
  prune_tokens(KEYS[2], KEYS[3], now - 60)
  local cur = redis.call('HGET', KEYS[3], gid)
  if cur then
    redis.call('HSET', KEYS[3], gid, used)
    if used ~= tonumber(cur) then redis.call('HINCRBY', KEYS[3], '#sum', used - tonumber(cur)) end
  elseif used > entry then
    -- It outlived its window: the tokens beyond its reservation count now.
    redis.call('ZADD', KEYS[2], now, gid .. ':x')
    redis.call('HSET', KEYS[3], gid .. ':x', used - entry)
    redis.call('HINCRBY', KEYS[3], '#sum', used - entry)
    redis.call('EXPIRE', KEYS[2], 120); redis.call('EXPIRE', KEYS[3], 120)
  end
end
if mres > 0 then
  local cur = redis.call('HGET', KEYS[6], gid)
  if cur then  -- absent: its lease lapsed, or Redis restarted meanwhile
    redis.call('HDEL', KEYS[6], gid)
    decr(KEYS[6], '#sum', tonumber(cur))
    redis.call('ZREM', KEYS[5], gid)
  end
end
if used > 0 then
  redis.call('INCRBY', KEYS[4], used)
  redis.call('EXPIRE', KEYS[4], 3456000)
end
return 1
"""
)

# KEYS: conc sets; ARGV: lease_s, then one grant id per key. Pushes each live lease's expiry.
RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  redis.call('ZADD', k, 'XX', until_, ARGV[i + 1])
  local ms = math.ceil(tonumber(ARGV[1]) * 2000)
  if redis.call('PTTL', k) < ms then redis.call('PEXPIRE', k, ms) end  -- never shortens a key's life
end
return #KEYS
"""

# KEYS: used counters of one month; ARGV: the ledger's totals. Never lowers a counter: another
# llmd may already have counted tokens the ledger does not hold yet.
SEED = """
for i, k in ipairs(KEYS) do
  local n = tonumber(ARGV[i])
  if tonumber(redis.call('GET', k) or '0') < n then
    redis.call('SET', k, n, 'EX', 3456000)
  end
end
return #KEYS
"""
