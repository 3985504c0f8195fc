"""Where a node of a policy file is: its JSON pointer and its (line, column) position.

Every diagnostic carries both: the pointer names the node whatever the file's layout, the
position is what editors and CI annotations show.
"""

from __future__ import annotations

from collections.abc import Iterable

Position = tuple[int, int]
"""1-based line and column; (0, 0) when unknown."""


def escape_pointer_token(token: str) -> str:
    """RFC 6901: ``~`` and ``/`` inside a key must not read as pointer syntax."""
    return token.replace("~", "~0").replace("/", "~1")


def build_pointer(path: Iterable[str | int]) -> str:
    """The JSON pointer of a path such as jsonschema's ``error.absolute_path``."""
    return "".join(f"/{escape_pointer_token(str(part))}" for part in path)
