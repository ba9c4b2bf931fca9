"""What the lowering knows of a value, and the exact conversions of constants into program arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..primitives import pot_exponent


@dataclass
class Value:
    """A value during lowering: its scale (0-d, or per channel along ``axis``) and zero point; no data."""

    scale: torch.Tensor
    zp: torch.Tensor
    axis: int | None = None


def zero() -> torch.Tensor:
    """The zero point of an accumulator."""
    return torch.tensor(0)


_INT_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64)


def code_dtype(qmin: int, qmax: int) -> np.dtype:
    """The smallest integer type holding codes in ``[qmin, qmax]``."""
    for t in _INT_TYPES:
        info = np.iinfo(t)
        if info.min <= qmin and qmax <= info.max:
            return np.dtype(t)
    raise ValueError(f"codes [{qmin}, {qmax}] do not fit int64")


def np_int(t: Any, dtype: Any = None) -> np.ndarray:
    """An exact int array: ``dtype``, or int32 when every value fits it, else int64."""
    a = torch.as_tensor(t).detach().cpu()
    if a.is_floating_point():
        if not bool(torch.equal(a, torch.round(a))):
            raise ValueError("not an integer tensor")
        a = a.to(torch.float64)
    a = np.asarray(a.to(torch.int64).numpy(), dtype=np.int64)
    if dtype is None:
        small = a.size == 0 or (int(a.min()) >= np.iinfo(np.int32).min and int(a.max()) <= np.iinfo(np.int32).max)
        dtype = np.int32 if small else np.int64
    out = a.astype(dtype)
    if not np.array_equal(out.astype(np.int64), a):
        raise ValueError(f"values do not fit {np.dtype(dtype).name}")
    return out


def np_small(t: Any) -> np.ndarray:
    """An exact int array in the smallest signed type that holds it (shifts, zero points, code ranges)."""
    a = np_int(t, np.int64)
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if a.size == 0 or (info.min <= int(a.min()) and int(a.max()) <= info.max):
            return a.astype(dtype)
    return a


def pot_exponent_array(scale: torch.Tensor) -> np.ndarray | None:
    """``e`` with ``scale == 2^e`` (elementwise), or None when a scale is not a power of two."""
    try:
        return np_int(pot_exponent(scale, "exact"))
    except ValueError:
        return None


def zp_arrays(ins: list[Value]) -> dict[str, np.ndarray]:
    """``in_zero_point.k`` of every input."""
    return {f"in_zero_point.{k}": np_small(v.zp) for k, v in enumerate(ins)}


def json_attr(v: Any) -> Any:
    """``v`` as JSON-able data (tensors of one element as numbers, anything else unknown as text)."""
    if isinstance(v, dict):
        return {k: json_attr(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_attr(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return str(v)


def centred_inputs(op: Any, consts: dict[str, torch.Tensor], vals: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The codes of ``op``'s inputs less their zero points (a 1-d zero point lies along the last dim)."""
    return [vals[i] - consts[f"in_zero_point.{k}"] for k, i in enumerate(op.inputs)]


#: fraction bits of the fixed-point values inside the integer softmax and LayerNorm kernels
FRAC_BITS = 16


def absmax(arr: Any) -> int:
    """The largest ``|v|`` of an integer array (0 for an empty one), as a Python int."""
    a = np.asarray(arr).astype(np.int64)
    return int(np.abs(a).max()) if a.size else 0


def table_widths(op: Any, bounds: Any, done: Any, program: Any) -> dict[str, int]:
    """Magnitudes of a lookup: its entries less the requant zero point."""
    table = np.asarray(op.arrays["table"]).astype(np.int64) - int(np.asarray(op.arrays["requant.zero_point"]))
    return {"acc": absmax(table)}


def c_table_out(op: Any, em: Any) -> tuple[int, str]:
    """The last two arguments of a C table lookup (``hq_lut``, ``hq_channel_lut``): the zero point taken off its
    entries and where they go. When the op's requantization is the identity on every entry (a shift by 0, one zero
    point, every entry within [qmin, qmax]), the entries are the codes themselves (``em.codes_written``: no
    requantization pass); else the accumulator, entries less the zero point, which the requantization reads."""
    table, arr = np.asarray(op.arrays["table"]), op.arrays
    shift, zp = np.asarray(arr.get("requant.shift", 1)), np.asarray(arr["requant.zero_point"])
    if (op.attrs["requant"]["mode"] == "shift" and shift.size and not shift.any() and zp.size == 1
            and int(np.asarray(arr["requant.qmin"])) <= table.min() and table.max() <= int(np.asarray(arr["requant.qmax"]))):
        return 0, em.codes_written()
    return em.scalar("requant.zero_point"), em.acc()


def c_centred(op: Any, em: Any, source: str | None = None) -> list[str]:
    """C of ``acc = v - in_zero_point.0`` (the zero point along the last dim); ``v``: the C expression ``source``,
    the codes of the op's input by default."""
    n, last = math.prod(op.out_shape), op.out_shape[-1]
    v = source or em.codes(op.inputs[0])
    return [f"hq_center_shift({v}, {em.arg('in_zero_point.0')}, {n}, {last}, (hq_param){{hq_zero, 1}}, {em.acc()});"]


def c_operands(op: Any, em: Any) -> tuple[str, str]:
    """The two inputs of an elementwise op, which the C kernels take of one shape (no broadcasting)."""
    a, b = op.inputs
    if em.shape(a) != em.shape(b):
        raise em.fail(f"shapes {em.shape(a)} and {em.shape(b)} differ (broadcasting is not supported)")
    return a, b


def pot_uniform(in_qp: Any, out_qp: Any) -> bool:
    """Whether both quantizers are uniform with power-of-two scales and the output's is one scale: what the
    integer softmax and LayerNorm kernels need."""
    if in_qp is None or out_qp is None or in_qp.grid != "uniform" or out_qp.grid != "uniform":
        return False
    return in_qp.is_pot and out_qp.is_pot and out_qp.scale.dim() == 0


def elements(shape) -> int:
    """Number of elements of a shape (1 for a scalar)."""
    return math.prod(shape) if shape else 1


def per_element(op, **per: int):
    """Counts of ops that do ``per[k]`` operations of each kind ``k`` per output element."""
    n = elements(op.out_shape)
    return {k: v * n for k, v in per.items()}
