"""Fixtures for the method tests: a tiny hand-built conv + token graph with outlier channels."""

from __future__ import annotations

import pytest
import torch

from hybridquant.graph.ir import Graph, Node

TOY_C = 8  # channels of the conv trunk and of the tokens
OUTLIERS = (1, 5)  # channels made large on purpose


def _conv(name: str, src: str, cin: int, cout: int, k: int, gen: torch.Generator, groups: int = 1,
          block: str = "") -> Node:
    w = torch.randn(cout, cin // groups, k, k, generator=gen) * 0.3
    b = torch.randn(cout, generator=gen) * 0.1
    attrs = {"stride": [1, 1], "padding": [k // 2, k // 2], "dilation": [1, 1], "groups": groups}
    return Node(name, "conv2d", [src], attrs, {"weight": w, "bias": b}, name, block)


def make_toy_graph(seed: int = 0) -> Graph:
    """input → stem conv → silu → mv2-like block (1x1, silu, depthwise 3x3, silu, 1x1) → tokens →
    LayerNorm → linear → softmax over tokens → matmul with the tokens → linear → output.

    Channels ``OUTLIERS`` of the stem output and of the LayerNorm affine are
    scaled up so the consumers' inputs have a few outlier channels.
    """
    gen = torch.Generator().manual_seed(seed)
    c = TOY_C
    stem = _conv("stem.conv", "input", 3, c, 3, gen, block="stem")
    for j in OUTLIERS:
        stem.params["weight"][j] *= 25.0
        stem.params["bias"][j] *= 25.0
    e1 = _conv("blk.conv1_1x1.conv", "stem.silu", c, 2 * c, 1, gen, block="mv2")
    dw = _conv("blk.conv2_kxk.conv", "blk.conv1_1x1.silu", 2 * c, 2 * c, 3, gen, groups=2 * c, block="mv2")
    p3 = _conv("blk.conv3_1x1.conv", "blk.conv2_kxk.silu", 2 * c, c, 1, gen, block="mv2")
    ln_w = torch.ones(c)
    ln_w[list(OUTLIERS)] = 20.0
    nodes = [
        Node("input", "input", []),
        stem,
        Node("stem.silu", "silu", ["stem.conv"], block="stem"),
        e1,
        Node("blk.conv1_1x1.silu", "silu", ["blk.conv1_1x1.conv"], block="mv2"),
        dw,
        Node("blk.conv2_kxk.silu", "silu", ["blk.conv2_kxk.conv"], block="mv2"),
        p3,
        Node("blk.add", "add", ["blk.conv3_1x1.conv", "stem.silu"], block="mv2"),
        Node("tok.flatten", "flatten", ["blk.add"], {"start": 2, "end": -1}),
        Node("tok.transpose", "transpose", ["tok.flatten"], {"dim0": 1, "dim1": 2}),
        Node("tok.norm", "layer_norm", ["tok.transpose"], {"shape": [c], "eps": 1e-5},
             {"weight": ln_w, "bias": torch.randn(c, generator=gen) * 0.1}),
        Node("tok.fc", "linear", ["tok.norm"], {},
             {"weight": torch.randn(c, c, generator=gen) * 0.3, "bias": torch.randn(c, generator=gen) * 0.1}),
        Node("tok.transpose_1", "transpose", ["tok.fc"], {"dim0": 1, "dim1": 2}),
        Node("tok.scores", "matmul", ["tok.fc", "tok.transpose_1"]),
        Node("tok.softmax", "softmax", ["tok.scores"], {"dim": -1}),
        Node("tok.attn", "matmul", ["tok.softmax", "tok.fc"]),
        Node("tok.add", "add", ["tok.attn", "tok.transpose"]),
        Node("tok.norm2", "layer_norm", ["tok.add"], {"shape": [c], "eps": 1e-5}, {}),
        Node("tok.select", "select", ["tok.norm2"], {"dim": 1, "index": 0}),
        Node("head.fc", "linear", ["tok.select"], {},
             {"weight": torch.randn(3, c, generator=gen) * 0.3, "bias": torch.zeros(3)}),
        Node("output", "output", ["head.fc"]),
    ]
    return Graph(nodes, meta={"input_size": [3, 6, 6]})


@pytest.fixture
def toy_graph() -> Graph:
    return make_toy_graph()


@pytest.fixture(scope="session")
def toy_calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return list((torch.rand(32, 3, 6, 6, generator=gen) * 2 - 1).split(8))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
