"""BatchNorm: folded into the convolution before quantization (no quantized or integer form of its own)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HybridQuantError
from .layout import channel_ids
from .registry import OpDef, register, run_float


def _batch_norm(node, inputs):
    p = node.params
    return F.batch_norm(inputs[0], p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"), False, 0.0,
                        node.attrs["eps"])


def _fold_batch_norm(graph, bn) -> None:
    """Fold ``bn`` (y = x·f + g, f = γ/σ, g = β − μ·f, σ = sqrt(var + eps)) into the conv before it (w' = w·f,
    b' = b·f + g), or else into the linear or unpadded 1×1 conv that alone reads it (w' = w·f along its input
    channels, b' = b + w·g: a BatchNorm1d before a classifier); an error where neither is there."""
    p = bn.params
    inv_std = torch.rsqrt(p["running_var"].double() + bn.attrs["eps"])
    gamma = p.get("weight", torch.ones_like(inv_std)).double()
    beta = p.get("bias", torch.zeros_like(inv_std)).double()
    factor = gamma * inv_std
    offset = beta - p["running_mean"].double() * factor
    conv = graph[bn.inputs[0]]
    if conv.op == "conv2d" and len(graph.users(conv.name)) == 1:
        w = conv.params["weight"].double()
        b = conv.params.get("bias", torch.zeros(w.shape[0])).double()
        conv.params["weight"] = (w * factor.reshape(-1, 1, 1, 1)).float()
        conv.params["bias"] = (b * factor + offset).float()
        graph.remove(bn.name, conv.name)  # the folded conv takes over the BatchNorm's place in reports
        return
    shape = graph.shapes()[bn.name]
    # each input channel of a reader, as the BatchNorm channel it carries: channel ids through the path
    readers = _channel_readers(graph, bn.name, channel_ids(shape, 1))
    if not readers:
        raise HybridQuantError(f"cannot fold BatchNorm {bn.name}: it neither follows a conv nor feeds linears")
    for nxt, perm in readers:
        w = nxt.params["weight"].double()
        b = nxt.params.get("bias", torch.zeros(w.shape[0])).double()
        nxt.params["bias"] = (b + (w.flatten(2).sum(-1) if w.dim() > 2 else w) @ offset[perm]).float()
        nxt.params["weight"] = (w * factor[perm].reshape([1, -1] + [1] * (w.dim() - 2))).float()
    graph.remove(bn.name, bn.inputs[0])


def _channel_readers(graph, name: str, index: torch.Tensor) -> list:
    """``(reader, perm)`` for each weighted op that reads value ``name`` (whose BatchNorm channel ids are
    ``index``) through layout ops and global average pools only (a per-channel affine commutes with both) and
    reads one BatchNorm channel per input channel at every position: a linear, or an unpadded 1×1 conv; its
    input channel ``k`` is BatchNorm channel ``perm[k]``. Empty unless every path ends in one."""
    readers = []
    for user in graph.users(name):
        if user.opdef.role == "data_movement" or user.op == "global_avg_pool":
            found = _channel_readers(graph, user.name, run_float(user, [index]))
            if not found:
                return []
            readers += found
        elif user.opdef.weighted and user.opdef.pointwise is not None and user.opdef.pointwise(user):
            cols = index.movedim(user.opdef.channel_axis, 0).reshape(index.shape[user.opdef.channel_axis], -1)
            if not bool((cols == cols[:, :1]).all()):
                return []  # an input channel mixes BatchNorm channels (a flatten of several positions)
            readers.append((user, cols[:, 0].round().long()))
        else:
            return []
    return readers


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
