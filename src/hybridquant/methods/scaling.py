"""Per-input-channel scaling between a layer and its input (SmoothQuant, HyQ, hfq).

``X' = X / α`` and ``W' = W · α`` leave ``conv(X, W)`` (or ``linear``)
unchanged in float. ``W · α`` is always folded into the consumer. ``X / α``
is folded into the producer when the producer is linear up to its quantizer
and feeds only this consumer (a conv/linear: its output rows; a LayerNorm:
its affine) — free. Otherwise an explicit ``scale_channels`` node is inserted
on that edge only; it reads the producer's value before quantization (the
integer program requantizes the wide accumulator per channel, a shift when α
is a power of two) and its α vector is the reported parameter increase.

The same holds for a per-channel shift, ``X' = X − z`` and ``b' = b + W z``
(Outlier Suppression+'s channel shifting), where ``X`` is a norm's output:
:func:`shift_source`, :func:`apply_input_shift`.
"""

from __future__ import annotations

import torch

from ..graph.ir import Graph, Node
from ..ops import op_providing


def input_channel_dim(node: Node) -> int:
    """Channel dim of ``node``'s input activation: 1 for conv (NCHW), last for linear."""
    return node.opdef.channel_axis


def is_depthwise(node: Node) -> bool:
    """A weighted layer whose every input channel meets only its own weight rows."""
    layout = node.opdef.weight_layout
    return layout is not None and layout(node) == "depthwise"


def scalable(node: Node, depthwise: bool = False) -> bool:
    """Layers whose input channels can be rescaled: dense convs and linears (and depthwise convs)."""
    layout = node.opdef.weight_layout
    kind = layout(node) if layout is not None else None
    return kind == "dense" or (depthwise and kind == "depthwise")


def weight_scale_shape(node: Node) -> list[int]:
    """Broadcast shape of a per-input-channel factor on ``node``'s weight."""
    w = node.params["weight"]
    if is_depthwise(node):  # input channel j meets weight rows j·m .. j·m + m − 1
        return [-1, 1, 1, 1]
    return [1, -1] + [1] * (w.dim() - 2)


def _foldable(graph: Graph, consumer: Node) -> bool:
    """Whether ``consumer``'s input factor can fold into its producer: a weighted op's output rows or a norm's
    affine, on channels along the same axis, read by this consumer only."""
    src = graph[consumer.inputs[0]]
    if len(graph.users(src.name)) != 1 or src.opdef.channel_axis != consumer.opdef.channel_axis:
        return False  # e.g. a conv's channels read by a linear
    return src.opdef.weighted or (src.opdef.norm is not None and "weight" in src.params)


def _fold_into_producer(graph: Graph, consumer: Node, inv_alpha: torch.Tensor) -> bool:
    if not _foldable(graph, consumer):
        return False
    src = graph[consumer.inputs[0]]
    if src.opdef.weighted:  # its output rows
        shape = [-1] + [1] * (src.params["weight"].dim() - 1)
        src.params["weight"] = src.params["weight"] * inv_alpha.reshape(shape)
        if "bias" in src.params:
            src.params["bias"] = src.params["bias"] * inv_alpha
    else:  # a LayerNorm's or GroupNorm's per-channel affine
        src.params["weight"] = src.params["weight"] * inv_alpha
        src.params["bias"] = src.params.get("bias", torch.zeros_like(inv_alpha)) * inv_alpha
    return True


def scaling_targets(graph: Graph, depthwise: bool = False) -> list[Node]:
    """The :func:`scalable` layers whose input is not the image: the layers outlier scaling and smoothing
    consider."""
    return [n for n in graph if scalable(n, depthwise) and graph.producer(n.inputs[0]).opdef.role != "source"]


def apply_input_scaling(graph: Graph, consumer: Node, alpha: torch.Tensor, allow_fold: bool = True) -> str:
    """Scale ``consumer``'s input by 1/α and its weight by α; returns ``'folded'`` or ``'explicit'``."""
    alpha = alpha.float()
    w = consumer.params["weight"]
    factor = alpha
    if is_depthwise(consumer) and w.shape[0] != alpha.numel():  # channel multiplier m > 1
        factor = alpha.repeat_interleave(w.shape[0] // alpha.numel())
    consumer.params["weight"] = w * factor.reshape(weight_scale_shape(consumer))
    inv_alpha = 1.0 / alpha
    if allow_fold and _fold_into_producer(graph, consumer, inv_alpha):
        return "folded"
    name = f"{consumer.name}.input_scale"
    node = Node(
        name, op_providing("channel_scale"), [consumer.inputs[0]],
        {"dim": input_channel_dim(consumer), "raw_input": True}, {"inv_alpha": inv_alpha},
        consumer.module, consumer.block,
    )
    graph.insert_before(consumer.name, 0, node)
    return "explicit"


def shift_source(graph: Graph, consumer: Node) -> Node | None:
    """The norm whose affine bias can absorb a per-channel shift of ``consumer``'s input, else ``None``.

    ``X' = X − z`` with ``b' = b + W z`` leaves a linear or a 1×1 unpadded conv unchanged in float (a
    wider kernel would see the shift in its zero padding); ``X − z`` is free when ``X`` is a LayerNorm or
    GroupNorm output that only ``consumer`` reads (through layout ops): its bias becomes ``β − z``.
    """
    if consumer.opdef.pointwise is None or not consumer.opdef.pointwise(consumer):
        return None
    name = consumer.inputs[0]
    while True:
        if len(graph.users(name)) != 1:
            return None
        node = graph[name]
        if node.opdef.norm is not None:
            return node
        if node.opdef.role != "data_movement":
            return None
        name = node.inputs[0]


def apply_input_shift(consumer: Node, source: Node, z: torch.Tensor) -> None:
    """Shift ``consumer``'s input by −z (into ``source``'s bias) and add ``W z`` to its bias (exact in float)."""
    z = z.float()
    beta = source.params.get("bias")
    source.params["bias"] = (beta if beta is not None else torch.zeros_like(z)) - z
    w = consumer.params["weight"].flatten(1)  # 1×1 conv: [Cout, Cin]
    bias = consumer.params.get("bias")
    consumer.params["bias"] = (bias if bias is not None else torch.zeros(w.shape[0])) + w @ z
