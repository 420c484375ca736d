"""Herald over MQTT vs raw aiomqtt on the same Mosquitto: end-to-end messages per second.

Run: ``.venv/bin/python benchmarks/mqtt_raw.py [N]`` (default 20000). Both sides publish QoS 1
(waiting for PUBACKs) while one consumer in a shared subscription handles and acks each
message; Herald adds typed encode/decode, the envelope as MQTT 5 user properties, manual acks
and the App's consume loop. Not a test: prints figures only.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import aiomqtt

from herald.bench import run_bench

#: Mosquitto's defaults (max_queued_messages 1000, 20 messages in flight per client) drop QoS 1
#: messages once a consumer lags by more than 1000, so point this at a broker configured with
#: ``max_queued_messages 0`` (and a larger ``max_inflight_messages``): ``mqtt_raw.py N PORT``.
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 1883
URL = f"mqtt://127.0.0.1:{PORT}"


async def raw(n: int, batch: int = 1000) -> float:
    """Raw aiomqtt: QoS 1 publish in batches (gathered PUBACKs), one shared-subscription
    consumer with automatic acks."""
    topic = f"rawbench/{uuid.uuid4().hex[:8]}"
    payload = b'{"sensor":"s-1","seq":1,"celsius":21.5,"unit":"C","site":"plant-7/line-2"}'
    v5 = aiomqtt.ProtocolVersion.V5
    async with (
        aiomqtt.Client("127.0.0.1", PORT, protocol=v5) as sub,
        aiomqtt.Client("127.0.0.1", PORT, protocol=v5, max_inflight_messages=1000) as pub,
    ):
        pub.pending_calls_threshold = 10**9
        await sub.subscribe(f"$share/raw/{topic}", qos=1)
        done = asyncio.Event()

        async def consume() -> None:
            seen = 0
            async for _ in sub.messages:
                seen += 1
                if seen == n:
                    done.set()
                    return

        task = asyncio.create_task(consume())
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            await asyncio.gather(
                *(pub.publish(topic, payload, qos=1) for _ in range(min(batch, n - i)))
            )
        await done.wait()
        seconds = time.perf_counter() - t0
        await task
    return n / seconds


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    raw_rate = asyncio.run(raw(n))
    herald = asyncio.run(run_bench(URL, n))
    print(f"raw aiomqtt QoS1 : {raw_rate:>10,.0f} msg/s  (n={n})")
    print(f"Herald mqtt://   : {herald.msgs_per_s:>10,.0f} msg/s  (n={n}, end to end, acked)")
    print(f"Herald / raw     : {herald.msgs_per_s / raw_rate:>10.2f}")


if __name__ == "__main__":
    main()
