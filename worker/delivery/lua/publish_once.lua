-- Atomic: announce a job on the stream only the first time it finishes (a redelivered job that
-- finishes again stores the same result but adds no second event).
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*',
                    'job_id', ARGV[3], 'kind', ARGV[4], 'status', ARGV[5], 'result', ARGV[6])
end
return false
