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

Each algorithm keeps its state under its own key, ``{base}:{g|s|f}``, so a rule that
changes algorithm in a reload starts empty instead of misreading the other's state (as the
memory store counts a state of another type as none):

- GCRA: a string, the theoretical arrival time;
- sliding log: a list of admission times, oldest first, at most ``limit`` long;
- fixed window: a string ``"{start} {count}"``.

Every key expires when its state is empty again, so idle keys cost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis

from policy_engine.algorithms import ratelimit
from policy_engine.algorithms.ratelimit import CombinedDecision, RateDecision
from policy_engine.language.model import RateAlgorithm, RateLimitSpec
from policy_engine.state.redis_pipeline import Call

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
-- KEYS: one state key per limit. ARGV[1]: now ('' for Redis's clock); ARGV[2]: cost; then
-- four values per limit: algorithm ('g', 's' or 'f'), limit, period, burst.
-- Returns four values per limit: 1 if it admits (else 0), remaining, retry_after and
-- reset_after (floats as strings); the states are written only when every limit admits.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local cost = tonumber(ARGV[2])
local reply = {}
local writes = {}
local all = true
for i = 1, #KEYS do
  local at = 2 + (i - 1) * 4
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
    if first > 0 then redis.call('LTRIM', key, first, -1) end
    local count = size - first
    if count + cost <= limit then
      allowed, remaining, reset = 1, limit - count - cost, (now + period) - now
      writes[#writes + 1] = {'s', key, fmt(now), ttl_ms(period)}
    else
      if cost > limit then
        retry = math.huge
      else
        local oldest = tonumber(redis.call('LINDEX', key, count - (limit - cost) - 1))
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
if all then
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

_KIND = {
    RateAlgorithm.GCRA: "g",
    RateAlgorithm.SLIDING_WINDOW: "s",
    RateAlgorithm.FIXED_WINDOW: "f",
}

Checks = Sequence[tuple[RateLimitSpec, str]]


class RedisRateLimits:
    """Builds the script call for a set of limits and reads its reply."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self.prefix = prefix
        self._check = client.register_script(CHECK)

    def key(self, spec: RateLimitSpec, key: str) -> str:
        """Where one rule's state for one key lives (by name, never by parameters)."""
        return f"{self.prefix}:rl:{spec.name}:{key}:{_KIND[spec.algorithm]}"

    def check(
        self, checks: Checks, now: float | None, cost: int = 1
    ) -> tuple[Call, Callable[[Any], CombinedDecision]]:
        """The call judging every (rule, key) together, and how to read its reply."""
        if cost < 1:
            raise ValueError(f"a request costs at least 1, got {cost}")
        args: list[str | int] = ["" if now is None else repr(float(now)), cost]
        for spec, _ in checks:
            args += [_KIND[spec.algorithm], spec.rate.limit, repr(spec.rate.period), spec.burst]
        keys = [self.key(spec, key) for spec, key in checks]
        names = [spec.name for spec, _ in checks]

        def read(reply: Any) -> CombinedDecision:
            decisions = []
            for index, name in enumerate(names):
                allowed, remaining, retry, reset = reply[4 * index : 4 * index + 4]
                decision = RateDecision(bool(allowed), int(remaining), _float(retry), _float(reset))
                decisions.append((name, decision))
            return ratelimit.combine(decisions)

        return Call(self._check, keys, args), read


def _float(value: bytes | str) -> float:
    text = value.decode() if isinstance(value, bytes) else value
    return math.inf if text == "inf" else float(text)
