"""The bundled model's pinned outputs (``tools/pins.py``): hfq W8A8 and W6A6 quantize, simulate, run as an
integer program and export to exactly what they did when the pins were recorded.

Float kernels differ between CPUs, so the pins are per machine kind (CPU capability and model); on a machine
without recorded pins the test says so and skips. Needs CIFAR-10 (``cifar10`` marker).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import pins  # noqa: E402

pytestmark = [
    pytest.mark.cifar10,
    pytest.mark.skipif(not pins.DATA.is_dir(), reason=f"CIFAR-10 ImageFolder not found at {pins.DATA}"),
]


def test_bundled_outputs_match_the_pins():
    recorded = json.loads(pins.PINS.read_text())
    key = pins.machine()
    if key not in recorded:
        pytest.skip(f"no pins recorded for '{key}' (recorded: {', '.join(sorted(recorded))}); "
                    "record them with python tools/pins.py --write")
    got = pins.compute()
    assert got == recorded[key]
