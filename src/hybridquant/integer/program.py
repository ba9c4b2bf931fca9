"""The integer program as data: ops in execution order with every integer constant they use.

:func:`hybridquant.integer.lower.lower` builds a :class:`Program` from a
quantized graph without running an image; the integer executor
(:class:`~hybridquant.integer.executor.IntegerModel`) interprets it, the
exports (:mod:`hybridquant.export`) write it, and the numpy reader runs what
they wrote. :func:`kind_docs` and :data:`REQUANT_DOC` are the contract
all of them follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import HybridQuantError
from ..ops import COUNT_KEYS, PROGRAM_KIND_DEFS, program_kind


def kind_docs() -> dict[str, str]:
    """How each kind of :class:`ProgramOp` runs (the contract of the export formats), read from the op table
    (a kind registered later included)."""
    return {name: kind.doc for name, kind in PROGRAM_KIND_DEFS.items()}

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

    ``kind`` says how it runs (:func:`kind_docs`), ``inputs`` names the
    values it reads (a node's codes, or for ``reads == 'accumulator'`` its
    wide accumulator), ``attrs`` holds structural attributes (JSON-able) and
    ``arrays`` the integer constants (0-d arrays for scalars). A per-channel
    (1-d) ``in_zero_point.k`` / ``align_shift.k`` lies along the last dim.
    ``out_shape`` is the shape of the op's codes (or accumulator) for a batch of one (None
    when it produces none). ``attrs['requant']`` (``mode``, ``axis``) comes
    with the ``requant.*`` arrays; ``attrs['keep_accumulator']`` marks an op
    whose accumulator a later ``channel_requant`` reads.
    """

    index: int
    name: str
    op: str
    kind: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    out_shape: list[int] | None = None


# --- what the hardware stores ------------------------------------------------------
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


def array_nbytes(op: ProgramOp, name: str) -> int:
    """Bytes the exports store ``op``'s array ``name`` in: packed at its bit width (weights below 8 bits, not a
    multiple of 8), else as is."""
    arr = op.arrays[name]
    bits = packed_weight_bits(op, name)
    return packed_nbytes(int(arr.size), bits) if bits is not None else int(arr.nbytes)


def array_category(kind: str, name: str) -> str:
    """Which :data:`STORAGE_CATEGORIES` entry the array ``name`` of an op of ``kind`` belongs to."""
    if name == "requant.thresholds":
        return "thresholds"
    if name in ("requant.shift", "requant.a", "requant.b", "requant.sign", "requant.n", "requant.multiplier"):
        return "requant_shifts"
    if name.startswith("requant."):
        return "zero_points_and_ranges"
    own = program_kind(kind).category
    if own is not None:
        return own
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
        for name in op.arrays:
            nbytes = array_nbytes(op, name)
            if program_kind(op.kind).host:
                host += nbytes
            else:
                breakdown[array_category(op.kind, name)] += nbytes
    return {"deployed_bytes": sum(breakdown.values()), "breakdown": breakdown, "host_bytes": host}


def requant_counts(op: ProgramOp) -> dict[str, int]:
    """Operations per image of ``op``'s requantization (``REQUANT_DOC``), per output element: a shift is one
    shift, its rounding and the zero point two additions, the saturation two comparisons; two terms add two
    shifts and an addition; a threshold grid counts its binary search's comparisons instead of the clamp."""
    mode = requant_kind(op)
    if mode is None or mode == "float":
        return {}
    n = int(np.prod(op.out_shape)) if op.out_shape else 1
    if mode == "threshold":
        steps = int(np.asarray(op.arrays["requant.thresholds"]).shape[-1]).bit_length()
        return {"shifts": 2 * n, "adds": 2 * n, "comparisons": steps * n}
    per = {"shifts": 3, "adds": 3} if mode == "two_term" else {"shifts": 1, "adds": 2}
    return {**{k: v * n for k, v in per.items()}, "comparisons": 2 * n}


def requant_kind(op: ProgramOp) -> str | None:
    """The requantization of ``op``: ``identity`` (shift 0 in every channel: only a saturation remains),
    ``shift`` (2^-k), ``two_term``, ``threshold`` (onto a threshold grid), ``float`` (an allowed float
    multiplier), or None when the op has none."""
    rq = op.attrs.get("requant")
    if rq is None:
        return None
    if rq["mode"] == "shift":
        return "identity" if not op.arrays["requant.shift"].any() else "shift"
    return rq["mode"]


@dataclass
class Program:
    """The lowered integer program of a quantized graph (see the module docstring).

    ``ops`` in execution order (the first quantizes the input, the last dequantizes the output),
    ``input_size`` the ``[C, H, W]`` of one image and ``config`` the quantization config it came from
    (JSON form).
    """

    ops: list[ProgramOp]
    input_size: list[int]
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name = {op.name: op for op in self.ops}

    def __getitem__(self, name: str) -> ProgramOp:
        return self._by_name[name]

    @property
    def has_float_requants(self) -> bool:
        return any(requant_kind(op) == "float" for op in self.ops)

    def require_integer(self) -> Program:
        """``self``, or HybridQuantError when a requantization uses a float multiplier."""
        if self.has_float_requants:
            raise HybridQuantError("the model uses float requantization multipliers: it has no integer program")
        return self

    def stats(self) -> dict[str, int]:
        """Requantization stages by kind and lookup tables: ``requant_shifts`` counts the real ones done by
        shifts (a multiplier 2^-k with k != 0 in some channel, two terms, or a threshold grid; of which
        ``requant_two_term`` and ``requant_threshold``), ``requant_identity`` those with multiplier exactly 1
        (after a lookup table, softmax or LayerNorm, which already emit codes on the output grid, or an add of
        operands already on it), ``requant_float`` the allowed float multipliers; ``luts`` the lookup tables
        (per-channel ones included)."""
        st = dict.fromkeys(("requant_shifts", "requant_identity", "requant_two_term", "requant_threshold",
                            "requant_float", "luts"), 0)
        for op in self.ops:
            kind = requant_kind(op)
            if kind in ("identity", "float"):
                st[f"requant_{kind}"] += 1
            elif kind is not None:
                st["requant_shifts"] += 1
                if kind in ("two_term", "threshold"):
                    st[f"requant_{kind}"] += 1
            st["luts"] += program_kind(op.kind).table
        return st

    def code_bounds(self) -> dict[str, int]:
        """The largest ``|code − zero point|`` of every value with codes (its output range against its own zero
        point; codes moved by a layout op keep their input's)."""
        bounds: dict[str, int] = {}
        for op in self.ops:
            prefix = next((k for k in ("requant.", "") if f"{k}qmin" in op.arrays), None)
            if prefix is not None:
                zp = np.asarray(op.arrays[f"{prefix}zero_point"]).astype(np.int64)
                lo, hi = int(op.arrays[f"{prefix}qmin"]), int(op.arrays[f"{prefix}qmax"])
                bounds[op.name] = int(np.maximum(np.abs(lo - zp), np.abs(hi - zp)).max())
            elif program_kind(op.kind).result == "codes" and op.inputs:
                bounds[op.name] = bounds[op.inputs[0]]
        return bounds

    def macs(self, op: ProgramOp) -> int:
        """Multiply-accumulates per image of ``op`` (conv / linear / matmul; 0 for any other)."""
        count = program_kind(op.kind).macs
        return count(op, self) if count is not None else 0

    def counts(self, op: ProgramOp) -> dict[str, int]:
        """Operations per image of ``op``: multiply-accumulates (:meth:`macs`) and :data:`COUNT_KEYS` (the
        kind's ``counts`` and its requantization's, :func:`requant_counts`)."""
        own = program_kind(op.kind).counts
        kind = own(op, self) if own is not None else {}
        requant = requant_counts(op)
        return {"macs": self.macs(op), **{k: int(kind.get(k, 0)) + int(requant.get(k, 0)) for k in COUNT_KEYS}}

    def op_counts(self) -> dict[str, Any]:
        """How much of the program runs on integer kernels, measured on its ops.

        Counted: every op that computes (the input quantizer and output dequantization on the host, layout
        ops and deferred non-linearities excluded). An op is integer when its requantization, if any, is
        multiplier-free (shifts, two terms or a threshold grid); ``integer_mac_fraction`` weighs each op by
        its multiply-accumulates per image.
        """
        ops = integer = macs = integer_macs = 0
        for op in self.ops:
            if program_kind(op.kind).host or not program_kind(op.kind).computes:
                continue
            is_int = requant_kind(op) != "float"
            n_macs = self.macs(op)
            ops += 1
            integer += int(is_int)
            macs += n_macs
            integer_macs += n_macs if is_int else 0
        return {"ops": ops, "integer_ops": integer, "integer_op_fraction": integer / ops if ops else 1.0,
                "macs": macs, "integer_macs": integer_macs,
                "integer_mac_fraction": integer_macs / macs if macs else 1.0}

    def storage(self) -> dict[str, Any]:
        """:func:`storage_breakdown` of the program; HybridQuantError for float multipliers."""
        return storage_breakdown(self.require_integer().ops)

    def describe(self) -> str:
        """One line per op: index, kind, name, inputs, output shape, constant bytes and requantization."""
        lines = []
        for op in self.ops:
            nbytes = sum(int(a.nbytes) for a in op.arrays.values())
            shape = "x".join(map(str, op.out_shape)) if op.out_shape else "-"
            lines.append(f"{op.index:4d} {op.kind:15s} {op.name:40s} <- {', '.join(op.inputs) or '-':40s} "
                         f"{shape:14s} {nbytes:9d} B  {requant_kind(op) or ''}")
        return "\n".join(lines)
