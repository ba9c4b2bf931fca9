"""BatchNorm: folded into the convolution before quantization (no quantized or integer form of its own)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HybridQuantError
from .registry import OpDef, register


def _batch_norm(node, inputs):
    p = node.params
    return F.batch_norm(inputs[0], p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"), False, 0.0,
                        node.attrs["eps"])


def _fold_batch_norm(graph, bn) -> None:
    """w' = w·γ/σ, b' = (b − μ)·γ/σ + β with σ = sqrt(var + eps), into the conv before ``bn``; a BatchNorm not
    directly after a conv that only it reads cannot be folded and is an error."""
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
    # the folded conv takes over the BatchNorm's place in reports
    graph.remove(bn.name, conv.name)


def channel_affine(ex, node, xs):
    """The ONNX input, weight and bias tensors of a norm with a per-channel affine along dim 1."""
    p, name, channels = ex.params(node), node.name, ex.shapes[node.name][1]
    w = ex.array(p["weight"]) if "weight" in p else np.ones(channels, np.float32)
    bias = ex.array(p["bias"]) if "bias" in p else np.zeros(channels, np.float32)
    return [xs[0], ex.b.const(f"{name}.weight", w), ex.b.const(f"{name}.bias", bias)]


def _onnx_batch_norm(ex, node, xs):
    p, name = ex.params(node), node.name
    inputs = channel_affine(ex, node, xs) + [ex.b.const(f"{name}.running_mean", ex.array(p["running_mean"])),
                                      ex.b.const(f"{name}.running_var", ex.array(p["running_var"]))]
    return ex.b.add("BatchNormalization", inputs, name, epsilon=float(node.attrs["eps"]))


register(
    OpDef("batch_norm", _batch_norm, role="folded", onnx=_onnx_batch_norm, fold=_fold_batch_norm),
)
