"""hfq — hardware-friendly quantization (Kim & Kim, ICCE 2025), as implemented here.

1. **Outlier scaling** (:mod:`.outlier_scaling`): per-channel power-of-two α
   move activation outliers into the next layer's weights, chosen by the
   layer's quantized output error.
2. **Objective-based power-of-two approximation** (:mod:`.pot_search`): every
   weight and activation exponent chosen by the error it causes downstream,
   layer by layer on quantized inputs.
3. **Remaining post-training, multiplier-free refinements**: GPTQ-style weight
   rounding on the chosen grid that also compensates the error arriving at
   each layer's input (:mod:`.weight_rounding`), and empirical bias
   correction (an int32 bias change).

Ablations: ``outlier_scaling=False``, ``pot_rounding='round'|'ceil'``,
``alpha_pot=False``, ``weight_rounding=False``, ``input_compensation=False``,
``bias_correction=False`` in
:class:`~hybridquant.config.QuantConfig`.
"""

from __future__ import annotations

from typing import Any

import torch

from ...config import QuantConfig
from ...graph.ir import Graph
from ..base import Method
from .outlier_scaling import outlier_scaling
from .pot_search import sequential_refine


class HFQ(Method):
    name = "hfq"

    def transform(self, graph: Graph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        if not config.outlier_scaling:
            return {"outlier_scaling": "off"}
        return outlier_scaling(graph, calib, config)

    def refine(self, qgraph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        search = config.pot and config.pot_rounding == "objective"
        return sequential_refine(qgraph, calib, search_weights=search, search_acts=search,
                                 bias_correction=config.bias_correction, weight_rounding=config.weight_rounding,
                                 input_compensation=config.input_compensation,
                                 two_term_weights=config.shift_terms == 2)
