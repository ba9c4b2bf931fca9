"""Graph transforms that leave the float function unchanged."""

from __future__ import annotations

import torch

from ..ops import op_def
from .ir import Graph, Node


def fold_batch_norm(graph: Graph) -> int:
    """Fold every op that exists only before quantization (BatchNorm: into the conv before it, by the op
    table's ``fold``); returns how many were folded."""
    folded = [node for node in graph if op_def(node.op).role == "folded"]
    for node in folded:
        op_def(node.op).fold(graph, node)
    return len(folded)


def remove_identities(graph: Graph) -> int:
    """Drop the nodes that compute their input unchanged (a multiplication by exactly 1.0, left by the
    attention-scale fold)."""
    identities = [node for node in graph if (test := op_def(node.op).is_identity) is not None and test(node)]
    for node in identities:
        graph.remove(node.name, node.inputs[0])
    return len(identities)


def _scaled_producer(graph: Graph, node: Node, shapes: dict[str, list[int]]) -> Node | None:
    """The weighted op whose output rows can take ``node``'s constant factor: for a number, through layout ops
    and a matmul's first operand; for a tensor, the op right before, when the tensor varies only along its
    channels. None where there is none that only this path reads."""
    value = node.params.get("value")
    name = node.inputs[0]
    while len(graph.users(name)) == 1:
        src = graph[name]
        if src.opdef.weighted:
            if value is None:
                return src
            axis = src.opdef.channel_axis
            rows = src.params["weight"].shape[0]
            shape = [1] * (len(shapes[name]) - value.dim()) + list(value.shape)
            want = [1] * len(shape)
            want[axis] = rows
            return src if shape == want else None
        if value is not None or not (src.opdef.role == "data_movement" or src.op == "matmul"):
            return None
        name = src.inputs[0]
    return None


def fold_constant_scales(graph: Graph) -> int:
    """Fold each product with a constant into the weighted op before it (an attention scale into the query
    projection, a layer scale into its conv); returns how many were folded. Exact in float."""
    folded, shapes = 0, None
    for node in [n for n in graph if n.op == "mul_const"]:
        shapes = shapes or graph.shapes()  # unchanged by the folds
        src = _scaled_producer(graph, node, shapes)
        if src is None:
            continue
        value = node.params.get("value", torch.tensor(node.attrs.get("value", 1.0)))
        factor = value.double().reshape(-1)
        w = src.params["weight"].double()
        src.params["weight"] = (w * factor.reshape([-1] + [1] * (w.dim() - 1))).float()
        if "bias" in src.params:
            src.params["bias"] = (src.params["bias"].double() * factor).float()
        graph.remove(node.name, node.inputs[0])
        folded += 1
    return folded
