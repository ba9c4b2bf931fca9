"""hfq — hardware-friendly quantization (Kim & Kim, ICCE 2025), as implemented here.

1. **Outlier scaling** (:mod:`.outlier_scaling`): per-channel power-of-two α
   move activation outliers into the next layer's weights, chosen by the
   layer's quantized output error; with ``channel_shift`` a layer reading a
   norm first has its input channels centred (the offset moves into the
   norm's bias and the layer's bias).
2. **Objective-based power-of-two approximation** (:mod:`.pot_search`): every
   weight and activation exponent chosen by the error it causes downstream,
   layer by layer on quantized inputs.
3. **Remaining post-training, multiplier-free refinements**: GPTQ-style weight
   rounding on the chosen grid that also compensates the error arriving at
   each layer's input (:mod:`.weight_rounding`), and empirical bias
   correction (an int32 bias change).
4. **Per-channel power-of-two factors on LayerNorm inputs** (FQ-ViT's PTF,
   ``ptf``): the residual stream of a transformer has a few wide channels;
   each channel gets the scale 2^(k + c_j), which the integer LayerNorm
   aligns with left shifts.
5. **Grids for lookup-table inputs**: a conv's output (up to 6 bits) read
   only by its SiLU table is quantized on a threshold grid (``lut_thresholds``,
   :mod:`.lut_grid`) whose intervals are the preimages of the SiLU output's
   codes, so it adds (almost) no error beyond the output's own quantizer.
   A table folded into outlier scaling's per-channel shift gets one grid for
   all its channels' output grids. Where no grid applies
   (``--no-lut-thresholds``, 8-bit activations, a table read both before and
   after its own quantizer) a uniform grid with a zero point
   (``lut_zero_point``) lets the exponent search give up the negative side,
   where SiLU is flat, for resolution where the output varies.
6. **Block reconstruction** (:mod:`.reconstruction`): each block learns its
   weights' rounding (down or up on the same grid) and its biases against the
   float model's block output, with the activation quantizers in the loop.

With ``scales='float'`` the same parts run (α is still chosen under power-of-two quantizers), the
search also tries float scales around the best power of two, and a power-of-two twin of the graph is
searched beside it: the model keeps whichever has the smaller output error on the search images, so
float scales are never worse than powers of two there (``info['refine']['float_search']``).

Ablations: ``outlier_scaling=False``, ``pot_rounding='round'|'ceil'``,
``alpha_pot=False``, ``weight_rounding=False``, ``input_compensation=False``,
``bias_correction=False``, ``channel_shift=False``, ``ptf=False``,
``lut_thresholds=False``, ``lut_zero_point=False``, ``reconstruction=False`` in :class:`~hybridquant.config.QuantConfig`.
"""

from __future__ import annotations

from typing import Any

import torch

from ...config import HfqConfig, QuantConfig
from ...graph.ir import Graph, Node
from ...graph.stream import split_images
from ...observers import ActivationObserver
from ...phases import phase
from ...qparams import QParams, range_to_qparams, restrict_pot, restrict_two_term
from ...store import Workspace
from ..fqvit import PTFMethod, ptf_samples
from .lut_grid import MAX_BITS
from .outlier_scaling import outlier_scaling
from .pot_search import SEARCH_IMAGES, sequential_refine
from .reconstruction import RECONSTRUCTION_IMAGES, reconstruct


class HFQ(PTFMethod):
    name = "hfq"
    config_class = HfqConfig

    def __init__(self, workspace: Workspace | None = None) -> None:
        super().__init__(workspace)
        # values read only by lookup-table non-linearities (``lut_zero_point``)
        self.lut_inputs: set[str] = set()

    def transform(self, graph: Graph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        if config.options.outlier_scaling:
            with phase("outlier scaling"):
                info = outlier_scaling(graph, calib, config, workspace=self.workspace)
        else:
            info = {"outlier_scaling": "off"}
        if config.options.ptf:
            with phase("ptf samples"):
                found, _ = ptf_samples(graph, calib)
            # the integer LayerNorm aligns channels along its normalised (last) dim only
            self.ptf = {name: v for name, v in found.items() if v[0] == -1}
            info["ptf_tensors"] = sorted(self.ptf)
        if config.options.lut_zero_point or config.options.lut_thresholds:
            self.lut_inputs = {n.name for n in graph if n.name not in self.ptf and (users := graph.users(n.name))
                               and all(u.opdef.elementwise for u in users)}
        return info

    def act_qparams(self, node: Node, obs: ActivationObserver, bits: int, config: QuantConfig) -> QParams:
        if (qp := self.ptf_qparams(node, obs, bits, config)) is not None:
            return qp
        if config.options.lut_zero_point and node.name in self.lut_inputs and obs.min < 0:
            lo, hi = obs.range(self.act_range)
            return range_to_qparams(torch.tensor(lo), torch.tensor(hi), bits, "asymmetric")
        return super().act_qparams(node, obs, bits, config)

    def lut_grid_inputs(self, qgraph) -> dict[str, str]:
        """Lookup-table inputs of at most :data:`~.lut_grid.MAX_BITS` bits that get threshold grids, each
        with the node whose quantizer completes its table: the table itself when it has its own per-tensor
        quantizer and nothing reads its value before that quantizer, or the one per-channel shift that
        alone reads it (outlier scaling's α folded into a per-channel table)."""
        graph, out = qgraph.graph, {}
        for name in sorted(self.lut_inputs):
            users = graph.users(name)
            if name not in qgraph.act or qgraph.act[name].bits > MAX_BITS or len(users) != 1:
                continue
            table, readers = users[0], graph.users(users[0].name)
            raw_readers = [u for u in readers if u.attrs.get("raw_input")]
            if table.name in qgraph.act and not raw_readers:
                completes = table.name
            elif table.name not in qgraph.act and len(readers) == 1 and readers[0].opdef.channel_scale is not None:
                completes = readers[0].name
            else:
                continue
            qp = qgraph.act.get(completes)
            if qp is not None and qp.grid == "uniform" and qp.scale.dim() == 0:
                out[name] = completes
        return out

    def _search(self, qgraph, calib: list[torch.Tensor], config: QuantConfig) -> tuple[dict[str, Any], dict]:
        """The sequential exponent search, weight rounding and bias correction; returns (info, GPTQ targets)."""
        # float scales always search; power-of-two scales unless an ablation asks for naive rounding
        search = not config.pot or config.pot_rounding == "objective"
        targets: dict[str, torch.Tensor] = {}
        opts: HfqConfig = config.options
        info = sequential_refine(qgraph, calib, search_weights=search, search_acts=search,
                                 bias_correction=opts.bias_correction, weight_rounding=opts.weight_rounding,
                                 input_compensation=opts.input_compensation,
                                 two_term_weights=config.pot and config.shift_terms == 2, rounding_targets=targets,
                                 zero_point_search=opts.lut_zero_point,
                                 lut_grids=self.lut_grid_inputs(qgraph) if opts.lut_thresholds else {},
                                 float_scales=not config.pot, workspace=self.workspace)
        return info, targets

    def refine(self, qgraph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        float_graph = qgraph.graph.clone() if config.options.reconstruction else None
        with phase("exponent search"):
            if config.pot:
                info, targets = self._search(qgraph, calib, config)
            else:
                info, targets = self._float_or_pot(qgraph, calib, config)
        if float_graph is not None:
            with phase("reconstruction"):
                info["reconstruction"] = reconstruct(qgraph, float_graph, calib, config.options.reconstruction_iters,
                                                     start=targets, workspace=self.workspace,
                                                     limit=RECONSTRUCTION_IMAGES)
                qgraph.rebuild()
        return info

    def _float_or_pot(self, qgraph, calib: list[torch.Tensor], config: QuantConfig) -> tuple[dict[str, Any], dict]:
        """Float scales: search them, and search a power-of-two twin of the same graph too; keep whichever
        gives the smaller network output error on the search images. Float scales are a superset of powers
        of two, but a layer-by-layer greedy search over more candidates is not always better end to end;
        this way a float-scale model is never worse than the power-of-two one on the calibration data."""
        chunks = split_images(qgraph.graph, calib, self.workspace, limit=SEARCH_IMAGES)
        refs = [qgraph.graph.run(c) for c in chunks]  # logits: small
        twin = pot_twin(qgraph, config.replace(scales="pot", pot_rounding="objective"))
        twin_info, twin_targets = self._search(twin, calib, twin.config)
        info, targets = self._search(qgraph, calib, config)

        def output_mse(model) -> float:
            return float(sum(((model.run(c) - r).pow(2).sum() for c, r in zip(chunks, refs, strict=True)),
                             torch.zeros(())) / sum(r.numel() for r in refs))

        err_float, err_pot = output_mse(qgraph), output_mse(twin)
        if err_pot < err_float:
            qgraph.graph, qgraph.act, qgraph.weight = twin.graph, twin.act, twin.weight
            qgraph.rebuild()
            info, targets = twin_info, twin_targets
        info["float_search"] = {"output_mse_float": err_float, "output_mse_pot": err_pot,
                                "kept": "pot" if err_pot < err_float else "float"}
        return info, targets


def pot_twin(qgraph, config: QuantConfig):
    """A copy of ``qgraph`` (graph cloned) with every uniform scale rounded to a power of two, as
    ``scales='pot'`` starts its search; zero points keep the low end of each float grid."""
    from ...graph.quantized import QuantizedGraph

    act = {}
    for name, qp in qgraph.act.items():
        if qp.grid == "uniform":
            lo = torch.tensor(-float(qp.zero_point.max()) * float(qp.scale.max()))
            qp = restrict_pot(qp, "round", lo=lo)
        act[name] = qp
    weight = {name: restrict_two_term(qp) if config.shift_terms == 2 else restrict_pot(qp, "round")
              for name, qp in qgraph.weight.items()}
    return QuantizedGraph(qgraph.graph.clone(), config, act, weight, list(qgraph.float_nodes), dict(qgraph.info))
