"""The graph's input and output: the host's input quantizer and output dequantization."""

from __future__ import annotations

import torch

from ..primitives import quantize
from .registry import OpDef, ProgramKind, register
from .values import np_int, per_element, pot_exponent_array


def host_scale_arrays(scale: torch.Tensor, zp: torch.Tensor, **more) -> dict:
    """The host's float32 scale, zero point, ``more``, and the scale's exponent when a power of two."""
    arrays = {"scale": scale.detach().cpu().float().numpy().copy(), "zero_point": np_int(zp), **more}
    exp = pot_exponent_array(scale)
    return arrays if exp is None else {**arrays, "scale_exp": exp}


def _lower_input(ctx, node, op):
    qp = ctx.qg.act[node.name]
    ctx.vals[node.name] = ctx.value(qp)
    ctx.fill(op, "quantize", [], {"axis": qp.axis},
             host_scale_arrays(qp.scale, qp.zero_point, qmin=np_int(qp.qmin), qmax=np_int(qp.qmax)))
    op.out_shape = ctx.shapes[node.name]


def _lower_output(ctx, node, op):
    out = ctx.vals[node.inputs[0]]
    ctx.fill(op, "output", node.inputs, {}, host_scale_arrays(out.scale, out.zp))
    op.out_shape = ctx.shapes[node.inputs[0]]


def _quantize(op, c, state, vals, accs):
    return quantize(vals[op.name], c["scale"], c["zero_point"], int(c["qmin"]), int(c["qmax"]),
                    op.attrs.get("axis")).to(torch.int64)


def _output(op, c, state, vals, accs):
    return ((vals[op.inputs[0]] - c["zero_point"]).double() * c["scale"].double()).float()


register(
    OpDef("input", None, role="source", lower=_lower_input),
    OpDef("output", None, role="sink", lower=_lower_output),
    ProgramKind("quantize", "codes = clamp(floor(x / scale + 1/2) + zero_point, qmin, qmax), in float32 on the host",
                run=_quantize, result="codes", host=True,
                counts=lambda op, program: per_element(op, lookups=1)),  # the C runtime's input table
    ProgramKind("output", "logits = (codes - zero_point) * scale in float64, then float32 (host side)",
                run=_output, result="logits", host=True),
)
