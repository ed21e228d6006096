-- hub inbox notify: store a notification in a user's inbox and push it, atomically.
--
-- Every key is in the hash slot of the user's pub/sub name, so the script runs on the shard
-- that owns the user (Redis Cluster) and its publish reaches that user's hubs.
--
-- KEYS[1]  stream  {<prefix>:user:<user>}:inbox       entry IDs "<seq>-0"; fields:
--                  e = the push (below), t = ms stored, x = ms it expires (none: never)
--                  the pub/sub channel is the name between the braces: <prefix>:user:<user>
-- KEYS[2]  meta    {<prefix>:user:<user>}:inbox:meta  hash: seq, epoch, read, acked, ...
-- KEYS[3]  ids     {<prefix>:user:<user>}:inbox:ids   hash: backend id -> seq
-- KEYS[4]  idt     {<prefix>:user:<user>}:inbox:idt   sorted set: backend id by ms stored
-- KEYS[5]  keys    {<prefix>:user:<user>}:inbox:keys  hash: collapse key -> seq
--          KEYS[3..5] are needed only by a notify with an id or a collapse key
-- ARGV[1]  the envelope: a msgpack map {"data": ...} without "inbox", or its signed form
--          [envelope, mac] (two bin values, docs/publish-api.md "Signed payloads")
-- ARGV[2]  inbox size: entries kept per user (the stream is trimmed by whole nodes, so it
--          may hold a few more; readers skip those)
-- ARGV[3]  inbox TTL in milliseconds: entries older than this are dropped, and the keys
--          expire this long after the user's last ack or read, and between this long and
--          1/64 longer after the last notify (see "renew" below)
-- ARGV[4]  epoch to use if the user has none yet (a fresh random string of 1 to 64 letters,
--          digits, '-' or '_')
-- ARGV[5]  "1": SPUBLISH (Redis Cluster, sharded pub/sub), else PUBLISH
-- ARGV[6]  the backend's id ("" or left out: none); a second notify with a known id stores
--          nothing
-- ARGV[7]  collapse key ("" or left out: none); the entry replaces the user's older one with
--          that key
-- ARGV[8]  the entry's time to live in milliseconds ("0" or left out: as long as the inbox
--          keeps it)
-- Returns {seq, epoch, receivers, duplicate, collapsed, expired, length}: duplicate is 1 when
-- the id was known (seq is then the first notify's, and nothing was stored or pushed);
-- collapsed is 1 when an older entry with the collapse key was replaced; expired counts the
-- entries this call dropped because their own ttl had passed; length is the inbox's entries.
--
-- The common notify (no id, no collapse key, no ttl) is a handful of calls and 2 keys and 5
-- arguments: the id and collapse-key bookkeeping, and the expiry of their keys, run only when
-- the notify names one. Each call costs Redis about as much as a small command, and each
-- argument about a quarter of one: together, most of what a notify costs.
--
-- Many notifies in one call (the users' keys must share a slot on a cluster: one user's):
-- ARGV[1]  "many"
-- ARGV[2], ARGV[3], ARGV[4]  inbox size, inbox TTL in ms and "1" for SPUBLISH, as ARGV[2],
--          ARGV[3] and ARGV[5] above, for all of them
-- ARGV[5]  the layout: a letter per notify, in order: "p" plain (2 keys: stream, meta; 2
--          arguments: envelope, epoch candidate), "t" with a ttl (2 keys; 5 arguments:
--          envelope, epoch candidate, id "", collapse key "", ttl), "f" with an id or a
--          collapse key (5 keys: stream, meta, ids, idt, keys; the same 5 arguments)
-- KEYS     each notify's keys, in order; ARGV[6...] each notify's arguments, in order
-- Returns a list with each notify's reply in its place (the table above), or its error: a
-- notify refused, or failed in Redis (WRONGTYPE...), fails alone and the others run. A call
-- whose keys and arguments are not what its layout names is refused before any of it runs.
-- The call itself (EVALSHA, TIME, the shared arguments) costs Redis once: about a fifth of a
-- plain notify shared by the batch.
--
-- Redis formats a Lua number passed to redis.call as a double (snprintf "%.17g", about 3k
-- instructions: 3% of a notify), so the arguments of the common path are strings: the size
-- as it came, "1", and the time as "stamp".
--
-- What every notify of a call shares, set once per call (below the function): the inbox size
-- (as it came, and as a number), the inbox TTL, 1/64 of it (slack), the SPUBLISH flag, and the
-- time in ms (as a number, and as a string: stamp).
local size_arg, size, inbox_ttl, slack, flag, now, stamp
local function notify(stream, meta, ids, idt, ckeys, env, candidate, id, ckey, life)
  -- What is wrong with the call is refused before anything is written.
  local head = string.byte(env, 1) or 0
  if head ~= 0x92 and head ~= 0xde and (head < 0x80 or head > 0x8f) then
    return redis.error_reply('ERR envelope must be a msgpack map or a signed [envelope, mac]')
  elseif not size or not inbox_ttl or not flag then
    return redis.error_reply('ERR inbox size and ttl must be integers (docs/inbox.md)')
  elseif (id ~= '' or ckey ~= '') and not ckeys then
    return redis.error_reply('ERR a notify with an id or a collapse key needs 5 keys')
  end
  -- meta "due": no entry at the head of the stream dies (its own ttl, or older than the inbox
  -- TTL) before this ms, so until then the head is not looked at. meta "renewed": when a notify
  -- last set the stream's and meta's TTL (to inbox_ttl + slack); an ack or a read clears it.
  -- meta "next": the earlier of due and renewed + slack, so never past now + slack when it is
  -- true; an ack or a read clears it too. Before it, a notify reads neither due nor renewed
  -- (each field read costs about as much as a small command).
  local got = redis.call('HMGET', meta, 'epoch', 'next')
  local epoch, next_at = got[1], tonumber(got[2])
  local due, renewed, fresh = 0, nil, not epoch
  if fresh then
    -- A new (or lost) inbox: a new epoch, and nothing left over from an old one. The epoch
    -- goes into pushes between spaces: letters, digits, '-' and '_' only.
    epoch = candidate
    if #epoch > 64 or not string.find(epoch, '^[%w_%-]+$') then
      return redis.error_reply('ERR the epoch candidate must be 1 to 64 letters, digits, - or _')
    end
    -- due, renewed and next are written by the slow path below, which a fresh inbox takes.
    due, next_at = now + inbox_ttl, nil
    if ckeys then
      redis.call('DEL', stream, ids, idt, ckeys)
      redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'read', 0, 'acked', 0)
    else
      -- Ids and collapse keys of a lost epoch (its meta evicted, say) may be left: "sweep"
      -- has the first notify that names one delete them before it looks.
      redis.call('DEL', stream)
      redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'read', 0, 'acked', 0, 'sweep', 1)
    end
  elseif ckeys and (id ~= '' or ckey ~= '') and redis.call('HDEL', meta, 'sweep') == 1 then
    redis.call('DEL', ids, idt, ckeys)
  elseif id ~= '' then
    local known = redis.call('HGET', ids, id)
    if known then
      local length = redis.call('XLEN', stream)
      return {tonumber(known), epoch, 0, 1, 0, 0, math.min(length, size)}
    end
  end

  local seq = redis.call('HINCRBY', meta, 'seq', '1')
  local sid = string.format('%d-0', seq)

  -- The push, stored as it is pushed. A plain notify's is "\193<seq>-0 <epoch> " then the
  -- envelope as it came (0xc1: the byte msgpack never uses): one concatenation, where building
  -- "inbox" into the envelope costs Redis about 7% of a notify. With an id, the envelope gets
  -- "inbox" = {seq, epoch, id} appended (data left as it is; a signed [envelope, mac] gets it
  -- as a third element, the signed bytes untouched).
  if id == '' then
    env = '\193' .. sid .. ' ' .. epoch .. ' ' .. env
  else
    local tail = '\165inbox\131\163seq' .. cmsgpack.pack(seq, 'epoch', epoch, 'id', id)
    if head == 0x92 then
      env = '\147' .. string.sub(env, 2) .. '\129' .. tail
    elseif head >= 0x80 and head <= 0x8e then
      env = string.char(head + 1) .. string.sub(env, 2) .. tail
    elseif head == 0x8f then
      env = '\222\0\16' .. string.sub(env, 2) .. tail
    elseif head == 0xde then
      local n = string.byte(env, 2) * 256 + string.byte(env, 3) + 1
      env = string.char(0xde, math.floor(n / 256), n % 256) .. string.sub(env, 4) .. tail
    end
  end

  local collapsed = 0
  if ckey ~= '' then
    local older = redis.call('HGET', ckeys, ckey)
    if older then
      collapsed = redis.call('XDEL', stream, older .. '-0')
    end
    redis.call('HSET', ckeys, ckey, seq)
    -- Keys of entries trimmed since are left behind (trimming does not look at entries); past
    -- twice the size, forget those older than the oldest entry kept.
    if redis.call('HLEN', ckeys) > 2 * size + 256 then
      local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
      local low = first and tonumber(string.match(first[1], '^(%d+)')) or seq
      local all, gone = redis.call('HGETALL', ckeys), {}
      for i = 1, #all, 2 do
        if tonumber(all[i + 1]) < low then
          gone[#gone + 1] = all[i]
        end
      end
      for i = 1, #gone, 1000 do
        redis.call('HDEL', ckeys, unpack(gone, i, math.min(i + 999, #gone)))
      end
    end
    redis.call('PEXPIRE', ckeys, inbox_ttl)
  end

  -- Past the size, whole stream nodes go (no deleted entries left for the next read to walk).
  -- The size and the time go as strings (see "stamp" above). An entry without a ttl has no
  -- "x".
  local expires = 0
  if life and life ~= '0' then
    expires = now + tonumber(life)
    redis.call('XADD', stream, 'MAXLEN', '~', size_arg, sid, 'e', env, 't', stamp, 'x', expires)
  else
    redis.call('XADD', stream, 'MAXLEN', '~', size_arg, sid, 'e', env, 't', stamp)
  end

  if id ~= '' then
    redis.call('HSET', ids, id, seq)
    redis.call('ZADD', idt, now, id)
    -- Ids are remembered for the inbox TTL (a retry after its entry was collapsed away must not
    -- bring the old data back), at most four times the inbox size.
    local stale = redis.call('ZRANGEBYSCORE', idt, '-inf', now - inbox_ttl, 'LIMIT', 0, 64)
    local excess = redis.call('ZCARD', idt) - #stale - 4 * size
    if excess > 0 then
      stale = redis.call('ZRANGE', idt, 0, #stale + excess - 1)
    end
    if #stale > 0 then
      redis.call('HDEL', ids, unpack(stale))
      redis.call('ZREM', idt, unpack(stale))
    end
    redis.call('PEXPIRE', ids, inbox_ttl)
    redis.call('PEXPIRE', idt, inbox_ttl)
  end

  -- The slow path, when "next" has come (or is missing, or not true): the oldest entries are
  -- dropped once older than the inbox TTL or past their own ttl (at most 64 per call; the next
  -- calls go on), looked at when "due" has come; expired entries further on are skipped by
  -- readers. And the renew (below).
  local expired = 0
  local slow = not next_at or next_at <= now or next_at > now + slack
  if slow then
    if not fresh then
      local more = redis.call('HMGET', meta, 'due', 'renewed')
      due, renewed = tonumber(more[1]) or 0, tonumber(more[2])
    end
    if due <= now then
      local oldest = now - inbox_ttl
      local function times(row)
        local f, t, x = row[2], 0, 0
        for i = 1, #f, 2 do
          if f[i] == 't' then
            t = tonumber(f[i + 1])
          elseif f[i] == 'x' then
            x = tonumber(f[i + 1])
          end
        end
        return t, x
      end
      local rows = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
      local t, x = times(rows[1])
      if (x ~= 0 and x <= now) or t < oldest then
        rows = redis.call('XRANGE', stream, '-', '+', 'COUNT', 64)
      end
      local drop = {}
      due = now  -- all 64 dropped: the next call goes on
      for _, row in ipairs(rows) do
        t, x = times(row)
        if x ~= 0 and x <= now then
          expired = expired + 1
        elseif t >= oldest then
          due = t + inbox_ttl
          if x ~= 0 and x < due then
            due = x
          end
          break
        end
        drop[#drop + 1] = row[1]
      end
      if #drop > 0 then
        redis.call('XDEL', stream, unpack(drop))
      end
    elseif expires ~= 0 and expires < due then
      due = expires
    end
    -- renew: the stream and meta live at least inbox_ttl past this notify. Setting their TTL on
    -- every notify costs two calls; set to inbox_ttl + slack, it needs renewing only once slack
    -- has gone by, so the inbox expires between inbox_ttl and inbox_ttl + slack after the last
    -- notify. An ack or a read sets it to inbox_ttl and clears "renewed" and "next", so the next
    -- notify renews.
    if not renewed or renewed + slack <= now or renewed > now then
      redis.call('PEXPIRE', stream, inbox_ttl + slack)
      redis.call('PEXPIRE', meta, inbox_ttl + slack)
      renewed = now
    end
    redis.call('HSET', meta, 'due', due, 'renewed', renewed, 'next',
      math.min(due, renewed + slack))
  elseif expires ~= 0 then
    -- An entry that dies before "next" moves "due" and "next" to when it does (due is not
    -- earlier: next is the earlier of the two); one that dies later may still move "due".
    if expires < next_at then
      redis.call('HSET', meta, 'due', expires, 'next', expires)
    elseif expires < (tonumber(redis.call('HGET', meta, 'due')) or 0) then
      redis.call('HSET', meta, 'due', expires)
    end
  end
  local length = math.min(redis.call('XLEN', stream), size)

  local channel, receivers = string.sub(stream, 2, -8), nil
  if flag == '1' then
    receivers = redis.call('SPUBLISH', channel, env)
  else
    receivers = redis.call('PUBLISH', channel, env)
  end
  return {seq, epoch, receivers, 0, collapsed, expired, length}
end

local many = ARGV[1] == 'many'
size_arg, flag = ARGV[2], ARGV[many and 4 or 5]
size, inbox_ttl = tonumber(size_arg or ''), tonumber(ARGV[3] or '')
slack = inbox_ttl and math.floor(inbox_ttl / 64)
local clock = redis.call('TIME')  -- seconds and microseconds, as strings
now = clock[1] * 1000 + math.floor(clock[2] / 1000)
stamp = clock[1] .. string.sub('00000' .. clock[2], -6, -4)
if not many then
  return notify(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1] or '', ARGV[4],
    ARGV[6] or '', ARGV[7] or '', ARGV[8])
end

-- Many notifies in one call (see the top): the layout is checked against the keys and
-- arguments before any of them runs; then each runs as a call of its own would.
local layout = ARGV[5] or ''
local nkeys, nargs = 0, 5
for i = 1, #layout do
  local kind = string.byte(layout, i)
  if kind == 112 then
    nkeys, nargs = nkeys + 2, nargs + 2
  elseif kind == 116 then
    nkeys, nargs = nkeys + 2, nargs + 5
  elseif kind == 102 then
    nkeys, nargs = nkeys + 5, nargs + 5
  else
    return redis.error_reply('ERR a batch layout is made of the letters p, t and f')
  end
end
if not size or not inbox_ttl or not flag then
  return redis.error_reply('ERR inbox size and ttl must be integers (docs/inbox.md)')
elseif nkeys ~= #KEYS or nargs ~= #ARGV then
  return redis.error_reply('ERR a batch needs the keys and arguments its layout names')
end
local replies, k, a = {}, 1, 6
for i = 1, #layout do
  local kind, ok, reply = string.byte(layout, i), nil, nil
  if kind == 112 then
    ok, reply = pcall(notify, KEYS[k], KEYS[k + 1], nil, nil, nil, ARGV[a], ARGV[a + 1], '', '')
    k, a = k + 2, a + 2
  elseif kind == 116 then
    ok, reply = pcall(notify, KEYS[k], KEYS[k + 1], nil, nil, nil, ARGV[a], ARGV[a + 1],
      ARGV[a + 2], ARGV[a + 3], ARGV[a + 4])
    k, a = k + 2, a + 5
  else
    ok, reply = pcall(notify, KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4],
      ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4])
    k, a = k + 5, a + 5
  end
  if not ok then
    -- A Redis error comes as "CODE message" (WRONGTYPE ...), kept; a Lua one gets "ERR".
    reply = tostring(reply)
    reply = {err = string.find(reply, '^%u+ ') and reply or 'ERR ' .. reply}
  end
  replies[i] = reply
end
return replies
