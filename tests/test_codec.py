"""Typed payloads: the annotation decides decoding; bad input is a clear, permanent error."""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict

import msgspec
import pydantic
import pytest

from herald import DecodeError, Message, Permanent, event_type
from herald.codec import decoder_for, encode, encode_many, type_name


class OrderPlaced(pydantic.BaseModel):
    order_id: str
    amount: float


class Shipped(msgspec.Struct):
    order_id: str


@dataclasses.dataclass
class Refunded:
    order_id: str
    cents: int


class Registered(TypedDict):
    user: str


@event_type("shop.Cancelled.v1")
class Cancelled(pydantic.BaseModel):
    order_id: str


def as_message(obj: Any, fmt: Any = "json") -> Message:
    payload, tname, ctype = encode(obj, fmt)
    return Message(id="x", topic="t", payload=payload, type=tname, headers={"content_type": ctype})


@pytest.mark.parametrize(
    ("obj", "cls"),
    [
        (OrderPlaced(order_id="o1", amount=9.5), OrderPlaced),
        (Shipped(order_id="o1"), Shipped),
        (Refunded(order_id="o1", cents=250), Refunded),
    ],
)
@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_event_classes_round_trip(obj: Any, cls: type, fmt: str) -> None:
    msg = as_message(obj, fmt)
    assert msg.type == cls.__name__
    assert decoder_for(cls)(msg) == obj


def test_typeddict_dict_str_bytes_and_message() -> None:
    msg = as_message({"user": "ana"})
    assert msg.type is None  # plain containers carry no type name
    assert decoder_for(Registered)(msg) == {"user": "ana"}
    assert decoder_for(dict)(msg) == {"user": "ana"}
    assert decoder_for(dict[str, Any])(msg) == {"user": "ana"}
    text = as_message("héllo ✓")
    assert decoder_for(str)(text) == "héllo ✓"
    raw = as_message(b"\x00\xff\x80")
    assert decoder_for(bytes)(raw) == b"\x00\xff\x80"
    assert decoder_for(Message)(raw) is raw


def test_union_dispatches_on_type_header() -> None:
    dec = decoder_for(OrderPlaced | Shipped)
    assert dec.accepts == {"OrderPlaced", "Shipped"}
    assert dec(as_message(Shipped(order_id="s"))) == Shipped(order_id="s")
    placed = OrderPlaced(order_id="o", amount=1)
    assert dec(as_message(placed)) == placed


def test_union_without_type_header_takes_first_member_that_fits() -> None:
    dec = decoder_for(Refunded | Shipped)
    msg = Message(id="x", topic="t", payload=b'{"order_id": "z"}')
    assert dec(msg) == Shipped(order_id="z")


def test_stable_type_name_override() -> None:
    assert type_name(Cancelled) == "shop.Cancelled.v1"
    assert as_message(Cancelled(order_id="c")).type == "shop.Cancelled.v1"
    assert decoder_for(Cancelled).accepts == {"shop.Cancelled.v1"}


@pytest.mark.parametrize(
    "payload",
    [b"", b"{not json", b'{"order_id": 5}', b'{"amount": 1}', bytes(range(256)), b"[1,2]"],
)
def test_bad_payloads_raise_decode_error_which_is_permanent(payload: bytes) -> None:
    msg = Message(id="x", topic="t", payload=payload, type="OrderPlaced")
    with pytest.raises(DecodeError) as info:
        decoder_for(OrderPlaced)(msg)
    assert isinstance(info.value, Permanent)
    assert "OrderPlaced" in str(info.value)


def test_invalid_utf8_for_str_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decoder_for(str)(Message(id="x", topic="t", payload=b"\xff\xfe"))


def test_undecodable_annotation_is_rejected_up_front() -> None:
    class Opaque:
        pass

    with pytest.raises(TypeError, match="cannot decode events annotated"):
        decoder_for(Opaque)


def test_unserialisable_object_is_a_clear_type_error() -> None:
    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"cannot serialise .*Opaque"):
        encode(Opaque())
    with pytest.raises(TypeError, match="cannot serialise"):
        encode_many([{"ok": 1}, {"bad": object()}])


def test_encode_many_matches_encode() -> None:
    objs = [Shipped(order_id="a"), OrderPlaced(order_id="b", amount=2), "t", b"b", {"k": 1}]
    assert encode_many(objs) == [encode(o) for o in objs]
