"""The integer program: a quantized graph run on integers only.

:class:`IntegerModel` lowers a :class:`~hybridquant.graph.quantized.QuantizedGraph`
once (checking that every requantization multiplier is a power of two — or
2^a ± 2^b with ``--shift-terms 2`` — and precomputing shifts, lookup tables
and LayerNorm constants) and then runs it on int64 code tensors:

* conv / linear / matmul: integer products summed exactly (computed through
  float64, exact below 2^53), plus the int32 bias at s_in·s_w;
* requantization: arithmetic right shift with round-half-up, then saturation
  (:func:`~hybridquant.integer.arith.requantize`);
* residual adds and concats: operands aligned to the finest scale by left
  shifts, summed, requantized;
* SiLU / GELU / sigmoid / ReLU / hardswish: lookup tables indexed by the code;
* softmax and LayerNorm: the integer kernels of :mod:`.arith`;
* outlier-scaling shifts (``scale_channels``): a per-channel requantization
  of the producer's wide accumulator (or a per-channel lookup table after a
  non-linearity).

A multiplier that is not a power of two is refused with a clear error unless
``allow_float_multipliers=True``, which rounds ``acc·M`` in float64 instead
(not multiplier-free; for comparison only).

The lowering is explicit: the dry run in the constructor records, per node,
every integer constant the program uses (:class:`ProgramOp`), and
:meth:`IntegerModel.program` returns that list in execution order — what
:mod:`hybridquant.export` writes for hardware.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HybridQuantError
from ..graph import ops as graph_ops
from ..graph.ir import ELEMENTWISE_OPS, LAYOUT_OPS, Node
from ..graph.quantized import QuantizedGraph
from ..primitives import pot_exponent, quantize
from ..qparams import QParams
from . import arith, nonlinear


@dataclass
class IntValue:
    """Integer codes ``q`` with float ``scale`` (0-d or per channel along ``axis``) and zero point."""

    q: torch.Tensor
    scale: torch.Tensor
    zp: torch.Tensor
    axis: int | None = None

    def centred(self) -> torch.Tensor:
        return self.q - _bc(self.zp, self.q, self.axis)


def _bc(t: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    if t.dim() == 0 or axis is None:
        return t
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.reshape(shape)


class Requant:
    """acc at scale ``s_in`` -> codes at ``qp``: multiplier M = s_in / s_out, as shifts."""

    def __init__(self, name: str, s_in: torch.Tensor, qp: QParams, terms: int, allow_float: bool):
        m = (s_in.double() / qp.scale.double()).flatten()
        self.qp = qp
        self.params: list[tuple[int, int, int, int]] | None = []
        self.m = m
        try:
            self.params = [arith.multiplier_to_shifts(float(v), terms) for v in m]
        except ValueError as exc:
            if not allow_float or qp.kind == "threshold":  # a threshold grid has no float form here
                raise HybridQuantError(
                    f"requantization multiplier of node {name} is not a power of two "
                    f"(e.g. {float(m[0]):.6g}); quantize with --scales pot or allow float multipliers"
                ) from exc
            self.params = None

    def __call__(self, acc: torch.Tensor, axis: int | None) -> torch.Tensor:
        qp = self.qp
        zp = qp.zero_point.to(torch.int64)
        if self.params is None:  # float fallback (explicitly allowed)
            m = _bc(self.m, acc, axis if self.m.numel() > 1 else None)
            return torch.clamp(torch.floor(acc.double() * m + 0.5).to(torch.int64) + zp, qp.qmin, qp.qmax)
        a, b, sign, n = (torch.tensor(v, dtype=torch.int64) for v in zip(*self.params, strict=True))
        ax = axis if a.numel() > 1 else None
        if a.numel() == 1:
            a, b, sign, n = a[0], b[0], sign[0], n[0]
        if qp.kind == "threshold":
            return arith.requantize_thresholds(acc, a, b, sign, n, qp.thresholds, axis=ax)
        if bool((sign == 0).all()):
            return arith.requantize(acc, n - a, zp, qp.qmin, qp.qmax, axis=ax)
        return arith.requantize_two_term(acc, a, b, sign, n, zp, qp.qmin, qp.qmax, axis=ax)


def _code_bound(qp: QParams) -> int:
    """Largest |code − zero point| a tensor quantized with ``qp`` can hold."""
    zp = qp.zero_point.to(torch.int64)
    return int(torch.maximum((qp.qmin - zp).abs(), (qp.qmax - zp).abs()).max())


def _exact_dtype(terms: int, a_bound: int, b_bound: int) -> torch.dtype:
    """float32 when every partial sum of ``terms`` products is an exact float32 integer, else float64."""
    return torch.float32 if terms * a_bound * b_bound < (1 << 24) else torch.float64


def _exact_int(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x).to(torch.int64)


# --- the lowered program ---------------------------------------------------------
#: how each kind of :class:`ProgramOp` runs (the contract of the export formats)
PROGRAM_KINDS = {
    "quantize": "codes = clamp(floor(x / scale + 1/2) + zero_point, qmin, qmax), in float32 on the host",
    "layout": "reshape / transpose / permute / flatten / select / slice / expand of the codes (torch semantics, "
              "batch dim included)",
    "conv2d": "acc = conv2d(x - in_zero_point.0, weight) + bias, exact int; then requant",
    "linear": "acc = (x - in_zero_point.0) @ weight^T + bias, exact int; then requant",
    "matmul": "acc = (a - in_zero_point.0) @ (b - in_zero_point.1), exact int; then requant",
    "add": "acc = ((a - in_zero_point.0) << align_shift.0) + ((b - in_zero_point.1) << align_shift.1); then requant",
    "cat": "acc = cat([(x_k - in_zero_point.k) << align_shift.k], attrs.dim); then requant",
    "mul": "acc = (a - in_zero_point.0) * (b - in_zero_point.1); then requant",
    "mul_const": "acc = x - in_zero_point.0 (the constant is folded into the requant); then requant",
    "global_avg_pool": "acc = sum over H, W of (x - in_zero_point.0), keepdim (1/HW is in the requant); then requant",
    "lut": "codes = table[x - in_qmin]; acc = codes - requant.zero_point; then the identity requant",
    "deferred": "no codes: a non-linearity read only through a consumer's per-channel table (channel_lut)",
    "channel_lut": "codes = table[c, x - in_qmin] for channel c along attrs.axis; then the identity requant",
    "channel_shift": "acc = v - in_zero_point.0, v = the input's accumulator (attrs.reads) or codes; "
                     "then a per-channel requant along attrs.axis",
    "softmax": "d = x - max(x); E = exp_table[d + len - 1]; S = sum E; "
               "codes = min(out_qmax, ((E << (out_exp + 1)) + S) // (2 S)) along attrs.dim; then the identity requant",
    "layer_norm": "over the last dim (C channels): x_j = (x_j - in_zero_point) << channel_shift_j; S1 = sum x; "
                  "S2 = sum x^2; y_j = C x_j - S1; V = C S2 - S1^2 + eps_q; "
                  "r = max(1, isqrt(V << 2 sqrt_frac_bits)) (floor square root); "
                  "n_j = ((y_j << (frac_bits + sqrt_frac_bits + 1)) + r) // (2 r) (division rounded half up); "
                  "codes = clamp(srr(n_j gamma_q_j + beta_q_j, out_shift) + out_zero_point, out_qmin, out_qmax); "
                  "then the identity requant (arith.int_layernorm)",
    "output": "logits = (codes - zero_point) * scale in float64, then float32 (host side)",
}
#: the requantization stage, recorded on every op that has ``requant.*`` arrays
REQUANT_DOC = (
    "mode 'shift': codes = clamp(srr(acc, requant.shift) + requant.zero_point, requant.qmin, requant.qmax); "
    "mode 'two_term': codes = clamp(srr((acc << a) + sign * (acc << b), n) + zero_point, qmin, qmax); "
    "srr(v, k) = (v + (1 << (k - 1))) >> k for k > 0 (round half up, arithmetic shift), v << -k for k <= 0; "
    "mode 'threshold' (a lookup table's input on a threshold grid): v = ((acc << a) + sign * (acc << b)) >> n "
    "(floor: no rounding bias; a left shift for n <= 0), codes = the number of requant.thresholds <= v; "
    "per-channel parameters lie along attrs.requant.axis"
)


@dataclass
class ProgramOp:
    """One op of the lowered integer program: what it reads and every integer constant it uses.

    ``kind`` says how it runs (:data:`PROGRAM_KINDS`), ``inputs`` names the
    values it reads (a node's codes, or for ``reads == 'accumulator'`` its
    wide accumulator), ``attrs`` holds structural attributes (JSON-able) and
    ``arrays`` the integer constants (0-d arrays for scalars). A per-channel
    (1-d) ``in_zero_point.k`` / ``align_shift.k`` lies along the last dim.
    ``out_shape`` is the shape of the op's codes for a batch of one (None
    when it produces none). ``attrs['requant']`` (``mode``, ``axis``) comes
    with the ``requant.*`` arrays; ``attrs['keep_accumulator']`` marks an op
    whose accumulator a later ``channel_shift`` reads.
    """

    index: int
    name: str
    op: str
    kind: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    out_shape: list[int] | None = None


_INT_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64)


def code_dtype(qmin: int, qmax: int) -> np.dtype:
    """The smallest integer type holding codes in ``[qmin, qmax]``."""
    for t in _INT_TYPES:
        info = np.iinfo(t)
        if info.min <= qmin and qmax <= info.max:
            return np.dtype(t)
    raise ValueError(f"codes [{qmin}, {qmax}] do not fit int64")


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


_SIGNED_TYPES = (np.int8, np.int16, np.int32, np.int64)


def _np_small(t: Any) -> np.ndarray:
    """An exact int array in the smallest signed type that holds it (shifts, zero points, code ranges)."""
    a = _np_int(t, np.int64)
    for dtype in _SIGNED_TYPES:
        info = np.iinfo(dtype)
        if a.size == 0 or (info.min <= int(a.min()) and int(a.max()) <= info.max):
            return a.astype(dtype)
    return a


def requant_kind(r: Requant) -> str:
    """``identity`` (multiplier exactly 1 in every channel: shift 0), ``shift`` (2^-k), ``two_term``,
    ``threshold`` (onto a threshold grid) or ``float`` (an allowed float multiplier)."""
    if r.params is None:
        return "float"
    if r.qp.kind == "threshold":
        return "threshold"
    if any(sign != 0 for _, _, sign, _ in r.params):
        return "two_term"
    return "identity" if all(n == a for a, _, _, n in r.params) else "shift"


# --- what the hardware stores ------------------------------------------------------
#: op kinds that run on the host (float32 input quantizer, float output dequantization): not deployed
HOST_KINDS = frozenset({"quantize", "output"})
#: op kinds that compute nothing (data movement, or a non-linearity fused into a per-channel table)
NO_COMPUTE_KINDS = frozenset({"layout", "deferred"})
#: the categories of :func:`storage_breakdown`, in report order
STORAGE_CATEGORIES = ("weights", "biases", "requant_shifts", "thresholds", "zero_points_and_ranges",
                      "align_shifts", "lookup_tables", "softmax_constants", "layernorm_constants", "other")


def packed_weight_bits(op: ProgramOp | dict[str, Any], name: str) -> int | None:
    """The bit width a weight array is packed at in the exports, or None when it is stored as is.

    Weights of a bit width that is not a multiple of 8 (e.g. 4 or 6 bits) are packed into a bit stream
    (:func:`packed_nbytes` bytes; layout in ``hybridquant.export.program.PACKING``)."""
    attrs = op.attrs if isinstance(op, ProgramOp) else op["attrs"]
    bits = attrs.get("weight_bits")
    if name != "weight" or bits is None or int(bits) % 8 == 0:
        return None
    return int(bits)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of ``count`` values of ``bits`` bits each, packed back to back (the last byte zero-padded)."""
    return (count * bits + 7) // 8


def array_category(kind: str, name: str) -> str:
    """Which :data:`STORAGE_CATEGORIES` entry the array ``name`` of an op of ``kind`` belongs to."""
    if name == "requant.thresholds":
        return "thresholds"
    if name in ("requant.shift", "requant.a", "requant.b", "requant.sign", "requant.n", "requant.multiplier"):
        return "requant_shifts"
    if name.startswith("requant."):
        return "zero_points_and_ranges"
    if kind == "softmax":
        return "softmax_constants"
    if kind == "layer_norm":
        return "layernorm_constants"
    if name == "weight":
        return "weights"
    if name == "bias":
        return "biases"
    if name == "table":
        return "lookup_tables"
    if name.startswith("align_shift"):
        return "align_shifts"
    if name.startswith("in_zero_point") or name == "in_qmin":
        return "zero_points_and_ranges"
    return "other"


def storage_breakdown(ops: list[ProgramOp]) -> dict[str, Any]:
    """Bytes of every constant of a lowered program, as the exports store them.

    ``deployed_bytes``: everything the integer hardware must hold (weights at their bit width, packed when
    below 8 bits; biases; requantization shifts; threshold grids; lookup tables; softmax and LayerNorm
    constants; zero points, code ranges and alignment shifts), with ``breakdown`` by
    :data:`STORAGE_CATEGORIES`; ``host_bytes``: the host's input quantizer and output dequantization
    (float32 scales and their integer companions), kept apart. Their sum is the size of the exported
    arrays (the npz's ``nbytes`` without its manifest).
    """
    breakdown = dict.fromkeys(STORAGE_CATEGORIES, 0)
    host = 0
    for op in ops:
        for name, arr in op.arrays.items():
            bits = packed_weight_bits(op, name)
            nbytes = packed_nbytes(int(arr.size), bits) if bits is not None else int(arr.nbytes)
            if op.kind in HOST_KINDS:
                host += nbytes
            else:
                breakdown[array_category(op.kind, name)] += nbytes
    return {"deployed_bytes": sum(breakdown.values()), "breakdown": breakdown, "host_bytes": host}


def _pot_exponent(scale: torch.Tensor) -> np.ndarray | None:
    """``e`` with ``scale == 2^e`` (elementwise), or None when a scale is not a power of two."""
    try:
        return _np_int(pot_exponent(scale, "exact"))
    except ValueError:
        return None


def _json_attr(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_json_attr(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return str(v)


class IntegerModel:
    """A lowered quantized graph that runs on integers; see the module docstring."""

    def __init__(self, qgraph: QuantizedGraph, allow_float_multipliers: bool = False):
        self.qg = qgraph
        self.graph = qgraph.graph
        self.allow_float = allow_float_multipliers
        self.terms = qgraph.config.shift_terms
        if qgraph.float_nodes:
            raise HybridQuantError(f"cannot lower: nodes left in float ({', '.join(qgraph.float_nodes[:3])} ...)")
        self.raw_readers = {n.inputs[0] for n in self.graph if n.attrs.get("raw_input")}
        # requantization stages by kind (see :meth:`_count_requants`), lookup tables, value-changing nodes
        self.stats = {"requant_shifts": 0, "requant_identity": 0, "requant_two_term": 0, "requant_threshold": 0,
                      "requant_float": 0, "luts": 0, "ops": 0}
        self._notes: dict[str, dict[str, Any]] = {}
        self._macs: dict[str, int] = {}  # multiply-accumulates per image of each MAC node (recorded by the dry run)
        self._recording = False
        self._check()

    # -- lowering checks ----------------------------------------------------------
    def _check(self) -> None:
        for node in self.graph:
            if node.op in ("output",) or node.op in LAYOUT_OPS:
                continue
            self.stats["ops"] += 1
            qp = self.qg.act.get(node.name)
            if node.op == "group_norm":
                raise HybridQuantError(f"cannot lower {node.name}: integer GroupNorm is not implemented")
            if qp is not None and qp.kind == "threshold":
                if not all(u.op in ELEMENTWISE_OPS for u in self.graph.users(node.name)):
                    raise HybridQuantError(f"cannot lower {node.name}: a threshold grid may feed lookup tables only")
            elif qp is not None and qp.kind != "uniform":
                raise HybridQuantError(f"cannot lower {node.name}: {qp.kind} quantizers have no integer kernel yet")
        # a dry run on one image builds every requantizer (and raises on float multipliers)
        c, h, w = self.graph.meta["input_size"]
        self._requants: dict[str, Requant] = {}
        self._luts: dict[str, Any] = {}
        self._recording = True  # the dry run also records the lowered program
        try:
            self.run(torch.zeros(1, c, h, w))
        finally:
            self._recording = False
        self._count_requants()

    def _requant(self, name: str, s_in: torch.Tensor, qp: QParams) -> Requant:
        r = self._requants.get(name)
        if r is None:
            r = self._requants[name] = Requant(name, s_in, qp, self.terms if name in self.qg.weight else 1,
                                               self.allow_float)
        return r

    def _count_requants(self) -> None:
        """Sort the requantization stages: ``requant_shifts`` counts the real ones done by shifts (a multiplier
        2^-k with k != 0 in some channel, a two-term multiplier, or a threshold grid), ``requant_identity`` those
        whose multiplier is exactly 1 (shift 0 everywhere: after a lookup table, softmax or LayerNorm, which
        already emit codes on the output grid, or an add of operands already on it) — only a saturation
        (and zero point) remains —, ``requant_float`` the float multipliers allowed by
        ``allow_float_multipliers``; ``requant_two_term`` and ``requant_threshold`` are the parts of
        ``requant_shifts`` in those forms."""
        for r in self._requants.values():
            kind = requant_kind(r)
            if kind == "identity":
                self.stats["requant_identity"] += 1
            elif kind == "float":
                self.stats["requant_float"] += 1
            else:
                self.stats["requant_shifts"] += 1
                if kind in ("two_term", "threshold"):
                    self.stats[f"requant_{kind}"] += 1

    # -- execution ----------------------------------------------------------------
    @torch.no_grad()
    def run(self, x: torch.Tensor, trace: dict[str, IntValue] | None = None) -> tuple[torch.Tensor, IntValue]:
        """Run on a float image batch; returns (dequantized logits, output codes).

        ``trace``, when given, receives every node's output codes.
        """
        vals: dict[str, IntValue] = trace if trace is not None else {}
        wide: dict[str, IntValue] = {}
        deferred: dict[str, tuple[Node, IntValue]] = {}
        for node in self.graph:
            if node.op == "output":
                out = vals[node.inputs[0]]
                logits = (out.centred().double() * _bc(out.scale.double(), out.q, out.axis)).float()
                if self._recording:
                    self._note_dequant(node, out)
                return logits, out
            qp = self.qg.act.get(node.name)
            if node.op == "input":
                vals[node.name] = IntValue(quantize(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax).to(torch.int64),
                                           qp.scale, qp.zero_point)
                if self._recording:
                    self._note_quantize(node, qp, vals[node.name].q)
                continue
            if node.op in LAYOUT_OPS:
                src = vals[node.inputs[0]]
                if src.axis is not None:
                    raise HybridQuantError(f"cannot lower {node.name}: per-channel codes through a layout op")
                vals[node.name] = IntValue(graph_ops.run_op(node, [src.q]), src.scale, src.zp)
                if self._recording:
                    self._note(node, "layout", [node.inputs[0]], {k: _json_attr(v) for k, v in node.attrs.items()},
                               out_shape=list(vals[node.name].q.shape))
                continue
            acc = self._accumulate(node, vals, wide, deferred)
            if acc is None:  # deferred non-linearity (read only by a per-channel shift)
                continue
            if node.name in self.raw_readers:
                wide[node.name] = acc
            if qp is not None:
                codes = self._requant(node.name, acc.scale, qp)(acc.q, acc.axis)
                vals[node.name] = IntValue(codes, qp.scale, qp.zero_point)
                if self._recording:
                    self._note_requant(node, acc, list(codes.shape))
        raise HybridQuantError("graph has no output node")

    def _accumulate(self, node: Node, vals, wide, deferred) -> IntValue | None:
        """The node's exact integer result before requantization (zero point 0)."""
        op, a = node.op, node.attrs
        ins = [vals[i] for i in node.inputs if i in vals]
        if op in ("conv2d", "linear"):
            x = ins[0]
            if x.axis is not None:
                raise HybridQuantError(f"cannot lower {node.name}: per-channel input codes")
            wq = self.qg.weight[node.name]
            w_int = self.qg.weight_int[node.name]
            dtype = _exact_dtype(w_int[0].numel(), _code_bound(self.qg.input_qparams(node)), wq.qmax)
            w = w_int.to(dtype)
            xc = x.centred().to(dtype)
            out = (F.conv2d(xc, w, None, a["stride"], a["padding"], a["dilation"], a["groups"]) if op == "conv2d"
                   else F.linear(xc, w))
            axis = 1 if op == "conv2d" else out.dim() - 1
            out = out.double()
            if node.name in self.qg.bias_int:
                out = out + _bc(self.qg.bias_int[node.name].double(), out, axis)
            if self._recording:
                self._note_mac(node, ins)
                self._macs[node.name] = int(out[0].numel()) * int(w_int[0].numel())
            return IntValue(_exact_int(out), x.scale.double() * wq.scale.double(), torch.tensor(0), axis)
        if op == "matmul":
            lhs, rhs = ins
            dtype = _exact_dtype(lhs.q.shape[-1], _code_bound(self.qg.input_qparams(node, 0)),
                                 _code_bound(self.qg.input_qparams(node, 1)))
            out = torch.matmul(lhs.centred().to(dtype), rhs.centred().to(dtype)).double()
            if self._recording:
                self._note(node, op, list(node.inputs), arrays=self._zp_arrays(ins))
                self._macs[node.name] = int(out[0].numel()) * int(lhs.q.shape[-1])
            return IntValue(_exact_int(out), lhs.scale.double() * rhs.scale.double(), torch.tensor(0))
        if op in ("add", "cat"):
            fine = min(float(v.scale.min()) for v in ins)
            parts = []
            for v in ins:
                shift = pot_exponent(v.scale.double() / fine, "round")
                parts.append(arith.align(v.q, v.zp.to(torch.int64), shift, 0, axis=v.axis))
            out = parts[0] + parts[1] if op == "add" else torch.cat(parts, dim=a["dim"])
            if self._recording:
                shifts = {f"align_shift.{k}": _np_small(pot_exponent(v.scale.double() / fine, "round"))
                          for k, v in enumerate(ins)}
                self._note(node, op, list(node.inputs), {"dim": int(a["dim"])} if op == "cat" else {},
                           {**self._zp_arrays(ins), **shifts})
            return IntValue(out, torch.tensor(fine, dtype=torch.float64), torch.tensor(0))
        if op in ("mul", "mul_const", "global_avg_pool") and self._recording:
            self._note(node, op, list(node.inputs), arrays=self._zp_arrays(ins))
        if op == "mul":
            lhs, rhs = ins
            return IntValue(lhs.centred() * rhs.centred(), lhs.scale.double() * rhs.scale.double(), torch.tensor(0))
        if op == "mul_const":
            return IntValue(ins[0].centred(), ins[0].scale.double() * a["value"], torch.tensor(0))
        if op == "global_avg_pool":
            x = ins[0]
            hw = x.q.shape[2] * x.q.shape[3]
            return IntValue(x.centred().sum(dim=(2, 3), keepdim=True), x.scale.double() / hw, torch.tensor(0))
        if op in ELEMENTWISE_OPS:
            return self._elementwise(node, ins[0], deferred)
        if op in ("softmax", "layer_norm"):
            return self._nonlinear(node, ins[0])
        if op == "scale_channels":
            return self._scale_channels(node, vals, wide, deferred)
        raise HybridQuantError(f"cannot lower op {op} ({node.name})")

    def _elementwise(self, node: Node, x: IntValue, deferred) -> IntValue | None:
        qp = self.qg.act.get(node.name)
        if node.name in self.raw_readers:  # per-channel shifts read f(x) itself: per-channel tables
            deferred[node.name] = (node, x)
        if qp is None:
            if self._recording:
                self._note(node, "deferred", [node.inputs[0]])
            return None
        table = self._luts.get(node.name)
        in_qp = self.qg.act[self.graph.producer(node.inputs[0]).name]
        if table is None:
            fn = graph_ops.unary_fn(node)
            if in_qp.kind == "threshold":  # one entry per interval, at its representative value
                table = arith.lut_codes(fn, in_qp.levels.double(), float(qp.scale), int(qp.zero_point), qp.qmin,
                                        qp.qmax)
            else:
                table = arith.build_lut(fn, float(x.scale), int(x.zp), in_qp.qmin, in_qp.qmax, float(qp.scale),
                                        int(qp.zero_point), qp.qmin, qp.qmax)
            self._luts[node.name] = table
            self.stats["luts"] += 1
        codes = arith.apply_lut(x.q, table, in_qp.qmin)
        if self._recording:
            self._note(node, "lut", [node.inputs[0]], arrays={
                "table": _np_int(table, code_dtype(qp.qmin, qp.qmax)), "in_qmin": _np_small(in_qp.qmin)})
        # already at the output grid: an identity requantization (multiplier 1)
        return IntValue(codes - int(qp.zero_point), qp.scale.double(), torch.tensor(0))

    def _nonlinear(self, node: Node, x: IntValue) -> IntValue:
        """Softmax / LayerNorm on the shared integer kernels (exactly what the simulation runs)."""
        qp = self.qg.act[node.name]
        in_qp = self.qg.input_qparams(node)
        if not nonlinear.supported(node, in_qp, qp):
            raise HybridQuantError(f"cannot lower {node.name}: {node.op} needs power-of-two input and output scales")
        if node.op == "softmax":
            codes = nonlinear.softmax_codes(x.q, node, in_qp, qp)
            if self._recording:
                self._note_softmax(node, in_qp, qp)
        else:
            kernel = self._luts.get(node.name)
            if kernel is None:
                kernel = self._luts[node.name] = nonlinear.LayerNormKernel(node, in_qp, qp)
            codes = kernel(x.q)
            if self._recording:
                self._note_layernorm(node, kernel)
        return IntValue(codes - int(qp.zero_point), qp.scale.double(), torch.tensor(0))

    def _scale_channels(self, node: Node, vals, wide, deferred) -> IntValue:
        src = node.inputs[0]
        dim = node.attrs["dim"]
        inv_alpha = node.params["inv_alpha"].double()
        qp = self.qg.act[node.name]
        if src in deferred:  # per-channel lookup table: f(x) / alpha_j on the output grid
            prod, x = deferred[src]
            in_qp = self.qg.act[self.graph.producer(prod.inputs[0]).name]
            table = self._luts.get(node.name)
            if table is None:
                out_scale = qp.scale.double() / inv_alpha
                if in_qp.kind == "threshold":  # one column per interval, at its representative value
                    table = arith.lut_codes(graph_ops.unary_fn(prod), in_qp.levels.double().unsqueeze(0), out_scale.reshape(-1, 1),
                                            int(qp.zero_point), qp.qmin, qp.qmax)
                else:
                    table = arith.build_channel_lut(graph_ops.unary_fn(prod), float(x.scale), int(x.zp), in_qp.qmin, in_qp.qmax,
                                                    out_scale, int(qp.zero_point), qp.qmin, qp.qmax)
                self._luts[node.name] = table
                self.stats["luts"] += 1
            axis = dim % x.q.dim()
            codes = arith.apply_channel_lut(x.q, table, in_qp.qmin, axis)
            if self._recording:
                self._note(node, "channel_lut", [prod.inputs[0]], {"axis": axis, "fused": prod.name, "fused_op": prod.op},
                           {"table": _np_int(table, code_dtype(qp.qmin, qp.qmax)), "in_qmin": _np_small(in_qp.qmin)})
            return IntValue(codes - int(qp.zero_point), qp.scale.double(), torch.tensor(0))
        v = wide.get(src) or vals[src]
        axis = dim % v.q.dim()
        if v.axis is not None and v.axis != axis:
            raise HybridQuantError(f"cannot lower {node.name}: channel axes disagree")
        if self._recording:
            self._note(node, "channel_shift", [src], {"axis": axis, "reads": "accumulator" if src in wide else "codes"},
                       self._zp_arrays([v]))
        per_channel = v.scale.double().flatten() if v.scale.dim() else v.scale.double().expand(inv_alpha.numel())
        return IntValue(v.centred(), per_channel * inv_alpha, torch.tensor(0), axis)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]

    # -- the lowered program --------------------------------------------------------
    def program(self) -> list[ProgramOp]:
        """The lowered integer program: one :class:`ProgramOp` per graph node, in execution order.

        Built from what the constructor's dry run recorded; the arrays are
        copies. Raises HybridQuantError for a model lowered with float
        multipliers (``allow_float_multipliers=True``), which has no integer
        program.
        """
        if any(r.params is None for r in self._requants.values()):
            raise HybridQuantError("the model uses float requantization multipliers: it has no integer program")
        wide_read = {n["inputs"][0] for n in self._notes.values() if n["attrs"].get("reads") == "accumulator"}
        ops = []
        for index, node in enumerate(self.graph):
            note = self._notes[node.name]
            attrs = _json_attr_dict(note["attrs"])
            if node.name in wide_read:
                attrs["keep_accumulator"] = True
            ops.append(ProgramOp(index, node.name, node.op, note["kind"], list(note["inputs"]), attrs,
                                 {k: v.copy() for k, v in note["arrays"].items()}, note.get("out_shape")))
        return ops

    def storage(self) -> dict[str, Any]:
        """``deployed_bytes``, its ``breakdown`` and ``host_bytes`` of the lowered program
        (:func:`storage_breakdown`); raises HybridQuantError like :meth:`program`."""
        return storage_breakdown(self.program())

    def op_counts(self) -> dict[str, Any]:
        """How much of the lowered program runs on integer kernels, measured on its ops.

        Counted: every op that computes (the input quantizer and output dequantization on the host, layout
        ops and deferred non-linearities excluded). An op is integer when its requantization, if any, is
        multiplier-free (shifts, two terms or a threshold grid), i.e. not a float multiplier allowed by
        ``allow_float_multipliers``; ``integer_mac_fraction`` weighs each op by its multiply-accumulates
        per image (conv / linear / matmul).
        """
        ops = integer = macs = integer_macs = 0
        for node in self.graph:
            note = self._notes.get(node.name)
            if note is None or note["kind"] in HOST_KINDS | NO_COMPUTE_KINDS:
                continue
            r = self._requants.get(node.name)
            is_int = r is None or r.params is not None
            n_macs = self._macs.get(node.name, 0)
            ops += 1
            integer += int(is_int)
            macs += n_macs
            integer_macs += n_macs if is_int else 0
        return {"ops": ops, "integer_ops": integer, "integer_op_fraction": integer / ops if ops else 1.0,
                "macs": macs, "integer_macs": integer_macs,
                "integer_mac_fraction": integer_macs / macs if macs else 1.0}

    def _note(self, node: Node, kind: str | None = None, inputs: list[str] | None = None,
              attrs: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None,
              out_shape: list[int] | None = None) -> None:
        """Merge what the dry run learnt about ``node`` into its program record."""
        note = self._notes.setdefault(node.name, {"kind": node.op, "inputs": [], "attrs": {}, "arrays": {},
                                                  "out_shape": None})
        if kind is not None:
            note["kind"] = kind
        if inputs is not None:
            note["inputs"] = list(inputs)
        note["attrs"].update(attrs or {})
        note["arrays"].update(arrays or {})
        if out_shape is not None:
            note["out_shape"] = [int(d) for d in out_shape]

    @staticmethod
    def _zp_arrays(ins: list[IntValue]) -> dict[str, np.ndarray]:
        return {f"in_zero_point.{k}": _np_small(v.zp) for k, v in enumerate(ins)}

    def _note_quantize(self, node: Node, qp: QParams, codes: torch.Tensor) -> None:
        arrays = {"scale": qp.scale.detach().cpu().float().numpy().copy(), "zero_point": _np_int(qp.zero_point),
                  "qmin": _np_int(qp.qmin), "qmax": _np_int(qp.qmax)}
        exp = _pot_exponent(qp.scale)
        if exp is not None:
            arrays["scale_exp"] = exp
        self._note(node, "quantize", [], {"axis": qp.axis}, arrays, list(codes.shape))

    def _note_dequant(self, node: Node, out: IntValue) -> None:
        arrays = {"scale": out.scale.detach().cpu().float().numpy().copy(), "zero_point": _np_int(out.zp)}
        exp = _pot_exponent(out.scale)
        if exp is not None:
            arrays["scale_exp"] = exp
        self._note(node, "output", [node.inputs[0]], {}, arrays, list(out.q.shape))

    def _note_mac(self, node: Node, ins: list[IntValue]) -> None:
        wq = self.qg.weight[node.name]
        arrays = {"weight": _np_int(self.qg.weight_int[node.name], code_dtype(wq.qmin, wq.qmax)),
                  **self._zp_arrays(ins[:1])}
        if node.name in self.qg.bias_int:
            arrays["bias"] = _np_int(self.qg.bias_int[node.name])
        attrs: dict[str, Any] = {}
        if node.op == "conv2d":
            attrs = {k: _json_attr(node.attrs[k]) for k in ("stride", "padding", "dilation", "groups")}
        attrs["weight_bits"] = int(wq.bits)  # the exports pack weights whose width is not a multiple of 8
        self._note(node, node.op, [node.inputs[0]], attrs, arrays)

    def _note_requant(self, node: Node, acc: IntValue, shape: list[int]) -> None:
        r = self._requants[node.name]
        qp = r.qp
        arrays = {"requant.zero_point": _np_small(qp.zero_point), "requant.qmin": _np_small(qp.qmin),
                  "requant.qmax": _np_small(qp.qmax)}
        if r.params is None:
            mode, per_channel = "float", r.m.numel() > 1
            arrays["requant.multiplier"] = r.m.numpy().copy()
        else:
            a, b, sign, n = (torch.tensor(v, dtype=torch.int64) for v in zip(*r.params, strict=True))
            per_channel = a.numel() > 1
            if not per_channel:
                a, b, sign, n = a[0], b[0], sign[0], n[0]
            if bool((sign == 0).all()) and qp.kind != "threshold":
                mode = "shift"
                arrays["requant.shift"] = _np_small(n - a)
            else:
                mode = "threshold" if qp.kind == "threshold" else "two_term"
                arrays.update({"requant.a": _np_small(a), "requant.b": _np_small(b), "requant.sign": _np_small(sign),
                               "requant.n": _np_small(n)})
                if qp.kind == "threshold":
                    arrays["requant.thresholds"] = _np_int(qp.thresholds)
        # a per-channel parameter without an axis broadcasts along the last dim (as torch does)
        axis = (acc.axis if acc.axis is not None else acc.q.dim() - 1) if per_channel else None
        if axis is not None:
            axis %= acc.q.dim()
        self._note(node, attrs={"requant": {"mode": mode, "axis": axis}}, arrays=arrays, out_shape=shape)

    def _note_softmax(self, node: Node, in_qp: QParams, qp: QParams) -> None:
        # the full table (every possible spread of the input codes); the kernel's entries are its tail
        table = arith.softmax_exp_table(float(in_qp.scale), in_qp.qmax - in_qp.qmin + 1, nonlinear.FRAC_BITS)
        self._note(node, "softmax", [node.inputs[0]], {"dim": int(node.attrs["dim"])}, {
            "exp_table": _np_int(table), "frac_bits": _np_small(nonlinear.FRAC_BITS),
            "out_exp": _np_small(nonlinear.softmax_out_exp(qp)), "out_qmax": _np_small(qp.qmax)})

    def _note_layernorm(self, node: Node, k: nonlinear.LayerNormKernel) -> None:
        o = k.out_qp
        self._note(node, "layer_norm", [node.inputs[0]], {"dim": -1}, {
            "in_zero_point": _np_small(k.in_zp), "channel_shift": _np_small(k.shift), "gamma_q": _np_int(k.gamma_q),
            "beta_q": _np_int(k.beta_q), "eps_q": _np_int(k.eps_q), "frac_bits": _np_small(nonlinear.FRAC_BITS),
            "sqrt_frac_bits": _np_small(k.sqrt_frac_bits), "out_shift": _np_small(k.out_shift),
            "out_zero_point": _np_small(o.zero_point), "out_qmin": _np_small(o.qmin), "out_qmax": _np_small(o.qmax)})


def _json_attr_dict(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: (_json_attr_dict(v) if isinstance(v, dict) else _json_attr(v)) for k, v in attrs.items()}
