"""Static width analysis of the integer program: the worst-case bit width of every intermediate of every op.

From the program alone (its constants and the code range of every value), each op kind's ``widths`` hook in
the op table bounds the magnitude of each intermediate its kernel computes (``acc``: the result before
requantization); the requantization stage is bounded here. A magnitude ``m`` needs ``bits(m)`` bits as a
signed integer. The bounds hold for every input in range, so a kernel whose intermediates are all within
32 bits cannot overflow int32 on any image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..ops import program_kind
from .program import Program, ProgramOp


def bits(magnitude: int) -> int:
    """Bits of a signed (two's complement) integer holding every value in ``[-magnitude, magnitude]``."""
    return int(magnitude).bit_length() + 1


def _requant(op: ProgramOp, acc: int, per_channel: list[int] | None = None) -> dict[str, int]:
    """Magnitudes inside the requantization of an accumulator bounded by ``acc`` (``REQUANT_DOC``); with
    ``per_channel`` (the bound of each output channel, as a conv's or linear's), a per-channel requantization
    meets each channel's own bound (a channel of a large bias and a right shift beside one that shifts left)."""
    g = {k.split(".", 1)[1]: np.asarray(v).astype(np.int64).reshape(-1) for k, v in op.arrays.items()
         if k.startswith("requant.")}
    mode = op.attrs["requant"]["mode"]

    def bound(i: int, size: int) -> int:
        return int(per_channel[i]) if per_channel is not None and size == len(per_channel) and size > 1 else acc

    if mode == "shift":
        out = 0
        for i, k in enumerate(g["shift"].tolist()):
            a = bound(i, len(g["shift"]))
            out = max(out, a + (1 << (k - 1)) if k > 0 else a << -k)
        return {"requant": out}
    if mode in ("two_term", "threshold"):
        out = 0
        size = max(len(g["a"]), len(g["b"]), len(g["sign"]), len(g["n"]))
        for i in range(size):
            a, b, sign, n = (int(g[k][i if len(g[k]) > 1 else 0]) for k in ("a", "b", "sign", "n"))
            b = b if sign != 0 else a
            lift = max(-min(a, b), 0)
            v = bound(i, size)
            total = (v << (a + lift)) + abs(sign) * (v << (b + lift))
            out = max(out, total + ((1 << (n + lift - 1)) if n + lift > 0 else 0))
        return {"requant": out}
    return {"requant": acc}  # a float multiplier: not an integer program


def analyse(program: Program) -> list[dict[str, Any]]:
    """Per op with arithmetic, in execution order: ``magnitudes`` (intermediate -> largest |value|), ``bits``
    (the same as signed widths) and ``max_bits``, the widest."""
    bounds = program.code_bounds()
    done: dict[str, dict[str, int]] = {}
    rows = []
    for op in program.ops:
        hook = program_kind(op.kind).widths
        if hook is None:
            continue
        found = dict(hook(op, bounds, done, program))
        per_channel = found.pop("acc_per_channel", None)  # not a magnitude: the acc bound of each output channel
        mags = {k: int(v) for k, v in found.items()}
        if "requant" in op.attrs:
            mags.update(_requant(op, mags["acc"], per_channel))
        done[op.name] = mags
        widths = {k: bits(v) for k, v in mags.items()}
        rows.append({"index": op.index, "name": op.name, "kind": op.kind, "magnitudes": mags, "bits": widths,
                     "max_bits": max(widths.values())})
    return rows
