"""How fast is reading `nvidia-smi -q -x`? gpufleet's safe parser vs a bare stdlib parse.

The controller parses one document per device-plugin pod, so on a 1,000-node
fleet the parser runs 1,000 times per sweep. The peer is the least any parser
must do: xml.etree.ElementTree.fromstring on the same bytes, with no entity
protection and no model. The ratio is the price of safety plus building the
model.
"""

from __future__ import annotations

import statistics
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable

from gpufleet.gpu import sim
from gpufleet.gpu.nvml import NvmlSource
from gpufleet.gpu.smi import parse_smi_xml, write_smi_xml
from gpufleet.gpu.snapshot import take_snapshot

ROUNDS = 7


def document(preset: str) -> bytes:
    source = NvmlSource(sim.open(preset))
    try:
        snap = take_snapshot(source)
    finally:
        source.close()
    return write_smi_xml(snap.devices, snap.samples, snap.processes).encode()


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    timings = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        timings.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(timings)


def main() -> None:
    print(f"{'preset':<10} {'bytes':>7} {'gpufleet us':>12} {'stdlib ET us':>13} {'ratio':>6}")
    for preset in sim.PRESETS:
        data = document(preset)
        ours = per_call_us(lambda data=data: parse_smi_xml(data, origin="bench"), 200)
        peer = per_call_us(lambda data=data: ET.fromstring(data), 200)
        print(f"{preset:<10} {len(data):>7} {ours:>12.1f} {peer:>13.1f} {ours / peer:>5.1f}x")


if __name__ == "__main__":
    main()
