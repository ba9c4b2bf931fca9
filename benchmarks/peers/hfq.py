"""hybridquant's own hfq, behind the same interface as the peer adapters (the reference row).

Config: ``capture`` (torch.export, BN folded, attention spelled out) and
``quantize_graph`` with ``QuantConfig(method="hfq", wbits, abits,
scales="pot" | "float")`` (hfq's own defaults: objective exponent search): every conv, linear and
attention matmul reads integers, adds/concats and SiLU/softmax/LayerNorm
outputs are requantized (see the README). Evaluated as the fake-quantized
simulation (``QuantizedGraph.run``), which the integer program reproduces
bit for bit with power-of-two scales.
"""

from __future__ import annotations

from typing import Any

import torch

from .common import package_version, quantize_and_evaluate

TOOL = "hfq"


def run(model: torch.nn.Module, calib: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
        wbits: int, abits: int, pot: bool, fp32_predictions: torch.Tensor | None = None) -> dict[str, Any]:
    """Quantize ``model`` with hfq at W``wbits``A``abits`` and evaluate it."""
    from hybridquant.config import QuantConfig

    cfg = QuantConfig(method="hfq", wbits=wbits, abits=abits, scales="pot" if pot else "float")
    desc = (f"hybridquant quantize_graph {cfg.method} W{wbits}A{abits} scales {cfg.scales} "
            f"(pot_rounding {cfg.pot_rounding}); every MAC, add, concat and nonlinearity output quantized")

    def quantize():
        from hybridquant.graph import capture
        from hybridquant.quantize import quantize_graph

        graph = capture(model, tuple(images.shape[1:]))
        return quantize_graph(graph, cfg, calib, progress=False).run

    return quantize_and_evaluate(TOOL, package_version("hybridquant"), desc, wbits, abits, pot, quantize, calib, images, labels,
                                 fp32_predictions, model)
