"""An event's shared rate limits and its breaker's permit, judged by one script.

An event that meets shared limits and a breaker used to cost a script per group of limits
(the enforced ones together, each shadow one alone) and one for the breaker's permit (and,
when the limits refused it, one more to hand the permit back). Here they all run in one
script, each as it runs alone (the Lua of ``CHECK`` and ``ACQUIRE`` is wrapped as two
functions, unchanged), and the permit is taken only when the enforced limits admit: a
refused event never holds one, so nothing goes back. One call to make and await per
event instead of two or three.

On a Redis Cluster the limits' keys and the breaker's hash live in different slots, so the
two are asked one after the other there (see :class:`~policy_engine.state.redis_store.RedisStore`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from policy_engine.algorithms import ratelimit
from policy_engine.algorithms.breaker import Permit
from policy_engine.algorithms.ratelimit import CombinedDecision, RateDecision
from policy_engine.language.model import CircuitBreakerSpec, RateLimitSpec
from policy_engine.state import redis_breaker_scripts
from policy_engine.state.redis_breakers import RedisBreakers, read_permit
from policy_engine.state.redis_clients import RedisClient
from policy_engine.state.redis_limits import CHECK, RedisRateLimits
from policy_engine.state.redis_pipeline import Arg, Call, Words

CHECK_THEN_ACQUIRE = f"""
local function check(KEYS, ARGV)
{CHECK}
end

local function acquire(KEYS, ARGV)
{redis_breaker_scripts.ACQUIRE}
end

-- The limits come in groups, each judged as CHECK judges it alone (the first group: the
-- enforced limits, all or none; then one group per shadow limit). ARGV[1]: g, the number
-- of groups; ARGV[2] to ARGV[g + 1]: each group's number of keys; then each group's number
-- of arguments; then every group's CHECK arguments; then ACQUIRE's, if a permit is asked.
-- KEYS: the groups' state keys, then the breaker's hash.
-- Returns {{the groups' CHECK replies, ACQUIRE's reply}}, or {{..., false}} when the first
-- group refuses (no permit taken) or no permit is asked.
local g = tonumber(ARGV[1])
local key_at, arg_at = 0, 2 * g + 1
local replies = {{}}
local admitted = true
for group = 1, g do
  local nk, na = tonumber(ARGV[1 + group]), tonumber(ARGV[1 + g + group])
  local keys, args = {{}}, {{}}
  for i = 1, nk do keys[i] = KEYS[key_at + i] end
  for i = 1, na do args[i] = ARGV[arg_at + i] end
  key_at, arg_at = key_at + nk, arg_at + na
  local judged = {{}}
  if nk > 0 then judged = check(keys, args) end
  if group == 1 then
    for i = 1, nk do
      if judged[4 * (i - 1) + 1] ~= 1 then admitted = false end
    end
  end
  replies[group] = judged
end
if not admitted or key_at == #KEYS then return {{replies, false}} end
local breaker_args = {{}}
for i = arg_at + 1, #ARGV do breaker_args[#breaker_args + 1] = ARGV[i] end
return {{replies, acquire({{KEYS[#KEYS]}}, breaker_args)}}
"""

Checks = Sequence[tuple[RateLimitSpec, str]]


class CheckThenAcquire:
    """Builds the one call for an event's limits and permit, and reads its reply."""

    def __init__(
        self, client: RedisClient, limits: RedisRateLimits, breakers: RedisBreakers
    ) -> None:
        self._script = client.register_script(CHECK_THEN_ACQUIRE)
        self._limits = limits
        self._breakers = breakers

    def call(
        self, groups: Sequence[Checks], spec: CircuitBreakerSpec | None, now: float | None
    ) -> tuple[Call, Callable[[Any], tuple[list[CombinedDecision], Permit | None]]]:
        """The call judging each group of limits (the first gates the permit; it may be
        empty) and, when the first admits, taking a permit from ``spec``'s breaker (none
        asked for when ``spec`` is None); and how to read its reply: a decision per group,
        and the permit (None when none was taken)."""
        keys: list[str] = []
        key_counts: list[Arg | Words] = []
        arg_counts: list[Arg | Words] = []
        args: list[Arg | Words] = []
        readers: list[Callable[[Any], list[tuple[str, RateDecision]]] | None] = []
        for checks in groups:
            if not checks:
                key_counts.append(0)
                arg_counts.append(0)
                readers.append(None)
                continue
            check, read_check = self._limits.call(checks, now, 1, peek=False)
            keys += check.keys
            args += check.args
            key_counts.append(len(check.keys))
            arg_counts.append(check.plain_count)
            readers.append(read_check)
        if spec is not None:
            acquire = self._breakers.acquire(spec, now)[0]
            keys += acquire.keys
            args += acquire.args
        call = Call(self._script, keys, [len(groups), *key_counts, *arg_counts, *args])

        def read(reply: Any) -> tuple[list[CombinedDecision], Permit | None]:
            judged, permit = reply
            decisions = [
                ALL_ADMIT if reader is None else ratelimit.combine(reader(answer))
                for reader, answer in zip(readers, judged, strict=True)
            ]
            return decisions, None if permit is None else read_permit(permit)

        return call, read


ALL_ADMIT = ratelimit.combine([])
"""The decision of an empty group of limits."""
