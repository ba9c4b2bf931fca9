"""Graph transforms that leave the float function unchanged."""

from __future__ import annotations

import torch

from ..errors import HybridQuantError
from .ir import Graph


def fold_batch_norm(graph: Graph) -> int:
    """Fold every BatchNorm into the conv before it; returns how many were folded.

    w' = w·γ/σ, b' = (b − μ)·γ/σ + β with σ = sqrt(var + eps). A BatchNorm
    not directly after a conv that only it reads cannot be folded and is an error.
    """
    folded = 0
    for bn in graph.by_op("batch_norm"):
        conv = graph[bn.inputs[0]]
        if conv.op != "conv2d" or len(graph.users(conv.name)) != 1:
            raise HybridQuantError(f"cannot fold BatchNorm {bn.name}: it does not follow a conv")
        p = bn.params
        inv_std = torch.rsqrt(p["running_var"].double() + bn.attrs["eps"])
        gamma = p.get("weight", torch.ones_like(inv_std)).double()
        beta = p.get("bias", torch.zeros_like(inv_std)).double()
        factor = gamma * inv_std
        w = conv.params["weight"].double()
        b = conv.params.get("bias", torch.zeros(w.shape[0])).double()
        conv.params["weight"] = (w * factor.reshape(-1, 1, 1, 1)).float()
        conv.params["bias"] = ((b - p["running_mean"].double()) * factor + beta).float()
        graph.remove(bn.name, conv.name)
        # the folded conv takes over the BatchNorm's place in reports
        folded += 1
    return folded


def remove_identities(graph: Graph) -> int:
    """Drop multiplications by exactly 1.0 (left by the attention-scale fold)."""
    removed = 0
    for node in graph.by_op("mul_const"):
        if node.attrs["value"] == 1.0:
            graph.remove(node.name, node.inputs[0])
            removed += 1
    return removed
