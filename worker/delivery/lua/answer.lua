-- Atomic: a job's whole answer in one round trip (instead of four: storing, announcing and clearing one by
-- one). Store the result as Celery's Redis backend does (SET, then PUBLISH on the key's channel
-- for waiters), except over a stored final state (SUCCESS, FAILURE, REVOKED: Celery never
-- overwrites a stored success either, and a job has one answer); announce it on
-- the stream once, as publish_once.lua; clear the job's start counter and its ledger entry (as
-- ``ledger.forget``). Returns 1 if this call stored the result.
local stored = false
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  local final = {SUCCESS = true, FAILURE = true, REVOKED = true}
  stored = ok and type(meta) == 'table' and final[meta['status']] == true
end
if not stored then
  if tonumber(ARGV[2]) > 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  else
    redis.call('SET', KEYS[1], ARGV[1])
  end
  redis.call('PUBLISH', KEYS[1], ARGV[1])
end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*',
             'job_id', ARGV[5], 'kind', ARGV[6], 'status', ARGV[7], 'result', ARGV[8])
end
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[5])
redis.call('HDEL', KEYS[6], ARGV[5])
if stored then return 0 end
return 1
