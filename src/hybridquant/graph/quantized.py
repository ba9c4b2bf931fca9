"""The fully quantized graph: a float graph plus the integer view of every tensor.

Every tensor entering a multiply-accumulate is integer: activations carry an
output quantizer on every value-changing node (``VALUE_OPS``), so conv,
linear and both matmul operands, residual adds and concats all read integer
tensors; weights are symmetric per output channel; biases are int32 at scale
s_in·s_w. Non-linear ops compute on dequantized inputs and their outputs are
re-quantized. The simulation runs the float ops on dequantized tensors, which
is exact for the integer program up to float rounding of large sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..config import QuantConfig
from ..ops import op_def
from ..primitives import dequantize, pot_scale, quantize
from ..qparams import QParams
from .ir import Graph, Node

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


#: the largest integer bias of an int32 accumulator: half its range, the other half for the products
BIAS_LIMIT = 2**30


def _bias_fitting(wq: QParams, bias: torch.Tensor, in_scale: torch.Tensor, pot: bool) -> QParams:
    """``wq`` with each output channel's scale raised (to a power of two with ``pot``) where its bias
    would pass :data:`BIAS_LIMIT` at ``in_scale·s_w``: a channel of near-zero weights (dead, or scaled down by
    outlier scaling) otherwise gets a weight scale so fine that its bias leaves the accumulator; its weights
    are then coarser, which costs nothing they could carry."""
    need = bias.double().abs() / (float(in_scale) * BIAS_LIMIT)
    scale = wq.scale.double()
    if not bool((need > scale).any()):
        return wq
    if pot:
        need = pot_scale(need, "ceil").double()
    raised = torch.maximum(scale, need if scale.dim() else need.max())
    return replace(wq, scale=raised.to(wq.scale.dtype))


def accumulator_bits(act_bits: int, weight_bits: int) -> int:
    """int32 accumulators for up to 8-bit operands; 16-bit operands need int64."""
    return 32 if max(act_bits, weight_bits) <= 8 else 64


@dataclass
class QuantizedGraph:
    """A :class:`Graph` with output quantizers (``act``) and integer weights.

    ``graph`` holds the float parameters after the method's transforms
    (and its refinements: GPTQ-rounded weights, corrected biases, ...);
    ``sim`` is the same graph with dequantized integer weights and biases,
    which :meth:`run` executes with every output fake-quantized.
    ``reference``, when set (by :func:`~hybridquant.quantize.quantize_graph`,
    not saved in ``model.hq``), is the float graph right after the method's
    transforms — folding, outlier scaling, channel shifts — and before any
    refinement: the float model the quantized one approximates node by node,
    which :func:`~hybridquant.quantize.layer_sqnr` compares against.
    """

    graph: Graph
    config: QuantConfig
    act: dict[str, QParams]
    weight: dict[str, QParams]
    float_nodes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    reference: Graph | None = field(default=None, repr=False, compare=False)
    weight_int: dict[str, torch.Tensor] = field(init=False)
    bias_int: dict[str, torch.Tensor] = field(init=False)
    sim: Graph = field(init=False)

    def __post_init__(self) -> None:
        self.rebuild()

    def input_qparams(self, node: Node, index: int = 0) -> QParams | None:
        """Quantizer of ``node``'s ``index``-th input (layout ops are transparent)."""
        return self.act.get(self.graph.producer(node.inputs[index]).name)

    def rebuild(self) -> None:
        """Recompute integer weights/biases and the simulation graph from ``act``/``weight``."""
        self.weight_int, self.bias_int = {}, {}
        sim = self.graph.clone()
        for node in sim:  # the weighted layers
            wq = self.weight.get(node.name)
            if wq is None:
                continue
            x_qp = self.input_qparams(node)
            has_bias = "bias" in node.params and x_qp is not None and x_qp.scale.dim() == 0
            if has_bias and accumulator_bits(x_qp.bits, wq.bits) == 32:
                wq = self.weight[node.name] = _bias_fitting(wq, node.params["bias"], x_qp.scale, self.config.pot)
            w = node.params["weight"]
            q = quantize(w, wq.scale, wq.zero_point, wq.qmin, wq.qmax, axis=0)
            self.weight_int[node.name] = q
            node.params["weight"] = dequantize(q, wq.scale, wq.zero_point, axis=0)
            if has_bias:
                bias_scale = (x_qp.scale.double() * wq.scale.double())
                b = torch.floor(node.params["bias"].double() / bias_scale + 0.5)
                if accumulator_bits(x_qp.bits, wq.bits) == 32:
                    b = b.clamp(INT32_MIN, INT32_MAX)
                self.bias_int[node.name] = b.to(torch.int64)
                node.params["bias"] = (b * bias_scale).float()
        self.sim = sim
        self.override = self._integer_kernels() if self.config.pot else {}

    def _integer_kernels(self) -> dict[str, Any]:
        """The integer kernels the integer program uses where the op table has one (softmax, LayerNorm)."""
        out: dict[str, Any] = {}
        for node in self.graph:
            simulate = op_def(node.op).simulate
            run = simulate(node, self.input_qparams(node), self.act.get(node.name)) if simulate else None
            if run is not None:
                out[node.name] = run
        return out

    def _hook(self, node: Node, out: torch.Tensor) -> torch.Tensor:
        qp = self.act.get(node.name)
        return qp.fake(out) if qp is not None else out

    @torch.no_grad()
    def run(self, x: torch.Tensor, keep: bool = False) -> Any:
        """Simulate the integer model on a float image batch."""
        return self.sim.run(x, hook=self._hook, keep=keep, override=self.override)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def grid_constants(self) -> int:
        """Thresholds of the threshold grids: constants the integer program needs besides weights, biases and
        tables (counted as parameters)."""
        return sum(q.thresholds.numel() for q in self.act.values() if q.grid == "threshold")

    def quantized_macs(self) -> list[Node]:
        """MAC nodes whose every input (and weight) is integer."""
        out = []
        for node in self.graph.where(mac=True):
            inputs_ok = all(self.input_qparams(node, i) is not None for i in range(len(node.inputs)))
            weight_ok = "weight" not in node.params or node.name in self.weight  # a matmul has no weight
            if inputs_ok and weight_ok:
                out.append(node)
        return out
