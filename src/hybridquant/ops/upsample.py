"""Bilinear upsampling by integer factors (half-pixel centres): integer weights in units of 1/(2·factor) per
dim, so the program's sum is exact and the weights' product enters the requantization."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import HybridQuantError
from ..primitives import arith, quantize
from .registry import OpDef, ProgramKind, register
from .values import Value, centred_inputs, per_element, zero, zp_arrays


def _factors(node) -> tuple[int, int]:
    fh, fw = (int(v) for v in node.attrs["scale"])
    return fh, fw


def _float(node, inputs):
    return F.interpolate(inputs[0], scale_factor=_factors(node), mode="bilinear", align_corners=False)


def _supported(in_qp) -> bool:
    return in_qp is not None and in_qp.grid == "uniform" and in_qp.scale.dim() == 0 and in_qp.zero_point.dim() == 0


def _unit(node) -> int:
    fh, fw = _factors(node)
    return 4 * fh * fw


def _simulate(node, in_qp, out_qp):
    if not _supported(in_qp):
        return None

    def run(inputs):  # the program's exact integer sum, at the input scale over the weights' unit
        q = quantize(inputs[0], in_qp.scale, in_qp.zero_point, in_qp.qmin, in_qp.qmax).to(torch.int64)
        acc = arith.int_upsample_bilinear(q - in_qp.zero_point.to(torch.int64), *_factors(node))
        return (acc.double() * (float(in_qp.scale) / _unit(node))).float()
    return run


def _lower(ctx, node, op):
    in_qp, x = ctx.qg.input_qparams(node), ctx.vals[node.inputs[0]]
    if not _supported(in_qp):
        raise HybridQuantError(f"cannot lower {node.name}: upsample_bilinear needs a per-tensor uniform input")
    ctx.fill(op, "upsample_bilinear", node.inputs, {"scale": list(_factors(node))}, zp_arrays([x]))
    return Value(x.scale.double() / _unit(node), zero())


def _run(op, c, state, vals, accs):
    fh, fw = (int(v) for v in op.attrs["scale"])
    return arith.int_upsample_bilinear(centred_inputs(op, c, vals)[0], fh, fw)


def _c(op, em):
    x = op.inputs[0]
    _, channels, h, w = em.shape(x)
    fh, fw = (int(v) for v in op.attrs["scale"])
    return [f"hq_upsample_bilinear({em.codes(x)}, {em.scalar('in_zero_point.0')}, {channels}, {h}, {w}, {fh}, {fw}, "
            f"{em.acc()});"]


def _onnx(ex, node, xs):
    fh, fw = _factors(node)
    scales = ex.b.const(f"{node.name}.scales", torch.tensor([1.0, 1.0, fh, fw]).numpy())
    return ex.b.add("Resize", [xs[0], "", scales], node.name, mode="linear",
                    coordinate_transformation_mode="half_pixel")


register(
    OpDef("upsample_bilinear", _float, lower=_lower, simulate=_simulate, onnx=_onnx, channel_axis=1),
    ProgramKind("upsample_bilinear", "acc = bilinear upsampling of (x - in_zero_point.0) [B, C, H, W] by integer "
                                     "factors (fh, fw) = attrs.scale, half-pixel centres: along each dim output i "
                                     "reads p = max(0, 2i + 1 - f), i0 = p // 2f, i1 = min(i0 + 1, n - 1) with "
                                     "weights 2f - p % 2f and p % 2f (acc is 4 fh fw times the float result; "
                                     "arith.int_upsample_bilinear); then requant",
                run=_run, c=_c, counts=lambda op, program: per_element(op, multiplies=6, adds=4),
                widths=lambda op, bounds, done, program: {
                    "acc": bounds[op.inputs[0]] * 4 * int(op.attrs["scale"][0]) * int(op.attrs["scale"][1])}),
)
