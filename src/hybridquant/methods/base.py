"""The method interface: what a PTQ algorithm may decide.

A method can (1) transform the float graph before calibration (migrate
outliers between layers), (2) choose each activation's range from its
observer, and (3) choose each weight's quantizer, and (4) refine the
finished quantized graph. The engine (:mod:`hybridquant.quantize`) calls
these in that order; everything else is shared.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import MethodConfig, MinMaxConfig, QuantConfig
from ..graph.ir import Graph, Node
from ..observers import ActivationObserver, mse_qparams, weight_qparams
from ..ops import op_def
from ..qparams import QParams, choose_mode, range_to_qparams
from ..store import Workspace


class Method:
    """Classic per-tensor PTQ with min-max ranges; subclasses override the steps."""

    name = "minmax"
    #: the method's options (``QuantConfig.options``): a frozen dataclass of the config layer
    config_class: type[MethodConfig] = MinMaxConfig
    #: how activation ranges are chosen: minmax, percentile or mse
    act_range = "minmax"
    #: how weight ranges are chosen: minmax or mse
    weight_range = "minmax"

    def __init__(self, workspace: Workspace | None = None) -> None:
        #: where steps that keep values over the calibration images keep them (bounded memory)
        self.workspace = workspace if workspace is not None else Workspace()

    def transform(self, graph: Graph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        """Edit ``graph`` in place before calibration; return facts for the report."""
        return {}

    def act_qparams(self, node: Node, obs: ActivationObserver, bits: int, config: QuantConfig) -> QParams:
        """Float qparams of ``node``'s output from its calibration statistics."""
        unit = op_def(node.op).unit_interval  # e.g. softmax: [0, 1]
        mode = "unsigned" if unit else choose_mode(obs.min, obs.max, config.act_symmetry)
        if self.act_range == "mse":
            return mse_qparams(obs.sample, obs.min, obs.max, bits, mode)
        lo, hi = obs.range(self.act_range)
        if unit:
            lo, hi = 0.0, max(hi, 1e-3)
        return range_to_qparams(torch.tensor(lo), torch.tensor(hi), bits, mode)

    def weight_qparams(self, node: Node, bits: int, config: QuantConfig) -> QParams:
        """Symmetric per-output-channel qparams of ``node``'s weight."""
        return weight_qparams(node.params["weight"], bits, self.weight_range)

    def refine(self, qgraph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        """Adjust the finished quantized graph (e.g. search exponents); facts for the report."""
        return {}
