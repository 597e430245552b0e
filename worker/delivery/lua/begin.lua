-- Atomic, one command with one reply (rather than a MULTI of SET NX and GET: four replies):
-- record a first start and return 0, or return the earlier starts without recording this one.
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
return tonumber(redis.call('GET', KEYS[1]) or '0')
