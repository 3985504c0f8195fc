"""An incoming event's size and payload schema.

The size needs nothing but a number the transport measured, so it is the first check of
all. The schema walks the whole payload, so it comes after the rate limits: a client over
its limit is refused before it costs a validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fastjsonschema

from policy_engine.core.decision import Decision, Outcome
from policy_engine.core.payload import INVALID_PAYLOAD, PAYLOAD_TOO_LARGE
from policy_engine.core.recorder import Recorder
from policy_engine.language.model import EventSpec


def check_size(spec: EventSpec, event: Mapping[str, Any], recorder: Recorder) -> Decision | None:
    """The refusal of an event larger than its spec allows."""
    max_bytes = spec.max_bytes
    size = event["size_bytes"]
    if max_bytes is None or size <= max_bytes:
        return None
    name = spec.name
    if recorder.enabled:
        detail = {"size_bytes": size, "max_bytes": max_bytes}
        recorder.note("events", name, True, "reject", detail)
    payload = PAYLOAD_TOO_LARGE.payload(f"events/{name}", max_bytes=max_bytes)
    return Decision(Outcome.REJECT, f"events/{name}", payload)


def check_schema(spec: EventSpec, event: Mapping[str, Any], recorder: Recorder) -> Decision | None:
    """The refusal of an event whose payload fails its spec's schema."""
    name, validate = spec.name, spec.validate
    if validate is not None:
        try:
            validate(event["payload"])
        except fastjsonschema.JsonSchemaValueException as exc:
            if recorder.enabled:
                recorder.note("events", name, True, "reject", {"schema": exc.message})
            payload = INVALID_PAYLOAD.payload(f"events/{name}", detail=exc.message)
            return Decision(Outcome.REJECT, f"events/{name}", payload)
    if recorder.enabled:
        recorder.note("events", name, False, "allow", {"size_bytes": event["size_bytes"]})
    return None
