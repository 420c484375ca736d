"""The server-side scripts of the Redis transport (see :mod:`herald.transports.redis.transport`).

Each script runs atomically in Redis, so a step that touches two keys (ack an entry and park a
copy of it for a delayed redelivery, say) can never be half done, whatever happens to the
client. Times come from the server's ``TIME``, so consumers on machines with skewed clocks agree
on when a delayed redelivery is due. Every key a script touches is passed in ``KEYS``; the
helper keys of a topic carry the topic in a ``{hash tag}``, so on a cluster they live in the
same slot as the topic's stream.
"""

from __future__ import annotations

import struct

__all__ = ["CLOSE", "MAINTAIN", "NACK_DELAYED", "PUBLISH", "READ", "RELEASE", "batch", "record"]


def record(items: list[str | bytes]) -> bytes:
    """Pack the field/value list of one stream entry for the scripts: a 2-byte count, then
    each item as a 4-byte big-endian length and its bytes (str as UTF-8). Redis's Lua reads it
    with ``struct.unpack`` (its ``cmsgpack`` knows no binary type, so payloads cannot go
    through msgpack)."""
    parts = [len(items).to_bytes(2, "big")]
    append = parts.append
    for item in items:
        if type(item) is not bytes:
            item = item.encode() if isinstance(item, str) else bytes(item)
        append(len(item).to_bytes(4, "big"))
        append(item)
    return b"".join(parts)


def batch(records: list[bytes]) -> bytes:
    """Several records for :data:`PUBLISH`: a 4-byte count, then the records."""
    return struct.pack(">I", len(records)) + b"".join(records)


_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- A record (see herald.transports.lua.record): a 2-byte count of items, then each
-- item as a 4-byte length and its bytes. Returns the items and the position after them.
local function read_record(blob, pos)
  local n
  n, pos = struct.unpack('>I2', blob, pos)
  local items = {}
  for i = 1, n do
    items[i], pos = struct.unpack('>I4c0', blob, pos)
  end
  return items, pos
end
"""

#: KEYS[1] stream. ARGV[1] the batch: a 4-byte count of records, then the records (each the
#: field/value list of one entry; see :func:`record`); ARGV[2]
#: '' | 'MAXLEN' | 'MINID'; ARGV[3] the MAXLEN, or the maximum age in ms for MINID.
#: One XADD per message, all or nothing. Returns the number of entries added.
PUBLISH = (
    _NOW
    + """
local blob, key, trim = ARGV[1], KEYS[1], ARGV[2]
local count, pos = struct.unpack('>I4', blob, 1)
local fields
if trim == 'MAXLEN' then
  for i = 1, count do
    fields, pos = read_record(blob, pos)
    redis.call('XADD', key, 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
  end
elseif trim == 'MINID' then
  local minid = string.format('%d', now_ms() - tonumber(ARGV[3]))
  for i = 1, count do
    fields, pos = read_record(blob, pos)
    redis.call('XADD', key, 'MINID', '~', minid, '*', unpack(fields))
  end
else
  for i = 1, count do
    fields, pos = read_record(blob, pos)
    redis.call('XADD', key, '*', unpack(fields))
  end
end
return count
"""
)

#: The consumer's periodic work, in one round trip. KEYS[1] stream, KEYS[2] the group's retry
#: stream, KEYS[3] the group's delayed set. ARGV[1] group, ARGV[2] consumer, ARGV[3] max entries
#: to claim, ARGV[4] min idle ms for a claim (-1: do not claim), ARGV[5]/ARGV[6] XAUTOCLAIM
#: cursors of the stream / retry stream, ARGV[7] '1': trim the stream below what every group
#: still needs, ARGV[8] reap consumers with nothing pending idle longer than this many ms (-1:
#: do not).
#:
#: 1. Moves due delayed redeliveries into the retry stream (where XREADGROUP finds them).
#: 2. Claims entries idle past the visibility timeout (crashed consumers, released ones), with
#:    their delivery count read from the PEL.
#: 3. Trims, reaps.
#:
#: Returns {claimed from the stream, claimed from the retry stream, next cursor, next retry
#: cursor, ms until the next delayed redelivery is due or -1}; a claimed entry is {id, fields,
#: delivery count}.
MAINTAIN = (
    _NOW
    + """
local stream, retry, delayed = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()

local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', string.format('%d', now), 'LIMIT', 0, 1000)
for i = 1, #due do
  redis.call('XADD', retry, '*', unpack((read_record(due[i], 1))))
  redis.call('ZREM', delayed, due[i])
end

local function claim(key, cursor, n, out)
  local r = redis.call('XAUTOCLAIM', key, group, consumer, ARGV[4], cursor, 'COUNT', n)
  for _, e in ipairs(r[2]) do
    if e and e[2] then
      local p = redis.call('XPENDING', key, group, e[1], e[1], 1)
      local n_deliveries = 1
      if p[1] then n_deliveries = p[1][4] end
      out[#out + 1] = {e[1], e[2], n_deliveries}
    end
  end
  return r[1]
end

local main_out, retry_out = {}, {}
local cur_main, cur_retry = ARGV[5], ARGV[6]
if tonumber(ARGV[4]) >= 0 then
  cur_main = claim(stream, cur_main, count, main_out)
  if #main_out < count then
    cur_retry = claim(retry, cur_retry, count - #main_out, retry_out)
  end
end

local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  if am ~= bm then return am < bm end
  return as < bs
end

local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

if ARGV[7] == '1' then
  -- Keep every entry some group has not acked: entries after a group's last-delivered id
  -- were never delivered to it, and its PEL holds the delivered, unacked ones.
  local minid = nil
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = fields(g)
    local keep = info['last-delivered-id']
    if tonumber(info['pending']) > 0 then
      local s = redis.call('XPENDING', stream, info['name'])
      if s[2] and id_less(s[2], keep) then keep = s[2] end
    end
    if minid == nil or id_less(keep, minid) then minid = keep end
  end
  if minid ~= nil and minid ~= '0-0' then
    redis.call('XTRIM', stream, 'MINID', '~', minid)
  end
end

if tonumber(ARGV[8]) >= 0 then
  for _, key in ipairs({stream, retry}) do
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, group)) do
      local info = fields(c)
      if tonumber(info['pending']) == 0 and tonumber(info['idle']) > tonumber(ARGV[8])
          and info['name'] ~= consumer then
        redis.call('XGROUP', 'DELCONSUMER', key, group, info['name'])
      end
    end
  end
end

local wait = -1
local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if first[2] then
  wait = math.max(0, tonumber(first[2]) - now)
end
return {main_out, retry_out, cur_main, cur_retry, wait}
"""
)

#: A non-blocking read packed into one reply, for when redis-py parses replies in pure Python
#: (no hiredis): parsing a dozen RESP elements per entry costs the client far more than this
#: script costs the server. KEYS[1] stream, KEYS[2] retry stream. ARGV[1] group, ARGV[2]
#: consumer, ARGV[3] max entries. Reads the retry stream first, then the stream (``>``), at
#: most ARGV[3] in all. Returns '' when nothing was new, else msgpack: an array of
#: [0 (stream) | 1 (retry stream), entry id, [field, value, ...]] with every string as bin.
READ = """
local group, consumer, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local pack = struct.pack
local out = {''}
local n, total = 1, 0
local function add(key, which, want)
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want,
                       'STREAMS', key, '>')
  if not r then return end
  local entries = r[1][2]
  for i = 1, #entries do
    local eid, flat = entries[i][1], entries[i][2]
    n = n + 1
    out[n] = pack('>BBBI4c0BI4', 0x93, which, 0xc6, #eid, eid, 0xdd, #flat)
    for j = 1, #flat do
      local v = flat[j]
      n = n + 1
      out[n] = pack('>BI4c0', 0xc6, #v, v)
    end
  end
  total = total + #entries
end
add(KEYS[2], 1, count)
if total < count then add(KEYS[1], 0, count - total) end
if total == 0 then return '' end
out[1] = pack('>BI4', 0xdd, total)
return table.concat(out)
"""

#: Delayed redelivery. KEYS[1] the stream the delivery came from, KEYS[2] the group's delayed
#: set. ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id, ARGV[4] delay in ms, ARGV[5] the
#: copy to deliver later (a :func:`record`), ARGV[6] '1': also XDEL the entry (it is
#: in the retry stream, which only this group reads).
#: Only if the entry is still pending for this consumer (another may have claimed it after the
#: visibility timeout): park the copy with its due time as score and ack the entry. Returns 1,
#: or 0 when the entry was not ours any more.
NACK_DELAYED = (
    _NOW
    + """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[2], string.format('%d', now_ms() + tonumber(ARGV[4])), ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
if ARGV[6] == '1' then redis.call('XDEL', KEYS[1], ARGV[3]) end
return 1
"""
)

#: Redeliver at once (``nack()`` without delay). KEYS[1] stream. ARGV[1] group, ARGV[2]
#: consumer, ARGV[3] the parking consumer, ARGV[4] entry id. If the entry is still pending for
#: this consumer, hand it to the parking consumer with an idle time far past any visibility
#: timeout (XCLAIM ... TIME 1 JUSTID: the delivery count is left alone), so the next claim by
#: any member of the group takes it and counts the delivery. Returns 1, or 0 if not ours.
RELEASE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], ARGV[4], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[4], 'TIME', 1, 'JUSTID')
return 1
"""

#: Leave the group. KEYS: the stream and the retry stream. ARGV[1] group, ARGV[2] consumer,
#: ARGV[3] parking consumer. Releases every entry pending for the consumer (as RELEASE does),
#: then deletes the consumer (now owning nothing, so nothing is lost). A missing group is
#: skipped. Returns how many entries were released.
CLOSE = """
local group, consumer, parking = ARGV[1], ARGV[2], ARGV[3]
local released = 0
for _, key in ipairs(KEYS) do
  while true do
    local p = redis.pcall('XPENDING', key, group, '-', '+', 1000, consumer)
    if type(p) ~= 'table' or p.err or #p == 0 then break end
    local args = {'XCLAIM', key, group, parking, 0}
    for _, e in ipairs(p) do args[#args + 1] = e[1] end
    args[#args + 1] = 'TIME'
    args[#args + 1] = 1
    args[#args + 1] = 'JUSTID'
    redis.call(unpack(args))
    released = released + #p
  end
  redis.pcall('XGROUP', 'DELCONSUMER', key, group, consumer)
end
return released
"""
