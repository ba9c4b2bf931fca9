"""The integer executor: an interpreter of the :class:`~hybridquant.integer.program.Program`.

It runs each op of the program on int64 code tensors with the run function
its kind declares in the op table (:mod:`hybridquant.ops`), reading nothing
but the program's constants, and then the op's requantization stage:
arithmetic right shift with round-half-up and saturation
(:func:`~hybridquant.primitives.arith.requantize`), two-term shifts, or a
threshold grid. Products are summed exactly (through float32 when every
partial sum stays below 2^24, else float64, exact below 2^53).

The program of a model quantized with float multipliers (lowered with
``allow_float_multipliers=True``) runs too, rounding ``acc·M`` in float64:
not multiplier-free, for comparison only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..graph.quantized import QuantizedGraph
from ..ops import program_kind
from ..primitives import _bcast, arith
from .lower import lower
from .program import Program, ProgramOp

_Consts = dict[str, torch.Tensor]


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
        self._kinds = {op.index: program_kind(op.kind) for op in self.program.ops}
        bounds = self.program.code_bounds()
        self._state: dict[int, Any] = {}
        for op in self.program.ops:
            kind = self._kinds[op.index]
            if kind.prepare is not None:
                self._state[op.index] = kind.prepare(op, self._consts[op.index], bounds, self.program)

    @torch.no_grad()
    def run(self, x: torch.Tensor, trace: dict[str, torch.Tensor] | None = None,
            acc_trace: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run on a float image batch; returns (dequantized logits, output codes).

        ``trace``, when given, receives every value's codes (int64) by op name; ``acc_trace`` the accumulators
        that later ops read (``keep_accumulator``).
        """
        vals: dict[str, torch.Tensor] = trace if trace is not None else {}
        accs: dict[str, torch.Tensor] = acc_trace if acc_trace is not None else {}
        vals[self.program.ops[0].name] = x  # the input op quantizes it in place
        for op in self.program.ops:
            c, kind = self._consts[op.index], self._kinds[op.index]
            if kind.result == "none":
                continue
            out = kind.run(op, c, self._state.get(op.index), vals, accs)
            if kind.result == "logits":
                return out, vals[op.inputs[0]]
            if kind.result == "codes":
                vals[op.name] = out
                continue
            if op.attrs.get("keep_accumulator"):
                accs[op.name] = out
            if "requant" in op.attrs:
                vals[op.name] = _requant(op, c, out)
        raise ValueError("program has no output op")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]

    def storage(self) -> dict[str, Any]:
        """The program's :meth:`~hybridquant.integer.program.Program.storage`."""
        return self.program.storage()

    def op_counts(self) -> dict[str, Any]:
        """The program's :meth:`~hybridquant.integer.program.Program.op_counts`."""
        return self.program.op_counts()


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
