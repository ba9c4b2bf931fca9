"""The integer executor: an interpreter of the :class:`~hybridquant.integer.program.Program`.

It runs each op of the program on int64 code tensors with the kernels of
:mod:`.arith`, reading nothing but the program's constants:

* conv / linear / matmul: integer products summed exactly (through float32
  when every partial sum stays below 2^24, else float64, exact below 2^53),
  plus the int32 bias;
* requantization: arithmetic right shift with round-half-up, then saturation
  (:func:`~hybridquant.integer.arith.requantize`), two-term shifts or a
  threshold grid;
* residual adds and concats: operands aligned by left shifts, summed;
* non-linearities: lookup tables (per channel after outlier scaling);
* softmax and LayerNorm: the integer kernels of :mod:`.arith`.

The program of a model quantized with float multipliers (lowered with
``allow_float_multipliers=True``) runs too, rounding ``acc·M`` in float64:
not multiplier-free, for comparison only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..graph import ops as graph_ops
from ..graph.ir import Node
from ..graph.quantized import QuantizedGraph
from ..primitives import _bcast, quantize
from . import arith
from .lower import lower
from .program import Program, ProgramOp

_Consts = dict[str, torch.Tensor]
#: kinds whose accumulator is computed from the centred codes of all their inputs
_CENTRED = frozenset({"conv2d", "linear", "matmul", "add", "cat", "mul", "mul_const", "global_avg_pool"})


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """An int array as int64 (float arrays keep their type)."""
    return torch.from_numpy(np.array(arr, copy=True) if arr.dtype.kind == "f" else arr.astype(np.int64))


class IntegerModel:
    """Runs a :class:`Program` (or lowers a quantized graph first) on integer codes."""

    def __init__(self, source: QuantizedGraph | Program, allow_float_multipliers: bool = False):
        self.program = source if isinstance(source, Program) else lower(source, allow_float_multipliers)
        self.stats = self.program.stats()
        self._consts: dict[int, _Consts] = {op.index: {k: _tensor(v) for k, v in op.arrays.items()}
                                            for op in self.program.ops}
        self._layout = {op.index: Node(op.name, op.op, [], op.attrs) for op in self.program.ops if op.kind == "layout"}
        bound: dict[str, int] = {}  # largest |code - zero point| of every value with codes
        self._dtype: dict[int, torch.dtype] = {}
        for op in self.program.ops:
            c = self._consts[op.index]
            if op.kind == "layout":
                bound[op.name] = bound[op.inputs[0]]
            rng = ("qmin", "qmax", "zero_point") if op.kind == "quantize" else (
                "requant.qmin", "requant.qmax", "requant.zero_point")
            if rng[0] in c:
                zp = c[rng[2]].to(torch.int64)
                bound[op.name] = int(torch.maximum((int(c[rng[0]]) - zp).abs(), (int(c[rng[1]]) - zp).abs()).max())
            if op.kind in ("conv2d", "linear"):
                w = c["weight"]
                self._dtype[op.index] = _exact_dtype(math.prod(w.shape[1:]), bound[op.inputs[0]], int(w.abs().max()))
                c["weight"] = w.to(self._dtype[op.index])
            elif op.kind == "matmul":
                k = self.program[op.inputs[0]].out_shape[-1]
                self._dtype[op.index] = _exact_dtype(k, bound[op.inputs[0]], bound[op.inputs[1]])

    @torch.no_grad()
    def run(self, x: torch.Tensor, trace: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run on a float image batch; returns (dequantized logits, output codes).

        ``trace``, when given, receives every value's codes (int64) by op name.
        """
        vals: dict[str, torch.Tensor] = trace if trace is not None else {}
        accs: dict[str, torch.Tensor] = {}
        for op in self.program.ops:
            c = self._consts[op.index]
            if op.kind == "quantize":
                vals[op.name] = quantize(x, c["scale"], c["zero_point"], int(c["qmin"]), int(c["qmax"]),
                                         op.attrs.get("axis")).to(torch.int64)
            elif op.kind == "layout":
                vals[op.name] = graph_ops.run_op(self._layout[op.index], [vals[op.inputs[0]]])
            elif op.kind == "output":
                codes = vals[op.inputs[0]]
                return ((codes - c["zero_point"]).double() * c["scale"].double()).float(), codes
            elif op.kind != "deferred":
                acc = self._accumulate(op, c, vals, accs)
                if op.attrs.get("keep_accumulator"):
                    accs[op.name] = acc
                if "requant" in op.attrs:
                    vals[op.name] = _requant(op, c, acc)
        raise ValueError("program has no output op")

    def _accumulate(self, op: ProgramOp, c: _Consts, vals, accs) -> torch.Tensor:  # noqa: C901 - one branch per kind
        """The op's exact integer result before requantization (zero point 0)."""
        kind, a = op.kind, op.attrs
        if kind in _CENTRED:  # the inputs' codes less their zero points (a 1-d zero point along the last dim)
            ins = [vals[i] - c[f"in_zero_point.{k}"] for k, i in enumerate(op.inputs)]
        if kind in ("conv2d", "linear"):
            xc = ins[0].to(self._dtype[op.index])
            out = (F.conv2d(xc, c["weight"], None, a["stride"], a["padding"], a["dilation"], a["groups"])
                   if kind == "conv2d" else F.linear(xc, c["weight"])).double()
            if "bias" in c:
                out = out + _bcast(c["bias"].double(), out, 1 if kind == "conv2d" else out.dim() - 1)
            return torch.round(out).to(torch.int64)
        if kind == "matmul":
            dtype = self._dtype[op.index]
            return torch.round(torch.matmul(ins[0].to(dtype), ins[1].to(dtype)).double()).to(torch.int64)
        if kind in ("add", "cat"):
            parts = [arith.align(v, 0, c[f"align_shift.{k}"], 0) for k, v in enumerate(ins)]
            return parts[0] + parts[1] if kind == "add" else torch.cat(parts, dim=a["dim"])
        if kind == "mul":
            return ins[0] * ins[1]
        if kind == "mul_const":
            return ins[0]
        if kind == "global_avg_pool":
            return ins[0].sum(dim=(2, 3), keepdim=True)
        zp = c.get("requant.zero_point")
        if kind == "lut":
            return arith.apply_lut(vals[op.inputs[0]], c["table"], int(c["in_qmin"])) - zp
        if kind == "channel_lut":
            return arith.apply_channel_lut(vals[op.inputs[0]], c["table"], int(c["in_qmin"]), a["axis"]) - zp
        if kind == "channel_shift":
            src = op.inputs[0]
            return (accs[src] if a["reads"] == "accumulator" else vals[src]) - c["in_zero_point.0"]
        if kind == "softmax":
            return arith.int_softmax(vals[op.inputs[0]], 0, 0.0, int(c["out_exp"]), int(c["out_qmax"]), dim=a["dim"],
                                     frac_bits=int(c["frac_bits"]), table=c["exp_table"]) - zp
        if kind == "layer_norm":
            return arith.int_layernorm(
                vals[op.inputs[0]], int(c["in_zero_point"]), c["channel_shift"], c["gamma_q"], c["beta_q"],
                int(c["eps_q"]), int(c["frac_bits"]), int(c["out_shift"]), int(c["out_zero_point"]),
                int(c["out_qmin"]), int(c["out_qmax"]), sqrt_frac_bits=int(c["sqrt_frac_bits"])) - zp
        raise ValueError(f"unknown program op kind {kind} ({op.name})")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]

    def storage(self) -> dict[str, Any]:
        """The program's :meth:`~hybridquant.integer.program.Program.storage`."""
        return self.program.storage()

    def op_counts(self) -> dict[str, Any]:
        """The program's :meth:`~hybridquant.integer.program.Program.op_counts`."""
        return self.program.op_counts()


def _exact_dtype(terms: int, a_bound: int, b_bound: int) -> torch.dtype:
    """float32 when every partial sum of ``terms`` products is an exact float32 integer, else float64."""
    return torch.float32 if terms * a_bound * b_bound < (1 << 24) else torch.float64


def _requant(op: ProgramOp, c: _Consts, acc: torch.Tensor) -> torch.Tensor:
    """The op's requantization stage (:data:`~hybridquant.integer.program.REQUANT_DOC`)."""
    mode, axis = op.attrs["requant"]["mode"], op.attrs["requant"]["axis"]
    zp, qmin, qmax = c["requant.zero_point"], int(c["requant.qmin"]), int(c["requant.qmax"])
    if mode == "shift":
        return arith.requantize(acc, c["requant.shift"], zp, qmin, qmax, axis=axis)
    if mode == "float":  # an allowed float multiplier: rounds acc·M in float64
        wide = acc.double()
        return torch.clamp(torch.floor(wide * _bcast(c["requant.multiplier"], wide, axis) + 0.5).to(torch.int64) + _bcast(zp, acc, axis), qmin, qmax)
    a, b, sign, n = (c[f"requant.{k}"] for k in ("a", "b", "sign", "n"))
    if mode == "threshold":
        return arith.requantize_thresholds(acc, a, b, sign, n, c["requant.thresholds"], axis=axis)
    return arith.requantize_two_term(acc, a, b, sign, n, zp, qmin, qmax, axis=axis)
