"""Rate limits inside Redis: GCRA, the sliding log and the fixed window as one Lua script.

One script judges every limit an event meets, all or none, in one atomic step: it decides
each limit as :mod:`policy_engine.algorithms.ratelimit` does (each function there writes its
steps out; the script is their transcription) and writes only when every limit admits. No
compare-and-set, no retries: a burst on one key from any number of processes is judged one
request at a time by Redis itself, so the limit holds exactly.

Time is Redis's own (``TIME``) unless the caller passes ``now`` (tests that compare the
two stores on the same instants do): processes sharing a store then need no clock
agreement. Floats cross the script boundary as ``%.17g`` strings, which round-trip
exactly (Redis would truncate a Lua number in a reply to an integer).

Each algorithm keeps its state under its own key, ``P:rl:{T}:R:K:A`` (prefix, tag, rule,
key, and ``A`` one of ``g``, ``s``, ``f``; see :mod:`policy_engine.state.redis_scripts`),
so a rule that changes algorithm in a reload starts empty instead of misreading the
other's state (as the memory store counts a state of another type as none):

- GCRA: a string, the theoretical arrival time;
- sliding log: a list of admission times, oldest first, at most ``limit`` long;
- fixed window: a string ``"{start} {count}"``.

Every key expires when its state is empty again, so idle keys cost nothing.

``{T}`` is a Redis Cluster hash tag, a short hash of the rule and the key: the states of
one (rule, key) share a slot, and different keys spread over the cluster. It is a hash
because the key is the client's to choose: braces in it cannot move the state elsewhere.

On a Redis Cluster the limits an event meets may live in different slots, which no one
script can touch. :meth:`RedisRateLimits.judge` groups them by slot: one group is judged
by one script, as on one Redis. Several are first *peeked* at, each by the same script
told to write nothing; if any group refuses, the event is refused and nothing consumed.
Otherwise each group is committed by its script, which judges again before it writes. A
request on the same keys between the peek and the commit can make one group refuse the
commit while the others have consumed: the event is then refused, and the other groups
were charged for it. That needs two requests racing on a limit's last units; the limit
that refuses is never exceeded, since its own commit is atomic.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.crc import key_slot

from policy_engine.algorithms import ratelimit
from policy_engine.algorithms.ratelimit import CombinedDecision, RateDecision
from policy_engine.language.model import RateAlgorithm, RateLimitSpec
from policy_engine.state.redis_clients import RedisClient
from policy_engine.state.redis_pipeline import Arg, Call, SpecArgs, Words

_FLOAT_HELPERS = """
local function fmt(x)
  if x == math.huge then return 'inf' end
  if x == -math.huge then return '-inf' end
  return string.format('%.17g', x)
end
-- The next float above and below a positive x (Python's math.nextafter), via its exponent.
local function nextup(x)
  if x == 0 then return math.ldexp(1, -1074) end
  local _, e = math.frexp(x)
  return x + math.ldexp(1, e - 53)
end
local function nextdown(x)
  local m, e = math.frexp(x)
  if m == 0.5 then return x - math.ldexp(1, e - 54) end
  return x - math.ldexp(1, e - 53)
end
-- at - now, rounded up just enough that now + wait >= at.
local function wait(now, at)
  local w = at - now
  while now + w < at do w = nextup(w) end
  return w
end
-- The smallest float t with floor(t / period) > index: the next window's start.
local function window_end(index, period)
  local e = (index + 1) * period
  while math.floor(e / period) <= index do e = nextup(e) end
  local below = nextdown(e)
  while math.floor(below / period) > index do
    e = below
    below = nextdown(e)
  end
  return e
end
local function ttl_ms(seconds)
  return math.max(1, math.ceil(seconds * 1000))
end
"""

CHECK = (
    _FLOAT_HELPERS
    + """
-- KEYS: one state key per limit. ARGV[1]: now ('' for Redis's clock); ARGV[2]: cost;
-- ARGV[3]: '1' to peek (write nothing), else '0'; then four values per limit: algorithm
-- ('g', 's' or 'f'), limit, period, burst.
-- Returns four values per limit: 1 if it admits (else 0), remaining, retry_after and
-- reset_after (floats as strings); the states are written only when every limit admits,
-- and never when peeking.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local cost = tonumber(ARGV[2])
local peek = ARGV[3] == '1'
local reply = {}
local writes = {}
local all = true
for i = 1, #KEYS do
  local at = 3 + (i - 1) * 4
  local kind, limit = ARGV[at + 1], tonumber(ARGV[at + 2])
  local period, burst = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  local key = KEYS[i]
  local allowed, remaining, retry, reset = 0, 0, 0, 0
  if kind == 'g' then
    local interval = period / limit
    local size = burst > 0 and burst or limit
    local stored = tonumber(redis.call('GET', key) or '')
    local tat = now
    if stored and stored >= now then tat = stored end
    local function left(t)
      if t <= now then return size end
      local k = math.max(math.floor(size - (t - now) / interval), 0)
      while k < size and now >= t - (size - k - 1) * interval do k = k + 1 end
      while k > 0 and now < t - (size - k) * interval do k = k - 1 end
      return k
    end
    local allow_at = tat - (size - cost) * interval
    if cost <= size and now >= allow_at then
      local new_tat = tat + cost * interval
      allowed, remaining, reset = 1, left(new_tat), new_tat - now
      writes[#writes + 1] = {'g', key, fmt(new_tat), ttl_ms(new_tat - now)}
    else
      remaining, reset = left(tat), tat - now
      if cost > size then retry = math.huge else retry = wait(now, allow_at) end
    end
  elseif kind == 's' then
    local size = redis.call('LLEN', key)
    local last = nil
    if size > 0 then last = tonumber(redis.call('LINDEX', key, -1)) end
    local first = 0
    while first < size and tonumber(redis.call('LINDEX', key, first)) + period <= now do
      first = first + 1
    end
    if size - first > limit then first = size - limit end
    local count = size - first
    -- Times that have left the window go; a peek counts past them instead.
    if first > 0 and not peek then
      redis.call('LTRIM', key, first, -1)
      first = 0
    end
    if count + cost <= limit then
      allowed, remaining, reset = 1, limit - count - cost, (now + period) - now
      writes[#writes + 1] = {'s', key, fmt(now), ttl_ms(period)}
    else
      if cost > limit then
        retry = math.huge
      else
        local oldest = tonumber(redis.call('LINDEX', key, first + count - (limit - cost) - 1))
        retry = wait(now, oldest + period)
      end
      remaining = math.max(0, limit - count)
      if last then reset = math.max(0, last + period - now) end
    end
  else
    local index = math.floor(now / period)
    local start = index * period
    local count = 0
    local stored = redis.call('GET', key)
    if stored then
      local s, c = string.match(stored, '^(%S+) (%S+)$')
      if tonumber(s) == start then count = tonumber(c) end
    end
    local e = window_end(index, period)
    reset = e - now
    if count + cost <= limit then
      allowed, remaining = 1, limit - count - cost
      writes[#writes + 1] = {'f', key, fmt(start) .. ' ' .. (count + cost), ttl_ms(e - now)}
    else
      remaining = math.max(0, limit - count)
      if cost > limit then retry = math.huge else retry = wait(now, e) end
    end
  end
  if allowed == 0 then all = false end
  reply[#reply + 1] = allowed
  reply[#reply + 1] = remaining
  reply[#reply + 1] = fmt(retry)
  reply[#reply + 1] = fmt(reset)
end
if all and not peek then
  for _, w in ipairs(writes) do
    if w[1] == 's' then
      for _ = 1, cost do redis.call('RPUSH', w[2], w[3]) end
      redis.call('PEXPIRE', w[2], w[4])
    else
      redis.call('SET', w[2], w[3], 'PX', w[4])
    end
  end
end
return reply
"""
)

KEPT_KEYS = 65_536
"""State keys kept made, at most (each ~100 bytes)."""

_KIND = {
    RateAlgorithm.GCRA: "g",
    RateAlgorithm.SLIDING_WINDOW: "s",
    RateAlgorithm.FIXED_WINDOW: "f",
}

Checks = Sequence[tuple[RateLimitSpec, str]]


Run = Callable[[Call], Awaitable[Any]]
"""How a call is sent: :meth:`Pipeline.run <policy_engine.state.redis_pipeline.Pipeline.run>`."""


class RedisRateLimits:
    """Builds the script calls for a set of limits and reads their replies.

    ``by_slot`` (on a Redis Cluster) judges limits in different slots by peek and commit,
    as the module says; otherwise one script judges them all.
    """

    def __init__(self, client: RedisClient, prefix: str, *, by_slot: bool = False) -> None:
        self.prefix = prefix
        self.by_slot = by_slot
        self._check = client.register_script(CHECK)
        self._spec_args = SpecArgs[RateLimitSpec](_spec_args)
        self._keys: dict[tuple[str, Any, str], str] = {}

    def key(self, spec: RateLimitSpec, key: str) -> str:
        """Where one rule's state for one key lives (by name, never by parameters).

        Kept once made (its hash tag is a digest): a conversation's key is asked for at
        every one of its events. Past ``KEPT_KEYS`` they are all dropped at once.
        """
        kept = self._keys
        at = (spec.name, spec.algorithm, key)
        found = kept.get(at)
        if found is None:
            if len(kept) >= KEPT_KEYS:
                kept.clear()
            found = kept[at] = state_key(self.prefix, spec, key)
        return found

    def check(
        self, checks: Checks, now: float | None, cost: int = 1, *, peek: bool = False
    ) -> tuple[Call, Callable[[Any], CombinedDecision]]:
        """The call judging every (rule, key) together, and how to read its reply."""
        call, read = self.call(checks, now, cost, peek=peek)
        return call, lambda reply: ratelimit.combine(read(reply))

    async def judge(
        self, checks: Checks, now: float | None, run: Run, cost: int = 1
    ) -> CombinedDecision:
        """Judge every (rule, key), all or none, running the calls with ``run``."""
        groups = self._groups(checks)
        if len(groups) <= 1:
            call, read = self.check(checks, now, cost)
            return read(await run(call))
        peeked = await self._run_all(groups, checks, now, cost, run, peek=True)
        if all(decision.allowed for _, decision in peeked):
            return ratelimit.combine(await self._run_all(groups, checks, now, cost, run))
        return ratelimit.combine(peeked)

    def _groups(self, checks: Checks) -> list[list[int]]:
        """The positions of the checks, grouped by the slot of their state."""
        if not self.by_slot:
            return [list(range(len(checks)))]
        slots: dict[int, list[int]] = {}
        for index, (spec, key) in enumerate(checks):
            slots.setdefault(key_slot(hash_tag(spec.name, key).encode()), []).append(index)
        return list(slots.values())

    async def _run_all(
        self,
        groups: list[list[int]],
        checks: Checks,
        now: float | None,
        cost: int,
        run: Run,
        *,
        peek: bool = False,
    ) -> list[tuple[str, RateDecision]]:
        """Every group's script at once; the decisions back in the order of ``checks``."""
        calls = [self.call([checks[i] for i in group], now, cost, peek=peek) for group in groups]
        replies = await asyncio.gather(*(run(call) for call, _ in calls))
        decisions: list[tuple[str, RateDecision] | None] = [None] * len(checks)
        for group, (_, read), reply in zip(groups, calls, replies, strict=True):
            for index, decision in zip(group, read(reply), strict=True):
                decisions[index] = decision
        return [decision for decision in decisions if decision is not None]

    def call(
        self, checks: Checks, now: float | None, cost: int, *, peek: bool
    ) -> tuple[Call, Callable[[Any], list[tuple[str, RateDecision]]]]:
        """The ``CHECK`` call for these limits, and how to read each limit's decision."""
        if cost < 1:
            raise ValueError(f"a request costs at least 1, got {cost}")
        args: list[Arg | Words] = ["" if now is None else repr(float(now)), cost, int(peek)]
        spec_args = self._spec_args
        for spec, _ in checks:
            args.append(spec_args(spec))
        keys = [self.key(spec, key) for spec, key in checks]
        names = [spec.name for spec, _ in checks]

        def read(reply: Any) -> list[tuple[str, RateDecision]]:
            decisions = []
            for index, name in enumerate(names):
                allowed, remaining, retry, reset = reply[4 * index : 4 * index + 4]
                decision = RateDecision(bool(allowed), int(remaining), _float(retry), _float(reset))
                decisions.append((name, decision))
            return decisions

        return Call(self._check, keys, args), read


def _spec_args(spec: RateLimitSpec) -> tuple[Arg, ...]:
    return (_KIND[spec.algorithm], spec.rate.limit, repr(spec.rate.period), spec.burst)


def state_key(prefix: str, spec: RateLimitSpec, key: str) -> str:
    """The key of a rule's state for one key under ``prefix``: see the module."""
    tag = hash_tag(spec.name, key)
    return f"{prefix}:rl:{{{tag}}}:{spec.name}:{key}:{_KIND[spec.algorithm]}"


def hash_tag(rule: str, key: str) -> str:
    """The hash tag of a (rule, key)'s states: which Redis Cluster slot holds them."""
    digest = hashlib.blake2b(digest_size=6)
    digest.update(rule.encode())
    digest.update(b"\0")
    digest.update(key.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _float(value: bytes | str) -> float:
    text = value.decode() if isinstance(value, bytes) else value
    return math.inf if text == "inf" else float(text)
