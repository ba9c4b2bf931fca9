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
  (H, W, 3 each, after resize and crop) and writes the int32 output codes of each;
* ``resources.json`` / ``resources.md``: the static width analysis (:mod:`hybridquant.integer.widths`: the
  worst-case bits of every intermediate of every op), multiply-accumulates, constant and scratch bytes. A
  model with an accumulator wider than 32 bits is refused (the kernels accumulate in int32); intermediates
  of LayerNorm, softmax and requantization over 32 bits run in int64 and are listed.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_dir
from ..errors import HybridQuantError
from ..graph.quantized import QuantizedGraph
from ..integer.lower import lower
from ..integer.program import Program, ProgramOp
from ..integer.widths import analyse
from ..ops import program_kind
from ..primitives import quantize
from .program import pack_bits

RUNTIME = Path(__file__).with_name("runtime")
RUNTIME_FILES = ("hq_kernels.h", "hq_kernels.c", "main.c", "Makefile")
#: the flags ``build_c`` compiles with: strict C99, warnings are errors
STRICT_CFLAGS = "-std=c99 -O3 -Wall -Wextra -Werror -pedantic"
_PER_LINE = 16
_INT32 = (-(2**31), 2**31 - 1)


def _ident(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", text)


def _comment(text: str) -> str:
    return str(text).replace("*/", "* /")


def _int32(v: int, what: str) -> str:
    if not _INT32[0] <= v <= _INT32[1]:
        raise HybridQuantError(f"cannot export to C: {what} = {v} does not fit int32")
    return "(-2147483647 - 1)" if v == _INT32[0] else str(v)


def _int64(v: int) -> str:
    return "(-INT64_C(9223372036854775807) - 1)" if v == -(2**63) else f"INT64_C({v})"


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
        self.op: ProgramOp | None = None
        self.scratch = _Scratch()
        self.temps: list[tuple[int, int]] = []  # the current op's temporary buffers

    # -- buffers and shapes ---------------------------------------------------------
    def codes(self, name: str) -> str:
        """The codes of value ``name`` (``int32_t *``)."""
        return f"(S + {self.offsets[name]})"

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
    def _emit(self, ctype: str, name: str, values: list[str], nbytes: int) -> str:
        lines = [f"static const {ctype} {name}[{max(len(values), 1)}] = {{"]
        for i in range(0, len(values), _PER_LINE):
            lines.append("    " + ", ".join(values[i:i + _PER_LINE]) + ",")
        if not values:
            lines.append("    0,")
        lines.append("};")
        self.consts.append("\n".join(lines))
        self.const_bytes += nbytes
        return name

    def name_of(self, key: str) -> str:
        return f"hq_op{self.op.index:04d}_{_ident(key)}"

    def array(self, key: str, wide: bool = False) -> str:
        """The current op's integer array ``key`` as a flat ``int32_t`` (``int64_t`` with ``wide``) constant."""
        arr = np.asarray(self.op.arrays[key]).reshape(-1)
        if wide:
            return self._emit("int64_t", self.name_of(key), [_int64(int(v)) for v in arr], 8 * arr.size)
        where = f"op {self.op.index} ({self.op.name}) array {key}"
        return self._emit("int32_t", self.name_of(key), [_int32(int(v), where) for v in arr], 4 * arr.size)

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

    def weights(self) -> str:
        """An ``hq_weights`` initializer of the current op's weight: bytes, packed below 8 bits."""
        w = np.asarray(self.op.arrays["weight"]).astype(np.int64)
        bits = int(self.op.attrs.get("weight_bits", 8))
        if bits > 8:
            raise HybridQuantError(f"cannot export to C: op {self.op.index} ({self.op.name}) has {bits}-bit "
                                   "weights; the C kernels take 2 to 8 bits")
        signed = bool(w.min() < 0) if w.size else True
        if bits == 8 and w.size and (w.min() < -128 or w.max() > 127):
            raise self.fail("8-bit weights outside [-128, 127]")
        data = (pack_bits(w, bits) if bits < 8 else w.astype(np.int8)).view(np.uint8).reshape(-1)
        name = self._emit("uint8_t", self.name_of("weight"), [str(int(v)) for v in data], data.size)
        return f"{{{name}, {bits}, {int(signed or bits == 8)}}}"

    def count(self, name: str) -> int:
        return _size(self.shapes[name])


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


def model_c(program: Program, model_meta: dict[str, Any] | None = None) -> tuple[str, str, dict[str, Any]]:
    """(``model.h``, ``model.c``, facts: scratch bytes, constant bytes, op count) of ``program``."""
    em = Emitter()
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
        em.op = op
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
            body += ["    " + line for line in kind.c(op, em)]
        for off, n in em.temps:
            scratch.give(off, n)
        em.temps = []
        if requant:
            body += ["    " + line for line in requant_lines(em, op)]
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
               "bytes, 4-byte aligned. Returns 0. */",
               "int hq_run(const uint8_t *pixels, int32_t *logits, void *scratch);", "", "#endif", ""]
    source = ["/* Generated by hybridquant from the integer program: the op sequence and its constants. */",
              "#include <string.h>", "", '#include "hq_kernels.h"', '#include "model.h"', "",
              "static const int32_t hq_zero[1] = {0};", ""]
    if names:
        quoted = ", ".join('"' + n.replace("\\", "\\\\").replace('"', '\\"') + '"' for n in names)
        source.append(f"const char *const hq_class_names[HQ_NUM_CLASSES] = {{{quoted}}};")
        source.append("")
    source += em.consts
    source += ["", "int hq_run(const uint8_t *pixels, int32_t *logits, void *scratch) {",
               "    int32_t *S = (int32_t *)scratch;", *body, "    return 0;", "}", ""]
    facts = {"scratch_bytes": 4 * max(scratch.end, 1), "constant_bytes": em.const_bytes, "ops": len(ops)}
    return "\n".join(header), "\n".join(source), facts


def resources_table(program: Program, rows: list[dict[str, Any]], facts: dict[str, Any]) -> dict[str, Any]:
    """``resources.json``: the width analysis per op (:func:`~hybridquant.integer.widths.analyse`), the ops with
    intermediates over 32 bits, multiply-accumulates per image, constant and scratch bytes."""
    macs = {op.name: program.macs(op) for op in program.ops}
    over = [{"index": r["index"], "name": r["name"], "kind": r["kind"], "max_bits": r["max_bits"],
             "widest": max(r["bits"], key=r["bits"].get)} for r in rows if r["max_bits"] > 32]
    return {
        "max_bits": max((r["max_bits"] for r in rows), default=0),
        "max_accumulator_bits": max((r["bits"]["acc"] for r in rows), default=0),
        "ops_over_32_bits": over,
        "macs_per_image": sum(macs.values()),
        "constant_bytes": facts["constant_bytes"],
        "scratch_bytes": facts["scratch_bytes"],
        "ops": [{**r, "macs": macs.get(r["name"], 0)} for r in rows],
    }


def resources_md(res: dict[str, Any]) -> str:
    """``resources.md``: the totals and the per-op widths of :func:`resources_table` as Markdown."""
    lines = ["# Resources of the exported program", "",
             f"- widest intermediate: {res['max_bits']} bits; widest accumulator: {res['max_accumulator_bits']} bits",
             f"- ops with intermediates over 32 bits: {len(res['ops_over_32_bits'])} "
             f"({', '.join(sorted({o['kind'] for o in res['ops_over_32_bits']})) or 'none'})",
             f"- multiply-accumulates per image: {res['macs_per_image']:,}",
             f"- constant bytes: {res['constant_bytes']:,}; scratch bytes: {res['scratch_bytes']:,}", "",
             "| # | op | kind | MACs | accumulator bits | widest intermediate | bits |", "|---|---|---|---|---|---|---|"]
    for r in res["ops"]:
        widest = max(r["bits"], key=r["bits"].get)
        lines.append(f"| {r['index']} | {r['name']} | {r['kind']} | {r['macs']:,} | {r['bits']['acc']} | {widest} | "
                     f"{r['max_bits']} |")
    return "\n".join(lines) + "\n"


def export_c(source: QuantizedGraph | Program, out_dir: str | Path, model_meta: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Write the C project of ``source``'s integer program into ``out_dir`` (created; replaced atomically).

    Returns the facts of :func:`model_c`. Raises HybridQuantError when the model cannot be lowered or a value
    does not fit the C kernels."""
    program = source if isinstance(source, Program) else lower(source)
    rows = analyse(program)
    for row in rows:  # the C kernels accumulate in int32, and compute the wider intermediates in int64
        if row["bits"]["acc"] > 32:
            raise HybridQuantError(f"cannot export to C: op {row['index']} ({row['name']}, {row['kind']}) needs a "
                                   f"{row['bits']['acc']}-bit accumulator; the C kernels accumulate in 32 bits")
        if row["max_bits"] > 64:
            widest = max(row["bits"], key=row["bits"].get)
            raise HybridQuantError(f"cannot export to C: op {row['index']} ({row['name']}, {row['kind']}) needs "
                                   f"{row['max_bits']} bits for its {widest}; the C kernels compute in at most 64")
    header, body, facts = model_c(program, model_meta)
    resources = resources_table(program, rows, facts)
    with atomic_dir(out_dir) as tmp:
        (tmp / "model.h").write_text(header)
        (tmp / "model.c").write_text(body)
        (tmp / "resources.json").write_text(json.dumps(resources, indent=2) + "\n")
        (tmp / "resources.md").write_text(resources_md(resources))
        for name in RUNTIME_FILES:
            (tmp / name).write_text((RUNTIME / name).read_text())
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


def run_c(binary: str | Path, pixels: np.ndarray, work_dir: str | Path) -> tuple[np.ndarray, float | None]:
    """Run a built ``hq_model`` on uint8 images [N, H, W, C]: (output codes [N, outputs] int32, processor seconds
    spent in ``hq_run`` when built with ``-DHQ_TIMING``, else None)."""
    work = Path(work_dir)
    images, codes = work / "images.bin", work / "codes.bin"
    images.write_bytes(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    done = subprocess.run([str(binary), str(images), str(codes)], capture_output=True, text=True)
    if done.returncode != 0:
        raise HybridQuantError(f"the C program failed: {done.stderr.strip()}")
    timing = re.search(r"(\d+) ticks in hq_run, (\d+) ticks per second", done.stderr)
    seconds = int(timing.group(1)) / int(timing.group(2)) if timing else None
    return np.fromfile(codes, dtype=np.int32).reshape(len(pixels), -1), seconds
