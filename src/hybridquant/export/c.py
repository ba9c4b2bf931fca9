"""Export the integer program as a self-contained C99 project.

``export_c(source, out_dir)`` writes:

* ``model.h``: the one entry point ``int hq_run(const uint8_t *pixels, int32_t *logits, void *scratch)``,
  ``HQ_SCRATCH_BYTES`` (the scratch buffer the caller provides: every value and accumulator lives in it,
  placed ahead of time), the input size, the output codes' count and dequantization, the class names;
* ``model.c``: the program's constants (weights packed at their bit width, least significant bit first)
  and the op sequence, generated from the :class:`~hybridquant.integer.program.Program`: each op's C form
  comes from its kind in the op table (``ProgramKind.c``), its requantization from :func:`requant_lines`;
* ``hq_kernels.h`` / ``hq_kernels.c``: the generic integer kernels (conv, linear, matmul, elementwise,
  lookup tables, softmax, LayerNorm, layout views, requantization), no ``malloc``, no floating point;
* ``main.c`` and a ``Makefile``: ``make`` builds ``hq_model``, which reads a file of uint8 RGB images
  (H, W, 3 each, after resize and crop) and writes the int32 output codes of each (built with ``-fopenmp``,
  the images of a batch in parallel); ``make debug`` builds ``hq_model_debug``, which checks every op's
  accumulator against the width analysis' bound and its codes against their range;
* ``hq_test.c`` (``make test``): golden per-op vectors from the Python integer executor on a fixed image, each
  op run alone on them, then the whole program (:func:`golden_c`);
* ``resources.json`` / ``resources.md``: the static width analysis (:mod:`hybridquant.integer.widths`: the
  worst-case bits of every intermediate of every op), the operations per image (multiply-accumulates,
  multiplies, shifts, additions, comparisons, lookups, divisions), constant bytes (by kind, and how the C
  arrays' bytes follow from the program's), scratch bytes and, when asked, the compiled objects' size. A
  model with any intermediate wider than 32 bits is refused, naming the op: the kernels compute in int32.

The input is the uint8 image: normalisation and input quantization are a per-channel 256-entry table
(``hq_input_table``), computed here with the float32 arithmetic of the Python preprocessing
(``ToTensor``'s ``/ 255``, ``Normalize``) and of the input quantizer, so the C program's codes equal the
integer executor's on the same images.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_dir
from ..errors import HybridQuantError
from ..graph.quantized import QuantizedGraph
from ..integer.lower import lower
from ..integer.program import Program, ProgramOp, array_nbytes, storage_breakdown
from ..integer.widths import analyse
from ..ops import COUNT_KEYS, program_kind
from ..ops.conv import C_TILE_LANES
from ..primitives import quantize
from .program import pack_bits

RUNTIME = Path(__file__).with_name("runtime")
RUNTIME_FILES = ("hq_kernels.h", "hq_kernels.c", "main.c", "Makefile")
#: the flags ``build_c`` compiles with: strict C99, warnings are errors
STRICT_CFLAGS = "-std=c99 -O3 -Wall -Wextra -Werror -pedantic"
_PER_LINE = 16


def _c_array(ctype: str, name: str, values: list[str]) -> str:
    """A ``static const`` C array of formatted ``values``, ``_PER_LINE`` to a line (one 0 when empty)."""
    rows = [", ".join(values[i:i + _PER_LINE]) for i in range(0, len(values), _PER_LINE)] or ["0"]
    return f"static const {ctype} {name}[{max(len(values), 1)}] = {{\n" + "".join(f"    {r},\n" for r in rows) + "};"


#: model.c's run-time checks: compiled in with -DHQ_DEBUG (``make debug``), nothing otherwise
DEBUG_CHECKS = """#ifdef HQ_DEBUG
#include <stdio.h>
/* 1 (with a message) when a value of op `index` lies outside [lo, hi]: its accumulator outside the width
 * analysis' bound, or its codes outside their range; hq_run then returns the op's index */
static int hq_check(int32_t index, const char *what, const int32_t *v, int32_t count, int64_t lo, int64_t hi) {
    int32_t i;
    for (i = 0; i < count; ++i) {
        if (v[i] < lo || v[i] > hi) {
            fprintf(stderr, "hq_model: op %d: %s %d at %d outside [%ld, %ld]\\n", (int)index, what, (int)v[i],
                    (int)i, (long)lo, (long)hi);
            return 1;
        }
    }
    return 0;
}
#define HQ_CHECK_ACC(index, v, count, bound) \\
    if (hq_check(index, "accumulator", v, count, -(int64_t)(bound), bound)) return index
#define HQ_CHECK_CODES(index, v, count, lo, hi) if (hq_check(index, "code", v, count, lo, hi)) return index
#else
#define HQ_CHECK_ACC(index, v, count, bound) (void)0
#define HQ_CHECK_CODES(index, v, count, lo, hi) (void)0
#endif"""
_INT32 = (-(2**31), 2**31 - 1)


def _ident(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", text)


def _comment(text: str) -> str:
    return str(text).replace("*/", "* /")


def _int32(v: int, what: str) -> str:
    if not _INT32[0] <= v <= _INT32[1]:
        raise HybridQuantError(f"cannot export to C: {what} = {v} does not fit int32")
    return "(-2147483647 - 1)" if v == _INT32[0] else str(v)


def _size(shape: list[int]) -> int:
    return math.prod(shape)


class _Scratch:
    """First-fit placement of the buffers in the scratch area (int32 slots), with the peak."""

    def __init__(self) -> None:
        self.free: list[tuple[int, int]] = []  # (offset, size)
        self.end = 0

    def take(self, size: int) -> int:
        size = max(size, 1)
        for i, (off, n) in enumerate(self.free):
            if n >= size:
                self.free[i:i + 1] = [(off + size, n - size)] if n > size else []
                return off
        off, self.end = self.end, self.end + size
        return off

    def give(self, off: int, size: int) -> None:
        self.free.append((off, max(size, 1)))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for o, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((o, n))
        self.free = merged


def column_blocks(weight: np.ndarray) -> np.ndarray:
    """A weight [out, in...] as the C matrix products read it when their lanes run along the outputs: the
    transposed matrix [in, out] cut into blocks of ``C_TILE_LANES`` columns, one after the other, each [in][16]
    row-major (the last one [in][out % 16]), so that a block is unpacked at a time."""
    wt = weight.reshape(weight.shape[0], -1).T
    return np.concatenate([wt[:, j:j + C_TILE_LANES].reshape(-1) for j in range(0, wt.shape[1], C_TILE_LANES)])


class Emitter:
    """What an op kind's C hook (``ProgramKind.c(op, em)``) uses: buffers, shapes and constants.

    Buffers are int32 slices of the scratch area ``S``; constants become ``static const`` arrays of
    ``model.c``. Hooks return C statements.
    """

    def __init__(self) -> None:
        self.shapes: dict[str, list[int]] = {}
        self.offsets: dict[str, int] = {}  # value name -> scratch offset of its codes
        self.acc_offsets: dict[str, int] = {}  # op name -> scratch offset of its accumulator
        self.consts: list[str] = []
        self.const_bytes = 0
        self.stored: dict[tuple[int, str], int] = {}  # (op index, array) -> bytes of its C array
        self.op: ProgramOp | None = None
        self.scratch = _Scratch()
        self.temps: list[tuple[int, int]] = []  # the current op's temporary buffers
        self.wrote_codes = False  # the current op's C form wrote its codes (codes_written)

    # -- buffers and shapes ---------------------------------------------------------
    def codes(self, name: str) -> str:
        """The codes of value ``name`` (``int32_t *``)."""
        return f"(S + {self.offsets[name]})"

    def codes_written(self) -> str:
        """The current op's codes, for a C form that writes them itself (its requantization is the identity):
        the emitter then adds no requantization and checks no accumulator."""
        self.wrote_codes = True
        return self.codes(self.op.name)

    def acc(self, name: str | None = None) -> str:
        """The accumulator of op ``name`` (the current op's by default)."""
        return f"(S + {self.acc_offsets[name or self.op.name]})"

    def shape(self, name: str) -> list[int]:
        return self.shapes[name]

    def temp(self, size: int) -> str:
        """A scratch buffer of ``size`` int32 values for the current op only."""
        off = self.scratch.take(size)
        self.temps.append((off, size))
        return f"(S + {off})"

    # -- constants ------------------------------------------------------------------
    def _emit(self, ctype: str, name: str, values: list[str], nbytes: int, key: str | None = None) -> str:
        """A ``static const`` array of ``model.c``; ``key``: the current op's array it holds (for the bytes'
        reconciliation with the program's, :meth:`reconcile`)."""
        if key is not None:
            self.stored[(self.op.index, key)] = nbytes
        self.consts.append(_c_array(ctype, name, values))
        self.const_bytes += nbytes
        return name

    def name_of(self, key: str) -> str:
        return f"hq_op{self.op.index:04d}_{_ident(key)}"

    def array(self, key: str) -> str:
        """The current op's integer array ``key`` as a flat ``int32_t`` constant."""
        arr = np.asarray(self.op.arrays[key]).reshape(-1)
        where = f"op {self.op.index} ({self.op.name}) array {key}"
        return self._emit("int32_t", self.name_of(key), [_int32(int(v), where) for v in arr], 4 * arr.size, key)

    def table(self, key: str) -> str:
        """An ``hq_table`` argument (a compound literal) of the current op's lookup table ``key``, stored at its
        dtype's width (int8, uint8, int16, uint16 or int32)."""
        arr = np.asarray(self.op.arrays[key]).reshape(-1)
        types = {"int8": ("int8_t", "HQ_I8"), "uint8": ("uint8_t", "HQ_U8"), "int16": ("int16_t", "HQ_I16"),
                 "uint16": ("uint16_t", "HQ_U16"), "int32": ("int32_t", "HQ_I32")}
        if arr.dtype.name not in types:
            raise self.fail(f"table {key} of type {arr.dtype.name}: the C kernels take 8, 16 or 32 bits")
        ctype, tag = types[arr.dtype.name]
        name = self._emit(ctype, self.name_of(key), [str(int(v)) for v in arr], int(arr.nbytes), key)
        return f"(hq_table){{{name}, {tag}}}"

    def has(self, key: str) -> bool:
        return key in self.op.arrays

    def scalar(self, key: str) -> int:
        arr = np.asarray(self.op.arrays[key])
        if arr.size != 1:
            raise HybridQuantError(f"cannot export to C: op {self.op.index} ({self.op.name}) array {key} has "
                                   f"{arr.size} values where the C kernel takes one")
        return int(arr.reshape(-1)[0])

    def param(self, key: str) -> str:
        """``hq_param`` initializer of a 0-d or 1-d array (per tensor or per channel; 0 when absent)."""
        if key not in self.op.arrays:
            return "{hq_zero, 1}"
        return f"{{{self.array(key)}, {np.asarray(self.op.arrays[key]).size}}}"

    def arg(self, key: str) -> str:
        """``hq_param`` argument (a compound literal) of array ``key`` (0 when absent)."""
        return "(hq_param)" + self.param(key)

    def fail(self, why: str) -> HybridQuantError:
        return HybridQuantError(f"cannot export to C: op {self.op.index} ({self.op.name}): {why}")

    def weights(self, blocked: bool = False) -> str:
        """An ``hq_weights`` initializer of the current op's weight ([out, in...], row-major; ``blocked``: its
        :func:`column_blocks`): bytes, packed below 8 bits."""
        w = np.asarray(self.op.arrays["weight"]).astype(np.int64)
        if blocked:
            w = column_blocks(w)
        bits = int(self.op.attrs.get("weight_bits", 8))
        if bits > 8:
            raise HybridQuantError(f"cannot export to C: op {self.op.index} ({self.op.name}) has {bits}-bit "
                                   "weights; the C kernels take 2 to 8 bits")
        signed = bool(w.min() < 0) if w.size else True
        if bits == 8 and w.size and (w.min() < -128 or w.max() > 127):
            raise self.fail("8-bit weights outside [-128, 127]")
        data = (pack_bits(w, bits) if bits < 8 else w.astype(np.int8)).view(np.uint8).reshape(-1)
        name = self._emit("uint8_t", self.name_of("weight"), [str(int(v)) for v in data], data.size, "weight")
        return f"{{{name}, {bits}, {int(signed or bits == 8)}}}"

    def count(self, name: str) -> int:
        return _size(self.shapes[name])

    def reconcile(self, program: Program, input_table_bytes: int) -> dict[str, int]:
        """How the C arrays' bytes follow from the program's ``deployed_bytes``: every deployed array is a C
        array, except the ones used only as scalars (``immediates``, written into the code); arrays narrower
        than 32 bits that the kernels read as int32 are ``widened``; the input table (host side in the
        program) is added. ``c_constant_bytes`` = deployed + widened − immediates + input table."""
        deployed = widened = immediates = 0
        for op in program.ops:
            if program_kind(op.kind).host:
                continue
            for key in op.arrays:
                nbytes = array_nbytes(op, key)
                deployed += nbytes
                if (op.index, key) in self.stored:
                    widened += self.stored[(op.index, key)] - nbytes
                else:
                    immediates += nbytes
        return {"deployed_bytes": deployed, "widened_to_int32": widened, "immediates": immediates,
                "input_table": input_table_bytes, "c_constant_bytes": deployed + widened - immediates + input_table_bytes}


def _axis_split(shape: list[int], axis: int | None) -> tuple[int, int]:
    """(inner, channels) of ``axis`` in ``shape``: element i has channel (i // inner) % channels."""
    if axis is None:
        return 1, 1
    axis %= len(shape)
    return _size(shape[axis + 1:]), shape[axis]


def requant_lines(em: Emitter, op: ProgramOp) -> list[str]:
    """The requantization of ``op``'s accumulator into its codes (the contract's ``REQUANT_DOC``)."""
    rq = op.attrs["requant"]
    modes = {"shift": "HQ_REQUANT_SHIFT", "two_term": "HQ_REQUANT_TWO_TERM", "threshold": "HQ_REQUANT_THRESHOLD"}
    if rq["mode"] not in modes:
        raise HybridQuantError(f"cannot export to C: op {op.index} ({op.name}) requantizes with a float multiplier")
    axis = rq["axis"]
    if axis is None and any(np.asarray(op.arrays[k]).size > 1 for k in op.arrays if k.startswith("requant.")
                            and k != "requant.thresholds"):
        axis = -1  # a 1-d parameter without an axis lies along the last dim (the contract's convention)
    inner, channels = _axis_split(op.out_shape, axis)
    fields = {k: em.param(f"requant.{k}") for k in ("shift", "a", "b", "sign", "n", "zero_point")}
    thresholds = em.array("requant.thresholds") if em.has("requant.thresholds") else "hq_zero"
    n_thr = np.asarray(op.arrays["requant.thresholds"]).size if em.has("requant.thresholds") else 0
    init = (f"{{{modes[rq['mode']]}, {inner}, {channels}, {fields['shift']}, {fields['a']}, {fields['b']}, "
            f"{fields['sign']}, {fields['n']}, {fields['zero_point']}, {em.scalar('requant.qmin')}, "
            f"{em.scalar('requant.qmax')}, {thresholds}, {n_thr}}}")
    return [f"{{ static const hq_requant rq = {init};",
            f"  hq_requantize({em.acc()}, {em.codes(op.name)}, {_size(op.out_shape)}, &rq); }}"]


def input_table(program: Program, model_meta: dict[str, Any] | None) -> np.ndarray:
    """[C, 256] codes of every uint8 pixel value per channel: ``ToTensor`` (``/ 255``), ``Normalize`` (mean, std
    of the model's data config; 0 and 1 without one) and the input quantizer, all in float32 as in Python."""
    op = program.ops[0]
    channels = program.input_size[0]
    # one image of 1 x 256 pixels, pixel p holding value p in every channel: x is [1, C, 1, 256]
    pixels = np.repeat(np.arange(256, dtype=np.uint8).reshape(1, 1, 256, 1), channels, axis=3)
    x = pixels_to_images(pixels, model_meta)
    c = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in op.arrays.items()}
    codes = quantize(x, c["scale"], c["zero_point"], int(c["qmin"]), int(c["qmax"]), op.attrs.get("axis"))
    return codes.reshape(channels, 256).numpy().astype(np.int64)


def pixels_to_images(pixels: np.ndarray, model_meta: dict[str, Any] | None) -> torch.Tensor:
    """The float images the Python pipeline makes of uint8 ``pixels`` [N, H, W, C] (``ToTensor``, ``Normalize``):
    what the integer executor must see to match the C program on the same pixels."""
    channels = pixels.shape[-1]
    cfg = (model_meta or {}).get("data_cfg", {})
    mean = torch.tensor(cfg.get("mean", [0.0] * channels), dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std", [1.0] * channels), dtype=torch.float32).reshape(1, -1, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).to(torch.float32).div(255)
    return x.sub(mean).div(std)


def model_c(program: Program, model_meta: dict[str, Any] | None = None,
            widths: list[dict[str, Any]] | None = None) -> tuple[str, str, dict[str, Any]]:
    """(``model.h``, ``model.c``, facts) of ``program``. Each op with arithmetic becomes a function
    ``hq_opNNNN(S)`` that ``hq_run`` calls in order; built with ``-DHQ_DEBUG``, ``hq_run`` checks after each
    one that its accumulator stays within the width analysis' bound (``widths``: :func:`analyse`'s rows) and
    its codes within their range. ``facts``: scratch bytes, constant bytes, op count, and ``ops_layout`` (per
    op function: the scratch offsets and sizes of the values and accumulators it reads and of the codes it
    writes; what the golden test of :func:`golden_c` fills and checks)."""
    em = Emitter()
    acc_bound = {r["name"]: r["magnitudes"]["acc"] for r in widths or []}
    functions: list[str] = []
    layout: list[dict[str, Any]] = []
    scratch = em.scratch
    ops = program.ops
    last_read: dict[str, int] = {}
    for op in ops:
        for name in op.inputs:
            last_read[name] = op.index
    first, out_op = ops[0], ops[-1]
    if not (program_kind(first.kind).host and program_kind(first.kind).result == "codes"):
        raise HybridQuantError("cannot export to C: the program does not start with the input quantizer")
    body: list[str] = []
    sizes: dict[str, int] = {}
    for op in ops:
        kind = program_kind(op.kind)
        em.op, em.wrote_codes = op, False
        if op.out_shape is not None:
            em.shapes[op.name] = list(op.out_shape)
        if kind.result == "none":
            continue
        if kind.result == "logits":
            src = op.inputs[0]
            body.append(f"    /* {op.index}: {_comment(op.name)} */")
            body.append(f"    memcpy(logits, {em.codes(src)}, sizeof(int32_t) * {em.count(src)});")
            continue
        size = _size(op.out_shape)
        requant = kind.result == "accumulator" and "requant" in op.attrs  # else only a channel_requant reads it
        if kind.result == "accumulator":
            em.acc_offsets[op.name] = scratch.take(size)
        if kind.result == "codes" or requant:
            em.offsets[op.name] = scratch.take(size)
        sizes[op.name] = size
        body.append(f"    /* {op.index}: {_comment(op.name)} ({op.op} -> {op.kind}) */")
        if op is first:
            table = em._emit("int32_t", "hq_input_table",
                             [_int32(int(v), "input table") for v in input_table(program, model_meta).reshape(-1)],
                             4 * 256 * program.input_size[0])
            c, h, w = program.input_size
            body.append(f"    hq_quantize_input(pixels, {c}, {h * w}, {table}, {em.codes(op.name)});")
        else:
            if kind.c is None:
                raise HybridQuantError(f"cannot export to C: op kind {op.kind} has no C form")
            lines = list(kind.c(op, em))
            if requant and not em.wrote_codes:
                lines += requant_lines(em, op)
            fn = f"hq_op{op.index:04d}"
            functions.append("\n".join([f"/* {op.index}: {_comment(op.name)} ({op.op} -> {op.kind}) */",
                                         f"static void {fn}(int32_t *S) {{", *["    " + ln for ln in lines], "}"]))
            body.append(f"    {fn}(S);")
            reads = [{"value": n, "offset": em.offsets[n], "size": sizes[n], "accumulator": False}
                     for n in dict.fromkeys(op.inputs) if n in em.offsets]
            reads += [{"value": n, "offset": em.acc_offsets[n], "size": sizes[n], "accumulator": True}
                      for n in dict.fromkeys(op.inputs) if n in em.acc_offsets and program[n].attrs.get("keep_accumulator")]
            writes = {"offset": em.offsets[op.name], "size": size} if op.name in em.offsets else None
            layout.append({"function": fn, "op": op.name, "reads": reads, "writes": writes})
            if kind.result == "accumulator" and op.name in acc_bound and not em.wrote_codes:
                body.append(f"    HQ_CHECK_ACC({op.index}, {em.acc()}, {size}, {acc_bound[op.name]});")
            if writes is not None and "requant.qmin" in op.arrays:
                body.append(f"    HQ_CHECK_CODES({op.index}, {em.codes(op.name)}, {size}, "
                            f"{em.scalar('requant.qmin')}, {em.scalar('requant.qmax')});")
        for off, n in em.temps:
            scratch.give(off, n)
        em.temps = []
        if kind.result == "accumulator" and not op.attrs.get("keep_accumulator"):
            scratch.give(em.acc_offsets[op.name], size)
        for name in dict.fromkeys(op.inputs):  # values nobody reads any more
            if last_read.get(name) != op.index:
                continue
            if name in em.offsets:
                scratch.give(em.offsets[name], sizes[name])
            if name in em.acc_offsets and program[name].attrs.get("keep_accumulator"):
                scratch.give(em.acc_offsets[name], sizes[name])
    out_shape = em.shapes[out_op.inputs[0]]
    n_out = _size(out_shape)
    meta = model_meta or {}
    names = [str(n) for n in meta.get("class_names") or []]
    header = [
        "/* Integer program exported by hybridquant: a model with no floating point (C99). */",
        "#ifndef HQ_MODEL_H", "#define HQ_MODEL_H", "", "#include <stdint.h>", "",
        f"#define HQ_INPUT_CHANNELS {program.input_size[0]}",
        f"#define HQ_INPUT_HEIGHT {program.input_size[1]}",
        f"#define HQ_INPUT_WIDTH {program.input_size[2]}",
        "/* bytes of one input image: uint8, (H, W, C) interleaved, after resize and crop */",
        "#define HQ_INPUT_BYTES (HQ_INPUT_CHANNELS * HQ_INPUT_HEIGHT * HQ_INPUT_WIDTH)",
        f"#define HQ_NUM_OUTPUTS {n_out}",
        f"#define HQ_SCRATCH_BYTES {4 * max(scratch.end, 1)}",
    ]
    zp = np.asarray(out_op.arrays["zero_point"]).reshape(-1)
    header.append(f"/* logits = (codes - HQ_OUTPUT_ZERO_POINT) * scale; scale: {_comment(out_op.arrays['scale'])} */")
    header.append(f"#define HQ_OUTPUT_ZERO_POINT {int(zp[0]) if zp.size == 1 else 0}")
    if "scale_exp" in out_op.arrays and np.asarray(out_op.arrays["scale_exp"]).size == 1:
        header.append(f"#define HQ_OUTPUT_SCALE_EXP {int(np.asarray(out_op.arrays['scale_exp']).reshape(-1)[0])}")
    if names:
        header.append(f"#define HQ_NUM_CLASSES {len(names)}")
        header.append("extern const char *const hq_class_names[HQ_NUM_CLASSES];")
    header += ["", "/* Run the model on one image; writes HQ_NUM_OUTPUTS output codes. `scratch`: HQ_SCRATCH_BYTES "
               "bytes, 4-byte aligned. Returns 0 (built with -DHQ_DEBUG: the index of the first op whose values "
               "leave their analysed bounds, after a message on stderr). */",
               "int hq_run(const uint8_t *pixels, int32_t *logits, void *scratch);", "", "#endif", ""]
    source = ["/* Generated by hybridquant from the integer program: the op sequence and its constants. */",
              "#include <string.h>", "", '#include "hq_kernels.h"', '#include "model.h"', "",
              "static const int32_t hq_zero[1] = {0};", ""]
    if names:
        quoted = ", ".join('"' + n.replace("\\", "\\\\").replace('"', '\\"') + '"' for n in names)
        source.append(f"const char *const hq_class_names[HQ_NUM_CLASSES] = {{{quoted}}};")
        source.append("")
    source += em.consts
    source += ["", DEBUG_CHECKS, "", *functions, "",
               "int hq_run(const uint8_t *pixels, int32_t *logits, void *scratch) {",
               "    int32_t *S = (int32_t *)scratch;", *body, "    return 0;", "}", ""]
    table_bytes = 4 * 256 * program.input_size[0]
    facts = {"scratch_bytes": 4 * max(scratch.end, 1), "constant_bytes": em.const_bytes, "ops": len(ops),
             "input_table_bytes": table_bytes, "constant_bytes_reconciliation": em.reconcile(program, table_bytes),
             "ops_layout": layout}
    return "\n".join(header), "\n".join(source), facts


def golden_image(program: Program) -> np.ndarray:
    """The image of the golden test: fixed pseudo-random uint8 pixels [1, H, W, C] (seed 0)."""
    c, h, w = program.input_size
    return np.random.default_rng(0).integers(0, 256, (1, h, w, c), dtype=np.uint8)


def _int32_array(name: str, values: np.ndarray) -> str:
    return _c_array("int32_t", name, [_int32(int(v), name) for v in np.asarray(values).reshape(-1)])


def golden_c(program: Program, model_meta: dict[str, Any] | None, facts: dict[str, Any]) -> str:
    """``hq_test.c``: golden per-op test vectors and the program that checks the C kernels against them.

    On :func:`golden_image`, the Python integer executor gives every value's codes (and the accumulators later
    ops read); for each op function of ``model.c`` the test fills its inputs with those codes, runs it alone,
    and compares the codes it writes with the executor's; then ``hq_run`` on the image end to end. It includes
    ``model.c`` (the op functions are static) and exits 1 naming the first op that differs."""
    from ..integer.executor import IntegerModel

    trace: dict[str, torch.Tensor] = {}
    accs: dict[str, torch.Tensor] = {}
    pixels = golden_image(program)
    _, codes = IntegerModel(program).run(pixels_to_images(pixels, model_meta), trace, accs)
    arrays: dict[str, str] = {}

    def ref(value: str, accumulator: bool) -> str:
        key = f"hq_golden_{'acc_' if accumulator else ''}{_ident(value)}"
        if key not in arrays:
            arrays[key] = _int32_array(key, (accs if accumulator else trace)[value].numpy())
        return key

    cases = []
    for entry in facts["ops_layout"]:
        if entry["writes"] is None:
            continue
        fills = " ".join(f"memcpy(S + {r['offset']}, {ref(r['value'], r['accumulator'])}, {4 * r['size']});"
                         for r in entry["reads"])
        out = ref(entry["op"], False)
        cases.append(f"    {fills}\n    {entry['function']}(S);\n"
                     f"    failed += hq_compare(\"{_comment(entry['op'])}\", S + {entry['writes']['offset']}, {out}, "
                     f"{entry['writes']['size']});")
    pix = ", ".join(str(int(v)) for v in pixels.reshape(-1))
    lines = ["/* Golden per-op test of the exported program (generated by hybridquant): `make test`. */",
             '#include <stdio.h>', '#include "model.c"', "",
             f"static const uint8_t hq_golden_pixels[HQ_INPUT_BYTES] = {{{pix}}};",
             _int32_array("hq_golden_output", codes.numpy()), *arrays.values(), "",
             "static int32_t hq_test_scratch[(HQ_SCRATCH_BYTES + 3) / 4];", "",
             "static int hq_compare(const char *op, const int32_t *got, const int32_t *want, int32_t count) {",
             "    int32_t i;",
             "    for (i = 0; i < count; ++i) {",
             "        if (got[i] != want[i]) {",
             '            fprintf(stderr, "hq_test: %s: code %d is %d, the Python kernels give %d\\n", op, (int)i, '
             "(int)got[i], (int)want[i]);",
             "            return 1;", "        }", "    }", "    return 0;", "}", "",
             "int main(void) {", "    int32_t *S = hq_test_scratch, logits[HQ_NUM_OUTPUTS];", "    int failed = 0;",
             *cases,
             "    hq_run(hq_golden_pixels, logits, S);",
             '    failed += hq_compare("hq_run", logits, hq_golden_output, HQ_NUM_OUTPUTS);',
             f'    printf("hq_test: {len(cases)} ops and the whole program on the golden image: %s\\n", '
             'failed ? "FAILED" : "ok");',
             "    return failed ? 1 : 0;", "}", ""]
    return "\n".join(lines)


def resources_table(program: Program, rows: list[dict[str, Any]], facts: dict[str, Any]) -> dict[str, Any]:
    """``resources.json``: the width analysis per op (:func:`~hybridquant.integer.widths.analyse`), the ops with
    intermediates over 32 bits, the operations per image (multiply-accumulates, multiplies, shifts, additions,
    comparisons, table lookups, divisions; :meth:`~hybridquant.integer.program.Program.counts`) per op and in
    total, constant bytes (by kind, :func:`~hybridquant.integer.program.storage_breakdown`, and as the C
    arrays hold them), scratch bytes and, when measured, the compiled code size (``facts["code"]``)."""
    counts = {op.name: program.counts(op) for op in program.ops if not program_kind(op.kind).result == "logits"}
    over = [{"index": r["index"], "name": r["name"], "kind": r["kind"], "max_bits": r["max_bits"],
             "widest": max(r["bits"], key=r["bits"].get)} for r in rows if r["max_bits"] > 32]
    storage = storage_breakdown(program.ops)
    return {
        "max_bits": max((r["max_bits"] for r in rows), default=0),
        "max_accumulator_bits": max((r["bits"]["acc"] for r in rows), default=0),
        "ops_over_32_bits": over,
        "macs_per_image": sum(c["macs"] for c in counts.values()),
        "counts_per_image": {k: sum(c[k] for c in counts.values()) for k in ("macs", *COUNT_KEYS)},
        "constant_bytes": facts["constant_bytes"],
        "deployed_bytes": storage["deployed_bytes"],
        "deployed_bytes_breakdown": storage["breakdown"],
        "input_table_bytes": facts["input_table_bytes"],
        "constant_bytes_reconciliation": facts["constant_bytes_reconciliation"],
        "scratch_bytes": facts["scratch_bytes"],
        "code": facts.get("code"),
        "ops": [{**r, "macs": counts[r["name"]]["macs"], "counts": counts[r["name"]]} for r in rows],
    }


def resources_md(res: dict[str, Any]) -> str:
    """``resources.md``: the totals and the per-op widths of :func:`resources_table` as Markdown."""
    rec = res["constant_bytes_reconciliation"]
    lines = ["# Resources of the exported program", "",
             f"- widest intermediate: {res['max_bits']} bits; widest accumulator: {res['max_accumulator_bits']} bits",
             f"- ops with intermediates over 32 bits: {len(res['ops_over_32_bits'])} "
             f"({', '.join(sorted({o['kind'] for o in res['ops_over_32_bits']})) or 'none'})",
             "- operations per image: " + ", ".join(f"{k} {v:,}" for k, v in res["counts_per_image"].items()),
             f"- the program's deployed bytes: {res['deployed_bytes']:,} ("
             + ", ".join(f"{k} {v:,}" for k, v in res["deployed_bytes_breakdown"].items() if v) + ")",
             f"- constant bytes in the C arrays: {res['constant_bytes']:,} = deployed {rec['deployed_bytes']:,} + "
             f"{rec['widened_to_int32']:,} for small arrays held as int32 − {rec['immediates']:,} of scalars written "
             f"into the code + the input table's {rec['input_table']:,}",
             f"- scratch (activation) bytes: {res['scratch_bytes']:,}"]
    if res.get("code"):
        lines.append("- compiled code (`size`, " + res["code"]["cflags"] + "): " + "; ".join(
            f"{name}: text {s['text']:,}, data {s['data']:,}, bss {s['bss']:,}" for name, s in res["code"]["objects"].items()))
    keys = ("shifts", "adds", "comparisons", "lookups", "divisions")
    lines += ["", "| # | op | kind | MACs | " + " | ".join(keys) + " | accumulator bits | widest intermediate | bits |",
              "|---|---|---|---|" + "---|" * len(keys) + "---|---|---|"]
    for r in res["ops"]:
        widest = max(r["bits"], key=r["bits"].get)
        lines.append(f"| {r['index']} | {r['name']} | {r['kind']} | {r['macs']:,} | "
                     + " | ".join(f"{r['counts'][k]:,}" for k in keys)
                     + f" | {r['bits']['acc']} | {widest} | {r['max_bits']} |")
    return "\n".join(lines) + "\n"


def code_size(project: str | Path, cflags: str = "-std=c99 -O2") -> dict[str, Any] | None:
    """``size`` of ``model.o`` and ``hq_kernels.o`` compiled from an exported project (text, data and bss bytes),
    or None without a C compiler or binutils' ``size``."""
    cc, size = c_compiler(), shutil.which("size")
    if cc is None or size is None:
        return None
    project, objects = Path(project), {}
    with tempfile.TemporaryDirectory(prefix="hq-size-") as tmp:
        for name in ("model.c", "hq_kernels.c"):
            obj = Path(tmp) / name.replace(".c", ".o")
            done = subprocess.run([cc, *cflags.split(), "-c", "-o", str(obj), str(project / name)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise HybridQuantError(f"the C compiler failed on {project / name}: "
                                       f"{(done.stderr.strip().splitlines() or ['no message'])[0]}")
            out = subprocess.run([size, str(obj)], capture_output=True, text=True, check=True).stdout.splitlines()
            text, data, bss = (int(v) for v in out[1].split()[:3])
            objects[obj.name] = {"text": text, "data": data, "bss": bss}
    return {"cflags": cflags, "objects": objects}


def export_c(source: QuantizedGraph | Program, out_dir: str | Path, model_meta: dict[str, Any] | None = None,
             measure_code: bool = False) -> dict[str, Any]:
    """Write the C project of ``source``'s integer program into ``out_dir`` (created; replaced atomically).

    Returns the facts of :func:`model_c`. ``measure_code`` compiles the project's objects once to record their
    size in ``resources.json`` (:func:`code_size`; needs a C compiler). Raises HybridQuantError when the model
    cannot be lowered or a value does not fit the C kernels."""
    program = source if isinstance(source, Program) else lower(source)
    rows = analyse(program)
    for row in rows:
        if row["max_bits"] > 32:
            widest = max(row["bits"], key=row["bits"].get)
            raise HybridQuantError(f"cannot export to C: op {row['index']} ({row['name']}, {row['kind']}) needs "
                                   f"{row['max_bits']} bits for its {widest}; the C kernels compute in 32")
    header, body, facts = model_c(program, model_meta, rows)
    golden = golden_c(program, model_meta, facts)
    facts = {k: v for k, v in facts.items() if k != "ops_layout"}
    with atomic_dir(out_dir) as tmp:
        (tmp / "model.h").write_text(header)
        (tmp / "model.c").write_text(body)
        (tmp / "hq_test.c").write_text(golden)
        for name in RUNTIME_FILES:
            (tmp / name).write_text((RUNTIME / name).read_text())
        if measure_code:
            facts["code"] = code_size(tmp)
        resources = resources_table(program, rows, facts)
        (tmp / "resources.json").write_text(json.dumps(resources, indent=2) + "\n")
        (tmp / "resources.md").write_text(resources_md(resources))
    return facts


def c_compiler() -> str | None:
    """The system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def native_flag() -> str:
    """`` -march=native`` when the C compiler takes it (integer results do not depend on it), else ``""``."""
    cc = c_compiler()
    if cc is None:
        return ""
    probe = subprocess.run([cc, "-march=native", "-x", "c", "-fsyntax-only", "-"], input="int x;\n",
                           capture_output=True, text=True)
    return " -march=native" if probe.returncode == 0 else ""


def build_c(project: str | Path, cflags: str = STRICT_CFLAGS) -> Path:
    """Compile an exported project with the system compiler (its Makefile's rule); returns ``hq_model``."""
    cc = c_compiler()
    if cc is None:
        raise HybridQuantError("no C compiler found (set CC or install cc, gcc or clang)")
    project = Path(project)
    sources = [str(project / n) for n in ("model.c", "hq_kernels.c", "main.c")]
    done = subprocess.run([cc, *cflags.split(), "-o", str(project / "hq_model"), *sources], capture_output=True,
                          text=True)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise HybridQuantError(f"the C compiler failed on {project}: {first}")
    return project / "hq_model"


def run_c(binary: str | Path, pixels: np.ndarray, work_dir: str | Path, threads: int | None = None
          ) -> tuple[np.ndarray, float | None]:
    """Run a built ``hq_model`` on uint8 images [N, H, W, C]: (output codes [N, outputs] int32, seconds spent in
    ``hq_run`` when built with ``-DHQ_TIMING``, else None). ``threads`` sets ``OMP_NUM_THREADS`` for a program
    built with ``-fopenmp`` (its seconds are then wall time)."""
    work = Path(work_dir)
    images, codes = work / "images.bin", work / "codes.bin"
    images.write_bytes(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    done = subprocess.run([str(binary), str(images), str(codes)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise HybridQuantError(f"the C program failed: {done.stderr.strip()}")
    timing = re.search(r"(\d+) ticks in hq_run, (\d+) ticks per second", done.stderr)
    seconds = int(timing.group(1)) / int(timing.group(2)) if timing else None
    return np.fromfile(codes, dtype=np.int32).reshape(len(pixels), -1), seconds
