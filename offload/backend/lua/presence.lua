-- Presence of one channel: who is in it, across every worker and instance.
--
-- Theory: each worker holds its members of a channel through a *lease* (one
-- per worker process) that it renews every heartbeat. A member is present
-- while some lease holds it; when the last one lets go (its sockets closed,
-- or its lease expired: a worker SIGKILLed, an instance gone) the member
-- enters a grace period, and leaves only if no lease takes it back before
-- the period ends. So a reconnect within the grace period makes no event, a
-- user's tabs on several workers are one member, and a dead worker's members
-- leave within lease ttl + grace + one sweep, with exactly one "leave" each
-- (ZREM is atomic here: concurrent sweepers cannot both see a member go).
--
-- Every key is the channel's (one hash tag): the script runs on one shard.
-- KEYS[1] m  members, all score 0: ordered by name for stable pagination
-- KEYS[2] g  members in their grace period, score: when they leave (ms)
-- KEYS[3] n  member -> number of leases holding it
-- KEYS[4] i  member -> its info (JSON text)
-- KEYS[5] l  leases, score: when each expires unless renewed (ms)
-- KEYS[6] c  holdings, all score 0: "<lease>|<member>"
-- ARGV[1] op: "join", "leave" or "sweep"
-- ARGV[2] now in ms ("" for Redis' own clock, shared by every instance)
-- ARGV[3] key ttl (ms): everything vanishes if nobody renews anything
-- join:  ARGV[4] lease, ARGV[5] lease ttl (ms), ARGV[6..] member, info, ...
--        returns the members that joined (absent before, grace included)
-- leave: ARGV[4] lease, ARGV[5] grace (ms), ARGV[6..] members
--        returns the members that left at once (grace 0)
-- sweep: ARGV[4] lease to renew or "", ARGV[5] lease ttl (ms), ARGV[6] grace (ms),
--        ARGV[7] most members to release in this call
--        returns {members that left, ms until the next deadline or false, 1 if more work is
--        due now, 1 if the lease was renewed (0: it expired and its members were
--        released: the worker must join them again)}
local m, g, n, i, l, c = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local op = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function gone(member, left)
  redis.call('ZREM', m, member)
  redis.call('HDEL', i, member)
  left[#left + 1] = member
end

-- A lease lets go of a member: when no lease holds it any more, its grace period starts.
local function release(lease, member, grace, left)
  if redis.call('ZREM', c, lease .. '|' .. member) == 0 then
    return
  end
  if redis.call('HINCRBY', n, member, -1) > 0 then
    return
  end
  redis.call('HDEL', n, member)
  if grace > 0 then
    redis.call('ZADD', g, now + grace, member)
  else
    gone(member, left)
  end
end

local function keep_alive()
  for _, key in ipairs(KEYS) do
    redis.call('PEXPIRE', key, ARGV[3])
  end
end

if op == 'join' then
  local lease = ARGV[4]
  local joined = {}
  for k = 6, #ARGV, 2 do
    local member = ARGV[k]
    if redis.call('ZADD', c, 'NX', 0, lease .. '|' .. member) == 1
        and redis.call('HINCRBY', n, member, 1) == 1 then
      redis.call('ZREM', g, member)
      if redis.call('ZADD', m, 'NX', 0, member) == 1 then
        joined[#joined + 1] = member
      end
    end
    redis.call('HSET', i, member, ARGV[k + 1])
  end
  redis.call('ZADD', l, now + tonumber(ARGV[5]), lease)
  keep_alive()
  return joined
end

if op == 'leave' then
  local lease, grace = ARGV[4], tonumber(ARGV[5])
  local left = {}
  for k = 6, #ARGV do
    release(lease, ARGV[k], grace, left)
  end
  if redis.call('ZRANGEBYLEX', c, '[' .. lease .. '|', '(' .. lease .. '}', 'LIMIT', 0, 1)[1] == nil then
    redis.call('ZREM', l, lease)
  end
  return left
end

if op == 'sweep' then
  local lease, ttl, grace, budget = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  local renewed = 0
  if lease ~= '' and redis.call('ZSCORE', l, lease) then
    redis.call('ZADD', l, now + ttl, lease)
    keep_alive()
    renewed = 1
  end
  local left = {}
  local more = 0
  -- Expired leases: their worker stopped renewing them (killed, or its instance gone).
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', l, '-inf', now, 'LIMIT', 0, 16)) do
    local held = redis.call('ZRANGEBYLEX', c, '[' .. dead .. '|', '(' .. dead .. '}', 'LIMIT', 0, budget)
    for _, holding in ipairs(held) do
      release(dead, string.sub(holding, #dead + 2), grace, left)
    end
    budget = budget - #held
    if budget <= 0 then
      more = 1
      break
    end
    redis.call('ZREM', l, dead)
  end
  -- Grace periods that ended: those members leave.
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', g, '-inf', now, 'LIMIT', 0, math.max(budget, 0))) do
    redis.call('ZREM', g, member)
    gone(member, left)
  end
  if redis.call('ZCOUNT', g, '-inf', now) > 0 then
    more = 1
  end
  local next_due = false
  for _, key in ipairs({ l, g }) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]
    if first and (not next_due or tonumber(first) < next_due) then
      next_due = tonumber(first)
    end
  end
  if next_due then
    next_due = math.max(0, next_due - now)  -- a delay: callers' clocks need not be Redis'
  end
  return { left, next_due, more, renewed }
end

return redis.error_reply('presence: unknown op ' .. tostring(op))
