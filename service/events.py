"""``POST /events``: parse a batch of feedback events into the stores' ``Event``s."""

from __future__ import annotations

from pydantic import ValidationError

from service.errors import ValidationFailed, describe_validation_errors
from service.schemas import EVENTS_ERROR_HINTS, EventsRequest
from service.store import Event
from service.store.tables import entity_id


def parse_events_request(body: bytes, max_events: int) -> EventsRequest:
    """JSON bytes -> EventsRequest; 422 with a clear message (at most ``max_events`` events)."""
    try:
        req = EventsRequest.model_validate_json(body)
    except ValidationError as e:
        message, details = describe_validation_errors(
            e.errors(include_input=False, include_url=False), hints=EVENTS_ERROR_HINTS
        )
        raise ValidationFailed(message, details=details) from None
    if len(req.events) > max_events:
        raise ValidationFailed(f"events: too many ({len(req.events)}); at most {max_events} per request")
    return req


def to_events(req: EventsRequest) -> list[Event]:
    return [
        Event(
            event_id=entity_id(e.event_id),
            user_id=entity_id(e.user_id),
            video_id=entity_id(e.video_id),
            timestamp=float(e.timestamp),
            labels={k: float(v) for k, v in e.labels.items()},
            features=dict(e.features),
        )
        for e in req.events
    ]
