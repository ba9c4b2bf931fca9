"""Layout ops: they move codes and keep their grid (torch semantics, the batch dim included)."""

from __future__ import annotations

from .registry import OpDef, ProgramKind, register, run_float

_LAYOUT = {
    "reshape": lambda n, i: i[0].reshape(n.attrs["shape"]),
    "transpose": lambda n, i: i[0].transpose(n.attrs["dim0"], n.attrs["dim1"]),
    "permute": lambda n, i: i[0].permute(n.attrs["dims"]),
    "flatten": lambda n, i: i[0].flatten(n.attrs["start"], n.attrs["end"]),
    "select": lambda n, i: i[0].select(n.attrs["dim"], n.attrs["index"]),
    "slice": lambda n, i: i[0].narrow(n.attrs["dim"], n.attrs["start"], n.attrs["end"] - n.attrs["start"]),
    "expand": lambda n, i: i[0].expand(n.attrs["shape"]),
}


def _lower(ctx, node, op):
    ctx.vals[node.name] = ctx.vals[node.inputs[0]]
    ctx.fill(op, "layout", node.inputs, dict(node.attrs), {})
    op.out_shape = ctx.shapes[node.name]


def _run(op, c, state, vals, accs):
    # a program op carries its graph op's name (``op.op``) and attributes: the float definition applies to codes
    return run_float(op, [vals[op.inputs[0]]])


register(
    *(OpDef(name, fn, role="data_movement", lower=_lower) for name, fn in _LAYOUT.items()),
    ProgramKind("layout", "reshape / transpose / permute / flatten / select / slice / expand of the codes (torch "
                          "semantics, batch dim included)", run=_run, result="codes", computes=False),
)
