"""BatchNorm folding leaves the float function unchanged."""

from __future__ import annotations

import torch
from torch import nn

from hybridquant.errors import HybridQuantError
from hybridquant.graph import capture


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


def test_bn_folding_is_exact_and_changes_the_weights():
    torch.manual_seed(0)
    model = ConvBN().eval()
    for bn in (model.bn, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    graph = capture(model, (3, 8, 8))
    assert not graph.by_op("batch_norm")
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    out = graph(x)
    assert float((out - ref).norm() / ref.norm()) <= 1e-5
    assert not torch.equal(graph["conv"].params["weight"], model.conv.weight)
    assert "bias" in graph["conv"].params  # BN's shift became a bias


def test_bn_without_conv_cannot_be_folded():
    class BNFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x)

    try:
        capture(BNFirst().eval(), (3, 4, 4))
    except HybridQuantError as exc:
        assert "BatchNorm" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected an error")
