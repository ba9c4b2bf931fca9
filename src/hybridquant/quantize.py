"""The engine: calibrate a captured graph and build its fully quantized twin.

``quantize_graph(graph, config, calib)`` is the one entry point; the method
named in ``config`` plugs into the steps documented in
:mod:`hybridquant.methods.base`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from tqdm import tqdm

from .config import PercentileConfig, QuantConfig
from .errors import HybridQuantError
from .graph.ir import Graph, Node
from .graph.quantized import QuantizedGraph
from .graph.stream import image_bytes
from .methods import METHODS
from .observers import ActivationObserver
from .phases import Phases, current, phase, progress_enabled
from .primitives import sqnr_from_sums
from .qparams import restrict_pot, restrict_two_term
from .store import Workspace


def float_node_names(graph: Graph, patterns: Iterable[str]) -> list[str]:
    """Nodes matched by the user's ``float_ops`` globs; an unmatched pattern is an error."""
    names: list[str] = []
    for pattern in patterns:
        hits = [n.name for n in graph if fnmatch.fnmatchcase(n.name, pattern) and n.opdef.role != "sink"]
        if not hits:
            raise HybridQuantError(f"--float-ops pattern '{pattern}' matches no node of the graph")
        names += [h for h in hits if h not in names]
    return names


def quant_points(graph: Graph, float_nodes: list[str]) -> list[Node]:
    """Nodes whose output gets an activation quantizer.

    A node whose every reader takes its value before quantization
    (``raw_input``, e.g. an outlier-scaling shift) is requantized by those
    readers instead and gets no quantizer of its own, unless its integer
    kernel writes codes on its own grid (``OpDef.kernel_output``: a softmax
    before EfficientFormerV2's talking-heads conv); the reader then reads
    those codes.
    """
    points = []
    for n in graph:
        if not n.opdef.changes_values or n.name in float_nodes:
            continue
        users = graph.users(n.name)
        if users and all(u.attrs.get("raw_input") for u in users) and not n.opdef.kernel_output:
            continue
        points.append(n)
    return points


def _bits_for(node: Node, graph: Graph, config: QuantConfig, tensor: str) -> int:
    if node.opdef.role == "source":
        return config.input_bits
    if config.first_last_8bit:
        layers = graph.where(weighted=True)  # the stem conv and the classifier
        if layers and node.name in (layers[0].name, layers[-1].name):
            return 8
    return config.wbits if tensor == "weight" else config.abits


@torch.no_grad()
def observe(graph: Graph, calib: list[torch.Tensor], names: Iterable[str], config: QuantConfig,
            progress: bool | None = None) -> dict[str, ActivationObserver]:
    """Run the float graph over ``calib`` and collect statistics of the named outputs."""
    wanted = set(names)
    # the percentile matters only to the percentile method's ranges
    pct = config.options.percentile if isinstance(config.options, PercentileConfig) else PercentileConfig().percentile
    observers = {n: ActivationObserver(pct, seed=i) for i, n in enumerate(sorted(wanted))}

    def hook(node: Node, out: torch.Tensor) -> torch.Tensor:
        if node.name in observers:
            observers[node.name].update(out)
        return out

    show = progress_enabled() if progress is None else progress
    for x in tqdm(calib, desc="calibrate", disable=not show, leave=False):
        graph.run(x, hook=hook)
    return observers


#: calibration images per batch of the statistics pass (fewer when the workspace's chunk size asks for it)
CALIB_BATCH = 64


def calib_batches(calib: torch.Tensor | list[torch.Tensor], batch_size: int = CALIB_BATCH) -> list[torch.Tensor]:
    """Split a calibration tensor into batches (a list is returned as is)."""
    if isinstance(calib, list):
        return calib
    return list(calib.split(batch_size))


def quantize_graph(graph: Graph, config: QuantConfig, calib: torch.Tensor | list[torch.Tensor],
                   progress: bool | None = None, workspace: Workspace | None = None) -> QuantizedGraph:
    """Quantize ``graph`` (left unchanged) with ``config``, calibrating on ``calib`` images.

    ``workspace`` bounds the memory of the steps that keep values over the calibration images (a default
    :class:`~hybridquant.store.Workspace` when None); ``progress`` draws progress bars (default: the current
    :class:`~hybridquant.phases.Phases` run's choice, else none)."""
    if progress is not None and current() is None:
        with Phases(progress=progress):
            return quantize_graph(graph, config, calib, None, workspace)
    if workspace is None:
        with Workspace() as ws:  # its spill files go when it closes
            return quantize_graph(graph, config, calib, None, ws)
    if isinstance(calib, torch.Tensor) and calib.shape[0]:
        batches = calib_batches(calib, workspace.chunk_images(image_bytes(graph, calib), CALIB_BATCH))
    else:
        batches = calib_batches(calib)
    method = METHODS[config.method](workspace)
    base_params = graph.num_params()
    graph = graph.clone()
    float_nodes = float_node_names(graph, config.float_ops)
    with phase("transform"):
        info: dict[str, Any] = {"transform": method.transform(graph, batches, config)}
    # the float model the quantized one is built from: transformed, not yet refined (layer_sqnr's reference)
    reference = graph.clone()

    points = quant_points(graph, float_nodes)
    with phase("observe"):
        observers = observe(graph, batches, [n.name for n in points], config)
    act = {}
    for node in points:
        qp = method.act_qparams(node, observers[node.name], _bits_for(node, graph, config, "act"), config)
        if config.pot and qp.grid == "uniform":
            mode = "round" if config.pot_rounding == "objective" else config.pot_rounding
            qp = restrict_pot(qp, mode, lo=torch.tensor(observers[node.name].min))
        act[node.name] = qp
    weight = {}
    for node in graph.where(weighted=True):
        if node.name in float_nodes:
            continue
        qp = method.weight_qparams(node, _bits_for(node, graph, config, "weight"), config)
        if config.pot and config.shift_terms == 2:
            qp = restrict_two_term(qp)
        elif config.pot:
            qp = restrict_pot(qp, "round" if config.pot_rounding == "objective" else config.pot_rounding)
        weight[node.name] = qp
    qgraph = QuantizedGraph(graph, config, act, weight, float_nodes, info, reference=reference)
    with phase("refine"):
        info["refine"] = method.refine(qgraph, batches, config)
    info["param_increase_pct"] = (100.0 * (graph.num_params() + qgraph.grid_constants() - base_params)
                                  / max(base_params, 1))
    return qgraph


@torch.no_grad()
def layer_sqnr(qgraph: QuantizedGraph, images: torch.Tensor, reference: Graph | None = None) -> dict[str, float]:
    """Output SQNR (dB) of every quantized node against the float graph it approximates, on ``images``.

    The reference is the *transformed* float graph — ``reference``, else ``qgraph.reference`` (the graph
    after the method's transforms, kept by :func:`quantize_graph`), else ``qgraph.graph`` (a loaded model:
    the float parameters after refinement) — run in float, so every node, including those a transform added
    (outlier-scaling shifts), has its float twin. Comparing with the *untransformed* model instead would
    measure the transforms, not the quantization: outlier scaling divides a LayerNorm's affine by α_j and a
    channel shift subtracts a per-channel mean z_j from it (both compensated in the next layer), so that
    norm's output X/α − z differs from the original X by far more than any quantization error: on the
    bundled model at W8A8 the LayerNorm rows read −4.4…+6.2 dB that way and 16…24 dB against the
    transformed graph (W6A6: ≈ 0 dB against 7…16 dB), and the added shift nodes had no twin at all (``nan``).

    A few rows may stay below 0 dB for another reason, which :func:`hybridquant.pipeline.layer_rows` states:
    block reconstruction learns biases (and roundings) against the *block's* output, so inner values may
    move along directions the block's output does not see — on the bundled model's last stage the attention
    runs over a single token (softmax ≡ 1), so a shift of the ``v`` bias passes through unchanged and the
    ``proj`` bias cancels it; ``attn.qkv``/``matmul_1``/``proj`` then read −5…−1 dB at W6A6 against the
    float model, and 7…25 dB against the refined float parameters (``reference=qgraph.graph``).

    Values may be ``inf`` (no error on these images) or ``-inf`` (a float output that is zero); the report
    turns them into a reason (:func:`hybridquant.pipeline.layer_rows`).
    """
    ref_graph = reference if reference is not None else qgraph.reference if qgraph.reference is not None \
        else qgraph.graph
    wanted = set(qgraph.act)
    signal: dict[str, torch.Tensor] = {}
    noise: dict[str, torch.Tensor] = {}
    # a few images at a time: every value of both graphs is kept for one chunk only
    step = Workspace().chunk_images(image_bytes(ref_graph, images) * LIVE_VALUES) if images.shape[0] else 1
    for chunk in images.split(step):
        ref = _kept(ref_graph, chunk, wanted)
        sim = _kept(qgraph, chunk, wanted)
        for name in ref.keys() & sim.keys():
            r = ref[name].double()
            signal[name] = signal.get(name, 0) + r.pow(2).sum()
            noise[name] = noise.get(name, 0) + (r - sim[name].double()).pow(2).sum()
    return {name: sqnr_from_sums(signal[name], noise[name]) for name in qgraph.act if name in signal}


#: how many values of one image a layer-SQNR chunk may hold at once, in units of the largest one
LIVE_VALUES = 64


def _kept(model, x: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.run(x, keep=True).items() if k in wanted}
