"""The flagship demo: an international shop whose five services talk only through events.

Run it with ``herald demo`` or ``python -m herald.demo``. Read it top-down:

- :mod:`herald.demo.events`: the typed events (pydantic models, msgspec Structs, dataclasses);
- :mod:`herald.demo.catalog`: the shoppers, the catalogue and the seeded orders;
- :mod:`herald.demo.services`: the five services, each a consumer group;
- :mod:`herald.demo.translations`: what customers are told, in their language;
- :mod:`herald.demo.timeline`: the live view;
- :mod:`herald.demo.summary`: the result and its tables;
- :mod:`herald.demo.run`: putting it together.
"""

from herald.demo.run import play, run_demo
from herald.demo.summary import DemoResult

__all__ = ["DemoResult", "play", "run_demo"]
