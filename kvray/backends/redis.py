r"""The Redis index backend: the block-key index kept in one Redis server, shared by readers.

Several kvray deployments (or replicas of one) can read and write the same index by pointing
at the same server and prefix. Every mutation is a Lua script, so each call is atomic and takes
one round trip however many keys it carries; ``score`` is one Lua script that walks the prompt's
prefix inside Redis and stops as soon as no holder is left, so it also costs one round trip.

Key layout (``P`` is the prefix, ``K`` a block key as 16 lower-case hex digits, ``\x1e`` and
``\x1f`` the ASCII record and unit separators)::

    P:k:K        HASH  field <pod>          -> "<tier>[\x1f<tier>...]"  tiers the pod holds K in
                       field "\x1e<tier>"   -> number of pods holding K in <tier>
    P:pod:<pod>  SET   "K\x1f<tier>"        every (key, tier) the pod holds; makes clear_pod and
                                            snapshot work without scanning the keyspace
    P:pods       SET   <pod>                holders added and not cleared
    P:meta       HASH  "pairs", "keys", "keys:<tier>" -> running counts for ``stats``
    P:emap       HASH  engine key (16 hex)  -> request key (16 hex)

One field per pod (rather than per (pod, tier)) lets ``score`` probe a block for exactly the
holders still alive with one ``HMGET``; the per-tier counter fields make "distinct (key, tier)"
counts O(1) to maintain. Pod ids and tier names therefore may not contain ``\x1e`` or ``\x1f``
(``ValueError``). Deployments sharing a server must use prefixes that are not of the form
``<other prefix>:<anything>``, or their keys could collide.

This is a single-server layout: the scripts compute key names, which Redis Cluster forbids.

With ``key_ttl_s`` set, every block hash gets that TTL, refreshed whenever any holder adds the
block, so blocks nobody re-announces eventually vanish even if their ``remove`` events were
lost. Redis 7.0 has no per-field expiry, so a silent holder's field in a block others keep
refreshing stays until ``remove``/``clear_pod``. Expiry is invisible to the counters: with a
TTL, ``stats`` counts are upper bounds. Scoring, ``holders`` and ``snapshot`` are exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, cast

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from kvray.core.index.base import IndexStats
from kvray.core.snapshot import decode_snapshot, encode_snapshot
from kvray.errors import BackendUnavailable, ConfigError
from kvray.types import PodId, Tier

_SEP: Final = "\x1f"
"""Separates tiers inside a pod field, and key from tier inside a pod-set member."""

_COUNT: Final = "\x1e"
"""Leads a block hash's per-tier holder-count field; pod ids cannot start with it."""

_ARGS_PER_CALL: Final = 4096
"""Keys per script call when restoring, so no single command grows without bound."""

_VERIFY_BATCH: Final = 10_000
"""(key, pod) probes per pipeline when a snapshot checks its entries against the block hashes."""

# Shared by every mutating script. ``drop`` removes one (pod, tier) from a block hash and keeps
# the per-tier counter in step; it returns 1 when that was the tier's last holder, i.e. when a
# distinct (key, tier) entry disappeared.
_PRELUDE: Final = r"""
local SEP = '\31'
local function has_tier(cur, tier)
  if not cur then return false end
  return string.find(SEP .. cur .. SEP, SEP .. tier .. SEP, 1, true) ~= nil
end
local function without_tier(cur, tier)
  local out = {}
  for t in string.gmatch(cur, '[^\31]+') do
    if t ~= tier then out[#out + 1] = t end
  end
  return table.concat(out, SEP)
end
local function drop(hk, pod, tier)
  local cur = redis.call('HGET', hk, pod)
  if not has_tier(cur, tier) then return 0 end
  local rest = without_tier(cur, tier)
  if rest == '' then
    redis.call('HDEL', hk, pod)
  else
    redis.call('HSET', hk, pod, rest)
  end
  local cf = '\30' .. tier
  if redis.call('HINCRBY', hk, cf, -1) <= 0 then
    redis.call('HDEL', hk, cf)
    return 1
  end
  return 0
end
"""

# ARGV: prefix, pod, tier, ttl_ms (0 = none), key_hex...
# The pod set is the source of truth for "pairs" (SADD's answer), so a block hash that expired
# under a TTL and is re-added is not counted twice.
_ADD: Final = (
    _PRELUDE
    + r"""
local pfx, pod, tier = ARGV[1], ARGV[2], ARGV[3]
local ttl = tonumber(ARGV[4])
local podset = pfx .. ':pod:' .. pod
local cf = '\30' .. tier
local new_pairs, new_keys = 0, 0
redis.call('SADD', pfx .. ':pods', pod)
for i = 5, #ARGV do
  local hk = pfx .. ':k:' .. ARGV[i]
  local cur = redis.call('HGET', hk, pod)
  if not has_tier(cur, tier) then
    if cur then cur = cur .. SEP .. tier else cur = tier end
    redis.call('HSET', hk, pod, cur)
    if redis.call('HINCRBY', hk, cf, 1) == 1 then new_keys = new_keys + 1 end
  end
  new_pairs = new_pairs + redis.call('SADD', podset, ARGV[i] .. SEP .. tier)
  if ttl > 0 then redis.call('PEXPIRE', hk, ttl) end
end
local meta = pfx .. ':meta'
if new_pairs ~= 0 then redis.call('HINCRBY', meta, 'pairs', new_pairs) end
if new_keys ~= 0 then
  redis.call('HINCRBY', meta, 'keys', new_keys)
  redis.call('HINCRBY', meta, 'keys:' .. tier, new_keys)
end
return new_pairs
"""
)

# ARGV: prefix, pod, tier, key_hex...
_REMOVE: Final = (
    _PRELUDE
    + r"""
local pfx, pod, tier = ARGV[1], ARGV[2], ARGV[3]
local podset = pfx .. ':pod:' .. pod
local gone_pairs, gone_keys = 0, 0
for i = 4, #ARGV do
  gone_keys = gone_keys + drop(pfx .. ':k:' .. ARGV[i], pod, tier)
  gone_pairs = gone_pairs + redis.call('SREM', podset, ARGV[i] .. SEP .. tier)
end
local meta = pfx .. ':meta'
if gone_pairs ~= 0 then redis.call('HINCRBY', meta, 'pairs', -gone_pairs) end
if gone_keys ~= 0 then
  redis.call('HINCRBY', meta, 'keys', -gone_keys)
  redis.call('HINCRBY', meta, 'keys:' .. tier, -gone_keys)
end
return gone_pairs
"""
)

# ARGV: prefix, pod. One script, hence atomic: no reader sees the pod half-cleared, and an add
# racing with the clear lands either wholly before it or wholly after. The price is that Redis
# is busy for the whole sweep (O(pairs the pod holds)).
_CLEAR_POD: Final = (
    _PRELUDE
    + r"""
local pfx, pod = ARGV[1], ARGV[2]
local podset = pfx .. ':pod:' .. pod
local members = redis.call('SMEMBERS', podset)
local gone = {}
for _, m in ipairs(members) do
  local at = string.find(m, SEP, 1, true)
  local tier = string.sub(m, at + 1)
  if drop(pfx .. ':k:' .. string.sub(m, 1, at - 1), pod, tier) == 1 then
    gone[tier] = (gone[tier] or 0) + 1
  end
end
redis.call('DEL', podset)
redis.call('SREM', pfx .. ':pods', pod)
local meta = pfx .. ':meta'
if #members > 0 then redis.call('HINCRBY', meta, 'pairs', -#members) end
local total = 0
for tier, n in pairs(gone) do
  redis.call('HINCRBY', meta, 'keys:' .. tier, -n)
  total = total + n
end
if total > 0 then redis.call('HINCRBY', meta, 'keys', -total) end
return #members
"""
)

# ARGV: prefix. Deletes everything the layout names, found through the pod sets rather than by
# SCAN, so a neighbouring prefix that happens to match a glob is never touched.
_WIPE: Final = r"""
local pfx = ARGV[1]
for _, pod in ipairs(redis.call('SMEMBERS', pfx .. ':pods')) do
  local podset = pfx .. ':pod:' .. pod
  for _, m in ipairs(redis.call('SMEMBERS', podset)) do
    local at = string.find(m, '\31', 1, true)
    redis.call('DEL', pfx .. ':k:' .. string.sub(m, 1, at - 1))
  end
  redis.call('DEL', podset)
end
redis.call('DEL', pfx .. ':pods', pfx .. ':meta', pfx .. ':emap')
return 1
"""

# ARGV: prefix, n_weights, (tier, weight) * n_weights, n_filter (-1 = all pods),
#       filter pod * n_filter, key_hex...
# Returns a flat [pod, score, ...]. Scores travel as "%.17g" strings because Redis truncates Lua
# numbers to integers, and 17 significant digits round-trip a double exactly; the sums are
# formed in the same order as ``score_from_holders``, so the results are bit-identical.
_SCORE: Final = r"""
local pfx = ARGV[1]
local i = 2
local weights = {}
local nw = tonumber(ARGV[i]); i = i + 1
for _ = 1, nw do
  weights[ARGV[i]] = tonumber(ARGV[i + 1])
  i = i + 2
end
local nf = tonumber(ARGV[i]); i = i + 1
local alive = {}
if nf > 0 then
  for j = i, i + nf - 1 do alive[#alive + 1] = ARGV[j] end
  i = i + nf
end
local n = #ARGV
if i > n then return {} end

-- A pod field's value is one of a handful of tier lists ("GPU", "CPU", "CPU\31GPU"...), so
-- the best weight is computed once per distinct value.
local memo = {}
local function best(v)
  local w = memo[v]
  if w == nil then
    for t in string.gmatch(v, '[^\31]+') do
      local x = weights[t] or 1.0
      if w == nil or x < w then w = x end
    end
    memo[v] = w
  end
  return w
end

-- HMGET in slices: Lua's unpack is bounded by the C stack.
local function hmget(hk, fields)
  local out = {}
  for s = 1, #fields, 512 do
    local part = redis.call('HMGET', hk, unpack(fields, s, math.min(s + 511, #fields)))
    for _, v in ipairs(part) do out[#out + 1] = v end
  end
  return out
end

local scores = {}
local start = i
if nf < 0 then
  -- Unfiltered: block 0's holders are exactly its pod fields.
  local flat = redis.call('HGETALL', pfx .. ':k:' .. ARGV[i])
  for j = 1, #flat, 2 do
    local f = flat[j]
    if string.byte(f, 1) ~= 30 then
      alive[#alive + 1] = f
      scores[f] = 0.0 + best(flat[j + 1])
    end
  end
  start = i + 1
end
for b = start, n do
  if #alive == 0 then break end
  local vals = hmget(pfx .. ':k:' .. ARGV[b], alive)
  local still = {}
  for j, pod in ipairs(alive) do
    local v = vals[j]
    if v then
      scores[pod] = (scores[pod] or 0.0) + best(v)
      still[#still + 1] = pod
    end
  end
  alive = still
end
local out = {}
for pod, s in pairs(scores) do
  out[#out + 1] = pod
  out[#out + 1] = string.format('%.17g', s)
end
return out
"""


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


def _hex(key: int) -> str:
    """A block or engine key as it appears in Redis key names and hash fields."""
    return f"{key:016x}"


def _check_name(kind: str, value: str) -> None:
    """Reject a pod id or tier that would break the separators of the key layout.

    Raises:
        ValueError: ``value`` contains ``\\x1e``/``\\x1f``, or is an empty tier.
    """
    if _SEP in value or _COUNT in value:
        raise ValueError(f"{kind} {value!r} contains a reserved separator (\\x1e or \\x1f)")
    if kind == "tier" and not value:
        raise ValueError("tier must not be empty")


def _valid_name(value: str) -> bool:
    """Whether ``value`` could be a stored pod id (filters are matched, not rejected)."""
    return _SEP not in value and _COUNT not in value


def _parse_block(flat: Mapping[str, str]) -> dict[PodId, set[Tier]]:
    """A block hash (``HGETALL``) as holder → tiers, skipping the per-tier counters."""
    return {
        PodId(field): {Tier(t) for t in value.split(_SEP)}
        for field, value in flat.items()
        if not field.startswith(_COUNT)
    }


def _chunks(seq: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    """Consecutive slices of ``seq`` of at most ``size`` items."""
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


class RedisBackend:
    """The block-key index in a Redis server (see the module docstring for the key layout).

    Every method maps a Redis or socket failure to ``BackendUnavailable``. Calls block for at
    most about ``socket_timeout_s`` (plus one immediate reconnect attempt, which is what lets a
    pooled connection survive a server restart).

    Args:
        url: ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL; a password in the URL wins
            over ``password``.
        prefix: namespace of every key this backend touches.
        password: the server's ``requirepass``/ACL password, when not in the URL.
        socket_timeout_s: connect and per-command timeout.
        key_ttl_s: when set, block hashes expire this long after the last ``add`` touching them.
        client: an existing ``redis.Redis`` to use instead of building one from ``url``; it must
            have ``decode_responses=True``, and ``close`` leaves it open (its owner closes it).

    Raises:
        ConfigError: the URL cannot be parsed, ``key_ttl_s`` is not positive, or ``client``
            does not decode responses.
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
                # redis-py's default retries ten times with backoff; a router must fail fast
                # and fall back, so retry once only (enough to replace a connection the server
                # closed while it sat in the pool).
                retry=Retry(NoBackoff(), 1),
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

    def _k(self, key: int) -> str:
        return f"{self._prefix}:k:{key:016x}"

    @property
    def _pods_key(self) -> str:
        return f"{self._prefix}:pods"

    @property
    def _meta_key(self) -> str:
        return f"{self._prefix}:meta"

    @property
    def _emap_key(self) -> str:
        return f"{self._prefix}:emap"

    def _pod_key(self, pod: str) -> str:
        return f"{self._prefix}:pod:{pod}"

    # -- IndexBackend --------------------------------------------------------------------------

    def add(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        """Record that ``pod`` holds ``keys`` in ``tier`` (one atomic script, one round trip).

        Raises:
            ValueError: ``pod`` or ``tier`` contains a reserved separator.
            BackendUnavailable: Redis cannot be reached or failed.
        """
        _check_name("pod", pod)
        _check_name("tier", tier)
        # No early return on empty keys: like the memory backend, an add registers the holder.
        with self._guard("add"):
            self._run(_ADD_S, [self._prefix, pod, tier, self._ttl_ms, *map(_hex, keys)])

    def remove(self, pod: PodId, tier: Tier, keys: Sequence[int]) -> None:
        """Record that ``pod`` no longer holds ``keys`` in ``tier`` (one round trip).

        Raises:
            BackendUnavailable: Redis cannot be reached or failed.
        """
        if not keys or not _valid_name(pod) or not _valid_name(tier):
            return  # nothing with such a name can be stored
        with self._guard("remove"):
            self._run(_REMOVE_S, [self._prefix, pod, tier, *map(_hex, keys)])

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
            members = cast(set[str], self._r.smembers(self._pods_key))
        return sorted(PodId(p) for p in members)

    def score(
        self,
        keys: Sequence[int],
        weights: Mapping[str, float],
        pods: Collection[str] | None = None,
    ) -> dict[PodId, float]:
        """Longest-consecutive-prefix score per holder, as ``score_from_holders`` computes it.

        One round trip: a Lua script walks the prefix inside Redis, probing each block only
        for the holders still alive, and stops at the first block none of them holds.

        Args:
            keys: the prompt's block keys, in order.
            weights: tier → weight; a tier not named weighs 1.0.
            pods: when given, only these holders are scored.

        Returns:
            holder → score, for holders that hold block 0 (and pass the filter).

        Raises:
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
            # A set: a duplicated filter entry would otherwise be scored twice in the script.
            wanted = sorted({p for p in pods if _valid_name(p)})
            if not wanted:
                return {}
            args.append(len(wanted))
            args += wanted
        args += map(_hex, keys)
        with self._guard("score"):
            flat = cast(list[str], self._run(_SCORE_S, args))
        return {PodId(flat[j]): float(flat[j + 1]) for j in range(0, len(flat), 2)}

    def holders(self, keys: Sequence[int]) -> list[dict[PodId, set[Tier]]]:
        """For each key, holder → tiers (one pipelined round trip).

        Raises:
            BackendUnavailable: Redis cannot be reached or failed.
        """
        if not keys:
            return []
        with self._guard("holders"):
            pipe = self._r.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(self._k(key))
            blocks = cast(list[dict[str, str]], pipe.execute())
        return [_parse_block(flat) for flat in blocks]

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
            self._r.hset(self._emap_key, mapping=mapping)

    def get_engine_map(self, engine_keys: Sequence[int]) -> list[int | None]:
        """Resolve engine keys to request keys, ``None`` where unknown (one ``HMGET``).

        Raises:
            BackendUnavailable: Redis cannot be reached or failed.
        """
        if not engine_keys:
            return []
        with self._guard("get_engine_map"):
            found = cast(
                list[str | None], self._r.hmget(self._emap_key, [_hex(e) for e in engine_keys])
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
            pipe.hgetall(self._meta_key)
            pipe.scard(self._pods_key)
            pipe.hlen(self._emap_key)
            meta, n_pods, n_emap = cast(tuple[dict[str, str], int, int], pipe.execute())
        per_tier = {
            field.removeprefix("keys:"): int(value)
            for field, value in meta.items()
            if field.startswith("keys:") and int(value) > 0
        }
        return IndexStats(
            backend=self.name,
            keys=max(0, int(meta.get("keys", 0))),
            pairs=max(0, int(meta.get("pairs", 0))),
            pods=int(n_pods),
            engine_map_entries=int(n_emap),
            per_tier=per_tier,
        )

    def snapshot(self) -> bytes:
        """The whole index in the portable snapshot format.

        Three pipelined round trips (plus one per 10k pairs): holders and engine map, the pod
        sets, then a check of each entry against its block hash, so blocks that expired under a
        TTL are left out. Not atomic: entries changing meanwhile may or may not be included.

        Raises:
            BackendUnavailable: Redis cannot be reached or failed.
        """
        with self._guard("snapshot"):
            pipe = self._r.pipeline(transaction=False)
            pipe.smembers(self._pods_key)
            pipe.hgetall(self._emap_key)
            pod_set, emap = cast(tuple[set[str], dict[str, str]], pipe.execute())
            pods = sorted(pod_set)
            pipe = self._r.pipeline(transaction=False)
            for pod in pods:
                pipe.smembers(self._pod_key(pod))
            members = cast(list[set[str]], pipe.execute())

            # (pod, key hex) → tiers the pod set claims; checked against the block hash below.
            claimed: dict[tuple[str, str], set[str]] = {}
            for pod, entries in zip(pods, members, strict=True):
                for entry in entries:
                    khex, _, tier = entry.partition(_SEP)
                    claimed.setdefault((pod, khex), set()).add(tier)
            probes = list(claimed)
            held: list[str | None] = []
            for start in range(0, len(probes), _VERIFY_BATCH):
                pipe = self._r.pipeline(transaction=False)
                for pod, khex in probes[start : start + _VERIFY_BATCH]:
                    pipe.hget(f"{self._prefix}:k:{khex}", pod)
                held += cast(list[str | None], pipe.execute())

        # Holders without keys are left out, as the memory backend leaves them out, so that
        # snapshots of equal content are equal whichever backend wrote them.
        holders: dict[str, dict[str, list[int]]] = {}
        for (pod, khex), value in zip(probes, held, strict=True):
            if value is None:
                continue
            for tier in claimed[(pod, khex)] & set(value.split(_SEP)):
                holders.setdefault(pod, {}).setdefault(tier, []).append(int(khex, 16))
        # Sorted throughout: Redis set order is arbitrary, and equal content should give
        # equal bytes (tests and tools compare snapshots).
        canonical = {
            pod: {tier: sorted(tiers[tier]) for tier in sorted(tiers)}
            for pod, tiers in sorted(holders.items())
        }
        engine_map = sorted((int(e, 16), int(r, 16)) for e, r in emap.items())
        return encode_snapshot(canonical, engine_map)

    def restore(self, data: bytes) -> None:
        """Replace everything under the prefix with a snapshot taken by any backend.

        The snapshot is decoded and checked first, so a bad one leaves the index untouched;
        then the wipe and the reload run in one MULTI/EXEC transaction (one round trip, and
        atomic for readers).

        Raises:
            MalformedFrame: ``data`` is not a kvray snapshot.
            ValueError: a pod id or tier in it contains a reserved separator.
            BackendUnavailable: Redis cannot be reached or failed.
        """
        snap = decode_snapshot(data)
        for pod, tiers in snap.holders.items():
            _check_name("pod", pod)
            for tier in tiers:
                _check_name("tier", tier)
        with self._guard("restore"):
            pipe = self._r.pipeline(transaction=True)
            # EVAL rather than EVALSHA: inside MULTI a NOSCRIPT could not be retried, and the
            # body's size is nothing next to the keys a restore carries.
            pipe.eval(_WIPE_S.body, 0, self._prefix)
            for pod, tiers in snap.holders.items():
                pipe.sadd(self._pods_key, pod)  # a holder with no keys is still a holder
                for tier, keys in tiers.items():
                    hexes = [_hex(k) for k in keys]
                    for part in _chunks(hexes, _ARGS_PER_CALL):
                        pipe.eval(_ADD_S.body, 0, self._prefix, pod, tier, self._ttl_ms, *part)
            pairs = [(_hex(e), _hex(r)) for e, r in snap.engine_map]
            for start in range(0, len(pairs), _ARGS_PER_CALL):
                chunk: dict[Any, Any] = dict(pairs[start : start + _ARGS_PER_CALL])
                pipe.hset(self._emap_key, mapping=chunk)
            pipe.execute()

    def close(self) -> None:
        """Close the connection pool (unless the client was passed in); later calls raise."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self._r.close()

    # -- extras --------------------------------------------------------------------------------

    def ping(self) -> None:
        """Check the server answers (for readiness probes).

        Raises:
            BackendUnavailable: Redis cannot be reached or failed.
        """
        with self._guard("ping"):
            self._r.ping()
