"""Faust codecs for crmsync's events, so Faust topics can carry them as `value_serializer`."""

from __future__ import annotations

from typing import Any

from faust.serializers import codecs
from faust.types.codecs import CodecT

from .codec import CHANGE_EVENT, EMAIL_EVENT, EventSchema

CHANGE_EVENT_CODEC = "crmsync-change-event"
EMAIL_EVENT_CODEC = "crmsync-email-event"


class AvroEventCodec(codecs.Codec):
    """Avro single-object encoding of one event type; decode errors stay typed (DecodeError)."""

    def __init__(self, schema: EventSchema, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schema = schema

    def clone(self, *children: CodecT) -> AvroEventCodec:
        return type(self)(self.schema, children=self.children + children, **self.kwargs)

    def _dumps(self, obj: Any) -> bytes:
        return self.schema.encode(obj, validate=False)

    def _loads(self, s: bytes) -> Any:
        return self.schema.decode(s)


def register() -> None:
    """Makes the codecs known to Faust by name; idempotent."""
    codecs.register(CHANGE_EVENT_CODEC, AvroEventCodec(CHANGE_EVENT))
    codecs.register(EMAIL_EVENT_CODEC, AvroEventCodec(EMAIL_EVENT))
