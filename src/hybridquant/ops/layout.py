"""Layout ops: they move codes and keep their grid (torch semantics, the batch dim included)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import HybridQuantError
from .registry import OpDef, ProgramKind, register, run_float

_LAYOUT = {
    "reshape": lambda n, i: i[0].reshape(n.attrs["shape"]),
    "transpose": lambda n, i: i[0].transpose(n.attrs["dim0"], n.attrs["dim1"]),
    "permute": lambda n, i: i[0].permute(n.attrs["dims"]),
    "flatten": lambda n, i: i[0].flatten(n.attrs["start"], n.attrs["end"]),
    "select": lambda n, i: i[0].select(n.attrs["dim"], n.attrs["index"]),
    "slice": lambda n, i: _slice(i[0], n.attrs),
    "expand": lambda n, i: i[0].expand(n.attrs["shape"]),
}


def _slice(x: torch.Tensor, a: dict) -> torch.Tensor:
    """``x[..., start:end:step, ...]`` along ``dim`` (``step`` 1 when absent)."""
    dim = int(a["dim"]) % x.dim()
    return x[(slice(None),) * dim + (slice(int(a["start"]), int(a["end"]), int(a.get("step", 1))),)]


def channel_ids(shape: list[int], axis: int) -> torch.Tensor:
    """One image of a ``shape`` value whose every element holds its index along ``axis`` (float64): run through
    layout ops (:func:`~hybridquant.ops.registry.run_float`), it tells which channel each element came from."""
    axis %= len(shape)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return torch.arange(shape[axis], dtype=torch.float64).reshape(view).expand([1, *shape[1:]]).clone()


def _reshape_target(ex, node) -> np.ndarray:
    """The constant Reshape target of ``node``'s output: -1 on the batch dim."""
    shape = list(ex.shapes[node.name])
    if node.op == "reshape":
        shape = [int(v) for v in node.attrs["shape"]]
    elif ex.batch_dim[node.name] is not None:
        shape[ex.batch_dim[node.name]] = -1
    if shape.count(-1) > 1 or 0 in shape:
        raise HybridQuantError(f"node {node.name}: cannot write reshape target {shape}")
    return np.array(shape, np.int64)


def _onnx_reshape(ex, node, xs):
    return ex.b.add("Reshape", [xs[0], ex.b.const(f"{node.name}.shape", _reshape_target(ex, node))], node.name)


def _onnx_transpose(ex, node, xs):
    r, a = ex.rank(node.name), node.attrs
    if node.op == "transpose":
        perm = list(range(r))
        i, j = int(a["dim0"]) % r, int(a["dim1"]) % r
        perm[i], perm[j] = perm[j], perm[i]
    else:
        perm = [int(d) % r for d in a["dims"]]
    return ex.b.add("Transpose", xs, node.name, perm=perm)


def _onnx_select(ex, node, xs):
    index = ex.b.const(f"{node.name}.index", np.array(int(node.attrs["index"]), np.int64))
    return ex.b.add("Gather", [xs[0], index], node.name, axis=int(node.attrs["dim"]))


def _onnx_slice(ex, node, xs):
    a = {"step": 1, **node.attrs}
    ints = [np.array([int(a[k])], np.int64) for k in ("start", "end", "dim", "step")]
    names = ("starts", "ends", "axes", "steps")
    consts = [ex.b.const(f"{node.name}.{k}", v) for k, v in zip(names, ints, strict=True)]
    return ex.b.add("Slice", [xs[0], *consts], node.name)


def _onnx_expand(ex, node, xs):
    # Expand broadcasts: a 1 on the batch dim keeps the input's batch size
    shape = np.array([1 if int(d) == -1 else int(d) for d in node.attrs["shape"]], np.int64)
    return ex.b.add("Expand", [xs[0], ex.b.const(f"{node.name}.shape", shape)], node.name)


_ONNX = {"reshape": _onnx_reshape, "flatten": _onnx_reshape, "transpose": _onnx_transpose,
         "permute": _onnx_transpose, "select": _onnx_select, "slice": _onnx_slice, "expand": _onnx_expand}


def _lower(ctx, node, op):
    ctx.vals[node.name] = ctx.vals[node.inputs[0]]
    ctx.fill(op, "layout", node.inputs, dict(node.attrs), {})
    op.out_shape = ctx.shapes[node.name]


def _run(op, c, state, vals, accs):
    # a program op carries its graph op's name (``op.op``) and attributes: the float definition applies to codes
    return run_float(op, [vals[op.inputs[0]]])


def simplify_view(shape: list[int], stride: list[int]) -> tuple[list[int], list[int]]:
    """The same strided view with fewer dims: size-1 dims dropped, and each dim merged into the next where it
    steps exactly over it (``stride[d] == stride[d + 1]·shape[d + 1]``); a contiguous view becomes one dim."""
    dims = [(n, s) for n, s in zip(shape, stride, strict=True) if n != 1]
    out: list[tuple[int, int]] = []
    for n, s in reversed(dims):
        if out and out[-1][1] * out[-1][0] == s:
            inner_n, inner_s = out.pop()
            out.append((inner_n * n, inner_s))
        else:
            out.append((n, s))
    out.reverse()
    return [n for n, _ in out], [s for _, s in out]


def _c(op, em):
    # every layout op of a contiguous tensor is a strided view of it: copy that view, in as few dims as it has
    x = op.inputs[0]
    view = run_float(op, [torch.empty(em.shape(x), device="meta")])
    shape, stride = simplify_view(list(view.shape), list(view.stride()))
    if len(shape) > 8:
        raise em.fail(f"{len(shape)} dims (the C views take at most 8)")
    init = (f"{{{len(shape)}, {{{', '.join(map(str, shape)) or 0}}}, {{{', '.join(map(str, stride)) or 0}}}, "
            f"{view.storage_offset()}}}")
    return [f"{{ static const hq_view v = {init};", f"  hq_view_copy({em.codes(x)}, &v, {em.codes(op.name)}); }}"]


register(
    *(OpDef(name, fn, role="data_movement", lower=_lower, onnx=_ONNX[name]) for name, fn in _LAYOUT.items()),
    ProgramKind("layout", "reshape / transpose / permute / flatten / select / slice (with a step) / expand of the codes (torch "
                          "semantics, batch dim included)", run=_run, result="codes", computes=False, c=_c),
)
