"""hfq — hardware-friendly quantization (Kim & Kim, ICCE 2025), as implemented here.

1. **Outlier scaling** (:mod:`.outlier_scaling`): per-channel power-of-two α
   move activation outliers into the next layer's weights, chosen by the
   layer's quantized output error; with ``channel_shift`` a layer reading a
   norm first has its input channels centred (the offset moves into the
   norm's bias and the layer's bias).
2. **Objective-based power-of-two approximation** (:mod:`.pot_search`): every
   weight and activation exponent chosen by the error it causes downstream,
   layer by layer on quantized inputs.
3. **Remaining post-training, multiplier-free refinements**: GPTQ-style weight
   rounding on the chosen grid that also compensates the error arriving at
   each layer's input (:mod:`.weight_rounding`), and empirical bias
   correction (an int32 bias change).
4. **Per-channel power-of-two factors on LayerNorm inputs** (FQ-ViT's PTF,
   ``ptf``): the residual stream of a transformer has a few wide channels;
   each channel gets the scale 2^(k + c_j), which the integer LayerNorm
   aligns with left shifts.
5. **Block reconstruction** (:mod:`.reconstruction`): each block learns its
   weights' rounding (down or up on the same grid) and its biases against the
   float model's block output, with the activation quantizers in the loop.

Ablations: ``outlier_scaling=False``, ``pot_rounding='round'|'ceil'``,
``alpha_pot=False``, ``weight_rounding=False``, ``input_compensation=False``,
``bias_correction=False``, ``channel_shift=False``, ``ptf=False``,
``reconstruction=False`` in :class:`~hybridquant.config.QuantConfig`.
"""

from __future__ import annotations

from typing import Any

import torch

from ...config import QuantConfig
from ...graph.ir import Graph, Node
from ...observers import ActivationObserver
from ...qparams import QParams, choose_mode
from ..base import Method
from ..fqvit import ptf_qparams, ptf_samples
from .outlier_scaling import outlier_scaling
from .pot_search import sequential_refine
from .reconstruction import RECONSTRUCTION_IMAGES, reconstruct


class HFQ(Method):
    name = "hfq"

    def __init__(self) -> None:
        # LayerNorm-input producer -> (channel axis, [rows, C] sample), for per-channel factors (``ptf``)
        self.ptf: dict[str, tuple[int, torch.Tensor]] = {}

    def transform(self, graph: Graph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        info = outlier_scaling(graph, calib, config) if config.outlier_scaling else {"outlier_scaling": "off"}
        if config.ptf and config.pot:
            found, _ = ptf_samples(graph, calib)
            # the integer LayerNorm aligns channels along its normalised (last) dim only
            self.ptf = {name: v for name, v in found.items() if v[0] == -1}
            info["ptf_tensors"] = sorted(self.ptf)
        return info

    def act_qparams(self, node: Node, obs: ActivationObserver, bits: int, config: QuantConfig) -> QParams:
        if node.name in self.ptf:
            axis, sample = self.ptf[node.name]
            return ptf_qparams(sample, obs.min, obs.max, bits, choose_mode(obs.min, obs.max, config.act_symmetry),
                               axis)
        return super().act_qparams(node, obs, bits, config)

    def refine(self, qgraph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        search = config.pot and config.pot_rounding == "objective"
        float_graph = qgraph.graph.clone() if config.reconstruction else None
        targets: dict[str, torch.Tensor] = {}
        info = sequential_refine(qgraph, calib, search_weights=search, search_acts=search,
                                 bias_correction=config.bias_correction, weight_rounding=config.weight_rounding,
                                 input_compensation=config.input_compensation,
                                 two_term_weights=config.shift_terms == 2, rounding_targets=targets)
        if float_graph is not None:
            images = torch.cat(calib)[:RECONSTRUCTION_IMAGES]
            info["reconstruction"] = reconstruct(qgraph, float_graph, images, config.reconstruction_iters,
                                                 start=targets)
            qgraph.rebuild()
        return info
