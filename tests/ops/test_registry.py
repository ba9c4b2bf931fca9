"""The op table: every op kind is declared once, and the walkers know ops only through it — an op added by
registering one definition runs in float, is quantized, lowers to the integer program and runs there bit for
bit with the simulation, with no walker changed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hybridquant.config import QuantConfig
from hybridquant.export.program import program_tables
from hybridquant.graph.ir import LAYOUT_OPS, MAC_OPS, VALUE_OPS, Graph, Node
from hybridquant.integer.executor import IntegerModel
from hybridquant.integer.lower import lower
from hybridquant.integer.program import kind_docs
from hybridquant.ops import OP_DEFS, PROGRAM_KIND_DEFS, OpDef, ProgramKind, op_def, register
from hybridquant.ops.values import Value, centred_inputs, zero, zp_arrays
from hybridquant.quantize import quantize_graph


def test_every_op_has_its_parts():
    for name, d in OP_DEFS.items():
        assert d.name == name
        assert (d.float is None) == (d.role in ("source", "sink")), name  # the graph's ends have no float op
        assert d.onnx is not None or d.role in ("source", "sink"), name
        if d.role == "folded":
            assert d.fold is not None and d.lower is None, name
    assert {n for n, d in OP_DEFS.items() if d.lower is None} == {"batch_norm"}
    assert set(kind_docs()) == set(PROGRAM_KIND_DEFS)
    for name, k in PROGRAM_KIND_DEFS.items():
        assert (k.run is None) == (k.result == "none"), name
        assert (k.c is not None) == (not k.host and k.result != "none"), name  # the device ops have a C form


def test_register_refuses_a_second_definition():
    with pytest.raises(ValueError, match="registered twice"):
        register(OpDef("conv2d", lambda node, i: i[0]))
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        op_def("no_such_op")


def _lower_double(ctx, node, op):
    x = ctx.vals[node.inputs[0]]
    ctx.fill(op, "double", node.inputs, {}, zp_arrays([x]))
    return Value(x.scale.double() * 2, zero())


@pytest.fixture
def double_op():
    """``double``: y = 2x, declared in one place the way an op module does it; removed afterwards."""
    register(OpDef("double", lambda node, i: 2 * i[0], lower=_lower_double,
                   onnx=lambda ex, node, xs: ex.b.add("Add", [xs[0], xs[0]], node.name)),
             ProgramKind("double", "acc = x - in_zero_point.0 (the factor 2 is in the requant); then requant",
                         run=lambda op, c, state, vals, accs: centred_inputs(op, c, vals)[0]))
    yield
    del OP_DEFS["double"], PROGRAM_KIND_DEFS["double"]


def test_a_registered_op_runs_everywhere_without_walker_changes(double_op):
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    gen = torch.Generator().manual_seed(0)

    def params():
        return {"weight": torch.randn(4, 4, 3, 3, generator=gen) * 0.2, "bias": torch.randn(4, generator=gen) * 0.1}

    graph = Graph([Node("input", "input", []),
                   Node("pre", "conv2d", ["input"], conv, {"weight": torch.randn(4, 3, 3, 3, generator=gen) * 0.3,
                                                          "bias": torch.zeros(4)}),
                   Node("twice", "double", ["pre"]),
                   Node("post", "conv2d", ["twice"], conv, params()),
                   Node("output", "output", ["post"])], meta={"input_size": [3, 8, 8]})
    assert "double" in VALUE_OPS and "double" not in LAYOUT_OPS | MAC_OPS
    x = torch.rand(6, 3, 8, 8, generator=gen) * 2 - 1
    values = graph.run(x, keep=True)
    assert torch.equal(values["twice"], 2 * values["pre"])
    assert graph.shapes()["twice"] == [1, 4, 8, 8]
    qg = quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), [x])
    assert "twice" in qg.act  # quantized like any value op
    program = lower(qg)
    assert program["twice"].kind == "double" and program["twice"].attrs["requant"]["mode"] == "shift"
    logits, _ = IntegerModel(program).run(x)
    assert torch.equal(logits, qg.run(x))
    manifest, _ = program_tables(program)  # the exports' contract names the new kind
    assert manifest["kinds"]["double"] == PROGRAM_KIND_DEFS["double"].doc
    pytest.importorskip("onnx")
    from hybridquant.export.onnx import build_onnx

    assert [n.op_type for n in build_onnx(qg).graph.node if n.name == "twice"] == ["Add"]


@pytest.fixture
def renamed_ops():
    """``conv2d_b``/``linear_b``/``silu_b``/``layer_norm_b``/``softmax_b``: the same ops under new names, registered
    the way an op module does it (the same definition, a new name); removed afterwards."""
    names = {"conv2d": "conv2d_b", "linear": "linear_b", "layer_norm": "layer_norm_b", "softmax": "softmax_b"}
    register(*(replace(op_def(old), name=new) for old, new in names.items()))
    # a unary op's float function is looked up by its name: this one's is its own
    register(replace(op_def("silu"), name="silu_b", float=lambda node, i: torch.nn.functional.silu(i[0])))
    names["silu"] = "silu_b"
    yield names
    for new in names.values():
        del OP_DEFS[new]


@pytest.mark.parametrize("method", ["hfq", "smoothquant", "ptq4vit", "hyq", "repq-vit", "fq-vit"])
def test_methods_know_ops_only_through_the_table(renamed_ops, method):
    """A graph whose ops are renamed (same definitions) quantizes exactly as the original: no method decides
    anything by an op's name."""
    from tests.methods.conftest import make_toy_graph

    graph = make_toy_graph()
    renamed = graph.clone()
    for node in renamed:
        node.op = renamed_ops.get(node.op, node.op)
    assert not {n.op for n in renamed} & set(renamed_ops)
    gen = torch.Generator().manual_seed(3)
    calib = [torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1]
    config = QuantConfig.build(method=method, scales="pot", wbits=6, abits=6, **(
        {"reconstruction_iters": 5} if method == "hfq" else {}))
    a, b = (quantize_graph(g, config, calib) for g in (graph, renamed))
    assert a.act.keys() == b.act.keys() and a.weight.keys() == b.weight.keys() and a.weight
    for name, qp in a.act.items():
        assert torch.equal(qp.scale, b.act[name].scale) and qp.grid == b.act[name].grid, name
    for name in a.weight_int:
        assert torch.equal(a.weight_int[name], b.weight_int[name]), name
    assert [renamed_ops.get(n.op, n.op) for n in a.graph] == [n.op for n in b.graph]  # the same transforms
    assert torch.equal(a.run(calib[0]), b.run(calib[0]))
