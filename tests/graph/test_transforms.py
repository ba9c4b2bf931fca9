"""Capture-time folds (BatchNorm, constant scales) leave the float function unchanged and change the weights."""

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


class TokenAttention(nn.Module):
    """FastViT-like: BatchNorm before attention over tokens (flatten, transpose, one qkv linear split by
    reshape/permute/unbind), the attention scale on the queries only, a layer scale after the tokens fold back."""

    def __init__(self, c: int = 8, heads: int = 2):
        super().__init__()
        self.heads, self.scale = heads, (c // heads) ** -0.5
        self.norm = nn.BatchNorm2d(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(-2, -1)  # [B, C, H, W] -> [B, N, C]
        q, k, v = self.qkv(t).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = self.proj((attn @ v).transpose(1, 2).reshape(b, h * w, c))
        return x + self.gamma * y.transpose(-2, -1).reshape(b, c, h, w)


def test_folds_through_layout_ops_reach_the_right_rows():
    """The BatchNorm folds forward into the qkv linear's input columns (through flatten and transpose), the
    attention scale into the query rows of qkv only (k and v read other rows of the same reshape), and the
    layer scale into the output rows of proj (through transpose and reshape): no BatchNorm or product with a
    constant is left, and the graph computes the model."""
    torch.manual_seed(0)
    model = TokenAttention().eval()
    model.norm.running_mean.uniform_(-1, 1)
    model.norm.running_var.uniform_(0.2, 3)
    graph = capture(model, (8, 4, 4))
    assert not graph.by_op("batch_norm", "mul_const")
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        ref = model(x)
    assert float((graph(x) - ref).norm() / ref.norm()) <= 1e-5
    qkv = graph.by_op("linear")[0].params["weight"]
    ratio = qkv[:, 0] / model.qkv.weight[:, 0].detach()  # column 0 carries the BatchNorm factor of channel 0
    assert torch.allclose(ratio[:8], ratio[0].expand(8)) and torch.allclose(ratio[8:], ratio[8].expand(16))
    assert torch.allclose(ratio[0] / ratio[8], torch.tensor(model.scale))  # the query rows alone took the scale
