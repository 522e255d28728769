-- Take connection slots for one client IP, atomically: the sockets of a
-- connect storm that asked together take theirs in one call, in order.
-- KEYS[1]  sorted set of the IP's open sockets, scored by last heartbeat
-- ARGV[1]  now (seconds)
-- ARGV[2]  heartbeats older than this no longer count (dead workers)
-- ARGV[3]  limit
-- ARGV[4]  key time-to-live in seconds
-- ARGV[5..] the member ids of the sockets asking, in order
-- returns  one integer per member: 1 if it took a slot, 0 if the IP was at its limit
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local limit = tonumber(ARGV[3])
local open = redis.call('ZCARD', KEYS[1])
local taken = {}
for i = 5, #ARGV do
  if open < limit then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
    open = open + 1
    taken[#taken + 1] = 1
  else
    taken[#taken + 1] = 0
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return taken
