"""What the Notifications service tells customers, in their own language."""

from __future__ import annotations

from herald.demo.events import Outcome

__all__ = ["LANGUAGES", "render"]

_TEMPLATES: dict[str, dict[Outcome, str]] = {
    "en": {
        "shipped": "Hi {name}, your order {order} is on its way with {carrier} "
        "(tracking {tracking}).",
        "out_of_stock": "Sorry {name}, {product} is sold out. Order {order} was cancelled "
        "and you have not been charged.",
        "payment_declined": "{name}, your payment of {amount} for order {order} was declined. "
        "Please try another card.",
    },
    "de": {
        "shipped": "Hallo {name}, deine Bestellung {order} ist mit {carrier} unterwegs "
        "(Sendungsnummer {tracking}).",
        "out_of_stock": "Leider ist {product} ausverkauft, {name}. Bestellung {order} wurde "
        "storniert, es wurde nichts abgebucht.",
        "payment_declined": "{name}, deine Zahlung über {amount} für Bestellung {order} wurde "
        "abgelehnt. Bitte versuche eine andere Karte.",
    },
    "fr": {
        "shipped": "Bonjour {name}, votre commande {order} est en route avec {carrier} "
        "(suivi {tracking}).",
        "out_of_stock": "Désolé {name}, {product} est épuisé. La commande {order} est annulée "
        "et vous n'avez pas été débité.",
        "payment_declined": "{name}, votre paiement de {amount} pour la commande {order} a été "
        "refusé. Merci d'essayer une autre carte.",
    },
    "es": {
        "shipped": "Hola {name}, tu pedido {order} está en camino con {carrier} "
        "(seguimiento {tracking}).",
        "out_of_stock": "Lo sentimos {name}, {product} está agotado. El pedido {order} se ha "
        "cancelado y no se te ha cobrado.",
        "payment_declined": "{name}, tu pago de {amount} del pedido {order} fue rechazado. "
        "Prueba con otra tarjeta.",
    },
    "pt": {
        "shipped": "Olá {name}, a sua encomenda {order} está a caminho com {carrier} "
        "(rastreio {tracking}).",
        "out_of_stock": "Lamentamos, {name}: {product} esgotou. A encomenda {order} foi "
        "cancelada e não foi cobrado.",
        "payment_declined": "{name}, o pagamento de {amount} da encomenda {order} foi recusado. "
        "Tente outro cartão.",
    },
    "ja": {
        "shipped": "{name}様、ご注文 {order} は{carrier}で発送されました（追跡番号 {tracking}）。",
        "out_of_stock": "{name}様、申し訳ございません。{product}は売り切れのため、"
        "ご注文 {order} はキャンセルされました。請求はありません。",
        "payment_declined": "{name}様、ご注文 {order} のお支払い（{amount}）は承認されません"
        "でした。別のカードをお試しください。",
    },
}

LANGUAGES: tuple[str, ...] = tuple(_TEMPLATES)


def render(language: str, outcome: Outcome, **fields: str) -> str:
    """The message for ``outcome`` in ``language`` (English when we do not speak it)."""
    templates = _TEMPLATES.get(language, _TEMPLATES["en"])
    return templates[outcome].format(**fields)
