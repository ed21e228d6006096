-- hub history read: the channel's top offset, its epoch and stored publications, atomically.
--
-- KEYS[1]  stream  {<prefix>:ch:<channel>}:history
-- KEYS[2]  meta    {<prefix>:ch:<channel>}:meta
-- ARGV[1]  since: return entries after this offset; "" for the newest entries
-- ARGV[2]  limit: "-1" every entry, "0" none (just offset and epoch), n at most n
-- ARGV[3]  "0": a plain read, which writes nothing; else a subscribe: when the channel has no
--          meta yet, create it with ARGV[4] as its epoch and this TTL in milliseconds, so that
--          the subscriber's epoch stays valid for the first publication
-- ARGV[4]  epoch to answer (and keep, see ARGV[3]) if the channel has none yet
-- ARGV[5]  history size: offsets older than the newest "size" are not returned (the publish
--          script trims the stream approximately, so it may still hold some); "0": no bound
-- Returns {offset, epoch, entries}, entries oldest first.
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  -- No history: an empty page. Only a subscribe keeps the epoch (for a while); a read of a
  -- random name leaves nothing behind.
  epoch = ARGV[4]
  if ARGV[3] ~= '0' then
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
  return {0, epoch, {}}
end
local top = tonumber(redis.call('HGET', KEYS[2], 'offset'))
local limit = tonumber(ARGV[2])
local size = tonumber(ARGV[5])
if limit == 0 then
  return {top, epoch, {}}
end
-- Offsets are consecutive entry IDs, so the first one wanted is known without a scan.
local first
if ARGV[1] ~= '' then
  first = tonumber(ARGV[1]) + 1
elseif limit > 0 then
  first = top - limit + 1
else
  first = 1
end
if size > 0 and first < top - size + 1 then
  first = top - size + 1
end
if first < 1 then
  first = 1
end
if first > top then
  return {top, epoch, {}}
end
local start = string.format('%d-0', first)
local entries
if limit > 0 then
  entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', limit)
else
  entries = redis.call('XRANGE', KEYS[1], start, '+')
end
return {top, epoch, entries}
