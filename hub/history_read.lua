-- hub history read: the channel's top offset, its epoch and stored publications, atomically.
--
-- KEYS[1]  stream  {<prefix>:ch:<channel>}:history
-- KEYS[2]  meta    {<prefix>:ch:<channel>}:meta
-- ARGV[1]  since: return entries after this offset; "" for the newest entries
-- ARGV[2]  limit: "-1" every entry, "0" none (just offset and epoch), n at most n
-- ARGV[3]  meta TTL in milliseconds ("0": none), used when the meta is created here
-- ARGV[4]  epoch to use if the channel has none yet
-- Returns {offset, epoch, entries}; entries oldest first, except for since "" with a limit,
-- where they come newest first.
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  -- Created on read too, so that a subscriber's epoch stays valid for the first publication.
  epoch = ARGV[4]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
  if ARGV[3] ~= '0' then
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
end
local top = tonumber(redis.call('HGET', KEYS[2], 'offset'))
local limit = tonumber(ARGV[2])
local entries = {}
if limit ~= 0 then
  if ARGV[1] == '' then
    if limit < 0 then
      entries = redis.call('XRANGE', KEYS[1], '-', '+')
    else
      entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', limit)
    end
  else
    local start = string.format('%d-1', tonumber(ARGV[1]))
    if limit < 0 then
      entries = redis.call('XRANGE', KEYS[1], start, '+')
    else
      entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', limit)
    end
  end
end
return {top, epoch, entries}
