"""FQ-ViT (Lin et al., IJCAI 2022): Power-of-Two Factor and Log-Int-Softmax.

**Power-of-Two Factor (PTF)** — LayerNorm inputs vary wildly between
channels, so the tensor feeding every LayerNorm gets one layer scale ``s``
and per-channel factors: channel j uses scale ``s·2^c_j`` with
``c_j ∈ {0, 1, 2, 3}`` and one zero point shared by all channels. ``s`` is
the per-tensor min-max scale divided by 2^3 (so ``c = 3`` reproduces plain
min-max) and ``c_j`` is the factor with the least quantization MSE on that
channel's calibration values. The integer LayerNorm then aligns channels by
shifting ``q_j - z`` left by ``c_j``. The quantizer sits on the output of the
value-changing node that produces the LayerNorm input (layout ops between
them are transparent); if that tensor also feeds a residual add, the add
simply reads the PTF-quantized tensor.

**Log-Int-Softmax** — every softmax output is quantized as ``2^-q`` with a
4-bit code (fewer when ``abits < 4``), so ``attn·V`` becomes shifts.

Everything else (the other activations and all weights) is min-max.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import FQViTConfig, QuantConfig
from ..graph.ir import Graph, Node
from ..observers import ActivationObserver
from ..ops import run_float
from ..primitives import exp2_int, fake_quantize
from ..qparams import QParams, choose_mode, range_to_qparams
from ..store import Workspace
from .base import Method

#: PTF factors are 2^c for c in 0..PTF_MAX_EXP
PTF_MAX_EXP = 3
#: bits of the log2 softmax quantizer
SOFTMAX_BITS = 4
#: calibration rows (tokens / pixels) kept per PTF tensor for the per-channel search
PTF_SAMPLE_ROWS = 4096


def ptf_qparams(sample: torch.Tensor, lo: float, hi: float, bits: int, mode: str = "asymmetric",
                axis: int = -1) -> QParams:
    """PTF qparams from a ``[rows, channels]`` ``sample`` and the tensor's range [lo, hi].

    The layer scale ``s`` is the per-tensor scale of [lo, hi] divided by
    2^PTF_MAX_EXP; channel j gets ``s·2^c_j`` with the ``c_j`` whose
    fake-quantization MSE on ``sample[:, j]`` is least. The zero point is the
    per-tensor one (0-d, shared). The result quantizes along ``axis``.
    """
    layer = range_to_qparams(torch.tensor(lo), torch.tensor(hi), bits, mode)
    base = layer.scale / (1 << PTF_MAX_EXP)
    x = sample.float()
    errs = []
    for c in range(PTF_MAX_EXP + 1):
        xq = fake_quantize(x, base * (1 << c), layer.zero_point, layer.qmin, layer.qmax)
        errs.append((xq - x).pow(2).mean(0))
    # ties go to the largest factor (the plain min-max grid, never clips more)
    err = torch.stack(errs[::-1])
    c = PTF_MAX_EXP - err.argmin(0)
    scale = base * exp2_int(c).float()  # exact: base times a power of two
    return QParams(scale, layer.zero_point.clone(), layer.qmin, layer.qmax, bits, axis)


def log2_softmax_qparams(bits: int) -> QParams:
    """FQ-ViT's log2 quantizer for softmax outputs: values 2^-q, q in [0, 2^bits - 1) (the top code is 0)."""
    bits = min(SOFTMAX_BITS, bits)
    return QParams(torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), 0, (1 << bits) - 1, bits, None, "log2")


def layout_chain(graph: Graph, name: str) -> list[Node]:
    """The layout ops from ``graph.producer(name)`` (exclusive) to ``name``, in execution order."""
    chain = []
    node = graph[name]
    while node.opdef.role == "data_movement":
        chain.append(node)
        node = graph[node.inputs[0]]
    return chain[::-1]


def channel_axis(chain: list[Node], shape: list[int], channels: int) -> int | None:
    """The axis of a producer output of ``shape`` that ``chain`` moves into the last dim.

    Found by pushing an index probe (value = position along the candidate
    axis) through the layout ops; ``-1`` for the last dim, ``None`` when no
    axis maps cleanly onto the last dim.
    """
    if not chain:
        return -1
    target = torch.arange(channels, dtype=torch.float32)
    for a, size in enumerate(shape):
        if size != channels:
            continue
        view = [1] * len(shape)
        view[a] = channels
        probe = target.reshape(view).expand(shape).contiguous()
        try:
            for node in chain:
                probe = run_float(node, [probe])
        except RuntimeError:
            continue
        if probe.shape[-1] == channels and bool((probe == target).all()):
            return -1 if a == len(shape) - 1 else a
    return None


@torch.no_grad()
def ptf_samples(graph: Graph, calib: list[torch.Tensor]) -> tuple[dict[str, tuple[int, torch.Tensor]], list[str]]:
    """For every value-changing node that feeds a LayerNorm: (axis of its output that is the LayerNorm
    channel, ``[rows, C]`` calibration sample); and the producers whose channel axis could not be found."""
    feeds: dict[str, str] = {}  # producer name -> name of the tensor the LayerNorm reads
    for ln in graph.where(norm="channels"):
        prod = graph.producer(ln.inputs[0])
        feeds.setdefault(prod.name, ln.inputs[0])
    wanted = set(feeds.values())
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
    shapes: dict[str, list[int]] = {}
    per_batch = max(1, math.ceil(PTF_SAMPLE_ROWS / max(len(calib), 1)))
    gen = torch.Generator().manual_seed(0)

    def hook(node: Node, out: torch.Tensor) -> torch.Tensor:
        if node.name in feeds and node.name not in shapes:
            shapes[node.name] = [1, *out.shape[1:]]
        if node.name in wanted:
            flat = out.detach().reshape(-1, out.shape[-1])
            if flat.shape[0] > per_batch:
                flat = flat[torch.randperm(flat.shape[0], generator=gen)[:per_batch]]
            rows[node.name].append(flat.float().clone())
        return out

    for x in calib:
        graph.run(x, hook=hook)

    ptf: dict[str, tuple[int, torch.Tensor]] = {}
    skipped = []
    for prod, src in feeds.items():
        sample = torch.cat(rows[src])
        axis = channel_axis(layout_chain(graph, src), shapes[prod], sample.shape[1])
        if axis is None:
            skipped.append(prod)
            continue
        ptf[prod] = (axis, sample)
    return ptf, skipped


class PTFMethod(Method):
    """A method with power-of-two factors (PTF) on some LayerNorm inputs: ``self.ptf`` maps each such producer
    to (the axis of its output that is the LayerNorm channel, a ``[rows, C]`` calibration sample)."""

    def __init__(self, workspace: Workspace | None = None) -> None:
        super().__init__(workspace)
        self.ptf: dict[str, tuple[int, torch.Tensor]] = {}

    def ptf_qparams(self, node: Node, obs: ActivationObserver, bits: int, config: QuantConfig) -> QParams | None:
        """``node``'s PTF quantizer, or None when it gets none."""
        if node.name not in self.ptf:
            return None
        axis, sample = self.ptf[node.name]
        return ptf_qparams(sample, obs.min, obs.max, bits, choose_mode(obs.min, obs.max, config.act_symmetry), axis)


class FQViT(PTFMethod):
    """PTF quantizers on LayerNorm inputs, log2 softmax outputs, min-max elsewhere."""

    name = "fq-vit"
    config_class = FQViTConfig

    def transform(self, graph: Graph, calib: list[torch.Tensor], config: QuantConfig) -> dict[str, Any]:
        """Leaves the graph as is; gathers the per-channel samples of every LayerNorm input."""
        self.ptf, skipped = ptf_samples(graph, calib)
        return {
            "ptf_tensors": sorted(self.ptf),
            "ptf_skipped": skipped,
            "log2_softmax": len(graph.where(unit_interval=True)),
        }

    def act_qparams(self, node: Node, obs: ActivationObserver, bits: int, config: QuantConfig) -> QParams:
        if node.opdef.unit_interval:  # attention probabilities
            return log2_softmax_qparams(bits)
        if (qp := self.ptf_qparams(node, obs, bits, config)) is not None:
            return qp
        return super().act_qparams(node, obs, bits, config)
