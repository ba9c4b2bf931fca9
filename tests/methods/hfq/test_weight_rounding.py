"""GPTQ-style rounding: same grid, lower output error than round-to-nearest."""

from __future__ import annotations

import pytest
import torch

from hybridquant.graph.ir import Node
from hybridquant.methods.hfq.weight_rounding import gptq_weight
from hybridquant.observers import weight_qparams
from hybridquant.qparams import restrict_pot


def _check(node: Node, x: torch.Tensor, run):
    qp = restrict_pot(weight_qparams(node.params["weight"], 4))
    rtn = qp.fake(node.params["weight"].flatten(1)).reshape(node.params["weight"].shape)
    opt = gptq_weight(node, x, qp)
    assert opt is not None
    # still on the grid
    codes = opt.flatten(1) / qp.scale[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert int(codes.round().abs().max()) <= qp.qmax
    ref = run(node.params["weight"])
    assert (run(opt) - ref).pow(2).mean() < (run(rtn) - ref).pow(2).mean()


def test_linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    x = torch.randn(512, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated inputs
    node = Node("fc", "linear", ["x"], {}, {"weight": w})
    _check(node, x, lambda wt: x @ wt.t())


def test_dense_and_depthwise_conv():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    attrs = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    # spatially smooth inputs, as real feature maps are (GPTQ exploits the correlation)
    x = F.interpolate(torch.randn(8, 6, 4, 4, generator=g), size=(10, 10), mode="bilinear")
    dense = Node("c", "conv2d", ["x"], attrs, {"weight": torch.randn(5, 6, 3, 3, generator=g)})
    _check(dense, x, lambda wt: F.conv2d(x, wt, None, 1, 1))
    dw_attrs = dict(attrs, groups=6)
    dw = Node("d", "conv2d", ["x"], dw_attrs, {"weight": torch.randn(6, 1, 3, 3, generator=g)})
    _check(dw, x, lambda wt: F.conv2d(x, wt, None, 1, 1, 1, 6))


def test_input_compensation_absorbs_upstream_error():
    """With the float input as target, the rounded weight also undoes the (linear part of the) error its
    quantized input carries: lower ‖W x − Ŵ x̃‖ than GPTQ on x̃ alone, on held-out samples too."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 32, generator=g)
    mix = torch.randn(32, 32, generator=g)
    x = torch.randn(4096, 32, generator=g) @ mix
    upstream = torch.eye(32) + 0.1 * torch.randn(32, 32, generator=g)  # e.g. a mis-scaled producer
    x_q = x @ upstream + 0.05 * torch.randn(4096, 32, generator=g)
    node = Node("fc", "linear", ["x"], {}, {"weight": w})
    qp = restrict_pot(weight_qparams(w, 6))
    plain = gptq_weight(node, x_q[:2048], qp)
    compensated = gptq_weight(node, x_q[:2048], qp, x_float=x[:2048])
    codes = compensated / qp.scale[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # same grid
    ref = x[2048:] @ w.t()
    err = lambda wt: float((x_q[2048:] @ wt.t() - ref).pow(2).mean())  # noqa: E731
    assert err(compensated) < 0.5 * err(plain)


def test_input_compensation_is_a_no_op_without_input_error():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 16, generator=g)
    x = torch.randn(1024, 16, generator=g)
    node = Node("fc", "linear", ["x"], {}, {"weight": w})
    qp = restrict_pot(weight_qparams(w, 4))
    assert torch.equal(gptq_weight(node, x, qp, x_float=x.clone()), gptq_weight(node, x, qp))


def test_input_compensation_skips_layers_with_too_few_samples():
    """The classifier sees one row per image: fewer rows than MIN_SAMPLES_PER_COLUMN per column keep W."""
    from hybridquant.methods.hfq.weight_rounding import MIN_SAMPLES_PER_COLUMN

    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 64, generator=g)
    n = MIN_SAMPLES_PER_COLUMN * 64 - 1
    x = torch.randn(n, 64, generator=g)
    node = Node("fc", "linear", ["x"], {}, {"weight": w})
    qp = restrict_pot(weight_qparams(w, 4))
    assert torch.equal(gptq_weight(node, x, qp, x_float=2 * x), gptq_weight(node, x, qp))


@pytest.mark.parametrize("groups", [1, 4])
def test_hessians_over_chunks_and_steps_equal_one_pass(monkeypatch, groups):
    """GPTQ's statistics summed chunk by chunk, one image per step, over the same random subset of columns
    as one pass over everything: equal up to float64 summation order (a wrong column offset would pick
    other columns and fail)."""
    from hybridquant.methods.hfq import weight_rounding as wr

    g = torch.Generator().manual_seed(2)
    attrs = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": groups}
    node = Node("c", "conv2d", ["x"], attrs, {"weight": torch.randn(4, 4 // groups, 3, 3, generator=g)})
    x = torch.randn(20, 4, 6, 6, generator=g)
    xf = x + 0.1 * torch.randn(20, 4, 6, 6, generator=g)
    h1, c1, s1, t1 = wr._hessians(node, [x], [xf], max_samples=600)
    monkeypatch.setattr(wr, "PATCH_BYTES", 1)
    h2, c2, s2, t2 = wr._hessians(node, list(x.split(3)), list(xf.split(3)), max_samples=600)
    assert (s1, t1) == (s2, t2) == (600, 720)
    assert torch.allclose(h1, h2, rtol=1e-12, atol=1e-12) and torch.allclose(c1, c2, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(h1, wr._hessians(node, [x], None, max_samples=720)[0], rtol=1e-3)  # a subset
