"""Graph capture of timm hybrids: complete, exact, batch-dynamic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybridquant.errors import HybridQuantError
from hybridquant.graph import capture
from hybridquant.graph.ir import LAYOUT_OPS, MAC_OPS


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_conv_linear_and_attention_matmul_is_captured(mvit_model, mvit_graph):
    from timm.layers import Attention

    convs = sum(isinstance(m, nn.Conv2d) for m in mvit_model.modules())
    linears = sum(isinstance(m, nn.Linear) for m in mvit_model.modules())
    attentions = sum(isinstance(m, Attention) for m in mvit_model.modules())
    assert len(mvit_graph.by_op("conv2d")) == convs
    assert len(mvit_graph.by_op("linear")) == linears
    assert len(mvit_graph.by_op("matmul")) == 2 * attentions  # q·kᵀ and attn·v
    assert len(mvit_graph.by_op("softmax")) == attentions
    assert not mvit_graph.by_op("batch_norm")  # all folded


def test_captured_graph_matches_the_model(mvit_model, mvit_graph):
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = mvit_model(x)
    assert _rel_err(mvit_graph(x), ref) <= 1e-5


@pytest.mark.parametrize("batch", [1, 5])
def test_batch_size_is_dynamic(mvit_model, mvit_graph, batch):
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        assert _rel_err(mvit_graph(x), mvit_model(x)) <= 1e-5


def test_capture_does_not_modify_the_model(mvit_model):
    before = {k: v.clone() for k, v in mvit_model.state_dict().items()}
    capture(mvit_model, (3, 64, 64))
    after = mvit_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_blocks_are_labelled(mvit_graph):
    blocks = {n.block for n in mvit_graph.by_op(*MAC_OPS)}
    assert {"stem", "mv2", "mobilevit", "head"} <= blocks
    assert all(n.block == "mobilevit" for n in mvit_graph.by_op("matmul"))


def test_node_names_say_where_they_come_from(mvit_graph):
    names = {n.name for n in mvit_graph.by_op("conv2d", "linear")}
    assert "stem.conv" in names and "head.fc" in names


def test_unsupported_op_is_a_clear_error():
    class WithMaxPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool(self.conv(x))

    with pytest.raises(HybridQuantError, match="cannot quantize op .*max_pool2d"):
        capture(WithMaxPool(), (3, 16, 16))


def test_layout_ops_have_one_input(mvit_graph):
    assert all(len(n.inputs) == 1 for n in mvit_graph if n.op in LAYOUT_OPS)


#: each family's smallest model, and the ops its capture must hold
FAMILIES = {
    "mobilevit_xxs": {"softmax", "layer_norm", "matmul"},  # softmax attention over patches
    "mobilevitv2_050": {"group_norm", "sum", "expand", "mul"},  # separable linear attention
    # attention biases (constants added), talking heads, a strided attention (1x1 pools as strided slices, a
    # bilinear upsampling back), layer scales (folded into their convs), BatchNorm before the two heads
    "efficientformerv2_s0": {"add_const", "upsample_bilinear", "gelu", "matmul"},
    # cascaded group attention (chunks as slices, a depthwise conv on the queries taking the attention scale),
    # squeeze-excitation (a broadcast product), BatchNorm1d before the classifier
    "efficientvit_m0": {"add_const", "sigmoid", "mul", "matmul", "cat"},
}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_every_family_is_captured_exactly(arch):
    """The captured graph computes the model's function: folds (BatchNorm into the conv before it or the
    linears after it, layer and attention scales into their convs) leave it unchanged."""
    from tests.conftest import QIMG, family_model

    model, graph = family_model(arch)
    x = torch.randn(2, 3, QIMG, QIMG)
    with torch.no_grad():
        assert _rel_err(graph(x), model(x)) <= 1e-5
    assert len(graph.by_op("conv2d")) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert FAMILIES[arch] <= {n.op for n in graph}
    assert not graph.by_op("batch_norm") and not [n for n in graph.by_op("mul_const") if "value" in n.params]


def test_linear_attention_ops_of_mobilevitv2():
    from tests.conftest import family_model

    _, graph = family_model("mobilevitv2_050")
    # query / key / value are three slices of one qkv conv along the channel dim
    slices = graph.by_op("slice")
    assert slices and all(n.attrs["dim"] == 1 for n in slices)
    assert {(n.attrs["start"], n.attrs["end"] - n.attrs["start"]) for n in slices} >= {(0, 1)}
    assert len(graph.by_op("sum")) == len(graph.by_op("softmax")) == len(graph.by_op("expand"))
    assert all(n.block == "mobilevit" for n in graph.by_op("softmax", "sum"))


def test_train_time_branches_are_merged_before_capture():
    """FastViT (MobileOne blocks): the capture runs the reparameterized model, one conv per merged branch set,
    and computes the same function; the model passed in keeps its branches."""
    import timm

    model = timm.create_model("fastvit_t8", num_classes=3).eval()
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    graph = capture(model, (3, 64, 64))
    assert len(graph.by_op("conv2d")) < convs
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel_err(graph(x), model(x)) <= 1e-4


def test_values_of_parameters_alone_become_constants():
    """A gathered bias table, a split of a parameter and a reshaped layer scale are evaluated at capture: the
    graph adds and multiplies constants (the scale folded into the conv before it) and computes the model."""
    class Consts(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.table = nn.Parameter(torch.randn(4, 7))
            self.register_buffer("idx", torch.randint(0, 7, (5, 5)))
            self.scales = nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x):
            y = self.conv(x) * self.scales.split(4)[1].view(1, -1, 1, 1)  # a layer scale
            return y + self.table[:, self.idx]  # an attention-bias table

    model = Consts().eval()
    graph = capture(model, (3, 5, 5))
    assert [n.op for n in graph] == ["input", "conv2d", "add_const", "output"]
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert _rel_err(graph(x), model(x)) <= 1e-6
