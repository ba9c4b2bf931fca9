"""``lower(qgraph) -> Program``: a quantized graph as an integer program, without running an image.

Every requantization multiplier must be a power of two (or 2^a ± 2^b with
``--shift-terms 2``); it becomes shifts. Non-linearities become lookup tables
(per channel where an outlier-scaling shift reads them), softmax and LayerNorm
the constants of the integer kernels of :mod:`.arith`. Each value is followed
symbolically — its scale, zero point and channel axis — and shapes come from
:meth:`~hybridquant.graph.ir.Graph.shapes` (meta tensors). A multiplier that
is not a power of two is refused with a clear error unless
``allow_float_multipliers=True``, which records it as a float (``mode
'float'``: not multiplier-free; for comparison only, never exported).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import HybridQuantError
from ..graph import ops as graph_ops
from ..graph.ir import ELEMENTWISE_OPS, LAYOUT_OPS, Node
from ..graph.quantized import QuantizedGraph
from ..primitives import pot_exponent
from ..qparams import QParams
from . import arith, nonlinear
from .program import Program, ProgramOp, code_dtype


@dataclass
class _Value:
    """What the lowering knows of a value: its scale (0-d, or per channel along ``axis``) and zero point."""

    scale: torch.Tensor
    zp: torch.Tensor
    axis: int | None = None


def _np_int(t: Any, dtype: Any = None) -> np.ndarray:
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


def _np_small(t: Any) -> np.ndarray:
    """An exact int array in the smallest signed type that holds it (shifts, zero points, code ranges)."""
    a = _np_int(t, np.int64)
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if a.size == 0 or (info.min <= int(a.min()) and int(a.max()) <= info.max):
            return a.astype(dtype)
    return a


def _pot_exponent(scale: torch.Tensor) -> np.ndarray | None:
    """``e`` with ``scale == 2^e`` (elementwise), or None when a scale is not a power of two."""
    try:
        return _np_int(pot_exponent(scale, "exact"))
    except ValueError:
        return None


def _json_attr(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _json_attr(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_attr(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return str(v)


def _zp_arrays(ins: list[_Value]) -> dict[str, np.ndarray]:
    return {f"in_zero_point.{k}": _np_small(v.zp) for k, v in enumerate(ins)}


def requant_arrays(name: str, s_in: torch.Tensor, qp: QParams, terms: int,
                   allow_float: bool) -> tuple[str, dict[str, np.ndarray]]:
    """``(mode, arrays)`` of the requantization from accumulator scale ``s_in`` to ``qp``: multiplier
    M = s_in / s_out as one shift (``shift``), two (``two_term``) or onto a threshold grid (``threshold``);
    a float multiplier (``float``) only where allowed."""
    m = (s_in.double() / qp.scale.double()).flatten()
    arrays = {"requant.zero_point": _np_small(qp.zero_point), "requant.qmin": _np_small(qp.qmin),
              "requant.qmax": _np_small(qp.qmax)}
    try:
        params = [arith.multiplier_to_shifts(float(v), terms) for v in m]
    except ValueError as exc:
        if not allow_float or qp.kind == "threshold":  # a threshold grid has no float form here
            raise HybridQuantError(
                f"requantization multiplier of node {name} is not a power of two "
                f"(e.g. {float(m[0]):.6g}); quantize with --scales pot or allow float multipliers"
            ) from exc
        return "float", {**arrays, "requant.multiplier": m.numpy().copy()}
    a, b, sign, n = (torch.tensor(v, dtype=torch.int64) for v in zip(*params, strict=True))
    if a.numel() == 1:
        a, b, sign, n = a[0], b[0], sign[0], n[0]
    if bool((sign == 0).all()) and qp.kind != "threshold":
        return "shift", {**arrays, "requant.shift": _np_small(n - a)}
    arrays.update({"requant.a": _np_small(a), "requant.b": _np_small(b), "requant.sign": _np_small(sign),
                   "requant.n": _np_small(n)})
    if qp.kind == "threshold":
        return "threshold", {**arrays, "requant.thresholds": _np_int(qp.thresholds)}
    return "two_term", arrays


def lower(qgraph: QuantizedGraph, allow_float_multipliers: bool = False) -> Program:
    """The integer program of ``qgraph``; HybridQuantError where it cannot be lowered (float nodes,
    quantizers without an integer kernel, float multipliers unless allowed)."""
    return _Lowering(qgraph, allow_float_multipliers).run()


class _Lowering:
    def __init__(self, qgraph: QuantizedGraph, allow_float: bool):
        self.qg, self.graph, self.allow_float = qgraph, qgraph.graph, allow_float
        if qgraph.float_nodes:
            raise HybridQuantError(f"cannot lower: nodes left in float ({', '.join(qgraph.float_nodes[:3])} ...)")
        for node in self.graph:
            qp = qgraph.act.get(node.name)
            if node.op == "group_norm":
                raise HybridQuantError(f"cannot lower {node.name}: integer GroupNorm is not implemented")
            if qp is not None and qp.kind == "threshold":
                if not all(u.op in ELEMENTWISE_OPS for u in self.graph.users(node.name)):
                    raise HybridQuantError(f"cannot lower {node.name}: a threshold grid may feed lookup tables only")
            elif qp is not None and qp.kind != "uniform":
                raise HybridQuantError(f"cannot lower {node.name}: {qp.kind} quantizers have no integer kernel yet")
        self.raw_readers = {n.inputs[0] for n in self.graph if n.attrs.get("raw_input")}
        self.shapes = self.graph.shapes()
        self.vals: dict[str, _Value] = {}  # codes
        self.wide: dict[str, _Value] = {}  # accumulators read by a per-channel shift
        self.deferred: dict[str, Node] = {}  # non-linearities read only through per-channel tables

    def run(self) -> Program:
        ops = []
        for index, node in enumerate(self.graph):
            op = ProgramOp(index, node.name, node.op, node.op, [], out_shape=None)
            qp = self.qg.act.get(node.name)
            if node.op == "output":
                out = self.vals[node.inputs[0]]
                self._fill(op, "output", node.inputs, {}, self._scale_arrays(out.scale, out.zp))
                op.out_shape = self.shapes[node.inputs[0]]
            elif node.op == "input":
                self.vals[node.name] = _Value(qp.scale, qp.zero_point)
                self._fill(op, "quantize", [], {"axis": qp.axis},
                           self._scale_arrays(qp.scale, qp.zero_point, qmin=_np_int(qp.qmin), qmax=_np_int(qp.qmax)))
                op.out_shape = self.shapes[node.name]
            elif node.op in LAYOUT_OPS:
                self.vals[node.name] = self.vals[node.inputs[0]]
                self._fill(op, "layout", node.inputs, dict(node.attrs), {})
                op.out_shape = self.shapes[node.name]
            else:
                acc = self._accumulate(node, op)
                if acc is not None and node.name in self.raw_readers:
                    self.wide[node.name] = acc
                if acc is not None and qp is not None:
                    self._requant(node, op, acc, qp)
            ops.append(op)
        read_wide = {op.inputs[0] for op in ops if op.attrs.get("reads") == "accumulator"}
        for op in ops:
            if op.name in read_wide:
                op.attrs["keep_accumulator"] = True
        return Program(ops, [int(d) for d in self.graph.meta["input_size"]], self.qg.config.to_dict())

    @staticmethod
    def _fill(op: ProgramOp, kind: str, inputs: list[str], attrs: dict[str, Any], arrays: dict[str, np.ndarray]):
        op.kind, op.inputs = kind, list(inputs)
        op.attrs.update(_json_attr(attrs))
        op.arrays.update(arrays)

    @staticmethod
    def _scale_arrays(scale: torch.Tensor, zp: torch.Tensor, **more: np.ndarray) -> dict[str, np.ndarray]:
        """The host's float32 scale, zero point, ``more``, and the scale's exponent when a power of two."""
        arrays = {"scale": scale.detach().cpu().float().numpy().copy(), "zero_point": _np_int(zp), **more}
        exp = _pot_exponent(scale)
        return arrays if exp is None else {**arrays, "scale_exp": exp}

    def _requant(self, node: Node, op: ProgramOp, acc: _Value, qp: QParams) -> None:
        terms = self.qg.config.shift_terms if node.name in self.qg.weight else 1
        mode, arrays = requant_arrays(node.name, acc.scale, qp, terms, self.allow_float)
        ndim = len(self.shapes[node.name])
        per_channel = (acc.scale.double() / qp.scale.double()).numel() > 1
        # a per-channel parameter without an axis broadcasts along the last dim (as torch does)
        axis = ((acc.axis if acc.axis is not None else ndim - 1) % ndim) if per_channel else None
        self._fill(op, op.kind, op.inputs, {"requant": {"mode": mode, "axis": axis}}, arrays)
        op.out_shape = self.shapes[node.name]
        self.vals[node.name] = _Value(qp.scale, qp.zero_point)

    def _accumulate(self, node: Node, op: ProgramOp) -> _Value | None:  # noqa: C901 - one branch per op kind
        """Record ``node``'s integer op; returns its accumulator (zero point 0) or None (deferred)."""
        kind, a, ins = node.op, node.attrs, [self.vals[i] for i in node.inputs if i in self.vals]
        zero = torch.tensor(0)
        if kind in ("conv2d", "linear"):
            wq = self.qg.weight[node.name]
            arrays = {"weight": _np_int(self.qg.weight_int[node.name], code_dtype(wq.qmin, wq.qmax)),
                      **_zp_arrays(ins[:1])}
            if node.name in self.qg.bias_int:
                arrays["bias"] = _np_int(self.qg.bias_int[node.name])
            attrs = {k: a[k] for k in ("stride", "padding", "dilation", "groups")} if kind == "conv2d" else {}
            # the exports pack weights whose width is not a multiple of 8
            self._fill(op, kind, node.inputs[:1], {**attrs, "weight_bits": int(wq.bits)}, arrays)
            axis = 1 if kind == "conv2d" else len(self.shapes[node.name]) - 1
            return _Value(ins[0].scale.double() * wq.scale.double(), zero, axis)
        if kind in ("matmul", "mul"):
            self._fill(op, kind, node.inputs, {}, _zp_arrays(ins))
            return _Value(ins[0].scale.double() * ins[1].scale.double(), zero)
        if kind in ("add", "cat"):
            fine = min(float(v.scale.min()) for v in ins)
            shifts = {f"align_shift.{k}": _np_small(pot_exponent(v.scale.double() / fine, "round"))
                      for k, v in enumerate(ins)}
            self._fill(op, kind, node.inputs, {"dim": int(a["dim"])} if kind == "cat" else {},
                       {**_zp_arrays(ins), **shifts})
            return _Value(torch.tensor(fine, dtype=torch.float64), zero)
        if kind == "mul_const":
            self._fill(op, kind, node.inputs, {}, _zp_arrays(ins))
            return _Value(ins[0].scale.double() * a["value"], zero)
        if kind == "global_avg_pool":
            self._fill(op, kind, node.inputs, {}, _zp_arrays(ins))
            _, _, h, w = self.shapes[node.inputs[0]]
            return _Value(ins[0].scale.double() / (h * w), zero)
        if kind in ELEMENTWISE_OPS:
            return self._elementwise(node, op, ins[0])
        if kind in ("softmax", "layer_norm"):
            return self._nonlinear(node, op)
        if kind == "scale_channels":
            return self._scale_channels(node, op)
        raise HybridQuantError(f"cannot lower op {kind} ({node.name})")

    def _elementwise(self, node: Node, op: ProgramOp, x: _Value) -> _Value | None:
        qp = self.qg.act.get(node.name)
        if node.name in self.raw_readers:  # per-channel shifts read f(x) itself: per-channel tables
            self.deferred[node.name] = node
        if qp is None:
            self._fill(op, "deferred", node.inputs[:1], {}, {})
            return None
        in_qp = self.qg.act[self.graph.producer(node.inputs[0]).name]
        fn = graph_ops.unary_fn(node)
        if in_qp.kind == "threshold":  # one entry per interval, at its representative value
            table = arith.lut_codes(fn, in_qp.levels.double(), float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax)
        else:
            table = arith.build_lut(fn, float(x.scale), int(x.zp), in_qp.qmin, in_qp.qmax, float(qp.scale),
                                    int(qp.zero_point), qp.qmin, qp.qmax)
        self._fill(op, "lut", node.inputs[:1], {}, {"table": _np_int(table, code_dtype(qp.qmin, qp.qmax)),
                                                     "in_qmin": _np_small(in_qp.qmin)})
        # already at the output grid: an identity requantization (multiplier 1)
        return _Value(qp.scale.double(), torch.tensor(0))

    def _nonlinear(self, node: Node, op: ProgramOp) -> _Value:
        """Softmax / LayerNorm: the constants of the shared integer kernels (what the simulation runs)."""
        qp, in_qp = self.qg.act[node.name], self.qg.input_qparams(node)
        if not nonlinear.supported(node, in_qp, qp):
            raise HybridQuantError(f"cannot lower {node.name}: {node.op} needs power-of-two input and output scales")
        if node.op == "softmax":
            # the full table (every possible spread of the input codes)
            table = arith.softmax_exp_table(float(in_qp.scale), in_qp.qmax - in_qp.qmin + 1, nonlinear.FRAC_BITS)
            self._fill(op, "softmax", node.inputs[:1], {"dim": int(node.attrs["dim"])}, {
                "exp_table": _np_int(table), "frac_bits": _np_small(nonlinear.FRAC_BITS),
                "out_exp": _np_small(nonlinear.softmax_out_exp(qp)), "out_qmax": _np_small(qp.qmax)})
        else:
            k = nonlinear.LayerNormKernel(node, in_qp, qp)
            self._fill(op, "layer_norm", node.inputs[:1], {"dim": -1}, {
                "in_zero_point": _np_small(k.in_zp), "channel_shift": _np_small(k.shift),
                "gamma_q": _np_int(k.gamma_q), "beta_q": _np_int(k.beta_q), "eps_q": _np_int(k.eps_q),
                "frac_bits": _np_small(nonlinear.FRAC_BITS), "sqrt_frac_bits": _np_small(k.sqrt_frac_bits),
                "out_shift": _np_small(k.out_shift), "out_zero_point": _np_small(qp.zero_point),
                "out_qmin": _np_small(qp.qmin), "out_qmax": _np_small(qp.qmax)})
        return _Value(qp.scale.double(), torch.tensor(0))

    def _scale_channels(self, node: Node, op: ProgramOp) -> _Value:
        src, qp = node.inputs[0], self.qg.act[node.name]
        inv_alpha = node.params["inv_alpha"].double()
        axis = node.attrs["dim"] % len(self.shapes[src])
        if src in self.deferred:  # per-channel lookup table: f(x) / alpha_j on the output grid
            prod = self.deferred[src]
            x = self.vals[prod.inputs[0]]
            in_qp = self.qg.act[self.graph.producer(prod.inputs[0]).name]
            out_scale, fn = qp.scale.double() / inv_alpha, graph_ops.unary_fn(prod)
            if in_qp.kind == "threshold":  # one column per interval, at its representative value
                table = arith.lut_codes(fn, in_qp.levels.double().unsqueeze(0), out_scale.reshape(-1, 1),
                                        int(qp.zero_point), qp.qmin, qp.qmax)
            else:
                table = arith.build_channel_lut(fn, float(x.scale), int(x.zp), in_qp.qmin, in_qp.qmax, out_scale,
                                                int(qp.zero_point), qp.qmin, qp.qmax)
            self._fill(op, "channel_lut", prod.inputs[:1], {"axis": axis, "fused": prod.name, "fused_op": prod.op},
                       {"table": _np_int(table, code_dtype(qp.qmin, qp.qmax)), "in_qmin": _np_small(in_qp.qmin)})
            return _Value(qp.scale.double(), torch.tensor(0))
        v = self.wide.get(src) or self.vals[src]
        if v.axis is not None and v.axis != axis:
            raise HybridQuantError(f"cannot lower {node.name}: channel axes disagree")
        self._fill(op, "channel_shift", [src], {"axis": axis, "reads": "accumulator" if src in self.wide else "codes"},
                   _zp_arrays([v]))
        per_channel = v.scale.double().flatten() if v.scale.dim() else v.scale.double().expand(inv_alpha.numel())
        return _Value(per_channel * inv_alpha, torch.tensor(0), axis)
