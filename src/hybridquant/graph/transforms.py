"""Graph transforms that leave the float function unchanged."""

from __future__ import annotations

import torch

from ..ops import op_def, run_float
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


def _layer_scale_producer(graph: Graph, node: Node, shapes: dict[str, list[int]]
                          ) -> tuple[Node, torch.Tensor] | None:
    """For a product with a constant tensor (a layer scale): the weighted op before it, through layout ops that
    only this path reads, and the factor of each of its rows, when every element of one row meets the same
    factor (the tensor varies along the channels only, wherever the layout ops moved them)."""
    path = [node.inputs[0]]
    while graph[path[-1]].opdef.role == "data_movement" and len(graph.users(path[-1])) == 1:
        path.append(graph[path[-1]].inputs[0])
    src = graph[path[-1]]
    if not src.opdef.weighted or len(graph.users(src.name)) != 1:
        return None
    ids = _channel_ids(src, shapes[src.name])
    for name in reversed(path[:-1]):
        ids = run_float(graph[name], [ids])
    ids = ids.round().long().reshape(-1)
    value = node.params["value"].double()
    factors = value.expand(torch.broadcast_shapes(value.shape, [1, *shapes[node.inputs[0]][1:]])).reshape(-1)
    rows = src.params["weight"].shape[0]
    factor = torch.ones(rows, dtype=torch.float64).scatter_(0, ids, factors)  # rows not read keep 1
    return (src, factor) if torch.equal(factor[ids], factors) else None


def _channel_ids(src: Node, shape: list[int]) -> torch.Tensor:
    """One image of ``src``'s output holding each element's output channel (row of its weight)."""
    axis = src.opdef.channel_axis % len(shape)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return torch.arange(shape[axis], dtype=torch.float64).reshape(view).expand([1, *shape[1:]]).clone()


def _number_producer(graph: Graph, node: Node, shapes: dict[str, list[int]]) -> tuple[Node, torch.Tensor] | None:
    """For a product with a number: the weighted op and the rows of it whose scaling scales exactly the
    product's input. The scaled value is the input, or the first operand of the matmul that alone feeds the
    product (``(A·B)·v = (A·v)·B``); from it back to a weighted op only layout ops, whose other readers must
    read none of those rows (the query of a qkv projection split by slices or a select)."""
    name = node.inputs[0]
    if graph[name].op == "matmul" and len(graph.users(name)) == 1:
        name = graph[name].inputs[0]
    path = [name]
    while graph[path[-1]].opdef.role == "data_movement":
        path.append(graph[path[-1]].inputs[0])
    src = graph[path[-1]]
    if not src.opdef.weighted:
        return None
    ids = {src.name: _channel_ids(src, shapes[src.name])}
    for name in reversed(path[:-1]):  # the ids down the path, producer first
        ids[name] = run_float(graph[name], [ids[graph[name].inputs[0]]])
    rows = torch.unique(ids[path[0]]).round().long()
    on_path = set(path)
    for name in path[1:]:  # every other reader of the path's values must miss the scaled rows
        for user in graph.users(name):
            if user.name in on_path:
                continue
            seen = run_float(user, [ids[name]]) if user.opdef.role == "data_movement" else ids[name]
            if bool(torch.isin(torch.unique(seen).round().long(), rows).any()):
                return None
    return src, rows


def fold_constant_scales(graph: Graph) -> int:
    """Fold each product with a constant into the weighted op before it (an attention scale into the query
    rows of its projection, a layer scale into its conv); returns how many were folded. Exact in float."""
    folded, shapes = 0, None
    for node in [n for n in graph if n.op == "mul_const"]:
        shapes = shapes or graph.shapes()  # unchanged by the folds
        found = (_layer_scale_producer if "value" in node.params else _number_producer)(graph, node, shapes)
        if found is None:
            continue
        src, rows = found
        w = src.params["weight"].double()
        if "value" in node.params:  # a factor per row
            factor = rows
        else:
            factor = torch.ones(w.shape[0], dtype=torch.float64)
            factor[rows] = float(node.attrs["value"])
        src.params["weight"] = (w * factor.reshape([-1] + [1] * (w.dim() - 1))).float()
        if "bias" in src.params:
            src.params["bias"] = (src.params["bias"].double() * factor).float()
        graph.remove(node.name, node.inputs[0])
        folded += 1
    return folded
