"""The demo's world: shoppers in eight countries, a small catalogue, and seeded orders.

Everything here is deterministic for a given seed, so one seed always tells the same story:
the same orders, the same sold-out limited editions, the same declined cards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from decimal import Decimal

from herald.demo.events import Customer, LineItem, OrderPlaced

__all__ = ["COUNTRIES", "PRODUCTS", "Country", "Product", "generate_orders", "initial_stock"]


@dataclass(frozen=True, slots=True)
class Country:
    code: str
    language: str
    currency: str
    domain: str
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Product:
    sku: str
    name: str
    price_eur: Decimal
    stock: int
    popularity: int  # relative weight when shoppers pick items


COUNTRIES: tuple[Country, ...] = (
    Country("DE", "de", "EUR", "de", ("Anna Schmidt", "Lukas Müller", "Jürgen Weiß")),
    Country("FR", "fr", "EUR", "fr", ("Camille Dubois", "Léa Martin", "Hugo Lefèvre")),
    Country("ES", "es", "EUR", "es", ("Lucía García", "Mateo Fernández")),
    Country("PT", "pt", "EUR", "pt", ("Inês Costa", "Tiago Ferreira")),
    Country("BR", "pt", "BRL", "com.br", ("João Silva", "Ana Souza", "Luíza Oliveira")),
    Country("US", "en", "USD", "com", ("Emily Johnson", "Michael Brown", "Sofia Rivera")),
    Country("GB", "en", "GBP", "co.uk", ("Oliver Smith", "Amelia Jones")),
    Country("JP", "ja", "JPY", "jp", ("佐藤 花子", "鈴木 一郎", "高橋 結衣")),
)

PRODUCTS: tuple[Product, ...] = (
    Product("HRL-TEE", "Herald T-shirt", Decimal("24.90"), 10_000, 30),
    Product("HRL-MUG", "Herald mug", Decimal("12.50"), 10_000, 30),
    Product("HRL-HOODIE", "Herald hoodie", Decimal("59.00"), 10_000, 15),
    Product("HRL-KEYBOARD", "Mechanical keyboard", Decimal("149.00"), 10_000, 8),
    Product("HRL-POSTER-LE", "Limited edition poster", Decimal("39.00"), 5, 5),
    Product("HRL-WATCH-LE", "Limited edition watch", Decimal("349.00"), 3, 3),
)

#: demo exchange rates from EUR, and how many decimals each currency has
_FX: dict[str, tuple[Decimal, int]] = {
    "EUR": (Decimal("1"), 2),
    "USD": (Decimal("1.08"), 2),
    "GBP": (Decimal("0.85"), 2),
    "BRL": (Decimal("5.40"), 2),
    "JPY": (Decimal("162"), 0),
}

#: payment methods shoppers use, with weights; the Payments service decides which decline
_TOKENS: tuple[tuple[str, int], ...] = (
    ("tok_visa", 50),
    ("tok_mastercard", 30),
    ("tok_amex", 12),
    ("tok_visa_insufficient_funds", 5),
    ("tok_mastercard_expired", 3),
)


def initial_stock() -> dict[str, int]:
    """Units on the shelf per SKU when the shop opens; a fresh dict each call."""
    return {p.sku: p.stock for p in PRODUCTS}


def product_name(sku: str) -> str:
    return next(p.name for p in PRODUCTS if p.sku == sku)


def price_in(price_eur: Decimal, currency: str) -> Decimal:
    rate, decimals = _FX[currency]
    return (price_eur * rate).quantize(Decimal(1).scaleb(-decimals))


def generate_orders(count: int, seed: int) -> list[OrderPlaced]:
    """``count`` orders from shoppers around the world, the same ones for the same seed."""
    rng = random.Random(seed)
    tokens, token_weights = zip(*_TOKENS, strict=True)
    weights = [p.popularity for p in PRODUCTS]
    orders = []
    for n in range(1, count + 1):
        country = rng.choice(COUNTRIES)
        name = rng.choice(country.names)
        customer = Customer(
            name=name,
            email=f"customer{n:04d}@example.{country.domain}",
            country=country.code,
            language=country.language,
        )
        picked = {p.sku: p for p in rng.choices(PRODUCTS, weights, k=rng.randint(1, 3))}
        items = [
            LineItem(sku, rng.choice((1, 1, 1, 2, 3)), price_in(p.price_eur, country.currency))
            for sku, p in picked.items()
        ]
        orders.append(
            OrderPlaced(
                order_id=f"ORD-{n:04d}",
                customer=customer,
                items=items,
                currency=country.currency,
                total=sum((i.unit_price * i.quantity for i in items), Decimal(0)),
                payment_token=rng.choices(tokens, token_weights)[0],
                express=rng.random() < 0.2,
            )
        )
    return orders
