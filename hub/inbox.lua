-- hub inbox notify: store a notification in a user's inbox and push it, atomically.
--
-- Every key is in the hash slot of the user's pub/sub name, so the script runs on the shard
-- that owns the user (Redis Cluster) and its publish reaches that user's hubs.
--
-- KEYS[1]  stream  {<prefix>:user:<user>}:inbox       entry IDs "<seq>-0"; fields:
--                  e = the push (msgpack), t = ms stored, x = ms it expires ("0": never),
--                  k = collapse key ("" none)
-- KEYS[2]  meta    {<prefix>:user:<user>}:inbox:meta  hash: seq, epoch, read, acked
-- KEYS[3]  ids     {<prefix>:user:<user>}:inbox:ids   hash: backend id -> seq
-- KEYS[4]  idt     {<prefix>:user:<user>}:inbox:idt   sorted set: backend id by ms stored
-- KEYS[5]  keys    {<prefix>:user:<user>}:inbox:keys  hash: collapse key -> seq
-- ARGV[1]  the pub/sub channel <prefix>:user:<user>
-- ARGV[2]  the envelope: a msgpack map {"data": ...} without "inbox"
-- ARGV[3]  the backend's id ("": none); a second notify with a known id stores nothing
-- ARGV[4]  collapse key ("": none); the entry replaces the user's older one with that key
-- ARGV[5]  the entry's time to live in milliseconds ("0": as long as the inbox keeps it)
-- ARGV[6]  inbox size: entries kept per user
-- ARGV[7]  inbox TTL in milliseconds: entries older than this are dropped, and the keys
--          expire this long after the user's last notify, ack or read
-- ARGV[8]  epoch to use if the user has none yet (a fresh random string)
-- ARGV[9]  "1": SPUBLISH (Redis Cluster, sharded pub/sub), else PUBLISH
-- Returns {seq, epoch, receivers, duplicate, collapsed, expired, length}: duplicate is 1 when
-- the id was known (seq is then the first notify's, and nothing was stored or pushed);
-- collapsed is 1 when an older entry with the collapse key was replaced; expired counts the
-- entries this call dropped because their own ttl had passed; length is the inbox's entries.
local stream, meta, ids, idt, ckeys = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, ckey = ARGV[3], ARGV[4]
local size, inbox_ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)

local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  -- A new (or lost) inbox: a new epoch, and nothing left over from an old one.
  epoch = ARGV[8]
  redis.call('DEL', stream, ids, idt, ckeys)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'read', 0, 'acked', 0)
end

if id ~= '' then
  local known = redis.call('HGET', ids, id)
  if known then
    return {tonumber(known), epoch, 0, 1, 0, 0, redis.call('XLEN', stream)}
  end
end

local seq = redis.call('HINCRBY', meta, 'seq', 1)

-- The push: the envelope with "inbox" = {seq, epoch[, id]} appended, data left as it is.
local env = ARGV[2]
local head = string.byte(env, 1) or 0
local mark = {seq = seq, epoch = epoch}
if id ~= '' then
  mark['id'] = id
end
local tail = cmsgpack.pack('inbox') .. cmsgpack.pack(mark)
if head >= 0x80 and head <= 0x8e then
  env = string.char(head + 1) .. string.sub(env, 2) .. tail
elseif head == 0x8f then
  env = string.char(0xde, 0, 16) .. string.sub(env, 2) .. tail
elseif head == 0xde then
  local n = string.byte(env, 2) * 256 + string.byte(env, 3) + 1
  env = string.char(0xde, math.floor(n / 256), n % 256) .. string.sub(env, 4) .. tail
else
  return redis.error_reply('ERR envelope must be a msgpack map')
end

local function forget_key(k, s)
  if k ~= '' and redis.call('HGET', ckeys, k) == tostring(s) then
    redis.call('HDEL', ckeys, k)
  end
end

local collapsed = 0
if ckey ~= '' then
  local older = redis.call('HGET', ckeys, ckey)
  if older then
    collapsed = redis.call('XDEL', stream, older .. '-0')
  end
  redis.call('HSET', ckeys, ckey, seq)
end

local expires = '0'
if ARGV[5] ~= '0' then
  expires = tostring(now + tonumber(ARGV[5]))
end
redis.call('XADD', stream, string.format('%d-0', seq), 'e', env, 't', now, 'x', expires,
  'k', ckey)
if id ~= '' then
  redis.call('HSET', ids, id, seq)
  redis.call('ZADD', idt, now, id)
end

-- Trim from the oldest end: past the size, older than the inbox TTL, or expired. One read of
-- the oldest entries (each XRANGE from the start walks over the deleted ones), at most 64
-- dropped per call; the next calls go on.
local oldest = now - inbox_ttl
local expired = 0
local length = redis.call('XLEN', stream)
local excess = length - size
local rows = redis.call('XRANGE', stream, '-', '+', 'COUNT', math.min(math.max(excess, 0), 63) + 1)
for _, row in ipairs(rows) do
  local fields = {}
  for i = 1, #row[2], 2 do
    fields[row[2][i]] = row[2][i + 1]
  end
  local x = tonumber(fields['x'])
  local dead = x ~= 0 and x <= now
  if length > size or tonumber(fields['t']) < oldest or dead then
    if dead then
      expired = expired + 1
    end
    redis.call('XDEL', stream, row[1])
    length = length - 1
    forget_key(fields['k'], string.match(row[1], '^(%d+)'))
  else
    break
  end
end
-- Ids are remembered for the inbox TTL (a retry after its entry was collapsed away must not
-- bring the old data back), at most four times the inbox size.
local stale = redis.call('ZRANGEBYSCORE', idt, '-inf', oldest, 'LIMIT', 0, 64)
local excess = redis.call('ZCARD', idt) - #stale - 4 * size
if excess > 0 then
  stale = redis.call('ZRANGE', idt, 0, #stale + excess - 1)
end
if #stale > 0 then
  redis.call('HDEL', ids, unpack(stale))
  redis.call('ZREM', idt, unpack(stale))
end

for _, key in ipairs(KEYS) do
  redis.call('PEXPIRE', key, inbox_ttl)
end
local receivers
if ARGV[9] == '1' then
  receivers = redis.call('SPUBLISH', ARGV[1], env)
else
  receivers = redis.call('PUBLISH', ARGV[1], env)
end
return {seq, epoch, receivers, 0, collapsed, expired, length}
