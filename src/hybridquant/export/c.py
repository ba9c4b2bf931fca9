"""Export the integer program as a self-contained C99 header.

The header holds the same content as the ``.npz`` export:

* a comment with the conventions, what each op kind computes, and the op
  table (execution order: index, kind, name, inputs);
* ``<P>_NUM_OPS``, ``<P>_MAX_INPUTS``, ``enum <p>_kind`` and the tables
  ``<p>_op_names``, ``<p>_op_kinds`` and ``<p>_op_inputs`` (indices of the
  ops whose values an op reads, -1 padded);
* per op ``NNNN``: its structural attributes as ``#define <P>_OPNNNN_<ATTR>``
  (lists as brace initialisers, e.g. ``<P>_OP0001_STRIDE {1, 1}``; the
  requant mode as ``<P>_OPNNNN_REQUANT_TWO_TERM`` and ``_REQUANT_THRESHOLD`` 0/1 and its axis,
  ``-1`` for none), ``<P>_OPNNNN_OUT_SHAPE``; every scalar constant as a
  typed ``#define`` (``((int32_t)9)``, ``INT64_C(...)``, float scales as
  hex float literals) and every array as ``static const <exact type>
  <p>_opNNNN_<name>[size]`` (row-major, flattened) with
  ``<P>_OPNNNN_<NAME>_SHAPE`` / ``_SIZE`` defines;
* a weight of a width that is not a multiple of 8 bits (``<P>_OPNNNN_WEIGHT_BITS``)
  is the packed ``int8_t`` byte stream of the npz (layout: the conventions'
  ``packing``), with ``<P>_OPNNNN_WEIGHT_PACKED 1``, ``_PACKED_SIGNED`` and the
  unpacked codes' ``_UNPACKED_SHAPE`` / ``_UNPACKED_SIZE``; so the header
  stores exactly the bytes the report's ``deployed_bytes`` counts.

``<P>``/``<p>`` is the prefix (``HQ``/``hq`` by default); array names are the
npz names with ``.`` turned into ``_`` (``requant.shift`` -> ``requant_shift``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .._io import write_text
from ..graph.quantized import QuantizedGraph
from .program import FORMAT, VERSION, program_tables

_C_TYPES = {
    "int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "uint16": "uint16_t",
    "int32": "int32_t", "uint32": "uint32_t", "int64": "int64_t", "uint64": "uint64_t",
    "float32": "float", "float64": "double",
}
_PER_LINE = 16


def _ident(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", text)


def _comment(text: str) -> str:
    return str(text).replace("*/", "* /")


def _int_literal(v: int, dtype: str) -> str:
    if dtype == "int64":
        if v == -(1 << 63):
            return "(-INT64_C(9223372036854775807) - 1)"
        return f"INT64_C({v})"
    if dtype == "uint64":
        return f"UINT64_C({v})"
    if dtype == "int32" and v == -(1 << 31):
        return "(-2147483647 - 1)"
    if dtype == "uint32":
        return f"{v}u"
    return str(v)


def _float_literal(v: float, dtype: str) -> str:
    text = float(v).hex()
    return text + ("f" if dtype == "float32" else "")


def _literals(arr: np.ndarray) -> list[str]:
    dtype = arr.dtype.name
    flat = arr.reshape(-1).tolist()
    if arr.dtype.kind == "f":
        return [_float_literal(v, dtype) for v in flat]
    return [_int_literal(int(v), dtype) for v in flat]


def _braces(values: list[Any]) -> str:
    return "{" + ", ".join(str(v) for v in values) + "}"


def _attr_define(name: str, value: Any) -> str | None:
    if isinstance(value, bool):
        return f"#define {name} {int(value)}"
    if isinstance(value, int):
        return f"#define {name} {value}"
    if value is None:
        return f"#define {name} (-1) /* none */"
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return f"#define {name} {_braces(list(value))}"
    if isinstance(value, float):
        return f"#define {name} {float(value).hex()}"
    if isinstance(value, str):
        return f"#define {name} \"{_comment(value)}\""
    return None


def header_text(qgraph: QuantizedGraph, model_meta: dict[str, Any] | None = None, prefix: str = "hq",
                guard: str = "HQ_MODEL_H") -> str:
    """The header's text (see the module docstring)."""
    manifest, arrays = program_tables(qgraph, model_meta)
    lo, up = _ident(prefix).lower(), _ident(prefix).upper()
    ops = manifest["ops"]
    kinds = sorted(manifest["kinds"])
    index_of = {op["name"]: op["index"] for op in ops}
    max_inputs = max([len(op["inputs"]) for op in ops] + [1])
    model = manifest["model"].get("name", "") if isinstance(manifest["model"], dict) else ""
    cfg = manifest["config"]

    out: list[str] = []
    w = out.append
    w(f"/* Integer program exported by hybridquant ({FORMAT} v{VERSION}).")
    w(f" * model: {_comment(model) or '-'}; method {cfg.get('method')}, W{cfg.get('wbits')}A{cfg.get('abits')}, "
      f"scales {cfg.get('scales')}, shift terms {cfg.get('shift_terms')}")
    w(f" * input: {_comment(manifest['input']['name'])} {manifest['input']['shape']} (C, H, W), "
      f"output: op {manifest['output']['op']}")
    w(" *")
    w(" * Conventions:")
    for k, v in manifest["conventions"].items():
        w(f" *   {k}: {_comment(v)}")
    w(" *")
    w(" * Op kinds:")
    for k in kinds:
        w(f" *   {k}: {_comment(manifest['kinds'][k])}")
    w(" *")
    w(" * Op table (execution order):")
    w(f" *   {'#':>5}  {'kind':<15} {'name':<48} inputs")
    for op in ops:
        w(f" *   {op['index']:>5}  {op['kind']:<15} {_comment(op['name']):<48} {_comment(', '.join(op['inputs']))}")
    w(" */")
    w(f"#ifndef {guard}")
    w(f"#define {guard}")
    w("")
    w("#include <stdint.h>")
    w("")
    w(f"#define {up}_NUM_OPS {len(ops)}")
    w(f"#define {up}_MAX_INPUTS {max_inputs}")
    w(f"#define {up}_INPUT_SHAPE {_braces(manifest['input']['shape'])}")
    w(f"#define {up}_OUTPUT_OP {manifest['output']['op']}")
    w("")
    w(f"enum {lo}_kind {{")
    for i, k in enumerate(kinds):
        w(f"    {up}_KIND_{k.upper()} = {i},")
    w("};")
    w("")
    w(f"static const char *const {lo}_op_names[{up}_NUM_OPS] = {{")
    for op in ops:
        w(f"    \"{op['name']}\",")
    w("};")
    w(f"static const uint8_t {lo}_op_kinds[{up}_NUM_OPS] = {{")
    for op in ops:
        w(f"    {up}_KIND_{op['kind'].upper()}, /* {op['index']} */")
    w("};")
    w(f"static const int32_t {lo}_op_inputs[{up}_NUM_OPS][{up}_MAX_INPUTS] = {{")
    for op in ops:
        idx = [index_of[i] for i in op["inputs"]] + [-1] * (max_inputs - len(op["inputs"]))
        w(f"    {_braces(idx)}, /* {op['index']} */")
    w("};")

    for op in ops:
        tag = f"OP{op['index']:04d}"
        w("")
        w(f"/* --- op {op['index']}: {_comment(op['name'])} ({op['op']}, kind {op['kind']}); "
          f"inputs: {_comment(', '.join(op['inputs'])) or '-'} --- */")
        if op["out_shape"] is not None:
            w(f"#define {up}_{tag}_OUT_SHAPE {_braces(op['out_shape'])}")
        for key, value in op["attrs"].items():
            if key == "requant":
                w(f"#define {up}_{tag}_REQUANT_TWO_TERM {int(value['mode'] == 'two_term')}")
                w(f"#define {up}_{tag}_REQUANT_THRESHOLD {int(value['mode'] == 'threshold')}")
                axis = value["axis"]
                w(f"#define {up}_{tag}_REQUANT_AXIS " + (str(axis) if axis is not None else "(-1) /* per tensor */"))
                continue
            line = _attr_define(f"{up}_{tag}_{_ident(key).upper()}", value)
            if line is not None:
                w(line)
        for key, meta in op["arrays"].items():
            arr = arrays[meta["key"]]
            cname = _ident(key)
            ctype = _C_TYPES[arr.dtype.name]
            if arr.ndim == 0:
                (lit,) = _literals(arr)
                value = lit if ctype in ("int64_t", "uint64_t", "float", "double") or lit.startswith("(") \
                    else f"(({ctype}){lit})"
                w(f"#define {up}_{tag}_{cname.upper()} {value}")
                continue
            w(f"#define {up}_{tag}_{cname.upper()}_SHAPE {_braces(list(arr.shape))}")
            w(f"#define {up}_{tag}_{cname.upper()}_SIZE {arr.size}")
            packed = meta.get("packed")
            if packed is not None:
                w(f"#define {up}_{tag}_{cname.upper()}_PACKED 1 /* {packed['bits']}-bit codes, "
                  f"least significant bit first */")
                w(f"#define {up}_{tag}_{cname.upper()}_PACKED_SIGNED {int(bool(packed['signed']))}")
                w(f"#define {up}_{tag}_{cname.upper()}_UNPACKED_SHAPE {_braces(list(packed['shape']))}")
                w(f"#define {up}_{tag}_{cname.upper()}_UNPACKED_SIZE {int(np.prod(packed['shape'], dtype=np.int64))}")
            if arr.size == 0:
                continue
            lits = _literals(arr)
            w(f"static const {ctype} {lo}_{tag.lower()}_{cname}[{arr.size}] = {{")
            for i in range(0, len(lits), _PER_LINE):
                w("    " + ", ".join(lits[i:i + _PER_LINE]) + ",")
            w("};")
    w("")
    w(f"#endif /* {guard} */")
    return "\n".join(out) + "\n"


def export_c(qgraph: QuantizedGraph, path: str | Path, model_meta: dict[str, Any] | None = None,
             prefix: str = "hq") -> None:
    """Write the integer program of ``qgraph`` as a C header at ``path`` (atomically).

    Raises HybridQuantError when the model cannot be lowered.
    """
    guard = f"{_ident(prefix).upper()}_{_ident(Path(path).name).upper()}_"
    write_text(path, header_text(qgraph, model_meta, prefix, guard))
