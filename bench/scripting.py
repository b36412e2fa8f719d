"""Measure how fast edgectl.scripting runs a small transform script.

Run as ``python bench/scripting.py``. It prints messages per second for batches
of 1,000 small messages and for one message per call, and the CPU count.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from edgectl.scripting import ScriptFunction

BATCH_SIZE = 1000
TRANSFORM = """
msg.temperature = msg.temperature * 1.8 + 32;
metadata.unit = "F";
return {msg: msg, metadata: metadata, msgType: msgType};
"""


def make_batch() -> list[tuple[Any, dict[str, str], str]]:
    """Build BATCH_SIZE small telemetry messages."""
    return [
        ({"temperature": n % 40, "humidity": 50, "id": n}, {"deviceName": f"d{n}"}, "T")
        for n in range(BATCH_SIZE)
    ]


def measure(run: Callable[[], int], seconds: float = 2.0) -> float:
    """Call ``run`` (which returns how many messages it ran) for a while."""
    run()
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        count += run()
    return count / (time.perf_counter() - started)


def main() -> None:
    """Print batch and single-call rates, and the CPU count."""
    batch = make_batch()
    with ScriptFunction(TRANSFORM, name="bench") as function:

        def run_batch() -> int:
            function.call_batch(batch)
            return len(batch)

        def run_singles() -> int:
            for msg, metadata, msg_type in batch[:100]:
                function.call(msg, metadata, msg_type)
            return 100

        print(f"cpu_count: {os.cpu_count()}")
        print(f"batch of {BATCH_SIZE}: {measure(run_batch):,.0f} messages/s")
        print(f"single calls: {measure(run_singles):,.0f} calls/s")


if __name__ == "__main__":
    main()
