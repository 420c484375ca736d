"""The events of the order flow, in the three styles Herald decodes.

The flow, one topic per service that publishes::

    orders         OrderPlaced                       pydantic model: validated at the edge
    inventory      StockReserved | OutOfStock        msgspec Structs: fast, compact
    payments       PaymentCaptured | PaymentFailed   dataclasses: plain standard library
    shipping       ShipmentPrepared                  pydantic model
    notifications  CustomerNotified                  msgspec Struct

Each event carries what the next service needs (event-carried state transfer): no service
reads another one's data. Money is a ``Decimal`` in the order's currency; on the wire it is a
string, so no float ever rounds a price.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

import msgspec
import pydantic

__all__ = [
    "Customer",
    "CustomerNotified",
    "LineItem",
    "OrderPlaced",
    "OutOfStock",
    "Outcome",
    "PaymentCaptured",
    "PaymentFailed",
    "ShipmentPrepared",
    "StockReserved",
]

Outcome = Literal["shipped", "out_of_stock", "payment_declined"]


# --- shared value types: dataclasses nest in pydantic models and msgspec Structs alike -----------


@dataclass(frozen=True, slots=True)
class Customer:
    name: str
    email: str
    country: str  # ISO 3166 alpha-2
    language: str  # ISO 639-1: en, de, fr, es, ja, pt


@dataclass(frozen=True, slots=True)
class LineItem:
    sku: str
    quantity: int
    unit_price: Decimal


# --- orders --------------------------------------------------------------------------------------


class OrderPlaced(pydantic.BaseModel):
    """A customer checked out. The entry point, so pydantic validates it strictly."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    order_id: str = pydantic.Field(pattern=r"^ORD-\d{4,}$")
    customer: Customer
    items: list[LineItem] = pydantic.Field(min_length=1)
    currency: str = pydantic.Field(pattern=r"^[A-Z]{3}$")
    total: Decimal = pydantic.Field(gt=0)
    payment_token: str
    express: bool = False

    @pydantic.model_validator(mode="after")
    def _total_matches_items(self) -> OrderPlaced:
        if sum(i.unit_price * i.quantity for i in self.items) != self.total:
            raise ValueError("total is not the sum of the line items")
        return self


# --- inventory -----------------------------------------------------------------------------------


class StockReserved(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    customer: Customer
    units: int
    amount: Decimal
    currency: str
    payment_token: str
    express: bool


class OutOfStock(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    customer: Customer
    sku: str
    product: str
    requested: int
    available: int


# --- payments ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaymentCaptured:
    order_id: str
    customer: Customer
    amount: Decimal
    currency: str
    express: bool


@dataclass(frozen=True, slots=True)
class PaymentFailed:
    order_id: str
    customer: Customer
    amount: Decimal
    currency: str
    reason: str


# --- shipping ------------------------------------------------------------------------------------


class ShipmentPrepared(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)

    order_id: str
    customer: Customer
    carrier: str
    service: Literal["express", "standard"]
    tracking_number: str
    eta_days: int = pydantic.Field(ge=1)


# --- notifications -------------------------------------------------------------------------------


class CustomerNotified(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    email: str
    language: str
    outcome: Outcome
    text: str
