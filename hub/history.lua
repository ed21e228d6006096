-- hub history publish: store a publication in its channel's stream and publish it, atomically.
--
-- KEYS[1]  stream  {<prefix>:ch:<channel>}:history   (entry IDs "<offset>-0", field "e")
-- KEYS[2]  meta    {<prefix>:ch:<channel>}:meta      (hash: offset, epoch)
-- ARGV[1]  the pub/sub channel <prefix>:ch:<channel>
-- ARGV[2]  the envelope: a msgpack map {"data": ..., ...} without offset and epoch, or the
--          signed form [envelope, mac] (two bin values)
-- ARGV[3]  history size (entries kept; the stream is trimmed approximately, readers skip older)
-- ARGV[4]  stream TTL in milliseconds after the last publication (history_ttl, 30 days if none)
-- ARGV[5]  meta TTL in milliseconds (max(stream TTL, 1 day))
-- ARGV[6]  epoch to use if the channel has none yet (a fresh random string)
-- ARGV[7]  "1": SPUBLISH (Redis Cluster, sharded pub/sub), else PUBLISH
-- Returns {offset, epoch, receivers}.
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  -- New (or lost) history: a new epoch, and nothing left over from an old one.
  epoch = ARGV[6]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)

-- Append "offset" and "epoch" to the map without decoding data: bump the map's length.
local env = ARGV[2]
local head = string.byte(env, 1) or 0
local tail = cmsgpack.pack('offset') .. cmsgpack.pack(offset) ..
  cmsgpack.pack('epoch') .. cmsgpack.pack(epoch)
if head == 0x92 then
  -- Signed, [envelope, mac] (docs/publish-api.md): the signed bytes stay as they are, offset
  -- and epoch go in a third element.
  env = string.char(0x93) .. string.sub(env, 2) .. string.char(0x82) .. tail
elseif head >= 0x80 and head <= 0x8d then
  env = string.char(head + 2) .. string.sub(env, 2) .. tail
elseif head == 0x8e or head == 0x8f then
  env = string.char(0xde, 0, head - 0x80 + 2) .. string.sub(env, 2) .. tail
elseif head == 0xde then
  local n = string.byte(env, 2) * 256 + string.byte(env, 3) + 2
  env = string.char(0xde, math.floor(n / 256), n % 256) .. string.sub(env, 4) .. tail
else
  return redis.error_reply('ERR envelope must be a msgpack map or a signed [envelope, mac]')
end

redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], string.format('%d-0', offset), 'e', env)
-- Both keys always expire; "0" (no TTL) from an older caller means the 30-day default.
local untimed = '2592000000'
redis.call('PEXPIRE', KEYS[1], ARGV[4] ~= '0' and ARGV[4] or untimed)
redis.call('PEXPIRE', KEYS[2], ARGV[5] ~= '0' and ARGV[5] or untimed)
local receivers
if ARGV[7] == '1' then
  receivers = redis.call('SPUBLISH', ARGV[1], env)
else
  receivers = redis.call('PUBLISH', ARGV[1], env)
end
return {offset, epoch, receivers}
