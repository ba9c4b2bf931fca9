"""Export a quantized model as a QDQ ONNX model, and run such a file with onnxruntime.

:func:`export_onnx` writes the fake-quantized simulation of a
:class:`~hybridquant.graph.quantized.QuantizedGraph` in the QDQ form that
ONNX runtimes understand (opset :data:`OPSET`):

* every activation quantizer becomes ``QuantizeLinear -> DequantizeLinear``
  on its node's output (per tensor, or per channel with ``axis``), its codes
  in int8/uint8 (up to 8 bits) or int16/uint16 (16 bits); a code range
  narrower than the container (``bits < 8``, narrow symmetric per-channel
  ranges) gets a ``Clip`` to ``[qmin, qmax]`` on the integer tensor between
  the two (through int32 for 16-bit containers, which onnxruntime cannot
  clip directly);
* conv / linear weights are integer initializers (int8 up to 8 bits, int16
  for 16) read through ``DequantizeLinear`` with their per-output-channel
  scales; biases are int32 initializers at scale ``s_in·s_w`` (a float
  initializer where the integer bias does not fit int32 or there is none);
* every op is the float op of :mod:`hybridquant.ops` on the
  dequantized tensors; nodes that read a value before its quantizer
  (``raw_input``) read the float tensor. Layout ops use constant shapes: the
  batch dim is dynamic (``N``), every other size fixed, so there are no
  ``Shape`` or ``Resize`` ops. A layout op's output is re-quantized with its
  input's (per-tensor) parameters, which is exact (the canonical
  ``DQ -> Transpose -> Q`` form) and keeps onnxruntime's QDQ propagation
  from inserting Q nodes of its own (onnxruntime 1.32 then fails to load
  opset-21 models with int8 activations: "output_dtype INT8 does not match
  y_zero_point type UINT8").

``QuantizeLinear`` rounds half to even where hybridquant rounds half up;
with power-of-two scales ties are frequent (a requantization drops whole
bits), so each per-tensor activation quantizer is preceded by
``Mul(1/s) -> Add(0.5) -> Floor -> Mul(s)``, which puts the value on the
grid with the simulation's rounding and leaves ``QuantizeLinear`` no tie
(counted as ``half_up_rounding``). Softmax / LayerNorm run in float where a
power-of-two simulation runs integer kernels, so logits still differ by a
few output LSBs at most (see ``tests/export/test_onnx.py``).
A threshold grid (hfq's grid on a lookup table's input) has no QDQ form
either; it is exported exactly as a branchless binary search over its
bounds (``Gather``, ``GreaterOrEqual``, ``Where`` per code bit) and a
``Gather`` of the code's representative value (counted as
``threshold_grids``). Quantizers with no uniform QDQ form
(``log2``, ``log_sqrt2``, ``twin``) are refused with
:class:`~hybridquant.errors.HybridQuantError`.

:class:`OnnxRunner` runs onnxruntime with its basic graph optimizations only. Its extended ones fuse the QDQ
pairs around a conv or matmul into u8·s8 integer kernels, which on x86 CPUs without VNNI sum pairs of products in
saturating int16 (``vpmaddubsw``). On such a CPU (AVX2 only) the fused model was measured 25 output LSBs away
from the QDQ arithmetic on ``tests/export/test_onnx.py``'s all-ops graph. With basic optimizations it matched
exactly.

The model's metadata (``metadata_props``, JSON strings under
``hybridquant.*`` keys) holds the model name, class names, data config
(input size, mean, std, interpolation, crop_pct) and quantization config, so
:class:`OnnxRunner` (``hybridquant eval --onnx``) rebuilds the preprocessing.

``onnx`` (export) and ``onnxruntime`` (evaluation) are optional: install the
``export`` extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_path, plain
from ..errors import HybridQuantError
from ..graph.ir import Node, unique_name
from ..graph.quantized import QuantizedGraph
from ..ops import op_def
from ..qparams import QParams

#: ONNX opset of the exported models (QuantizeLinear-21 has int16 codes; GroupNormalization-21
#: per-channel affine; Gelu-20); onnxruntime >= 1.18 runs it
OPSET = 21
#: the IR version that goes with OPSET (what onnxruntime >= 1.18 reads)
IR_VERSION = 10
FORMAT = "hybridquant-onnx-qdq"
VERSION = 1
#: metadata_props key prefix; every value is a JSON string
META_PREFIX = "hybridquant."
OUTPUT_NAME = "logits"
BATCH_DIM = "N"
EXPORT_EXTRA = "onnx export needs the 'export' extra: pip install 'hybridquant[export]'"
RUNTIME_EXTRA = "onnx evaluation needs the 'export' extra: pip install 'hybridquant[export]'"

#: integer containers: (numpy dtype, ONNX element type name, min, max)
_CONTAINERS = (
    (np.int8, "INT8", -(1 << 7), (1 << 7) - 1),
    (np.uint8, "UINT8", 0, (1 << 8) - 1),
    (np.int16, "INT16", -(1 << 15), (1 << 15) - 1),
    (np.uint16, "UINT16", 0, (1 << 16) - 1),
)
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1


def _require_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise HybridQuantError(EXPORT_EXTRA) from exc
    return onnx


def _container(qmin: int, qmax: int, what: str):
    for np_dtype, onnx_name, lo, hi in _CONTAINERS:
        if (qmin < 0) == (lo < 0) and lo <= qmin and qmax <= hi:
            return np_dtype, onnx_name, lo, hi
    raise HybridQuantError(f"{what}: integer range [{qmin}, {qmax}] fits no int8/uint8/int16/uint16 container")


class _Builder:
    """Collects ONNX nodes and initializers under unique, readable names."""

    def __init__(self, onnx_module) -> None:
        self.onnx = onnx_module
        self.helper = onnx_module.helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.taken: set[str] = set()
        self.qdq_pairs = 0
        self.layout_qdq = 0
        self.weight_dq = 0
        self.rounded = 0
        self.threshold_grids = 0

    def unique(self, base: str) -> str:
        return unique_name(base, self.taken)

    def const(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.unique(base)
        self.inits.append(numpy_helper.from_array(np.array(array, order="C", copy=True), name))
        return name

    def add(self, op_type: str, inputs: list[str], out: str, **attrs: Any) -> str:
        """Append one node; ``out`` is the base of its output's name. Returns the output's name."""
        name = self.unique(out)
        self.nodes.append(self.helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    # -- quantizers ----------------------------------------------------------------------
    def qdq(self, src: str, qp: QParams, owner: str, clip: bool = True) -> str:
        """``QuantizeLinear -> [Clip] -> DequantizeLinear`` of ``src`` with ``qp``; returns the float output.

        ``clip=False`` leaves out the Clip of a narrow code range (for values already on the grid).
        """
        if qp.grid == "threshold":
            return self.threshold_grid(src, qp, owner)
        if qp.grid != "uniform":
            raise HybridQuantError(f"node {owner}: its '{qp.grid}' quantizer has no ONNX QuantizeLinear/"
                                   "DequantizeLinear form; export a model with uniform quantizers")
        np_dtype, onnx_name, lo, hi = _container(qp.qmin, qp.qmax, f"node {owner}")
        scale = qp.scale.detach().cpu().float().numpy()
        zp = np.broadcast_to(qp.zero_point.detach().cpu().numpy().astype(np.int64), scale.shape).astype(np_dtype)
        attrs: dict[str, Any] = {}
        if scale.ndim > 0:
            if qp.axis is None or scale.ndim != 1:
                raise HybridQuantError(f"node {owner}: per-channel activation scales need one axis")
            attrs["axis"] = int(qp.axis)
        s = self.const(f"{owner}.act_scale", scale)
        z = self.const(f"{owner}.act_zero_point", zp)
        if clip and scale.ndim == 0:
            src = self._round_half_up(src, scale, owner)
        q = self.add("QuantizeLinear", [src, s, z], f"{owner}.quantized", **attrs)
        if clip and (qp.qmin, qp.qmax) != (lo, hi):  # a code range narrower than the container
            if np_dtype in (np.int8, np.uint8):
                q = self.add("Clip", [q, self.const(f"{owner}.qmin", np.array(qp.qmin, np_dtype)),
                                      self.const(f"{owner}.qmax", np.array(qp.qmax, np_dtype))], f"{owner}.clipped")
            else:  # onnxruntime has no 16-bit Clip: clip exactly in int32
                wide = self.add("Cast", [q], f"{owner}.quantized_int32", to=self.onnx.TensorProto.INT32)
                wide = self.add("Clip", [wide, self.const(f"{owner}.qmin", np.array(qp.qmin, np.int32)),
                                         self.const(f"{owner}.qmax", np.array(qp.qmax, np.int32))],
                                f"{owner}.clipped_int32")
                q = self.add("Cast", [wide], f"{owner}.clipped", to=getattr(self.onnx.TensorProto, onnx_name))
        self.qdq_pairs += 1
        if not clip:
            self.layout_qdq += 1
        return self.add("DequantizeLinear", [q, s, z], f"{owner}.dequantized", **attrs)

    def threshold_grid(self, src: str, qp: QParams, owner: str) -> str:
        """A threshold grid (no QDQ form): the code, the number of bounds at or below ``x``, by a branchless
        binary search (``Gather`` of a bound, ``GreaterOrEqual``, ``Where``; one step per code bit, as
        hardware would compare), then its representative value ``levels[code]`` (``Gather``)."""
        bounds = (qp.thresholds.double() * float(qp.scale)).float().numpy()  # exact: integers times 2^f
        steps = max(1, int(bounds.size).bit_length())
        padded = np.full(1 << steps, np.inf, np.float32)  # bounds past the last never count
        padded[:bounds.size] = bounds
        table = self.const(f"{owner}.bounds", padded)
        code = self.const(f"{owner}.code0", np.array(0, np.int64))
        one = self.const(f"{owner}.one", np.array(1, np.int64))
        for bit in reversed(range(steps)):
            cand = self.add("Add", [code, self.const(f"{owner}.bit{bit}", np.array(1 << bit, np.int64))],
                            f"{owner}.candidate{bit}")
            index = self.add("Sub", [cand, one], f"{owner}.index{bit}")
            bound = self.add("Gather", [table, index], f"{owner}.bound{bit}")
            above = self.add("GreaterOrEqual", [src, bound], f"{owner}.at_or_above{bit}")
            code = self.add("Where", [above, cand, code], f"{owner}.code{bit}")
        self.threshold_grids += 1
        return self.add("Gather", [self.const(f"{owner}.levels", qp.levels.float().numpy()), code],
                        f"{owner}.dequantized")

    def _round_half_up(self, src: str, scale: np.ndarray, owner: str) -> str:
        """``floor(x/s + 0.5)·s``: values already on the grid, so QuantizeLinear's half-to-even never
        meets a tie and the codes are the simulation's (ties are frequent with power-of-two scales)."""
        t = self.add("Mul", [src, self.const(f"{owner}.act_inv_scale", (1.0 / scale).astype(np.float32))],
                     f"{owner}.scaled")
        t = self.add("Add", [t, self.const(f"{owner}.half", np.array(0.5, np.float32))], f"{owner}.plus_half")
        t = self.add("Floor", [t], f"{owner}.floor")
        self.rounded += 1
        return self.add("Mul", [t, self.const(f"{owner}.act_grid_scale", scale)], f"{owner}.on_grid")

    def dq_const(self, base: str, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                 axis: int | None) -> str:
        """An integer initializer read through DequantizeLinear (per tensor or along ``axis``)."""
        attrs = {"axis": axis} if scale.ndim > 0 and axis is not None else {}
        inputs = [self.const(f"{base}_quantized", q), self.const(f"{base}_scale", scale.astype(np.float32)),
                  self.const(f"{base}_zero_point", zero_point.astype(q.dtype))]
        self.weight_dq += 1
        return self.add("DequantizeLinear", inputs, base, **attrs)


def _shapes(qgraph: QuantizedGraph) -> tuple[dict[str, list[int]], dict[str, int | None]]:
    """Every node's output shape for a batch of one, and which dim of it grows with the batch."""
    size = [int(v) for v in qgraph.graph.meta.get("input_size", [])]
    if len(size) != 3:
        raise HybridQuantError("the quantized model has no input_size (C, H, W) in its graph metadata")
    with torch.no_grad():
        one = qgraph.sim.run(torch.zeros(1, *size), keep=True)
        two = qgraph.sim.run(torch.zeros(2, *size), keep=True)
    shapes, batch_dim = {}, {}
    for name, v in one.items():
        s1, s2 = list(v.shape), list(two[name].shape)
        grows = [i for i, (a, b) in enumerate(zip(s1, s2, strict=True)) if a != b]
        if len(grows) > 1:
            raise HybridQuantError(f"node {name}: more than one dim depends on the batch size")
        shapes[name] = s1
        batch_dim[name] = grows[0] if grows else None
    return shapes, batch_dim


def _np(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype)


class _Exporter:
    def __init__(self, qgraph: QuantizedGraph, onnx_module) -> None:
        self.qg = qgraph
        self.check_quantizers()
        self.b = _Builder(onnx_module)
        self.shapes, self.batch_dim = _shapes(qgraph)
        self.value: dict[str, str] = {}  # node -> ONNX tensor of its (quantized) output
        self.raw: dict[str, str] = {}  # node -> ONNX tensor of its output before the quantizer
        self.value_qp: dict[str, QParams | None] = {}  # node -> quantizer of the value it carries

    def check_quantizers(self) -> None:
        """Refuse quantizers without an ONNX form (log2, log_sqrt2, twin) up front."""
        for name, qp in list(self.qg.act.items()) + list(self.qg.weight.items()):
            if qp.grid not in ("uniform", "threshold"):
                raise HybridQuantError(f"node {name}: its '{qp.grid}' quantizer has no ONNX QuantizeLinear/"
                                       "DequantizeLinear form; export a model with uniform quantizers")

    # -- parameters ----------------------------------------------------------------------
    def weight(self, node: Node, transpose: bool = False) -> str:
        """The float weight tensor of a conv / linear (``transpose``: a linear's [in, out])."""
        wq = self.qg.weight.get(node.name)
        sim = self.qg.sim[node.name]
        if wq is None:  # a float node
            w = _np(sim.params["weight"])
            return self.b.const(f"{node.name}.weight", w.T if transpose else w)
        np_dtype, _, _, _ = _container(wq.qmin, wq.qmax, f"weights of node {node.name}")
        if wq.bits > 8 and np_dtype in (np.int8, np.uint8):  # 16-bit weights stay int16
            np_dtype = np.int16 if wq.qmin < 0 else np.uint16
        q = self.qg.weight_int[node.name].detach().cpu().numpy().astype(np_dtype)
        scale = _np(wq.scale)
        zp = np.broadcast_to(_np(wq.zero_point, np.int64), scale.shape)
        axis = 0
        if transpose:
            q, axis = q.T, 1
        return self.b.dq_const(f"{node.name}.weight", q, scale, zp, axis)

    def bias(self, node: Node) -> str | None:
        sim = self.qg.sim[node.name]
        if "bias" not in sim.params:
            return None
        b = self.qg.bias_int.get(node.name)
        wq = self.qg.weight.get(node.name)
        x_qp = self.qg.input_qparams(node)
        if b is not None and wq is not None and x_qp is not None and x_qp.scale.dim() == 0 and (
                b.numel() == 0 or (int(b.min()) >= _INT32_MIN and int(b.max()) <= _INT32_MAX)):
            scale = (x_qp.scale.double() * wq.scale.double()).float().numpy()
            return self.b.dq_const(f"{node.name}.bias", _np(b, np.int32), scale, np.zeros(scale.shape, np.int32), 0)
        return self.b.const(f"{node.name}.bias", _np(sim.params["bias"]))

    # -- what the op table's emitters use ----------------------------------------------
    def rank(self, name: str) -> int:
        return len(self.shapes[name])

    def params(self, node: Node) -> dict[str, torch.Tensor]:
        """The simulation's parameters of ``node`` (dequantized integer weights and biases)."""
        return self.qg.sim[node.name].params

    @staticmethod
    def array(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
        return _np(t, dtype)

    def emit(self, node: Node, xs: list[str]) -> str:
        emitter = op_def(node.op).onnx
        if emitter is None:
            raise HybridQuantError(f"node {node.name}: op '{node.op}' has no ONNX form")
        return emitter(self, node, xs)

    # -- the graph -----------------------------------------------------------------------
    def build(self, model_meta: dict[str, Any] | None):
        onnx, helper = self.b.onnx, self.b.helper
        graph = self.qg.graph
        first = graph.nodes[0]
        if op_def(first.op).role != "source":
            raise HybridQuantError("the quantized graph does not start with its input")
        c, h, w = (int(v) for v in graph.meta["input_size"])
        out_node = graph.output.inputs[0]
        for node in graph:
            role = op_def(node.op).role
            if role == "sink":
                continue
            if role == "source":
                out = self.b.unique(node.name)
            else:
                xs = [self.raw[i] if node.attrs.get("raw_input") else self.value[i] for i in node.inputs]
                out = self.emit(node, xs)
            self.raw[node.name] = out
            if node.opdef.role == "data_movement":
                # the codes of a layout op's output are its input's; an explicit QDQ with the same
                # (per-tensor) parameters is exact and is the canonical QDQ form of a moved tensor.
                # It also keeps onnxruntime (1.32) from inserting its own Q after the layout op, with
                # an output_dtype that its int8 -> uint8 rewrite then contradicts (session init fails).
                qp = self.value_qp[node.inputs[0]]
                self.value_qp[node.name] = qp
                layout_qdq = qp is not None and qp.scale.dim() == 0
                self.value[node.name] = self.b.qdq(out, qp, node.name, clip=False) if layout_qdq else out
                continue
            qp = self.qg.act.get(node.name)
            self.value_qp[node.name] = qp
            self.value[node.name] = self.b.qdq(out, qp, node.name) if qp is not None else out
        logits = self.b.add("Identity", [self.value[out_node]], OUTPUT_NAME)
        out_shape: list[Any] = list(self.shapes[out_node])
        if self.batch_dim[out_node] is not None:
            out_shape[self.batch_dim[out_node]] = BATCH_DIM
        g = helper.make_graph(
            self.b.nodes, _graph_name(model_meta),
            [helper.make_tensor_value_info(first.name, onnx.TensorProto.FLOAT, [BATCH_DIM, c, h, w])],
            [helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, out_shape)],
            self.b.inits,
        )
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                  producer_name="hybridquant", producer_version=_version(),
                                  doc_string="QDQ export of a hybridquant model (fake-quantized simulation)")
        helper.set_model_props(model, _metadata(self.qg, model_meta, first.name, logits))
        return model


def _version() -> str:
    from .. import __version__

    return str(__version__)


def _graph_name(model_meta: dict[str, Any] | None) -> str:
    name = (model_meta or {}).get("name")
    return str(name) if name else "hybridquant"


def _metadata(qgraph: QuantizedGraph, model_meta: dict[str, Any] | None, input_name: str,
              output_name: str) -> dict[str, str]:
    meta = dict(model_meta or {})
    entries: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "model_name": meta.get("name"), "source": meta.get("source"),
        "num_classes": meta.get("num_classes"), "class_names": meta.get("class_names"),
        "data_cfg": meta.get("data_cfg"),
        "config": qgraph.config.to_dict(),
        "input": {"name": input_name, "shape": [BATCH_DIM, *qgraph.graph.meta["input_size"]]},
        "output": output_name,
        "float_nodes": list(qgraph.float_nodes),
    }
    return {META_PREFIX + k: json.dumps(plain(v)) for k, v in entries.items() if v is not None}


def _build(qgraph: QuantizedGraph, model_meta: dict[str, Any] | None):
    onnx = _require_onnx()
    exporter = _Exporter(qgraph, onnx)
    model = exporter.build(model_meta)
    onnx.checker.check_model(model, full_check=True)
    return model, exporter.b


def build_onnx(qgraph: QuantizedGraph, model_meta: dict[str, Any] | None = None):
    """The checked QDQ ``onnx.ModelProto`` of ``qgraph`` (see the module docstring)."""
    return _build(qgraph, model_meta)[0]


def export_onnx(qgraph: QuantizedGraph, path: str | Path, model_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``qgraph`` as a QDQ ONNX model at ``path`` (atomically); returns a summary.

    The summary holds ``opset``, ``ir_version``, ``nodes`` (ONNX nodes),
    ``qdq_pairs`` (QuantizeLinear -> DequantizeLinear pairs: one per
    activation quantizer plus ``layout_qdq``, the exact re-quantization
    after layout ops), ``weight_dq`` (integer weight / bias initializers
    read through DequantizeLinear), ``half_up_rounding`` (quantizers
    preceded by the half-up rounding chain), ``threshold_grids`` (threshold
    grids, exported as comparisons and a gather), ``input`` and ``output``
    (tensor names).
    Raises HybridQuantError for quantizers without a QDQ form, and when
    ``onnx`` is not installed; nothing is written then.
    """
    model, built = _build(qgraph, model_meta)
    data = model.SerializeToString()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return {"opset": OPSET, "ir_version": IR_VERSION, "nodes": len(model.graph.node),
            "qdq_pairs": built.qdq_pairs, "layout_qdq": built.layout_qdq, "weight_dq": built.weight_dq,
            "half_up_rounding": built.rounded, "threshold_grids": built.threshold_grids,
            "input": model.graph.input[0].name, "output": model.graph.output[0].name}


# --- evaluation with onnxruntime --------------------------------------------------------
def session_options(threads: int):
    """onnxruntime session options that compute a QDQ model's arithmetic as written (see the module docstring:
    no QDQ fusion into integer kernels, which saturate on x86 CPUs without VNNI)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class OnnxRunner:
    """An exported model in an onnxruntime CPU session; call it on a float image batch for logits."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise HybridQuantError(RUNTIME_EXTRA) from exc
        path = Path(path)
        if not path.is_file():
            raise HybridQuantError(f"ONNX model not found: {path}")
        options = session_options(int(threads or torch.get_num_threads()))
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            raw_meta = dict(self.session.get_modelmeta().custom_metadata_map)
        except Exception as exc:
            text = str(exc).strip()
            reason = text.splitlines()[0] if text else type(exc).__name__
            raise HybridQuantError(f"cannot read ONNX model {path}: {reason}") from exc
        self.path = path
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise HybridQuantError(f"{path}: expected one image input, got {len(inputs)} inputs")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_shape = list(inputs[0].shape)
        try:
            self.meta = {k[len(META_PREFIX):]: json.loads(v) for k, v in raw_meta.items() if k.startswith(META_PREFIX)}
        except json.JSONDecodeError as exc:
            raise HybridQuantError(f"{path}: malformed hybridquant metadata: {exc}") from exc
        if self.meta.get("format") != FORMAT:
            raise HybridQuantError(f"{path} was not exported by hybridquant (no preprocessing metadata)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: x.detach().cpu().float().numpy()}
        return torch.from_numpy(self.session.run([self.output_name], feed)[0])
