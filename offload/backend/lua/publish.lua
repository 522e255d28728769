-- Publish one message atomically: append it to the channel's history stream
-- (capped, with a time-to-live) and PUBLISH it with the id the stream gave it.
-- Running both in one script means live delivery and history always agree:
-- no subscriber can see an id that history lacks, or the reverse.
--
-- The publish token makes a retried call (redis-py retries once after a
-- timeout or a lost reply) return the first call's id instead of publishing
-- the message twice.
--
-- KEYS[1]  history stream key
-- KEYS[2]  this publish call's token key
-- ARGV[1]  pub/sub channel
-- ARGV[2]  data, as JSON text
-- ARGV[3]  history size (MAXLEN, exact)
-- ARGV[4]  history time-to-live in seconds (reset by every publish)
-- ARGV[5]  "1": SPUBLISH (Redis Cluster: sharded pub/sub, the message stays on
--          its shard), else PUBLISH. Absent means PUBLISH.
--
-- Both keys and the pub/sub channel carry the channel as their hash tag, so in
-- a Cluster the script runs on one shard.
-- returns  the message id, "<ms>-<seq>"
local prior = redis.call('GET', KEYS[2])
if prior then
  return prior
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '*', 'd', ARGV[2])
redis.call('SET', KEYS[2], id, 'EX', 60)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call(ARGV[5] == '1' and 'SPUBLISH' or 'PUBLISH', ARGV[1], id .. ' ' .. ARGV[2])
return id
