"""An incoming event's size and payload schema: the first checks, and the cheapest.

They need nothing but the event itself, so a malformed or oversized event is refused before
any condition is evaluated or any state is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fastjsonschema

from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.payload import INVALID_PAYLOAD, PAYLOAD_TOO_LARGE
from policy_engine.core.recorder import Recorder
from policy_engine.language.model import EventSpec


def check_payload(spec: EventSpec, event: Mapping[str, Any], recorder: Recorder) -> Decision | None:
    """The refusal of an event too large for its spec, or whose payload fails its schema."""
    name, max_bytes = spec.name, spec.max_bytes
    size = event["size_bytes"]
    if max_bytes is not None and size > max_bytes:
        if recorder.enabled:
            detail = {"size_bytes": size, "max_bytes": max_bytes}
            recorder.note("events", name, True, "reject", detail)
        payload = PAYLOAD_TOO_LARGE.payload(f"events/{name}", max_bytes=max_bytes)
        return Decision(Outcome.REJECT, f"events/{name}", payload)
    validate = spec.validate
    if validate is not None:
        try:
            validate(event["payload"])
        except fastjsonschema.JsonSchemaValueException as exc:
            if recorder.enabled:
                recorder.note("events", name, True, "reject", {"schema": exc.message})
            payload = INVALID_PAYLOAD.payload(f"events/{name}", detail=exc.message)
            return Decision(Outcome.REJECT, f"events/{name}", payload)
    if recorder.enabled:
        recorder.note("events", name, False, "allow", {"size_bytes": size})
    return None
