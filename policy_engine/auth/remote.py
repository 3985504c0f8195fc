"""A JWKS fetched from a URL, off the event loop, cached, rotated and kept through outages.

The rules, each for a failure seen in the field:

- One fetch at a time: concurrent callers (50 tokens with a new ``kid`` at once) await the
  same in-flight fetch instead of starting 50.
- At most one fetch attempt per ``min_refresh_interval``, whatever asks for it (an unknown
  ``kid``, an expired cache, a retry after a failure): a client inventing ``kid`` values
  cannot turn the server into a load generator against the identity provider.
- A failed fetch keeps the last good key set, is reported (``on_fetch``) and counted, and
  is retried no sooner than the interval. Only with no key set ever fetched is a token
  refused for it (``keys_unavailable``, retryable).
- A key set older than ``max_age`` is still used while a refresh runs in the background:
  a connect never waits on the identity provider unless the token needs a key not yet seen.

The HTTP request runs in a worker thread (``asyncio.to_thread`` with urllib), bounded by a
timeout and a response size cap.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from policy_engine.auth.failures import AuthenticationConfigError, AuthenticationError, AuthReason
from policy_engine.auth.keys import HMAC_ALGORITHMS, KeySet, check_algorithms, keyset_from_jwks

DEFAULT_MAX_AGE = 300.0
DEFAULT_MIN_REFRESH_INTERVAL = 30.0
DEFAULT_TIMEOUT = 5.0
MAX_JWKS_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class JwksFetch:
    """What one fetch attempt did, for the observer: keys found, or why it failed."""

    url: str
    ok: bool
    keys: int
    error: str
    seconds: float


FetchListener = Callable[[JwksFetch], None]


class RemoteJwks:
    """A :class:`~policy_engine.auth.keys.KeySource` reading a JWKS URL.

    ``clock`` is monotonic seconds (cache age and the refresh interval); tests inject it.
    Call ``await source.current()`` at start-up to have the keys before the first client.
    """

    def __init__(
        self,
        url: str,
        algorithms: Iterable[str],
        *,
        max_age: float = DEFAULT_MAX_AGE,
        min_refresh_interval: float = DEFAULT_MIN_REFRESH_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        on_fetch: FetchListener | None = None,
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise AuthenticationConfigError(f"a JWKS URL must be http or https: {url!r}")
        if min_refresh_interval < 0 or max_age <= 0 or timeout <= 0:
            raise AuthenticationConfigError(
                "max_age and timeout must be positive, the interval not negative"
            )
        allowed = check_algorithms(algorithms)
        if allowed & HMAC_ALGORITHMS:
            raise AuthenticationConfigError(
                "a JWKS URL publishes public keys; an HS provider needs a local secret"
            )
        self.url = url
        self.algorithms = tuple(sorted(allowed))
        self.max_age = max_age
        self.min_refresh_interval = min_refresh_interval
        self.timeout = timeout
        self._clock = clock
        self._on_fetch = on_fetch
        self._keys: KeySet | None = None
        self._fetched_at = 0.0
        self._attempted_at: float | None = None
        self._kid_refreshed_at: float | None = None
        self._in_flight: asyncio.Task[None] | None = None
        self.fetches = 0
        self.failures = 0
        self.last_error = ""

    async def current(self) -> KeySet:
        if self._keys is None:
            return await self._refresh()
        if self._clock() - self._fetched_at >= self.max_age and self._may_attempt():
            self._start()
        return self._keys

    async def refresh_for_unknown_kid(self) -> KeySet:
        """One refresh per ``min_refresh_interval`` for unknown kids, counted apart from the
        first fetch and the ``max_age`` refreshes: a key rotated a minute after start-up is
        found at once, and a flood of made-up kids still costs one fetch per interval. A failing
        identity provider is not asked again before the interval since its last failure."""
        now = self._clock()
        due = self._kid_refreshed_at is None or (
            now - self._kid_refreshed_at >= self.min_refresh_interval
        )
        failing = bool(self.last_error) and not self._may_attempt()
        if self._in_flight is None and due and not failing:
            self._kid_refreshed_at = now
            self._start()
        return await self._refresh()

    async def _refresh(self) -> KeySet:
        if self._in_flight is None and self._may_attempt():
            self._start()
        if self._in_flight is not None:
            # Shielded: a caller giving up must not cancel the fetch the others await.
            await asyncio.shield(self._in_flight)
        if self._keys is None:
            raise AuthenticationError(AuthReason.KEYS_UNAVAILABLE, self.last_error)
        return self._keys

    def _may_attempt(self) -> bool:
        return self._in_flight is None and (
            self._attempted_at is None
            or self._clock() - self._attempted_at >= self.min_refresh_interval
        )

    def _start(self) -> None:
        self._attempted_at = self._clock()
        self._in_flight = asyncio.create_task(self._fetch())

    async def _fetch(self) -> None:
        started = time.perf_counter()
        self.fetches += 1
        try:
            body = await asyncio.to_thread(download, self.url, self.timeout, MAX_JWKS_BYTES)
            keys = keyset_from_jwks(json.loads(body), self.algorithms)
        except Exception as error:  # any failure keeps the last good keys
            self.failures += 1
            self.last_error = _describe(error)
            self._report(ok=False, keys=0, started=started)
        else:
            self._keys = keys
            self._fetched_at = self._clock()
            self.last_error = ""
            self._report(ok=True, keys=len(keys), started=started)
        finally:
            self._in_flight = None

    def _report(self, *, ok: bool, keys: int, started: float) -> None:
        if self._on_fetch is not None:
            seconds = time.perf_counter() - started
            self._on_fetch(JwksFetch(self.url, ok, keys, self.last_error, seconds))


def download(url: str, timeout: float, max_bytes: int) -> bytes:
    """The body of a 200 response, at most ``max_bytes``; blocking, so run it in a thread."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
        body: bytes = response.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise OSError(f"JWKS larger than {max_bytes} bytes")
    return body


def _describe(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:200]
