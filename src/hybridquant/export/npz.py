"""Export the integer program as one ``.npz`` file with its JSON manifest inside.

Layout of the file (``numpy.load`` reads it, ``allow_pickle`` not needed):

* ``__manifest__``: a 0-d unicode array holding the JSON manifest
  (:func:`~hybridquant.export.program.program_tables`): op order, kinds,
  inputs, structural attributes, output shapes and, per op, the names,
  dtypes and shapes of its arrays;
* ``opNNNN.<name>``: the integer arrays of op ``NNNN`` (execution order),
  e.g. ``op0001.weight`` (int8/int16; a weight of a width that is not a
  multiple of 8 bits, e.g. 4 or 6, is stored packed as an int8 byte stream,
  its manifest entry saying ``packed``: bits, signedness, unpacked dtype and
  shape — layout in the manifest's ``conventions.packing``),
  ``op0001.bias`` (int32/int64), ``op0001.requant.shift`` (the smallest
  signed type, 0-d or per channel, as for zero points and code ranges), ``op0002.table``
  (a lookup table in the output code type), ``op0017.exp_table``,
  ``op0013.gamma_q``; scalars are 0-d arrays. The input quantizer
  (``op0000.scale``/``scale_exp``/``zero_point``/``qmin``/``qmax``) and the
  output dequantization (last op: ``scale``/``scale_exp``/``zero_point``)
  are the only float data (the float32 scales, for the host).

The arrays' ``nbytes`` add up to the report's ``deployed_bytes`` (every op but
the host's input quantizer and output dequantization) plus ``host_bytes``
(those two); :meth:`~hybridquant.integer.program.Program.storage`
counts them from the lowered program without writing a file.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path
from ..errors import HybridQuantError
from ..graph.quantized import QuantizedGraph
from ..integer.program import Program
from .program import FORMAT, MANIFEST_KEY, VERSION, program_from_tables, program_tables


def export_npz(qgraph: QuantizedGraph | Program, path: str | Path, model_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the integer program of ``qgraph`` (or the lowered program itself) to ``path`` (atomically);
    returns the manifest.

    Raises HybridQuantError when the model cannot be lowered (e.g. float
    requantization multipliers).
    """
    manifest, arrays = program_tables(qgraph, model_meta)
    arrays[MANIFEST_KEY] = np.array(json.dumps(manifest, indent=1))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return manifest


def load_npz(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read an exported program back: ``(manifest, arrays by flat key)``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise HybridQuantError(f"cannot read integer program {path}: {exc}") from exc
    if MANIFEST_KEY not in arrays:
        raise HybridQuantError(f"{path} has no {MANIFEST_KEY}: not an exported integer program")
    try:
        manifest = json.loads(str(arrays.pop(MANIFEST_KEY)))
    except json.JSONDecodeError as exc:
        raise HybridQuantError(f"{path}: its manifest is not JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise HybridQuantError(f"{path} is not a {FORMAT} file")
    if manifest.get("version") != VERSION:
        raise HybridQuantError(f"{path} is a {FORMAT} v{manifest.get('version')} file; this hybridquant reads "
                               f"v{VERSION}: export it again from its model.hq")
    return manifest, arrays


def load_program(path: str | Path) -> Program:
    """An exported ``.npz`` as the :class:`~hybridquant.integer.program.Program` it was written from."""
    return program_from_tables(*load_npz(path))
