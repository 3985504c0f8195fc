"""A small conversation app to run the engine against: ``policy-engine serve`` without an app.

It has the shape of the reference application: a client connects with a
``conversation_id`` (query string or ``auth``) and joins that conversation's room; each
``oh_user_action`` it sends comes back to everyone in the conversation as an ``oh_event``
with an increasing integer ``id``. It knows nothing of the policy engine but the one
parser it shares with it (:func:`~policy_engine.adapter.identity.handshake_value`), so both
read the same conversation from a handshake: rate limits, shedding, breakers and replay
after a reconnect (from ``latest_event_id``) are the adapter's work, which is the point.
"""

from __future__ import annotations

from typing import Any

import socketio

from policy_engine.adapter.identity import handshake_value

CONVERSATION_PARAM = "conversation_id"
REFUSAL_MESSAGE = "Connect with a conversation_id."


def create_server(**options: Any) -> socketio.AsyncServer:
    """A fresh demo server; ``options`` go to :class:`socketio.AsyncServer`."""
    sio = socketio.AsyncServer(async_mode="asgi", **options)
    last_ids: dict[str, int] = {}

    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        conversation_id = conversation_of(environ, auth)
        if not conversation_id:
            raise socketio.exceptions.ConnectionRefusedError(
                REFUSAL_MESSAGE, {"reason": "conversation_required"}
            )
        await sio.save_session(sid, {CONVERSATION_PARAM: conversation_id})
        await sio.enter_room(sid, conversation_id)

    async def oh_user_action(sid: str, data: Any) -> dict[str, Any]:
        session = await sio.get_session(sid)
        conversation_id = session[CONVERSATION_PARAM]
        event_id = last_ids.get(conversation_id, -1) + 1
        last_ids[conversation_id] = event_id
        event = {
            "id": event_id,
            "source": "user",
            "conversation_id": conversation_id,
            "action": data,
        }
        await sio.emit("oh_event", event, room=conversation_id)
        return {"ok": True, "id": event_id}

    sio.on("connect", connect)
    sio.on("oh_user_action", oh_user_action)
    return sio


def conversation_of(environ: dict[str, Any], auth: Any) -> str:
    """The conversation a client asked for, read exactly as the policy engine reads it."""
    return handshake_value(environ, auth, CONVERSATION_PARAM)


sio = create_server()
"""For ``policy-engine serve policy_engine.server.demo:sio``; ``serve`` alone builds its own."""
