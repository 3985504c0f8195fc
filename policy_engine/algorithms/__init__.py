"""The pure algorithms: backoff, rate limits and circuit breakers.

Each is a function of ``(spec, state, now)`` returning a verdict and the new state, so the
memory store, the Redis store and the tests run exactly the same steps.
"""
