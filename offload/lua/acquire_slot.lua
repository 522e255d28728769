-- Take one connection slot for a client IP, atomically.
-- KEYS[1]  sorted set of the IP's open sockets, scored by last heartbeat
-- ARGV[1]  now (seconds)
-- ARGV[2]  heartbeats older than this no longer count (dead workers)
-- ARGV[3]  limit
-- ARGV[4]  this socket's member id
-- ARGV[5]  key time-to-live in seconds
-- returns  1 if the slot was taken, 0 if the IP is at its limit
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
