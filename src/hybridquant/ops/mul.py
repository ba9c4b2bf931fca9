"""Elementwise products: of two activations, or of one with a constant (a number, folded into its
requantization; a constant tensor — a layer scale — is folded into the layer before it at capture)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import HybridQuantError
from .layout import channel_ids
from .registry import OpDef, ProgramKind, register, run_float
from .values import Value, c_centred, centred_inputs, elements, per_element, zero, zp_arrays


def _lower_mul(ctx, node, op):
    lhs, rhs = (ctx.vals[i] for i in node.inputs)
    ctx.fill(op, "mul", node.inputs, {}, zp_arrays([lhs, rhs]))
    return Value(lhs.scale.double() * rhs.scale.double(), zero())


def const_value(node):
    """The constant of a ``mul_const`` node: a number (``attrs``) or a tensor (``params``)."""
    return node.params["value"] if "value" in node.params else node.attrs["value"]


def _layer_scale_rows(graph, node, shapes):
    """For a product with a constant tensor (a layer scale): the weighted op before it, through layout ops that
    only this path reads, and the factor of each of its rows, when every element of one row meets the same
    factor (the tensor varies along the channels only, wherever the layout ops moved them)."""
    path = [node.inputs[0]]
    while graph[path[-1]].opdef.role == "data_movement" and len(graph.users(path[-1])) == 1:
        path.append(graph[path[-1]].inputs[0])
    src = graph[path[-1]]
    if not src.opdef.weighted or len(graph.users(src.name)) != 1:
        return None
    ids = channel_ids(shapes[src.name], src.opdef.channel_axis)
    for name in reversed(path[:-1]):
        ids = run_float(graph[name], [ids])
    ids = ids.round().long().reshape(-1)
    value = node.params["value"].double()
    factors = value.expand(torch.broadcast_shapes(value.shape, [1, *shapes[node.inputs[0]][1:]])).reshape(-1)
    factor = torch.ones(src.params["weight"].shape[0], dtype=torch.float64).scatter_(0, ids, factors)
    return (src, factor) if torch.equal(factor[ids], factors) else None  # rows no element reaches keep 1


def _number_rows(graph, node, shapes):
    """For a product with a number: the weighted op and its rows whose scaling scales exactly the product's
    input. The scaled value is the input, or the first operand of the product of two values (a matmul) that
    alone feeds it (``(A·B)·v = (A·v)·B``); from it back to a weighted op only layout ops, whose other readers
    must read none of those rows (the queries of a qkv projection split by slices or a select)."""
    name = node.inputs[0]
    first = graph[name].opdef
    if first.mac and not first.weighted and len(graph.users(name)) == 1:
        name = graph[name].inputs[0]
    path = [name]
    while graph[path[-1]].opdef.role == "data_movement":
        path.append(graph[path[-1]].inputs[0])
    src = graph[path[-1]]
    if not src.opdef.weighted:
        return None
    ids = {src.name: channel_ids(shapes[src.name], src.opdef.channel_axis)}
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
    factor = torch.ones(src.params["weight"].shape[0], dtype=torch.float64)
    factor[rows] = float(node.attrs["value"])
    return src, factor


def _absorb(graph, node, shapes) -> bool:
    """Fold a product with a constant into the rows of the weighted op before it (an attention scale into the
    query rows of its projection, a layer scale into its conv or linear); False where the graph does not allow."""
    found = (_layer_scale_rows if "value" in node.params else _number_rows)(graph, node, shapes)
    if found is None:
        return False
    src, factor = found
    w = src.params["weight"].double()
    src.params["weight"] = (w * factor.reshape([-1] + [1] * (w.dim() - 1))).float()
    if "bias" in src.params:
        src.params["bias"] = (src.params["bias"].double() * factor).float()
    graph.remove(node.name, node.inputs[0])
    return True


def _lower_mul_const(ctx, node, op):
    if "value" in node.params:
        raise HybridQuantError(f"cannot lower {node.name}: a product with a constant tensor that does not fold into "
                               "the layer before it")
    x = ctx.vals[node.inputs[0]]
    ctx.fill(op, "mul_const", node.inputs, {}, zp_arrays([x]))
    return Value(x.scale.double() * node.attrs["value"], zero())


def _mul(op, c, state, vals, accs):
    a, b = centred_inputs(op, c, vals)
    return a * b


def _onnx_mul_const(ex, node, xs):
    v = const_value(node)
    value = ex.b.const(f"{node.name}.value", ex.array(v) if "value" in node.params else np.array(v, np.float32))
    return ex.b.add("Mul", [xs[0], value], node.name)


def broadcast_block(shape: list[int], out: list[int]) -> tuple[int, int] | None:
    """The dims ``[first, end)`` of ``out`` along which ``shape`` is broadcast, when they are one contiguous block
    (``(0, 0)``: not broadcast); None for another pattern."""
    shape = [1] * (len(out) - len(shape)) + list(shape)
    dims = [d for d, (s, o) in enumerate(zip(shape, out, strict=True)) if s != o]
    if not dims:
        return 0, 0
    first, end = dims[0], dims[-1] + 1
    if any(shape[d] != 1 for d in range(first, end)):
        return None
    return first, end


def _c_mul(op, em):
    a, b = op.inputs
    za, zb = "in_zero_point.0", "in_zero_point.1"
    if em.shape(a) == em.shape(b):
        return [f"hq_mul({em.codes(a)}, {em.arg(za)}, {em.codes(b)}, {em.arg(zb)}, "
                f"{em.count(a)}, {em.shape(a)[-1]}, {em.acc()});"]
    out = op.out_shape
    if em.shape(b) == list(out):  # the broadcast operand second
        a, b, za, zb = b, a, zb, za
    block = broadcast_block(em.shape(b), out) if em.shape(a) == list(out) else None
    if block is None:
        raise em.fail(f"shapes {em.shape(a)} and {em.shape(b)}: the C kernel broadcasts one operand along one "
                      "block of dims")
    first, end = block
    outer, mid, inner = elements(out[:first]), elements(out[first:end]), elements(out[end:])
    return [f"hq_mul_bcast({em.codes(a)}, {em.scalar(za)}, {em.codes(b)}, {em.scalar(zb)}, {outer}, {mid}, "
            f"{inner}, {em.acc()});"]


register(
    OpDef("mul", lambda node, i: i[0] * i[1], lower=_lower_mul, onnx=lambda ex, node, xs: ex.b.add("Mul", xs, node.name)),
    OpDef("mul_const", lambda node, i: i[0] * const_value(node), lower=_lower_mul_const, onnx=_onnx_mul_const,
          is_identity=lambda node: node.attrs.get("value") == 1.0, absorb=_absorb),
    ProgramKind("mul", "acc = (a - in_zero_point.0) * (b - in_zero_point.1); then requant", run=_mul, c=_c_mul,
                counts=lambda op, program: per_element(op, multiplies=1, adds=2),
                widths=lambda op, bounds, done, program: {"acc": bounds[op.inputs[0]] * bounds[op.inputs[1]]}),
    ProgramKind("mul_const", "acc = x - in_zero_point.0 (the constant is folded into the requant); then requant",
                run=lambda op, c, state, vals, accs: centred_inputs(op, c, vals)[0], c=c_centred,
                counts=lambda op, program: per_element(op, adds=1),
                widths=lambda op, bounds, done, program: {"acc": bounds[op.inputs[0]]}),
)
