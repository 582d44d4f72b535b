"""Webhooks between protobuf and domain values (the servicer's translation of the webhook RPCs)."""

from __future__ import annotations

from collections.abc import Iterable

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.server.convert import ts_from_ms
from aqimodels.server.events import EventType
from aqimodels.server.webhooks import DELIVERED, EVENT, FAILED, REDELIVERY, RETRYING, TEST, Delivery, Webhook

_PREFIX = "REGISTRY_EVENT_TYPE_"
_OUTCOMES = {DELIVERED: pb.WEBHOOK_DELIVERY_OUTCOME_DELIVERED, RETRYING: pb.WEBHOOK_DELIVERY_OUTCOME_RETRYING,
             FAILED: pb.WEBHOOK_DELIVERY_OUTCOME_FAILED}
_KINDS = {EVENT: pb.WEBHOOK_DELIVERY_KIND_EVENT, TEST: pb.WEBHOOK_DELIVERY_KIND_TEST,
          REDELIVERY: pb.WEBHOOK_DELIVERY_KIND_REDELIVERY}


def event_types_from_proto(values: Iterable[int], field: str = "event_types") -> list[EventType]:
    """RegistryEventType numbers as event types; UNSPECIFIED or an unknown number is INVALID_ARGUMENT."""
    out = []
    for value in values:
        name = pb.RegistryEventType.Name(value) if value in pb.RegistryEventType.values() else ""  # type: ignore[arg-type]
        if not name.startswith(_PREFIX) or name == _PREFIX + "UNSPECIFIED":
            raise InvalidArgumentError(f"{field} holds {value}, which is not an event type", field=field)
        out.append(EventType(name.removeprefix(_PREFIX)))
    return out


def webhook_to_proto(hook: Webhook) -> pb.Webhook:
    return pb.Webhook(id=hook.id, url=hook.url,
                      event_types=[pb.RegistryEventType.Value(_PREFIX + t.value) for t in hook.event_types],
                      model_name=hook.model_name, create_time=ts_from_ms(hook.create_ms), created_by=hook.created_by,
                      delivered_sequence=hook.cursor, owner=hook.lease_owner)


def delivery_to_proto(d: Delivery) -> pb.WebhookDelivery:
    return pb.WebhookDelivery(id=d.id, webhook_id=d.webhook_id, event_sequence=d.event_sequence, attempt=d.attempt,
                              status_code=d.status_code, latency_ms=d.latency_ms, error=d.error,
                              time=ts_from_ms(d.time_ms), outcome=_OUTCOMES.get(d.outcome, 0),  # type: ignore[arg-type]
                              kind=_KINDS.get(d.kind, 0))  # type: ignore[arg-type]
