"""The live status page, ``/dashboard``: what ``/status`` says, drawn for a person.

One self-contained HTML file (``dashboard.html`` beside this module: its styles and script
inline, nothing fetched from elsewhere, no build step) that polls ``status`` (and
``metrics``, for the most refused keys) relative to its own address, so it works wherever
the operations endpoints are served, behind a path prefix too. History (the load
sparklines, breaker transitions, reloads seen) is kept in the page, not the server: the
server stays stateless about who watches it, and a second viewer costs it one more poll.

The page is an operations endpoint like ``/status`` (same listener, same bearer token),
since it shows exactly what ``/status`` shows.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

RESOURCE = "dashboard.html"
CONTENT_TYPE = b"text/html; charset=utf-8"


@cache
def html() -> bytes:
    """The page, read once from the package."""
    return files(__package__).joinpath(RESOURCE).read_bytes()


async def page() -> tuple[int, bytes, bytes]:
    """The ``/dashboard`` route: status, content type and body, as the other routes answer."""
    return 200, CONTENT_TYPE, html()
