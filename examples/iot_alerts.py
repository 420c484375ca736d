"""IoT alerts: sensor readings in, high-temperature alerts out, the critical ones paged.

Sensors in three zones publish readings to ``readings`` (key: the sensor id, so each sensor's
readings stay in order). The ``monitor`` group compares each reading with its zone's threshold
and publishes an ``Alert`` to ``alerts`` when it is too hot, with the severity in a header.
Two groups consume the alerts: ``dashboard`` shows every one, while ``pager`` uses
``filter=`` to wake someone only for critical alerts, without even decoding the others.

Run it as a script: it simulates 120 readings, waits until every alert is shown, and exits::

    python examples/iot_alerts.py                  # in-process bus (memory://)
    HERALD_BROKER=sqlite:///iot.db python examples/iot_alerts.py

or as a long-running worker on a broker other processes reach, fed from another terminal::

    HERALD_BROKER=sqlite:///iot.db herald run examples.iot_alerts:app
    herald publish --broker sqlite:///iot.db --type Reading --key srv-1 readings \
        '{"sensor_id": "srv-1", "zone": "server-room", "celsius": 41.5}'
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass

import anyio
import msgspec

from herald import App, Context, Message


class Reading(msgspec.Struct, frozen=True):
    sensor_id: str
    zone: str
    celsius: float


@dataclass(frozen=True)
class Alert:
    sensor_id: str
    zone: str
    celsius: float
    threshold: float
    severity: str  # "warning" or "critical"


THRESHOLDS = {"server-room": 30.0, "greenhouse": 38.0, "freezer": -15.0}
CRITICAL_MARGIN = 5.0  # degrees over the threshold that make an alert critical

# read at import, so `herald run examples.iot_alerts:app` builds the same app
BROKER = os.environ.get("HERALD_BROKER", "memory://")
app = App("iot", broker=BROKER)
counts: Counter[str] = Counter()  # checked, warning, critical, shown, paged


@app.subscriber("readings", group="monitor")
async def check_temperature(reading: Reading, ctx: Context) -> None:
    counts["checked"] += 1
    threshold = THRESHOLDS[reading.zone]
    if reading.celsius <= threshold:
        return
    over = reading.celsius - threshold
    severity = "critical" if over >= CRITICAL_MARGIN else "warning"
    alert = Alert(reading.sensor_id, reading.zone, reading.celsius, threshold, severity)
    await ctx.publish("alerts", alert, key=reading.sensor_id, headers={"severity": severity})
    counts[severity] += 1


@app.subscriber("alerts", group="dashboard")
async def show_alert(alert: Alert) -> None:
    counts["shown"] += 1
    print(
        f"ALERT [{alert.severity:>8}] {alert.zone}/{alert.sensor_id}: "
        f"{alert.celsius:.1f} °C (threshold {alert.threshold:.1f} °C)"
    )


def is_critical(message: Message) -> bool:
    return message.headers.get("severity") == "critical"


@app.subscriber("alerts", group="pager", filter=is_critical)
async def page_on_call(alert: Alert) -> None:
    counts["paged"] += 1
    print(f"PAGE  on-call engineer: {alert.zone}/{alert.sensor_id} is at {alert.celsius:.1f} °C")


def simulate_readings(per_sensor: int = 20, seed: int = 42) -> list[Reading]:
    """Readings of six sensors: a daily swing, noise, and a fault now and then."""
    rng = random.Random(seed)
    sensors = [
        ("srv-1", "server-room", 24.0),
        ("srv-2", "server-room", 26.0),
        ("gh-1", "greenhouse", 30.0),
        ("gh-2", "greenhouse", 32.0),
        ("frz-1", "freezer", -20.0),
        ("frz-2", "freezer", -19.0),
    ]
    readings = []
    for t in range(per_sensor):
        for sensor_id, zone, base in sensors:
            swing = 3.0 * math.sin(t / per_sensor * 2 * math.pi)
            fault = rng.uniform(6.0, 14.0) if rng.random() < 0.05 else 0.0
            celsius = round(base + swing + rng.gauss(0, 0.8) + fault, 1)
            readings.append(Reading(sensor_id, zone, celsius))
    return readings


async def main() -> int:
    readings = simulate_readings()

    def done() -> bool:
        alerts = counts["warning"] + counts["critical"]
        return (
            counts["checked"] == len(readings)
            and counts["shown"] == alerts
            and counts["paged"] == counts["critical"]
        )

    async with app:
        for reading in readings:
            await app.publish("readings", reading, key=reading.sensor_id)
        with anyio.move_on_after(10):  # a bounded run: never hang
            while not done():
                await anyio.sleep(0.01)
    print(
        f"{counts['checked']} readings checked: {counts['warning']} warnings, "
        f"{counts['critical']} critical alerts, {counts['paged']} paged"
    )
    return 0 if done() and counts["critical"] > 0 else 1


if __name__ == "__main__":
    sys.exit(anyio.run(main))
