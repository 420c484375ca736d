"""Finding an App by its ``MODULE:ATTRIBUTE`` name, for every command that takes one."""

from __future__ import annotations

import importlib
import os
import sys

from herald.app import App

__all__ = ["load_app"]


def load_app(target: str) -> App:
    """Import ``module:attribute`` (the working directory is importable) and return the App.

    Raises ``ValueError`` when ``target`` is not of that form or names something that is not
    a :class:`herald.App`, and ``ImportError`` when the module cannot be imported.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:APP (e.g. shop.service:app), got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise ValueError(f"{target!r} is {type(app).__name__}, not a herald.App")
    return app
