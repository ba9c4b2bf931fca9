"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into the weights.

For every dense conv and linear (the layers :func:`~.scaling.scalable`
accepts, except the first conv, which reads the image) a per-input-channel
factor ``s_j = max|X_j|^a / max|W_j|^(1-a)`` is computed from the float
calibration activations ``X`` the layer reads and its weights ``W``
(``max|W_j|`` over every weight that reads input channel j), with
``a = SmoothQuantConfig.alpha``; ``s`` is clamped to [1e-5, 1e5] and set to 1
on channels whose activation or weight is all zero. With ``scales='pot'``
each ``s_j`` is rounded to ``2^round(log2 s_j)`` so dividing the activation
stays a shift. ``X/s`` and ``W·s`` are applied by
:func:`~.scaling.apply_input_scaling` (folded into the producer where
possible, else an explicit per-channel layer). Ranges are then min-max.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import QuantConfig, SmoothQuantConfig
from ..graph.ir import Graph, Node
from ..primitives import pot_scale
from .base import Method
from .scaling import apply_input_scaling, input_channel_dim, scaling_targets

S_MIN, S_MAX = 1e-5, 1e5


def smooth_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float, pot: bool = False) -> torch.Tensor:
    """SmoothQuant's ``s_j`` from per-input-channel ``max|X_j|`` and a conv/linear weight [O, I, ...]."""
    dims = [d for d in range(weight.dim()) if d != 1]
    w_absmax = weight.detach().abs().amax(dim=dims).double()
    a_absmax = act_absmax.double()
    s = a_absmax.clamp_min(S_MIN).pow(alpha) / w_absmax.clamp_min(S_MIN).pow(1.0 - alpha)
    s = s.clamp(S_MIN, S_MAX)
    s = torch.where((a_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))
    if pot:
        s = pot_scale(s, "round")
    return s.float()


def smoothing_targets(graph: Graph) -> list[Node]:
    """Dense convs and linears whose input can take a per-channel factor (:func:`~.scaling.scaling_targets`)."""
    return scaling_targets(graph)


@torch.no_grad()
def input_channel_absmax(graph: Graph, consumers: list[Node], calib: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max|X_j|`` of each consumer's input over ``calib``, keyed by consumer name.

    The statistics are taken on the exact tensor the consumer reads (its
    ``inputs[0]``, after any layout ops), along its input channel dim.
    """
    wanted: dict[str, set[int]] = {}
    for c in consumers:
        wanted.setdefault(c.inputs[0], set()).add(input_channel_dim(c))
    stats: dict[tuple[str, int], torch.Tensor] = {}

    def hook(node: Node, out: torch.Tensor) -> torch.Tensor:
        for dim in wanted.get(node.name, ()):
            d = dim % out.dim()
            amax = out.detach().abs().amax(dim=[i for i in range(out.dim()) if i != d]).float()
            key = (node.name, dim)
            stats[key] = amax if key not in stats else torch.maximum(stats[key], amax)
        return out

    for x in calib:
        graph.run(x, hook=hook)
    return {c.name: stats[(c.inputs[0], input_channel_dim(c))] for c in consumers}


class SmoothQuant(Method):
    """Per-input-channel smoothing of every dense conv / linear, then min-max ranges."""

    name = "smoothquant"
    config_class = SmoothQuantConfig

    def transform(self, graph: Graph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        consumers = smoothing_targets(graph)
        absmax = input_channel_absmax(graph, consumers, calib)
        kinds = {"folded": 0, "explicit": 0}
        for node in consumers:
            s = smooth_factors(absmax[node.name], node.params["weight"], config.options.alpha, config.pot)
            kinds[apply_input_scaling(graph, node, s)] += 1
        return {
            "alpha": config.options.alpha,
            "pot_factors": config.pot,
            "scaled": len(consumers),
            "folded": kinds["folded"],
            "explicit": kinds["explicit"],
        }
