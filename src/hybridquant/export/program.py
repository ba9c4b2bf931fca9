"""The integer program as plain data: a JSON manifest plus named integer arrays.

Both export formats (:mod:`.npz`, :mod:`.c`) write what :func:`program_tables`
returns. The program is :func:`~hybridquant.integer.lower.lower`'s, the one
:class:`~hybridquant.integer.executor.IntegerModel` interprets, so a reader
that follows the manifest reproduces its output codes bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._io import plain
from ..graph.quantized import QuantizedGraph
from ..integer.lower import lower
from ..integer.program import (
    REQUANT_DOC,
    Program,
    ProgramOp,
    kind_docs,
    packed_nbytes,
    packed_weight_bits,
)
from .reader import unpack_bits

FORMAT = "hybridquant-integer-program"
VERSION = 3  # 2: program kind channel_shift is channel_requant, LayerNorm's channel_shift array ptf_shift;
#   3: LayerNorm and softmax in int32 (a per-row shift and reciprocal; LayerNorm's eps_m, eps_shift, z_bits)
#: how sub-8-bit (any width not a multiple of 8) weights are stored
PACKING = (
    "a weight whose op has attrs.weight_bits = b with b % 8 != 0 is stored packed: its arrays entry has "
    "'packed': {'bits': b, 'signed', 'dtype', 'shape'} (the unpacked codes' type and row-major shape) while "
    "'dtype'/'shape' describe the stored int8 byte stream of ceil(count * b / 8) bytes; code i (row-major order) "
    "occupies stream bits [i b, (i + 1) b), the stream's bit j being bit (j mod 8) of byte j div 8 (least "
    "significant bit first: 4-bit codes are two per byte, code 2k in the low nibble; 6-bit codes are four per "
    "3 bytes); each field is the code's b-bit two's complement when signed (sign-extend on reading), else the "
    "code itself; the last byte is zero-padded; read the bytes as unsigned (uint8) to unpack"
)
#: npz key of the JSON manifest (a 0-d unicode array)
MANIFEST_KEY = "__manifest__"

CONVENTIONS = {
    "codes": "activations are integer codes in [requant.qmin, requant.qmax] of the op that made them (layout ops "
             "keep their input's codes); a code stands for (code - zero_point) * scale, scales being powers of two",
    "rounding": "round half up everywhere: a right shift by k > 0 adds 1 << (k - 1) first; "
                "a division by d > 0 is (2 num + d) // (2 d) (floor division)",
    "broadcast": "a 1-d per-channel array lies along the axis its op names (attrs.requant.axis, attrs.axis); "
                 "in_zero_point.k and align_shift.k, when 1-d, along the last dim",
    "arithmetic": "int64 accumulators; conv/linear/matmul products are exact",
    "layout": "arrays are row-major (C order); weights conv [Cout, Cin/groups, kh, kw], linear [out, in]",
    "batch": "out_shape (of the op's codes, or of its accumulator when it is not requantized) is for a batch of one; layout attrs use torch semantics with -1 for the batch-dependent dim",
    "requant": REQUANT_DOC,
    "packing": PACKING,
}


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """``codes`` (any int array) as the packed int8 byte stream of :data:`PACKING`."""
    flat = np.asarray(codes, dtype=np.int64).reshape(-1)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if flat.size and flat.min() < 0 else (0, (1 << bits) - 1)
    if flat.size and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ValueError(f"codes do not fit {bits} bits")
    fields = (flat & ((1 << bits) - 1)).astype(np.uint64)
    # bit k of code i goes to stream bit i*bits + k
    stream = ((fields[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8).reshape(-1)
    out = np.packbits(stream, bitorder="little")
    assert out.size == packed_nbytes(flat.size, bits)
    return out.view(np.int8)


def array_key(index: int, key: str) -> str:
    """The flat name of op ``index``'s array ``key`` (``op0003.requant.shift``)."""
    return f"op{index:04d}.{key}"


def program_tables(source: QuantizedGraph | Program, model_meta: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(manifest, arrays)``: the JSON-able manifest and every integer array under its flat key.

    The manifest holds ``format``/``version``, ``model`` (``model_meta``:
    name, data config, class names), ``config``, ``input`` (name, shape),
    ``output`` (the value dequantized into logits), ``conventions``,
    ``kinds`` (what each op kind computes) and ``ops``: per op in execution
    order its ``index``, ``name``, graph ``op``, ``kind``, ``inputs``,
    ``attrs``, ``out_shape`` and ``arrays`` (array name -> ``{"key",
    "dtype", "shape"}``, plus ``"packed"`` for a packed weight: see
    :data:`PACKING`). The arrays' sizes add up to
    :meth:`~hybridquant.integer.program.Program.storage`'s
    ``deployed_bytes + host_bytes``.
    """
    program = (source if isinstance(source, Program) else lower(source)).require_integer()
    ops = program.ops
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for op in ops:
        listed = {}
        for name, arr in op.arrays.items():
            key = array_key(op.index, name)
            bits = packed_weight_bits(op, name)
            if bits is None:
                arrays[key] = np.array(arr, order="C", copy=True)  # keeps 0-d arrays 0-d
                listed[name] = {"key": key, "dtype": arr.dtype.name, "shape": list(arr.shape)}
                continue
            arrays[key] = pack_bits(arr, bits)
            listed[name] = {"key": key, "dtype": arrays[key].dtype.name, "shape": list(arrays[key].shape),
                            "packed": {"bits": bits, "signed": bool(arr.size and arr.min() < 0),
                                       "dtype": arr.dtype.name, "shape": list(arr.shape)}}
        entries.append({"index": op.index, "name": op.name, "op": op.op, "kind": op.kind, "inputs": op.inputs,
                        "attrs": op.attrs, "out_shape": op.out_shape, "arrays": listed})
    manifest = {
        "format": FORMAT, "version": VERSION,
        "model": plain(model_meta or {}),
        "config": plain(program.config),
        "input": {"name": ops[0].name, "shape": list(program.input_size)},
        "output": {"name": ops[-1].inputs[0], "op": len(ops) - 1},
        "conventions": CONVENTIONS,
        "kinds": kind_docs(),
        "ops": entries,
    }
    return manifest, arrays


def program_from_tables(manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> Program:
    """The :class:`~hybridquant.integer.program.Program` that :func:`program_tables` wrote (packed weights
    unpacked to their codes' type), so an exported file runs on :class:`~hybridquant.integer.executor.IntegerModel`."""
    ops = []
    for entry in manifest["ops"]:
        consts = {}
        for name, meta in entry["arrays"].items():
            arr = arrays[meta["key"]]
            packed = meta.get("packed")
            consts[name] = (unpack_bits(arr, packed).astype(packed["dtype"]) if packed is not None
                            else np.array(arr, copy=True))
        ops.append(ProgramOp(entry["index"], entry["name"], entry["op"], entry["kind"], list(entry["inputs"]),
                             dict(entry["attrs"]), consts, entry["out_shape"]))
    return Program(ops, list(manifest["input"]["shape"]), dict(manifest.get("config", {})))
