//! Redis Lua scripts shared by the edge (writer) and the router (reader) of
//! session locks, route memberships and the registry generation marker.
//! Every time used is Redis's own `TIME`, so machines' clocks never disagree.

/// Lock refresh by the owner. KEYS[1] lock, ARGV[1] owner value, ARGV[2] TTL ms.
/// Returns 1 refreshed, 2 re-asserted (the key was gone, e.g. Redis lost its
/// data), 0 taken by another owner.
pub const REFRESH_LOCK: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"#;

/// Release by the owner only. KEYS[1] lock, ARGV[1] owner value. Returns 1 if deleted.
pub const RELEASE_LOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Compare-and-set takeover. KEYS[1] lock, ARGV[1] expected old owner,
/// ARGV[2] new owner, ARGV[3] TTL ms. Returns 1 if taken over.
pub const TAKEOVER_LOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"#;

/// Adds or refreshes this edge's membership in route keys. KEYS: route keys;
/// ARGV[1] pod id, then one TTL in ms per key. Each member's score is its own
/// expiry (Redis time), so one edge's refresh never keeps another alive.
/// Expired members are pruned; the key itself expires after its last member.
/// Returns how many memberships were new.
pub const ROUTE_REFRESH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = 0
for i, key in ipairs(KEYS) do
  local ttl = tonumber(ARGV[i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  added = added + redis.call('ZADD', key, now + ttl, ARGV[1])
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
return added
"#;

/// The registry generation marker: created (with Redis time, ms) by the first
/// edge that finishes a full re-assertion after Redis lost its data.
/// KEYS[1] marker. Returns 1 if created now.
pub const MARK_GENERATION: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
redis.call('SET', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
return 1
"#;

/// Resolves route keys to live edges in one round trip. KEYS[1] generation
/// marker, KEYS[2..] route keys. Returns `{now_ms, marker_ms or -1, pod1,
/// addr1 or false, pod2, addr2 or false, ...}` with each live pod once.
pub const RESOLVE_ROUTES: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local marker = redis.call('GET', KEYS[1])
local out = {now, marker and tonumber(marker) or -1}
local seen = {}
for i = 2, #KEYS do
  local pods = redis.call('ZRANGEBYSCORE', KEYS[i], now, '+inf')
  for _, pod in ipairs(pods) do
    if not seen[pod] then
      seen[pod] = true
      table.insert(out, pod)
      table.insert(out, redis.call('GET', 'edge:' .. pod) or false)
    end
  end
end
return out
"#;
