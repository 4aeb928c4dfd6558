r"""The Redis index backend: the block-key index kept in one Redis server, shared by readers.

Several kvray deployments (or replicas of one) can read and write the same index by pointing
at the same server and prefix. Every call but ``snapshot``/``restore`` is one round trip:
mutations are Lua scripts (so each is also atomic, however many keys it carries), and ``score``
is a Lua script that walks the prompt's prefix inside Redis and stops as soon as no holder is
left. ``score`` returns exactly (bit for bit) what ``core.scoring.score_from_holders`` returns.

Key layout (``P`` is the prefix, ``K`` a block key as 16 lower-case hex digits, ``T`` a tier,
``\x1f`` the ASCII unit separator)::

    P:b:K:T      STRING  bitmap over holder slots: bit s set <=> the pod in slot s holds K in T
    P:slot       HASH    pod -> slot number (the pods added and not cleared)
    P:slotpod    HASH    slot number -> pod
    P:free       ZSET    slots freed by clear_pod, reused smallest first
    P:pod:<pod>  SET     "K\x1fT" for every (key, tier) the pod holds; lets clear_pod and
                         snapshot find the pod's bits without scanning the keyspace
    P:tiers      HASH    T -> number of P:b:*:T bitmaps (the tiers in use, and stats.per_tier)
    P:meta       HASH    "pairs" -> (key, pod, tier) count; "nslots" -> slots ever allocated
    P:emap       HASH    engine key (16 hex) -> request key (16 hex)

Why bitmaps, one string per (block, tier): the scorer fetches the bitmaps of many consecutive
blocks with a single ``MGET`` and ANDs them a byte at a time in Lua, so a 1024-block prompt costs
a handful of Redis commands rather than one per block, and a block held by 256 pods is 32 bytes
rather than 256 hash fields. (This backend's first layout, a hash per block probed with one
HMGET each, was 3-70x slower in ``benchmarks/bench_redis.py``.) The cost of ``score`` grows
with the number of tiers in use: each block's bitmap is fetched once per tier. Slot numbers are
dense and reused, which keeps the bitmaps short; their width grows with the fleet (a holder in
slot s makes its bitmaps s/8 bytes long).

Pod ids and tier names may not contain ``\x1e`` or ``\x1f`` (``ValueError``); block keys must
be u64. Deployments sharing a server must use prefixes that are not of the form ``<other
prefix>:<anything>``, or their keys could collide. This is a single-server layout: the scripts
compute key names, which Redis Cluster forbids.

With ``key_ttl_s`` set, each bitmap gets that TTL, refreshed whenever any holder adds the block
in that tier, so blocks nobody re-announces vanish even if their ``remove`` events were lost.
A silent holder's bit in a block others keep refreshing stays until ``remove``/``clear_pod``.
Expiry is invisible to the counters: with a TTL, ``stats`` counts are upper bounds. Scoring,
``holders`` and ``snapshot`` are exact.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, cast

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from kvray.core.index.base import IndexStats
from kvray.core.snapshot import decode_snapshot, encode_snapshot, engine_pairs, holder_keys
from kvray.errors import BackendUnavailable, ConfigError
from kvray.types import PodId, Tier

_SEP: Final = "\x1f"
"""Separates key from tier in a pod-set member."""

_RESERVED: Final = ("\x1e", "\x1f")
"""Characters pod ids and tiers may not contain (separators of the layout)."""

_KEYS_PER_CALL: Final = 4096
"""Keys per script call when restoring, so no single command grows without bound."""

_KEYS_PER_TRIP: Final = 32_768
"""Entries a restore round trip may touch: keeps each well inside the socket timeout (Redis
does roughly a million script-driven key operations per second)."""

_VERIFY_BATCH: Final = 10_000
"""Entries per pipeline when a snapshot checks the pod sets against the bitmaps."""

# Shared by the mutating scripts.
#   slot_of:   the pod's slot, or nil.
#   clear_bit: clear the slot's bit in bitmap ``bk``; 1 when that emptied (and so deleted) the
#              bitmap, 0 when others remain, -1 when the bit was not set. GETBIT first because
#              SETBIT would create a missing key.
#   bump_tier: keep the P:tiers count in step, dropping a tier whose count reaches 0 so that
#              the scorer only fetches tiers that exist.
_PRELUDE: Final = r"""
local SEP = '\31'
local function slot_of(pfx, pod)
  local s = redis.call('HGET', pfx .. ':slot', pod)
  if s then return tonumber(s) end
  return nil
end
local function clear_bit(bk, slot)
  if redis.call('GETBIT', bk, slot) == 0 then return -1 end
  redis.call('SETBIT', bk, slot, 0)
  if redis.call('BITCOUNT', bk) == 0 then
    redis.call('DEL', bk)
    return 1
  end
  return 0
end
local function bump_tier(pfx, tier, n)
  if n == 0 then return end
  if redis.call('HINCRBY', pfx .. ':tiers', tier, n) <= 0 then
    redis.call('HDEL', pfx .. ':tiers', tier)
  end
end
"""

# ARGV: prefix, pod, tier, ttl_ms (0 = none), keys as one string of 16-hex-digit groups.
# A new pod gets the smallest free slot. The pod set is the source of truth for "pairs" (SADD's
# answer), so a bitmap that expired under a TTL and is re-added is not counted twice.
_ADD: Final = (
    _PRELUDE
    + r"""
local pfx, pod, tier = ARGV[1], ARGV[2], ARGV[3]
local ttl = tonumber(ARGV[4])
local blob = ARGV[5]
local slot = slot_of(pfx, pod)
if not slot then
  local free = redis.call('ZPOPMIN', pfx .. ':free')
  if #free > 0 then
    slot = tonumber(free[1])
  else
    slot = redis.call('HINCRBY', pfx .. ':meta', 'nslots', 1) - 1
  end
  redis.call('HSET', pfx .. ':slot', pod, slot)
  redis.call('HSET', pfx .. ':slotpod', slot, pod)
end
local podset = pfx .. ':pod:' .. pod
local base, suffix = pfx .. ':b:', ':' .. tier
local new_pairs, new_keys = 0, 0
local held = {}
for i = 1, #blob, 16 do
  local khex = string.sub(blob, i, i + 15)
  local bk = base .. khex .. suffix
  if redis.call('SETBIT', bk, slot, 1) == 0 then
    if redis.call('BITCOUNT', bk) == 1 then new_keys = new_keys + 1 end
    new_pairs = new_pairs + redis.call('SADD', podset, khex .. SEP .. tier)
  else
    held[#held + 1] = (i - 1) / 16
  end
  if ttl > 0 then redis.call('PEXPIRE', bk, ttl) end
end
if new_pairs ~= 0 then redis.call('HINCRBY', pfx .. ':meta', 'pairs', new_pairs) end
bump_tier(pfx, tier, new_keys)
return held
"""
)

# ARGV: prefix, pod, tier, keys blob.
_REMOVE: Final = (
    _PRELUDE
    + r"""
local pfx, pod, tier, blob = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local slot = slot_of(pfx, pod)
if not slot then return 0 end
local podset = pfx .. ':pod:' .. pod
local base, suffix = pfx .. ':b:', ':' .. tier
local gone_pairs, gone_keys = 0, 0
for i = 1, #blob, 16 do
  local khex = string.sub(blob, i, i + 15)
  if clear_bit(base .. khex .. suffix, slot) == 1 then gone_keys = gone_keys + 1 end
  gone_pairs = gone_pairs + redis.call('SREM', podset, khex .. SEP .. tier)
end
if gone_pairs ~= 0 then redis.call('HINCRBY', pfx .. ':meta', 'pairs', -gone_pairs) end
bump_tier(pfx, tier, -gone_keys)
return gone_pairs
"""
)

# ARGV: prefix, pod. One script, hence atomic: no reader sees the pod half-cleared, an add
# racing with the clear lands wholly before or after it, and the slot is only freed once every
# bit it owned is clear (so its next owner starts clean). The price is that Redis is busy for
# the whole sweep (O(pairs the pod holds)).
_CLEAR_POD: Final = (
    _PRELUDE
    + r"""
local pfx, pod = ARGV[1], ARGV[2]
local slot = slot_of(pfx, pod)
if not slot then return 0 end
local podset = pfx .. ':pod:' .. pod
local members = redis.call('SMEMBERS', podset)
local gone = {}
for _, m in ipairs(members) do
  local tier = string.sub(m, 18)
  if clear_bit(pfx .. ':b:' .. string.sub(m, 1, 16) .. ':' .. tier, slot) == 1 then
    gone[tier] = (gone[tier] or 0) + 1
  end
end
redis.call('DEL', podset)
redis.call('HDEL', pfx .. ':slot', pod)
redis.call('HDEL', pfx .. ':slotpod', slot)
redis.call('ZADD', pfx .. ':free', slot, slot)
if #members > 0 then redis.call('HINCRBY', pfx .. ':meta', 'pairs', -#members) end
for tier, n in pairs(gone) do bump_tier(pfx, tier, -n) end
return #members
"""
)

# ARGV: prefix, pod... Deletes those pods' bitmaps (other holders' bits in them included) and
# pod sets; found through the pod sets rather than by SCAN, so a neighbouring prefix that
# happens to match a glob is never touched. ``restore`` runs it over every pod in bounded
# batches, then deletes the fixed keys.
_WIPE: Final = r"""
local pfx = ARGV[1]
for i = 2, #ARGV do
  local podset = pfx .. ':pod:' .. ARGV[i]
  for _, m in ipairs(redis.call('SMEMBERS', podset)) do
    redis.call('DEL', pfx .. ':b:' .. string.sub(m, 1, 16) .. ':' .. string.sub(m, 18))
  end
  redis.call('DEL', podset)
end
return 1
"""

# Shared by the reading scripts: the set bit positions (0 = most significant, as SETBIT
# numbers them) of a byte value, memoised, and HMGET in slices (Lua's unpack is bounded by the
# C stack).
_READ_PRELUDE: Final = r"""
local band, bor, byte, sub = bit.band, bit.bor, string.byte, string.sub
local bits_memo = {}
local function bits_of(v)
  local r = bits_memo[v]
  if not r then
    r = {}
    for p = 0, 7 do
      if band(v, 2 ^ (7 - p)) ~= 0 then r[#r + 1] = p end
    end
    bits_memo[v] = r
  end
  return r
end
local function hmget(key, fields)
  local out = {}
  for s = 1, #fields, 1000 do
    local part = redis.call('HMGET', key, unpack(fields, s, math.min(s + 999, #fields)))
    for k = 1, #part do out[#out + 1] = part[k] end
  end
  return out
end
"""

# ARGV: prefix, n_weights, (tier, weight) * n_weights, n_filter (-1 = all pods),
#       filter pod * n_filter, keys blob.
# Returns a flat [pod, score, ...].
#
# ``alive`` maps a byte index of the slot bitmaps to the holders (bits) still in the run; only
# its non-zero bytes (``idx``) are visited, so a prompt cached on a few pods costs a few byte
# operations per block whatever the fleet size. Tiers are visited best weight first and
# ``covered`` keeps a holder from being counted twice in one block, which is exactly
# score_from_holders' "max weight over the holder's tiers". Blocks are fetched in MGET batches
# that grow 1, 4, 16, 64, 128...: a miss costs one small MGET, a long hit few commands, and at
# most one batch is fetched past the end of the run. (Library functions are held in locals and
# loops are numeric: in Redis's Lua 5.1 interpreter that is most of the per-block cost.)
#
# Scores travel as "%.17g" strings because Redis truncates Lua numbers to integers, and 17
# significant digits round-trip a double exactly; each holder's sum is formed block by block in
# prompt order, as score_from_holders forms it, so the results are bit-identical.
_SCORE: Final = (
    _READ_PRELUDE
    + r"""
local pfx = ARGV[1]
local i = 2
local weights = {}
local nw = tonumber(ARGV[i]); i = i + 1
for _ = 1, nw do
  weights[ARGV[i]] = tonumber(ARGV[i + 1])
  i = i + 2
end
local nf = tonumber(ARGV[i]); i = i + 1
local blob = ARGV[#ARGV]
local nblocks = #blob / 16
if nblocks == 0 then return {} end

-- Tiers in use, best weight first (insertion sort: a handful of tiers, and NaN-safe).
local TN, TW = {}, {}
for _, t in ipairs(redis.call('HKEYS', pfx .. ':tiers')) do
  local w = weights[t] or 1.0
  local at = #TN + 1
  while at > 1 and TW[at - 1] < w do
    TN[at], TW[at] = TN[at - 1], TW[at - 1]
    at = at - 1
  end
  TN[at], TW[at] = ':' .. t, w
end
local nt = #TN
if nt == 0 then return {} end

local alive, idx, nidx = {}, {}, 0
local need_seed = nf < 0
if not need_seed then
  local wanted = {}
  for j = i, i + nf - 1 do wanted[#wanted + 1] = ARGV[j] end
  local slots = hmget(pfx .. ':slot', wanted)
  for k = 1, #slots do
    local s = slots[k]
    if s then
      s = tonumber(s)
      local j = math.floor(s / 8) + 1
      if not alive[j] then
        alive[j] = 0
        nidx = nidx + 1
        idx[nidx] = j
      end
      alive[j] = bor(alive[j], 2 ^ (7 - s % 8))
    end
  end
  if nidx == 0 then return {} end
end

local base = pfx .. ':b:'
local max_batch = math.max(1, math.min(128, math.floor(4000 / nt)))
local scores = {}
-- A block whose bitmaps are the very strings of the previous block's (Lua interns strings, so
-- this is a pointer comparison) changes nothing but adds the same weights again: only count
-- it, and replay the pending additions, in order, when the pattern changes or the walk ends.
local prev, have_prev = {}, false
local pat_sl, pat_w, npat, rep = {}, {}, 0, 0
local function flush()
  for q = 1, npat do
    local sl, w = pat_sl[q], pat_w[q]
    local acc = scores[sl]
    for _ = 1, rep do acc = acc + w end
    scores[sl] = acc
  end
  rep = 0
end
local b, batch = 1, 1
while b <= nblocks do
  local last = math.min(nblocks, b + batch - 1)
  local names, n = {}, 0
  for blk = b, last do
    local kb = base .. sub(blob, 16 * blk - 15, 16 * blk)
    for t = 1, nt do
      n = n + 1
      names[n] = kb .. TN[t]
    end
  end
  local vals = redis.call('MGET', unpack(names))
  for blk = b, last do
    local off = (blk - b) * nt
    local same = have_prev
    if same then
      for t = 1, nt do
        if vals[off + t] ~= prev[t] then
          same = false
          break
        end
      end
    end
    if same then
      rep = rep + 1
    else
      if rep > 0 then flush() end
      if need_seed then
        -- Unfiltered: the candidates are whoever holds block 0 in any tier.
        need_seed = false
        for t = 1, nt do
          local s = vals[off + t]
          if s then
            for j = 1, #s do
              if not alive[j] and byte(s, j) ~= 0 then
                alive[j] = 255
                nidx = nidx + 1
                idx[nidx] = j
              end
            end
          end
        end
      end
      npat = 0
      local nstill = 0  -- idx is compacted in place: no table per block for the collector
      for x = 1, nidx do
        local j = idx[x]
        local a = alive[j]
        local covered = 0
        for t = 1, nt do
          local s = vals[off + t]
          if s then
            local v = byte(s, j)
            if v and v ~= 0 then
              local m = band(band(a, v), 255 - covered)
              if m ~= 0 then
                covered = covered + m
                local w, slot0 = TW[t], (j - 1) * 8
                local ps = bits_of(m)
                for q = 1, #ps do
                  local sl = slot0 + ps[q]
                  scores[sl] = (scores[sl] or 0) + w
                  npat = npat + 1
                  pat_sl[npat], pat_w[npat] = sl, w
                end
              end
            end
          end
        end
        if covered ~= 0 then
          alive[j] = covered
          nstill = nstill + 1
          idx[nstill] = j
        end
      end
      nidx = nstill
      if nidx == 0 then break end
      for t = 1, nt do prev[t] = vals[off + t] end
      have_prev = true
    end
  end
  if nidx == 0 then break end
  b = last + 1
  batch = math.min(batch * 4, max_batch)
end
if rep > 0 then flush() end

local slots, sums = {}, {}
for sl, v in pairs(scores) do
  slots[#slots + 1] = sl
  sums[#sums + 1] = v
end
if #slots == 0 then return {} end
local names = hmget(pfx .. ':slotpod', slots)
local out = {}
for k = 1, #slots do
  if names[k] then
    out[#out + 1] = names[k]
    out[#out + 1] = string.format('%.17g', sums[k])
  end
end
return out
"""
)

# ARGV: prefix, keys blob. Returns, per key, a flat [pod, tier, pod, tier, ...].
_HOLDERS: Final = (
    _READ_PRELUDE
    + r"""
local pfx, blob = ARGV[1], ARGV[2]
local tiers = redis.call('HKEYS', pfx .. ':tiers')
local pod_of = {}
local flat = redis.call('HGETALL', pfx .. ':slotpod')
for j = 1, #flat, 2 do pod_of[tonumber(flat[j])] = flat[j + 1] end
local out = {}
for i = 1, #blob, 16 do
  local khex = sub(blob, i, i + 15)
  local entry = {}
  if #tiers > 0 then
    local names = {}
    for t = 1, #tiers do names[t] = pfx .. ':b:' .. khex .. ':' .. tiers[t] end
    local vals = redis.call('MGET', unpack(names))
    for t = 1, #tiers do
      local s = vals[t]
      if s then
        for j = 1, #s do
          local v = byte(s, j)
          if v ~= 0 then
            for _, p in ipairs(bits_of(v)) do
              local pod = pod_of[(j - 1) * 8 + p]
              if pod then
                entry[#entry + 1] = pod
                entry[#entry + 1] = tiers[t]
              end
            end
          end
        end
      end
    end
  end
  out[#out + 1] = entry
end
return out
"""
)


class _Script:
    """A Lua script and its SHA1, run by EVALSHA (the body only travels on a cache miss)."""

    __slots__ = ("body", "sha")

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()


_ADD_S: Final = _Script(_ADD)
_REMOVE_S: Final = _Script(_REMOVE)
_CLEAR_POD_S: Final = _Script(_CLEAR_POD)
_WIPE_S: Final = _Script(_WIPE)
_SCORE_S: Final = _Script(_SCORE)
_HOLDERS_S: Final = _Script(_HOLDERS)


def _hex(key: int) -> str:
    """An engine or request key as an engine-map field or value."""
    return f"{key:016x}"


def _blob(keys: Sequence[int]) -> str:
    """Keys as one string of 16-hex-digit groups: one script argument however many keys.

    Packing ~1000 separate arguments costs redis-py more than the whole script costs Redis;
    ``struct`` + ``hex`` does it in C.

    Raises:
        ValueError: a key is not a u64.
    """
    try:
        return struct.pack(f">{len(keys)}Q", *keys).hex()
    except struct.error as exc:
        raise ValueError(f"block keys must be u64 (0 <= key < 2**64): {exc}") from exc


def _check_name(kind: str, value: str) -> None:
    """Reject a pod id or tier that would break the separators of the key layout.

    Raises:
        ValueError: ``value`` contains ``\\x1e``/``\\x1f``, or is an empty tier.
    """
    if not _valid_name(value):
        raise ValueError(f"{kind} {value!r} contains a reserved separator (\\x1e or \\x1f)")
    if kind == "tier" and not value:
        raise ValueError("tier must not be empty")


def _valid_name(value: str) -> bool:
    """Whether ``value`` could be a stored pod id or tier."""
    return not any(c in value for c in _RESERVED)


def _chunks(seq: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    """Consecutive slices of ``seq`` of at most ``size`` items."""
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


class RedisBackend:
    """The block-key index in a Redis server (see the module docstring for the key layout).

    Every method maps a Redis or socket failure to ``BackendUnavailable``. A call blocks for at
    most about ``socket_timeout_s``; a broken connection is retried once at once, which is what
    lets pooled connections survive a server restart.

    Args:
        url: ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL; a password in the URL wins
            over ``password``.
        prefix: namespace of every key this backend touches.
        password: the server's ``requirepass``/ACL password, when not in the URL.
        socket_timeout_s: connect and per-command timeout.
        key_ttl_s: when set, block bitmaps expire this long after the last ``add`` touching
            them.
        client: an existing ``redis.Redis`` to use instead of building one from ``url``; it must
            have ``decode_responses=True``, and ``close`` leaves it open (its owner closes it).

    Raises:
        ConfigError: the URL cannot be parsed, ``prefix`` is empty, ``key_ttl_s`` is not
            positive, or ``client`` does not decode responses.
    """

    name = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "kvray",
        password: str | None = None,
        socket_timeout_s: float = 2.0,
        key_ttl_s: float | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        if not prefix:
            raise ConfigError("redis prefix must not be empty")
        if key_ttl_s is not None and key_ttl_s <= 0:
            raise ConfigError(f"key_ttl_s must be positive, got {key_ttl_s}")
        self._prefix = prefix
        self._ttl_ms = 0 if key_ttl_s is None else max(1, round(key_ttl_s * 1000))
        self._closed = False
        if client is not None:
            if not client.get_connection_kwargs().get("decode_responses"):
                raise ConfigError("a client passed to RedisBackend needs decode_responses=True")
            self._r = client
            self._owns_client = False
            return
        try:
            self._r = redis.Redis.from_url(
                url,
                password=password,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                decode_responses=True,
                # redis-py's default retries ten times with backoff, timeouts included; a
                # router must fail fast and fall back, so retry once, and only a broken
                # connection (a pooled one the server closed, e.g. across a restart).
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            )
        except ValueError as exc:
            # The message names the URL's problem, not the URL, which may carry a password.
            raise ConfigError(f"bad redis url: {exc}") from exc
        self._owns_client = True

    # -- plumbing ----------------------------------------------------------------------------

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Map every Redis/socket failure inside the block to ``BackendUnavailable``."""
        if self._closed:
            raise BackendUnavailable("redis backend is closed")
        try:
            yield
        except (redis.RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis {what} failed: {exc}") from exc

    def _run(self, script: _Script, args: Sequence[str | int]) -> Any:
        """Run ``script`` with ``args`` as ARGV: one round trip, two after a script-cache miss."""
        try:
            return self._r.evalsha(script.sha, 0, *args)
        except NoScriptError:
            # Server restarted or SCRIPT FLUSH: EVAL runs the body and caches it again.
            return self._r.eval(script.body, 0, *args)

    def _key(self, name: str) -> str:
        return f"{self._prefix}:{name}"

    # -- IndexBackend --------------------------------------------------------------------------

    def add(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        """Record that ``pod`` holds ``keys`` in ``tier`` (one atomic script, one round trip).

        Like the memory backend, an add registers the holder even when ``keys`` is empty.

        Raises:
            ValueError: ``pod`` or ``tier`` contains a reserved separator, or a key is not u64.
            BackendUnavailable: Redis cannot be reached or failed.
        """
        self.add_held(pod, tier, keys)

    def add_held(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> list[int]:
        """``add``; returns the positions of the keys ``pod`` already held in ``tier`` (the
        script reads each bit as it sets it: no extra round trip).

        Raises:
            ValueError: ``pod`` or ``tier`` contains a reserved separator, or a key is not u64.
            BackendUnavailable: Redis cannot be reached or failed.
        """
        _check_name("pod", pod)
        _check_name("tier", tier)
        blob = _blob(keys)
        with self._guard("add"):
            held = self._run(_ADD_S, [self._prefix, pod, tier, self._ttl_ms, blob])
        return [int(i) for i in cast(list[Any], held)]

    def remove(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        """Record that ``pod`` no longer holds ``keys`` in ``tier`` (one round trip).

        Raises:
            ValueError: a key is not u64.
            BackendUnavailable: Redis cannot be reached or failed.
        """
        if not keys or not _valid_name(pod) or not _valid_name(tier):
            return  # nothing with such a name can be stored
        blob = _blob(keys)
        with self._guard("remove"):
            self._run(_REMOVE_S, [self._prefix, pod, tier, blob])

    def clear_pod(self, pod: PodId) -> None:
        """Forget everything ``pod`` holds, atomically (Redis is busy O(pairs of the pod)).

        Raises:
            BackendUnavailable: Redis cannot be reached or failed.
        """
        if not _valid_name(pod):
            return
        with self._guard("clear_pod"):
            self._run(_CLEAR_POD_S, [self._prefix, pod])

    def pods(self) -> list[PodId]:
        """Holders added and not cleared, sorted.

        Raises:
            BackendUnavailable: Redis cannot be reached or failed.
        """
        with self._guard("pods"):
            names = cast(list[str], self._r.hkeys(self._key("slot")))
        return sorted(PodId(p) for p in names)

    def score(
        self,
        keys: Sequence[int],
        weights: Mapping[str, float],
        pods: Collection[str] | None = None,
    ) -> dict[PodId, float]:
        """Longest-consecutive-prefix score per holder, exactly as ``score_from_holders``.

        One round trip: a Lua script walks the prefix inside Redis, fetching block bitmaps in
        growing ``MGET`` batches, and stops at the first block no candidate holds.

        Args:
            keys: the prompt's block keys, in order.
            weights: tier → weight; a tier not named weighs 1.0.
            pods: when given, only these holders are scored.

        Returns:
            holder → score, for holders that hold block 0 (and pass the filter).

        Raises:
            ValueError: a key is not u64.
            BackendUnavailable: Redis cannot be reached or failed.
        """
        if not keys:
            return {}
        args: list[str | int] = [self._prefix, len(weights)]
        for tier, weight in weights.items():
            # repr is the shortest string that parses back to the same double.
            args += [tier, repr(float(weight))]
        if pods is None:
            args.append(-1)
        else:
            # A set: a duplicated filter entry must not be looked up twice.
            wanted = sorted({p for p in pods if _valid_name(p)})
            if not wanted:
                return {}
            args.append(len(wanted))
            args += wanted
        args.append(_blob(keys))
        with self._guard("score"):
            flat = cast(list[str], self._run(_SCORE_S, args))
        return {PodId(flat[j]): float(flat[j + 1]) for j in range(0, len(flat), 2)}

    def holders(self, keys: Sequence[int]) -> list[dict[PodId, set[Tier]]]:
        """For each key, holder → tiers (one round trip).

        Raises:
            ValueError: a key is not u64.
            BackendUnavailable: Redis cannot be reached or failed.
        """
        if not keys:
            return []
        blob = _blob(keys)
        with self._guard("holders"):
            per_key = cast(list[list[str]], self._run(_HOLDERS_S, [self._prefix, blob]))
        out: list[dict[PodId, set[Tier]]] = []
        for flat in per_key:
            entry: dict[PodId, set[Tier]] = {}
            for j in range(0, len(flat), 2):
                entry.setdefault(PodId(flat[j]), set()).add(Tier(flat[j + 1]))
            out.append(entry)
        return out

    def put_engine_map(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Remember engine key → request key for each pair (one ``HSET``).

        Raises:
            BackendUnavailable: Redis cannot be reached or failed.
        """
        if not pairs:
            return
        # Any: redis-py's Mapping[EncodableT, EncodableT] is invariant, so dict[str, str] fails.
        mapping: dict[Any, Any] = {_hex(e): _hex(r) for e, r in pairs}
        with self._guard("put_engine_map"):
            self._r.hset(self._key("emap"), mapping=mapping)

    def get_engine_map(self, engine_keys: Sequence[int]) -> list[int | None]:
        """Resolve engine keys to request keys, ``None`` where unknown (one ``HMGET``).

        Raises:
            BackendUnavailable: Redis cannot be reached or failed.
        """
        if not engine_keys:
            return []
        with self._guard("get_engine_map"):
            found = cast(
                list[str | None], self._r.hmget(self._key("emap"), [_hex(e) for e in engine_keys])
            )
        return [None if v is None else int(v, 16) for v in found]

    def stats(self) -> IndexStats:
        """Counts from the maintained counters (one round trip; upper bounds under a TTL).

        ``bytes_estimate`` is 0: the server's memory is shared with whatever else it holds.

        Raises:
            BackendUnavailable: Redis cannot be reached or failed.
        """
        with self._guard("stats"):
            pipe = self._r.pipeline(transaction=False)
            pipe.hgetall(self._key("meta"))
            pipe.hgetall(self._key("tiers"))
            pipe.hlen(self._key("slot"))
            pipe.hlen(self._key("emap"))
            meta, tiers, n_pods, n_emap = cast(
                tuple[dict[str, str], dict[str, str], int, int], pipe.execute()
            )
        per_tier = {tier: int(n) for tier, n in tiers.items() if int(n) > 0}
        return IndexStats(
            backend=self.name,
            keys=sum(per_tier.values()),
            pairs=max(0, int(meta.get("pairs", 0))),
            pods=int(n_pods),
            engine_map_entries=int(n_emap),
            per_tier=per_tier,
        )

    def snapshot(self) -> bytes:
        """The whole index in the portable snapshot format.

        Three pipelined round trips (plus one per 10k entries): slots and engine map, the pod
        sets, then a ``GETBIT`` of each entry, so blocks that expired under a TTL are left out.
        Not atomic: entries changing meanwhile may or may not be included.

        Raises:
            BackendUnavailable: Redis cannot be reached or failed.
        """
        with self._guard("snapshot"):
            pipe = self._r.pipeline(transaction=False)
            pipe.hgetall(self._key("slot"))
            pipe.hgetall(self._key("emap"))
            slots, emap = cast(tuple[dict[str, str], dict[str, str]], pipe.execute())
            pods = sorted(slots)
            pipe = self._r.pipeline(transaction=False)
            for pod in pods:
                pipe.smembers(self._key(f"pod:{pod}"))
            members = cast(list[set[str]], pipe.execute())

            entries = [(pod, entry) for pod, ms in zip(pods, members, strict=True) for entry in ms]
            held: list[int] = []
            for start in range(0, len(entries), _VERIFY_BATCH):
                pipe = self._r.pipeline(transaction=False)
                for pod, entry in entries[start : start + _VERIFY_BATCH]:
                    khex, _, tier = entry.partition(_SEP)
                    pipe.getbit(self._key(f"b:{khex}:{tier}"), int(slots[pod]))
                held += cast(list[int], pipe.execute())

        # Holders without keys are left out, as the memory backend leaves them out, and all is
        # sorted (Redis set order is arbitrary), so equal content gives equal bytes.
        holders: dict[str, dict[str, list[int]]] = {}
        for (pod, entry), bit in zip(entries, held, strict=True):
            if bit:
                khex, _, tier = entry.partition(_SEP)
                holders.setdefault(pod, {}).setdefault(tier, []).append(int(khex, 16))
        canonical = {
            pod: {tier: sorted(tiers[tier]) for tier in sorted(tiers)}
            for pod, tiers in sorted(holders.items())
        }
        engine_map = sorted((int(e, 16), int(r, 16)) for e, r in emap.items())
        return encode_snapshot(canonical, engine_map)

    def restore(self, data: bytes) -> None:
        """Replace everything under the prefix with a snapshot taken by any backend.

        The snapshot is decoded and checked first, so a bad one leaves the index untouched.
        Then the old content is deleted and the new loaded in pipelined round trips of bounded
        size (about 32k entries each), so a large restore never holds Redis for longer than the
        socket timeout. It is therefore not atomic: readers may see a partly loaded index, and
        writes racing with it may or may not survive. Restore before serving.

        Raises:
            MalformedFrame: ``data`` is not a kvray snapshot.
            ValueError: a pod id or tier in it contains a reserved separator, or a key is not
                u64.
            BackendUnavailable: Redis cannot be reached or failed (the index is then partly
                restored; restoring again repairs it).
        """
        snap = decode_snapshot(data)
        # Everything is checked and encoded before anything is deleted.
        adds: list[tuple[str, str, str]] = []
        for pod, tiers in snap.holders.items():
            _check_name("pod", pod)
            # An add without keys gives the holder its slot even if it holds nothing.
            adds.append((pod, "GPU", ""))
            for tier in tiers:
                _check_name("tier", tier)
        for pod, tier, keys in holder_keys(snap):
            adds += [(pod, tier, _blob(part)) for part in _chunks(keys, _KEYS_PER_CALL)]
        emap = [(_hex(e), _hex(r)) for e, r in engine_pairs(snap)]
        # EVAL rather than EVALSHA in the pipelines below: a NOSCRIPT inside a pipeline could
        # not be retried, and the body's size is small next to the keys each call carries.
        with self._guard("restore"):
            old = cast(list[str], self._r.hkeys(self._key("slot")))
            pipe = self._r.pipeline(transaction=False)
            for pod in old:
                pipe.scard(self._key(f"pod:{pod}"))
            sizes = cast(list[int], pipe.execute()) if old else []
            batch: list[str] = []
            load = 0
            for pod, size in zip(old, sizes, strict=True):
                batch.append(pod)
                load += size + 1
                if load >= _KEYS_PER_TRIP:
                    self._r.eval(_WIPE_S.body, 0, self._prefix, *batch)
                    batch, load = [], 0
            if batch:
                self._r.eval(_WIPE_S.body, 0, self._prefix, *batch)
            self._r.delete(
                *(self._key(k) for k in ("slot", "slotpod", "free", "tiers", "meta", "emap"))
            )

            pipe = self._r.pipeline(transaction=False)
            load = 0
            for pod, tier, blob in adds:
                pipe.eval(_ADD_S.body, 0, self._prefix, pod, tier, self._ttl_ms, blob)
                load += len(blob) // 16 + 1
                if load >= _KEYS_PER_TRIP:
                    pipe.execute()
                    load = 0
            for start in range(0, len(emap), _KEYS_PER_CALL):
                chunk: dict[Any, Any] = dict(emap[start : start + _KEYS_PER_CALL])
                pipe.hset(self._key("emap"), mapping=chunk)
            pipe.execute()

    def close(self) -> None:
        """Close the connection pool (unless the client was passed in); later calls raise."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self._r.close()

    # -- extras --------------------------------------------------------------------------------

    def set_epoch(self, token: str) -> None:
        """Mark this index's content with ``token`` (kvray's shard writes one at start).

        A Redis that restarts without persistence comes back empty and without the mark, which
        is how a shard tells "Redis was down" from "Redis lost my data" (then it rebuilds).
        """
        with self._guard("set_epoch"):
            self._r.set(self._key("epoch"), token)

    def get_epoch(self) -> str | None:
        """The mark written by ``set_epoch`` (None when the content was lost)."""
        with self._guard("get_epoch"):
            value = self._r.get(self._key("epoch"))
        return None if value is None else str(value)

    def ping(self) -> None:
        """Check the server answers (for readiness probes).

        Raises:
            BackendUnavailable: Redis cannot be reached or failed.
        """
        with self._guard("ping"):
            self._r.ping()
