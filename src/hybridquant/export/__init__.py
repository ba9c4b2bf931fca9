"""Deployable exports of the integer program (for hardware and reference readers).

A quantized model whose requantization multipliers are all powers of two (or
2^a ± 2^b with two shift terms) is lowered by
:func:`~hybridquant.integer.lower.lower` to a
:class:`~hybridquant.integer.program.Program`, which holds, per op in
execution order, every integer constant: int8/int16 weights, int32/int64
biases, requantization shifts (or two-term ``a``/``b``/``sign``/``n``), zero
points and code ranges, lookup tables (per-channel ones too), softmax
``exp`` tables and output exponents, LayerNorm constants, alignment shifts
of adds and concats, layout attributes, the input quantizer and the output
dequantization.

* :func:`export_npz`: one ``.npz`` with the arrays and a JSON manifest inside
  (key ``__manifest__``); :func:`load_npz` reads it back, :func:`load_program` as a Program that
  :class:`~hybridquant.integer.executor.IntegerModel` runs.
* :func:`export_c` (:mod:`.c`): a C99 project that runs the program — ``model.h``/``model.c`` generated from
  it, the integer kernels (``hq_kernels.c``), ``main.c`` and a ``Makefile``; no malloc, no floating point.
* :func:`export_onnx` (:mod:`.onnx`): the fake-quantized simulation as a QDQ
  ONNX model (any uniform scales, not only powers of two), with the
  preprocessing in its metadata; :class:`~.onnx.OnnxRunner` runs it with
  onnxruntime. Needs the ``export`` extra (``onnx``, ``onnxruntime``),
  imported only when used.

CLI: ``hybridquant export --qmodel model.hq --format {npz,c,onnx} --out PATH`` (a folder for ``c``).
"""

from .c import export_c
from .npz import export_npz, load_npz, load_program
from .onnx import export_onnx
from .program import FORMAT, MANIFEST_KEY, VERSION, program_tables

__all__ = ["FORMAT", "MANIFEST_KEY", "VERSION", "export_c", "export_npz", "export_onnx", "load_npz",
           "load_program", "program_tables"]
