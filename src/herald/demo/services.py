"""The five services of the shop: each is a consumer group reacting to the others' events.

::

    shop ── OrderPlaced ──▶ orders
    orders        ─▶ Inventory      ─▶ inventory:  StockReserved | OutOfStock
    inventory     ─▶ Payments       ─▶ payments:   PaymentCaptured | PaymentFailed
    payments      ─▶ Shipping       ─▶ shipping:   ShipmentPrepared   (express orders by filter=)
    inventory, payments, shipping
                  ─▶ Notifications  ─▶ notifications: CustomerNotified (in the customer's language)
    notifications ─▶ Orders         closes the order

Every group gets every message of its topic and handles the event types its handlers are
annotated with (a group ignores the others: Payments never sees an ``OutOfStock``). Handlers
publish with ``ctx.publish``, so every event of an order carries the correlation id of its
``OrderPlaced``, and with the order id as key, so one order's events stay in order.

Each service keeps its own state (stock, ledger, outbox, order book) in a small class created
per run. Delivery is at-least-once, so the services that change state remember what they
decided per order: a redelivered event gets the same answer instead of a second reservation.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal

import anyio

from herald import App, Context, Message
from herald.demo.catalog import initial_stock, price_in, product_name
from herald.demo.events import (
    CustomerNotified,
    OrderPlaced,
    Outcome,
    OutOfStock,
    PaymentCaptured,
    PaymentFailed,
    ShipmentPrepared,
    StockReserved,
)
from herald.demo.timeline import Timeline
from herald.demo.translations import render
from herald.message import CORRELATION_ID

__all__ = ["GROUPS", "Shop", "build_app", "checkout", "money"]

GROUPS = ("inventory", "payments", "shipping", "notifications", "orders")

#: the routing header Payments sets on PaymentCaptured; Shipping routes on it without decoding
SHIPPING = "shipping"

CARD_LIMIT_EUR = Decimal(1000)
EU = frozenset({"DE", "FR", "ES", "PT"})
NATIONAL_CARRIERS = {
    "DE": "DHL",
    "FR": "Colissimo",
    "ES": "Correos",
    "PT": "CTT",
    "BR": "Correios",
    "US": "USPS",
    "GB": "Royal Mail",
    "JP": "Japan Post",
}


def money(amount: Decimal, currency: str) -> str:
    return f"{amount:,} {currency}"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# --- the services' own state ---------------------------------------------------------------------


@dataclass
class Inventory:
    stock: dict[str, int] = field(default_factory=initial_stock)
    decided: dict[str, StockReserved | OutOfStock] = field(default_factory=dict)

    def reserve(self, order: OrderPlaced) -> StockReserved | OutOfStock:
        if order.order_id in self.decided:  # a redelivery: same answer, no second reservation
            return self.decided[order.order_id]
        result: StockReserved | OutOfStock
        short = [i for i in order.items if self.stock[i.sku] < i.quantity]
        if short:
            item = short[0]
            result = OutOfStock(
                order_id=order.order_id,
                customer=order.customer,
                sku=item.sku,
                product=product_name(item.sku),
                requested=item.quantity,
                available=self.stock[item.sku],
            )
        else:
            for i in order.items:
                self.stock[i.sku] -= i.quantity
            result = StockReserved(
                order_id=order.order_id,
                customer=order.customer,
                units=sum(i.quantity for i in order.items),
                amount=order.total,
                currency=order.currency,
                payment_token=order.payment_token,
                express=order.express,
            )
        self.decided[order.order_id] = result
        return result


@dataclass
class Payments:
    revenue: dict[str, Decimal] = field(default_factory=dict)
    decided: dict[str, PaymentCaptured | PaymentFailed] = field(default_factory=dict)

    def charge(self, r: StockReserved) -> PaymentCaptured | PaymentFailed:
        if r.order_id in self.decided:  # a redelivery: never charge twice
            return self.decided[r.order_id]
        result: PaymentCaptured | PaymentFailed
        reason = self.decline_reason(r)
        if reason:
            result = PaymentFailed(r.order_id, r.customer, r.amount, r.currency, reason)
        else:
            self.revenue[r.currency] = self.revenue.get(r.currency, Decimal(0)) + r.amount
            result = PaymentCaptured(r.order_id, r.customer, r.amount, r.currency, r.express)
        self.decided[r.order_id] = result
        return result

    @staticmethod
    def decline_reason(r: StockReserved) -> str | None:
        """The card network's answer, simulated: some test cards fail, big amounts too."""
        if r.payment_token.endswith("_insufficient_funds"):
            return "insufficient funds"
        if r.payment_token.endswith("_expired"):
            return "card expired"
        if r.amount > price_in(CARD_LIMIT_EUR, r.currency):
            return "over the card limit"
        return None


@dataclass
class Shipping:
    prepared: dict[str, ShipmentPrepared] = field(default_factory=dict)

    def prepare(self, paid: PaymentCaptured, express: bool) -> ShipmentPrepared:
        if paid.order_id in self.prepared:  # a redelivery: one parcel per order
            return self.prepared[paid.order_id]
        country = paid.customer.country
        carrier = "DHL Express" if express else NATIONAL_CARRIERS.get(country, "DHL")
        eta = (1 if country in EU else 2) if express else (3 if country in EU else 7)
        shipment = self.prepared[paid.order_id] = ShipmentPrepared(
            order_id=paid.order_id,
            customer=paid.customer,
            carrier=carrier,
            service="express" if express else "standard",
            tracking_number=f"{'EX' if express else 'ST'}{paid.order_id[4:]}{country}",
            eta_days=eta,
        )
        return shipment

    @property
    def by_service(self) -> Counter[str]:
        return Counter(s.service for s in self.prepared.values())


@dataclass
class Notifications:
    sent: dict[str, CustomerNotified] = field(default_factory=dict)  # by order id

    def send(self, notification: CustomerNotified) -> None:
        self.sent[notification.order_id] = notification  # a redelivery overwrites, not adds

    @property
    def by_language(self) -> Counter[str]:
        return Counter(n.language for n in self.sent.values())


@dataclass
class OrderBook:
    """The Orders service: which orders are open, and how each closed one ended."""

    expected: frozenset[str]  # the order ids customers will place
    placed: dict[str, str] = field(default_factory=dict)  # order id -> correlation id
    closed: dict[str, Outcome] = field(default_factory=dict)
    all_closed: anyio.Event = field(default_factory=anyio.Event)

    def close(self, order_id: str, outcome: Outcome) -> None:
        self.closed[order_id] = outcome
        if self.expected <= self.closed.keys():
            self.all_closed.set()

    @property
    def open_orders(self) -> list[str]:
        return sorted(self.expected - self.closed.keys())


@dataclass
class Shop:
    """The state of all five services for one run of the demo."""

    orders: OrderBook
    inventory: Inventory = field(default_factory=Inventory)
    payments: Payments = field(default_factory=Payments)
    shipping: Shipping = field(default_factory=Shipping)
    notifications: Notifications = field(default_factory=Notifications)


# --- wiring the handlers -------------------------------------------------------------------------


def build_app(broker: str, shop: Shop, timeline: Timeline) -> App:
    """An App running the five services of ``shop`` on ``broker``."""
    app = App("shop", broker=broker)
    _inventory(app, shop.inventory, timeline)
    _payments(app, shop.payments, timeline)
    _shipping(app, shop.shipping, timeline)
    _notifications(app, shop.notifications, timeline)
    _orders(app, shop.orders, timeline)
    return app


def _inventory(app: App, inventory: Inventory, timeline: Timeline) -> None:
    @app.subscriber("orders", group="inventory")
    async def reserve_stock(order: OrderPlaced, ctx: Context) -> None:
        result = inventory.reserve(order)
        if isinstance(result, StockReserved):
            detail = f"{plural(result.units, 'unit')} held"
            timeline.record(ctx.correlation_id, "inventory", result, detail)
        else:
            detail = f"{result.product}: {result.requested} wanted, {result.available} left"
            timeline.record(ctx.correlation_id, "inventory", result, detail, bad=True)
        await ctx.publish("inventory", result, key=order.order_id)


def _payments(app: App, payments: Payments, timeline: Timeline) -> None:
    @app.subscriber("inventory", group="payments")
    async def charge_card(reserved: StockReserved, ctx: Context) -> None:
        result = payments.charge(reserved)
        amount = money(result.amount, result.currency)
        if isinstance(result, PaymentCaptured):
            # routing metadata goes in a header, so Shipping can route without decoding
            speed = "express" if result.express else "standard"
            timeline.record(ctx.correlation_id, "payments", result, f"{amount} captured")
            await ctx.publish("payments", result, key=result.order_id, headers={SHIPPING: speed})
        else:
            detail = f"{amount} declined: {result.reason}"
            timeline.record(ctx.correlation_id, "payments", result, detail, bad=True)
            await ctx.publish("payments", result, key=result.order_id)


def is_express(message: Message) -> bool:
    return message.headers.get(SHIPPING) == "express"


def _shipping(app: App, shipping: Shipping, timeline: Timeline) -> None:
    # Two handlers share the group: the first whose type and filter match gets the message.
    @app.subscriber("payments", group="shipping", filter=is_express)
    async def ship_express(paid: PaymentCaptured, ctx: Context) -> None:
        await _ship(shipping.prepare(paid, express=True), ctx)

    @app.subscriber("payments", group="shipping")
    async def ship_standard(paid: PaymentCaptured, ctx: Context) -> None:
        await _ship(shipping.prepare(paid, express=False), ctx)

    async def _ship(shipment: ShipmentPrepared, ctx: Context) -> None:
        detail = (
            f"{shipment.carrier} ({shipment.service}), {plural(shipment.eta_days, 'day')}, "
            f"tracking {shipment.tracking_number}"
        )
        timeline.record(ctx.correlation_id, "shipping", shipment, detail)
        await ctx.publish("shipping", shipment, key=shipment.order_id)


def _notifications(app: App, notifications: Notifications, timeline: Timeline) -> None:
    # One handler on three topics; the union annotation dispatches on the event type.
    @app.subscriber("inventory", group="notifications")
    @app.subscriber("payments", group="notifications")
    @app.subscriber("shipping", group="notifications")
    async def notify_customer(
        event: OutOfStock | PaymentFailed | ShipmentPrepared, ctx: Context
    ) -> None:
        customer = event.customer
        outcome: Outcome
        match event:
            case ShipmentPrepared():
                outcome = "shipped"
                fields = {"carrier": event.carrier, "tracking": event.tracking_number}
            case OutOfStock():
                outcome = "out_of_stock"
                fields = {"product": event.product}
            case PaymentFailed():
                outcome = "payment_declined"
                fields = {"amount": money(event.amount, event.currency)}
        text = render(
            customer.language, outcome, name=customer.name, order=event.order_id, **fields
        )
        sent = CustomerNotified(
            order_id=event.order_id,
            email=customer.email,
            language=customer.language,
            outcome=outcome,
            text=text,
        )
        notifications.send(sent)
        timeline.record(ctx.correlation_id, "notifications", sent, f"[{sent.language}] {text}")
        await ctx.publish("notifications", sent, key=sent.order_id)


async def checkout(app: App, shop: Shop, timeline: Timeline, order: OrderPlaced) -> None:
    """The shop front: a customer checks out, and the Orders service places the order.

    The web request's id becomes the correlation id; every event that follows from this order,
    in every service, carries it.
    """
    request_id = f"req-{uuid.uuid4().hex}"
    c = order.customer
    units = sum(i.quantity for i in order.items)
    detail = (
        f"{order.order_id} by {c.name} ({c.country}), {units} units, "
        f"{money(order.total, order.currency)}"
    )
    timeline.record(request_id, "orders", order, detail + (", express" if order.express else ""))
    shop.orders.placed[order.order_id] = request_id
    await app.publish("orders", order, key=order.order_id, headers={CORRELATION_ID: request_id})


def _orders(app: App, book: OrderBook, timeline: Timeline) -> None:
    @app.subscriber("notifications", group="orders")
    async def close_order(notified: CustomerNotified, ctx: Context) -> None:
        book.close(notified.order_id, notified.outcome)
        timeline.order_closed(ctx.correlation_id, notified.order_id, notified.outcome)
