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
/// Returns, per key, 1 if the membership was new, else 0.
pub const ROUTE_REFRESH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = {}
for i, key in ipairs(KEYS) do
  local ttl = tonumber(ARGV[i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  added[i] = redis.call('ZADD', key, now + ttl, ARGV[1])
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
return added
"#;

/// The edge registration, written at the start of every refresh pass.
/// KEYS[1] `edge:{pod}` (hash), KEYS[2] the edge directory (hash pod → addr),
/// KEYS[3] the registry generation marker. ARGV[1] pod id, ARGV[2] gRPC
/// address, ARGV[3] boot id, ARGV[4] canary state, ARGV[5] TTL ms, ARGV[6]
/// the generation this edge confirmed last ("" if none), ARGV[7] a fresh
/// generation id, used if the marker is missing (Redis lost its data).
/// The confirmation is kept only if the registration of this very boot
/// survived and the marker is unchanged: otherwise Redis may have lost (or
/// expired) this edge's memberships, and it must re-assert before confirming.
/// Returns `{existed (0/1), marker, kept confirmation ("" if dropped)}`.
pub const REGISTER_EDGE: &str = r#"
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then redis.call('DEL', KEYS[1]) end
local existed = redis.call('EXISTS', KEYS[1])
local boot = redis.call('HGET', KEYS[1], 'boot')
local marker = redis.call('GET', KEYS[3])
if not marker then
  marker = ARGV[7]
  redis.call('SET', KEYS[3], marker)
end
local gen = ARGV[6]
if existed == 0 or boot ~= ARGV[3] or gen ~= marker then gen = '' end
redis.call('HSET', KEYS[1], 'addr', ARGV[2], 'boot', ARGV[3], 'canary', ARGV[4], 'gen', gen)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {existed, marker, gen}
"#;

/// Confirms, after a full re-assertion pass, the generation the pass
/// started under. KEYS[1] `edge:{pod}`, KEYS[2] marker. ARGV[1] boot id,
/// ARGV[2] generation. Returns 1 if confirmed, 0 if the registration or the
/// marker changed meanwhile (the next pass tries again).
pub const CONFIRM_GENERATION: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
if redis.call('HGET', KEYS[1], 'boot') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'gen', ARGV[2])
return 1
"#;

/// Graceful departure: registration deleted, directory entry turned into a
/// tombstone (`-{Redis time ms}`) so routers stop waiting for this edge at
/// once. KEYS[1] `edge:{pod}`, KEYS[2] directory. ARGV[1] pod id.
pub const DEREGISTER_EDGE: &str = r#"
local t = redis.call('TIME')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[1], '-' .. (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)))
return 1
"#;

/// The edge directory for routers and peers. KEYS[1] directory, KEYS[2]
/// marker, KEYS[2 + i] the registration key of pod ARGV[i] (the caller
/// reads the directory's pods first: every key is declared, so the script
/// runs in one slot of a Redis Cluster too). Tombstones older than a minute
/// are dropped (every router has seen them by then). Returns `{marker or "",
/// {pod1, dir_addr1, registered1 (0/1), reg_addr1 or "", gen1 or "",
/// canary1 or "", pod2, ...}, {pods in the directory whose key was not
/// passed}}`: the caller reads again with those.
pub const READ_DIRECTORY: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keys = {}
for i, pod in ipairs(ARGV) do keys[pod] = KEYS[i + 2] end
local out = {}
local missing = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local pod = all[i]
  local v = all[i + 1]
  local key = keys[pod]
  if not key then
    table.insert(missing, pod)
  else
    if string.sub(v, 1, 1) == '-' and now - (tonumber(string.sub(v, 2)) or 0) > 60000
       and redis.call('EXISTS', key) == 0 then
      redis.call('HDEL', KEYS[1], pod)
    end
    local reg = redis.call('HMGET', key, 'addr', 'gen', 'canary')
    table.insert(out, pod)
    table.insert(out, v)
    table.insert(out, reg[1] and 1 or 0)
    table.insert(out, reg[1] or '')
    table.insert(out, reg[2] or '')
    table.insert(out, reg[3] or '')
  end
end
return {redis.call('GET', KEYS[2]) or '', out, missing}
"#;

/// Forgets an edge whose death a router confirmed, unless it registered
/// again meanwhile. KEYS[1] `edge:{pod}`, KEYS[2] directory, KEYS[3..]
/// route keys to drop it from. ARGV[1] pod id. Returns 1 if forgotten.
pub const FORGET_EDGE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
for i = 3, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
"#;

/// Resolves the route keys of many subjects to edges in one round trip, and
/// checks which of the edges the router knows have not confirmed the current
/// generation. KEYS[1] marker, KEYS[2] directory, KEYS[3..] the route keys of
/// every subject, subject after subject; ARGV[1] the number of subjects n,
/// ARGV[2..n+1] how many route keys each subject has, ARGV[n+2..] the pods
/// the router knows. Membership scores are not trusted for liveness (a frozen
/// Redis expires them while the edges live): every member is returned with
/// its registration, and the router decides.
/// Returns `{marker or "", {{pod, reg_addr or "", ...} per subject}, {unconfirmed pod, ...}}`;
/// an unconfirmed pod that is a member of a subject does not make that
/// subject's answer incomplete (the router applies that rule).
pub const RESOLVE_ROUTES: &str = r#"
local marker = redis.call('GET', KEYS[1])
local n = tonumber(ARGV[1])
local addrs = {}
local groups = {}
local k = 3
for g = 1, n do
  local members = {}
  local seen = {}
  for _ = 1, tonumber(ARGV[g + 1]) do
    for _, pod in ipairs(redis.call('ZRANGE', KEYS[k], 0, -1)) do
      if not seen[pod] then
        seen[pod] = true
        local addr = addrs[pod]
        if addr == nil then
          addr = redis.call('HGET', 'edge:' .. pod, 'addr') or ''
          addrs[pod] = addr
        end
        table.insert(members, pod)
        table.insert(members, addr)
      end
    end
    k = k + 1
  end
  groups[g] = members
end
local unconfirmed = {}
for i = n + 2, #ARGV do
  local pod = ARGV[i]
  local gen = redis.call('HGET', 'edge:' .. pod, 'gen')
  if (not marker) or gen ~= marker then
    local entry = redis.call('HGET', KEYS[2], pod) or ''
    if string.sub(entry, 1, 1) ~= '-' then table.insert(unconfirmed, pod) end
  end
end
return {marker or '', groups, unconfirmed}
"#;

/// The registry half of [`RESOLVE_ROUTES`] for a Redis Cluster, where route
/// keys live in other slots than the registry. The router asks this script,
/// in the registry's slot, for the addresses and confirmations of the edges
/// it knows *before* it reads the route members (one call per slot): an
/// edge confirms a generation only after writing all its routes, so one
/// confirmed before the members were read is in them wherever it wants the
/// subject (decision 0027). Route members it did not know are asked about
/// afterwards, for their addresses only. KEYS[1] marker, KEYS[2] directory,
/// KEYS[2 + i] the registration key of pod ARGV[i + 1]; ARGV[1] the number
/// of pods asked only for their address, ARGV[2..] those pods, then the pods
/// whose confirmation is checked too.
/// Returns `{marker or "", {pod, reg_addr or "", ...}, {unconfirmed pod, ...}}`.
pub const RESOLVE_REGISTRY: &str = r#"
local marker = redis.call('GET', KEYS[1])
local n = tonumber(ARGV[1])
local pods = {}
local unconfirmed = {}
local seen = {}
for i = 2, #ARGV do
  local pod = ARGV[i]
  local key = KEYS[i + 1]
  if not seen[pod] then
    seen[pod] = true
    local reg = redis.call('HMGET', key, 'addr', 'gen')
    table.insert(pods, pod)
    table.insert(pods, reg[1] or '')
    if i > n + 1 and ((not marker) or reg[2] ~= marker) then
      local entry = redis.call('HGET', KEYS[2], pod) or ''
      if string.sub(entry, 1, 1) ~= '-' then table.insert(unconfirmed, pod) end
    end
  end
end
return {marker or '', pods, unconfirmed}
"#;

/// Whether the registry is complete as an operator (or a test) sees it: the
/// generation marker exists and every registered edge in the directory has
/// confirmed it. KEYS[1] marker, KEYS[2] directory, KEYS[2 + i] the
/// registration key of pod ARGV[i] (every pod of the directory, read first).
/// Returns 1 or 0, or -1 when the directory holds a pod not passed (read again).
pub const REGISTRY_CONFIRMED: &str = r#"
local marker = redis.call('GET', KEYS[1])
local keys = {}
for i, pod in ipairs(ARGV) do keys[pod] = KEYS[i + 2] end
local pods = redis.call('HKEYS', KEYS[2])
for _, pod in ipairs(pods) do
  if not keys[pod] then return -1 end
end
if not marker then return 0 end
for _, pod in ipairs(pods) do
  local reg = redis.call('HMGET', keys[pod], 'addr', 'gen')
  if reg[1] and reg[2] ~= marker then return 0 end
end
return 1
"#;
