"""Peer-tool adapters: the same model, calibration and eval images through other PTQ tools.

``TOOLS`` maps a tool name to ``run(model, calib, images, labels, wbits,
abits, pot, fp32_predictions=None) -> dict`` (see :mod:`peers.common` for
the result cell). Every adapter imports its tool only when it runs, so this
package imports without the ``peers`` extra; a tool that is missing or fails
gives a cell with ``error`` set and ``quant_top1`` None.

``hfq`` is hybridquant itself behind the same interface, the reference row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import brevitas_pot, hfq, mct_pot, nncf_ptq, quark_pof2, torchao_pt2e

TOOLS: dict[str, Callable[..., dict[str, Any]]] = {
    "hfq": hfq.run,
    "torchao": torchao_pt2e.run,
    "brevitas": brevitas_pot.run,
    "quark": quark_pof2.run,
    "mct": mct_pot.run,
    "nncf": nncf_ptq.run,
}

#: the distribution each tool comes from (for versions in reports)
DISTRIBUTIONS = {"hfq": "hybridquant", "torchao": "torchao", "brevitas": "brevitas", "quark": "amd-quark",
                 "mct": "model-compression-toolkit", "nncf": "nncf"}

SETTINGS = ("W8A8", "W6A6", "W4A8")
SCALES = ("pot", "float")


def cells() -> list[tuple[str, tuple[str, int, int, bool]]]:
    """``(cell id, (tool, wbits, abits, pot))`` of every peers cell: ``<tool>_<setting>_<pot|float>``."""
    out = []
    for tool in TOOLS:
        for setting in SETTINGS:
            w, a = (int(v) for v in setting.lstrip("W").split("A"))
            for scales in SCALES:
                out.append((f"{tool}_{setting}_{scales}", (tool, w, a, scales == "pot")))
    return out
