"""Exports of the integer program: a numpy reader reproduces IntegerModel bit for bit from the npz alone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hybridquant.config import QuantConfig
from hybridquant.errors import HybridQuantError
from hybridquant.export import MANIFEST_KEY, export_c, export_npz, load_npz
from hybridquant.export import reader as rr
from hybridquant.export.program import program_tables
from hybridquant.integer.executor import IntegerModel
from hybridquant.integer.lower import lower
from hybridquant.integer.program import kind_docs
from hybridquant.ops import unary_fn
from hybridquant.primitives.arith import build_lut
from hybridquant.quantize import quantize_graph
from tests.methods.conftest import make_toy_graph


@pytest.fixture(scope="module")
def toy_calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return list((torch.rand(32, 3, 6, 6, generator=gen) * 2 - 1).split(8))


TOY_CONFIGS = {
    "minmax-pot": QuantConfig(method="minmax", scales="pot"),
    "hfq-w6a6": QuantConfig(method="hfq", scales="pot", pot_rounding="objective", wbits=6, abits=6),
    "hfq-two-term": QuantConfig(method="hfq", scales="pot", wbits=4, abits=6, shift_terms=2),
}


def _toy_images(n: int = 16) -> torch.Tensor:
    # a wider range than the calibration set, so saturation is exercised too
    return torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(5)) * 3 - 1.5


def _assert_reader_matches(path, qg, x: torch.Tensor) -> None:
    program = rr.load(path)
    want_logits, want = IntegerModel(qg).run(x)
    logits, codes = rr.run(program, x.numpy())
    assert codes.dtype == np.int64
    assert np.array_equal(codes, want.numpy())
    assert np.array_equal(logits, want_logits.numpy())


@pytest.mark.parametrize("name", list(TOY_CONFIGS))
def test_reader_reproduces_the_toy_program(name, toy_calib, tmp_path):
    qg = quantize_graph(make_toy_graph(), TOY_CONFIGS[name], toy_calib)
    path = tmp_path / "toy.npz"
    export_npz(qg, path)
    _assert_reader_matches(path, qg, _toy_images())


def test_every_node_matches_the_trace(toy_calib, tmp_path):
    """Stronger than the logits: each op's codes equal IntegerModel's, node by node."""
    qg = quantize_graph(make_toy_graph(), TOY_CONFIGS["hfq-w6a6"], toy_calib)
    export_npz(qg, tmp_path / "toy.npz")
    program = rr.load(tmp_path / "toy.npz")
    x = _toy_images(4)
    trace: dict = {}
    IntegerModel(qg).run(x, trace=trace)
    seen: dict = {}
    rr.run_codes(program, rr.quantize_input(program, x.numpy()), trace=seen)
    assert set(seen) == set(trace)
    for k, v in trace.items():
        assert np.array_equal(seen[k], v.numpy()), k


@pytest.fixture(scope="module")
def mvit_qgraph(mvit_graph, calib_images):
    return quantize_graph(mvit_graph, QuantConfig(method="minmax", scales="pot"), calib_images)


#: hybrids of every family that lowers, with the program kinds their integer program must hold
HYBRIDS = {
    "mobilevit_xxs": {"conv2d", "linear", "matmul", "add", "cat", "lut", "softmax", "layer_norm", "global_avg_pool",
                      "layout"},
    "mobilevitv2_050": {"conv2d", "linear", "mul", "add", "lut", "softmax", "group_norm", "sum", "global_avg_pool",
                        "layout"},
    "efficientformerv2_s0": {"conv2d", "linear", "matmul", "add", "add_const", "lut", "softmax", "upsample_bilinear",
                             "global_avg_pool", "layout"},
    "efficientvit_m0": {"conv2d", "linear", "matmul", "mul", "add", "add_const", "cat", "lut", "softmax",
                        "global_avg_pool", "layout"},
}


@pytest.fixture(scope="module", params=list(HYBRIDS))
def hybrid_qgraph(request, mvit_qgraph, calib_images):
    """Each family's small model at 64x64, min-max W8A8 power-of-two (mobilevit_xxs: the shared fixture's)."""
    if request.param == "mobilevit_xxs":
        return request.param, mvit_qgraph
    from tests.conftest import family_model

    graph = family_model(request.param)[1].clone()
    return request.param, quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), calib_images)


def test_reader_reproduces_the_hybrids(hybrid_qgraph, calib_images, tmp_path):
    name, qg = hybrid_qgraph
    path = tmp_path / "hybrid.npz"
    manifest = export_npz(qg, path)
    assert HYBRIDS[name] <= {op["kind"] for op in manifest["ops"]}
    _assert_reader_matches(path, qg, calib_images[:3])
    logits, _ = IntegerModel(qg).run(calib_images[:3])
    assert torch.equal(logits, qg.run(calib_images[:3]))  # the simulation is the integer program


def test_manifest_layout(toy_calib, tmp_path):
    qg = quantize_graph(make_toy_graph(), TOY_CONFIGS["hfq-two-term"], toy_calib)
    path = tmp_path / "toy.npz"
    manifest = export_npz(qg, path, {"name": "toy", "num_classes": 3})
    with np.load(path, allow_pickle=False) as data:
        files = set(data.files)
        stored = json.loads(str(data[MANIFEST_KEY]))
    assert stored == json.loads(json.dumps(manifest))
    assert stored["format"] == "hybridquant-integer-program" and stored["version"] == 3
    assert stored["model"]["name"] == "toy" and stored["config"]["shift_terms"] == 2
    assert [op["name"] for op in stored["ops"]] == [n.name for n in qg.graph]
    assert {op["kind"] for op in stored["ops"]} <= set(kind_docs())
    listed = {m["key"] for op in stored["ops"] for m in op["arrays"].values()}
    assert listed | {MANIFEST_KEY} == files
    by_name = {op["name"]: op for op in stored["ops"]}
    inp, out = stored["ops"][0], stored["ops"][-1]
    assert inp["kind"] == "quantize" and {"scale", "scale_exp", "zero_point", "qmin", "qmax"} <= set(inp["arrays"])
    assert out["kind"] == "output" and {"scale", "scale_exp", "zero_point"} <= set(out["arrays"])
    conv = by_name["blk.conv3_1x1.conv"]
    assert conv["arrays"]["weight"]["dtype"] == "int8" and conv["arrays"]["bias"]["dtype"] == "int32"
    assert conv["attrs"]["requant"] == {"mode": "two_term", "axis": 1}
    assert {"requant.a", "requant.b", "requant.sign", "requant.n"} <= set(conv["arrays"])
    # a conv output read only by its SiLU table: a threshold grid, reached by the same two terms
    grids = [name for name, qp in qg.act.items() if qp.grid == "threshold"]
    assert grids
    for name in grids:
        op = by_name[name]
        assert op["attrs"]["requant"] == {"mode": "threshold", "axis": 1}
        assert {"requant.a", "requant.b", "requant.sign", "requant.n", "requant.thresholds"} <= set(op["arrays"])
        assert op["arrays"]["requant.thresholds"]["shape"] == [qg.act[name].qmax]
    assert by_name["blk.add"]["arrays"]["align_shift.1"]["shape"] == []
    assert by_name["tok.softmax"]["arrays"]["exp_table"]["shape"] == [64]  # one entry per 6-bit input level
    assert {"gamma_q", "beta_q", "eps_q", "out_shift", "ptf_shift"} <= set(
        by_name["tok.norm"]["arrays"])
    assert by_name["tok.fc"]["out_shape"] == [1, 36, 8]
    # per-channel tables after a non-linearity, and the deferred non-linearity itself
    assert by_name["blk.conv3_1x1.conv.input_scale"]["kind"] == "channel_lut"
    # one column per code of its input: the depthwise conv's output, a 6-bit threshold grid
    levels = qg.act["blk.conv2_kxk.conv"].qmax + 1
    assert qg.act["blk.conv2_kxk.conv"].grid == "threshold" and levels <= 64
    assert by_name["blk.conv3_1x1.conv.input_scale"]["arrays"]["table"]["shape"] == [16, levels]
    assert by_name["blk.conv2_kxk.silu"]["kind"] == "deferred"
    manifest2, arrays = load_npz(path)
    assert manifest2 == stored and MANIFEST_KEY not in arrays


def test_program_records_the_quantized_graphs_constants(toy_calib):
    qg = quantize_graph(make_toy_graph(), TOY_CONFIGS["minmax-pot"], toy_calib)
    ops = lower(qg).ops
    assert [op.name for op in ops] == [n.name for n in qg.graph] and [op.index for op in ops] == list(range(len(ops)))
    conv = next(op for op in ops if op.name == "stem.conv")
    assert np.array_equal(conv.arrays["weight"].astype(np.int64), qg.weight_int["stem.conv"].numpy())
    assert np.array_equal(conv.arrays["bias"].astype(np.int64), qg.bias_int["stem.conv"].numpy())
    # the shift is log2 of the multiplier s_in * s_w / s_out
    s_in, s_w, s_out = (qg.act["input"].scale.double(), qg.weight["stem.conv"].scale.double(),
                        qg.act["stem.conv"].scale.double())
    assert torch.equal(2.0 ** -torch.from_numpy(conv.arrays["requant.shift"].astype(np.float64)), s_in * s_w / s_out)
    lut = next(op for op in ops if op.name == "stem.silu")
    i, o = qg.act["stem.conv"], qg.act["stem.silu"]
    want = build_lut(unary_fn(qg.graph["stem.silu"]), float(i.scale), int(i.zero_point), i.qmin, i.qmax,
                     float(o.scale), int(o.zero_point), o.qmin, o.qmax)
    assert np.array_equal(lut.arrays["table"].astype(np.int64), want.numpy())


def test_float_multipliers_cannot_be_exported(toy_calib, tmp_path):
    qg = quantize_graph(make_toy_graph(), QuantConfig(method="minmax", scales="float"), toy_calib)
    with pytest.raises(HybridQuantError, match="not a power of two"):
        export_npz(qg, tmp_path / "f.npz")
    with pytest.raises(HybridQuantError, match="not a power of two"):
        export_c(qg, tmp_path / "f")
    assert not any(tmp_path.iterdir())


def test_program_of_a_float_multiplier_model_is_refused(toy_calib):
    from hybridquant.graph.ir import Graph, Node
    from tests.methods.conftest import _conv

    gen = torch.Generator().manual_seed(0)
    graph = Graph([Node("input", "input", []), _conv("conv", "input", 3, 4, 3, gen), Node("output", "output", ["conv"])],
                  meta={"input_size": [3, 6, 6]})
    qg = quantize_graph(graph, QuantConfig(method="minmax", scales="float"), toy_calib)
    im = IntegerModel(qg, allow_float_multipliers=True)
    assert im.program.has_float_requants and im.stats["requant_float"] == 1
    with pytest.raises(HybridQuantError, match="float requantization multipliers"):
        im.storage()
    with pytest.raises(HybridQuantError, match="float requantization multipliers"):
        program_tables(im.program)


# --- C header ------------------------------------------------------------------------
GCC = shutil.which("gcc")


def test_the_hybrids_run_in_c_bit_exact(hybrid_qgraph, tmp_path):
    """Each family (64x64, min-max W8A8): conv, depthwise, linear, attention matmuls, softmax, LayerNorm and
    GroupNorm, the token sum and broadcast product of the linear attention, concat and the layout ops of the
    unfold/fold run in C exactly as in the integer executor."""
    from .test_c_runtime import META, build, executor_codes, pixels, run

    _, qg = hybrid_qgraph
    export_c(qg, tmp_path / "model", META)
    px = pixels(3, qg.graph.meta["input_size"])
    assert np.array_equal(run(build(tmp_path / "model"), px, tmp_path), executor_codes(qg, px))


def test_softmax_exp_table_is_the_tail_of_the_exported_table(toy_calib):
    """The simulation and the program share the full table; a table built for a smaller spread (what the kernel
    builds when given none) is its tail."""
    from hybridquant.primitives.arith import softmax_exp_table

    qg = quantize_graph(make_toy_graph(), TOY_CONFIGS["minmax-pot"], toy_calib)
    op = next(op for op in lower(qg).ops if op.kind == "softmax")
    full = op.arrays["exp_table"].astype(np.int64)
    in_scale = float(qg.input_qparams(qg.graph["tok.softmax"]).scale)
    for levels in range(1, full.size + 1):
        assert np.array_equal(softmax_exp_table(in_scale, levels, 16).numpy(), full[full.size - levels:]), levels


def test_load_npz_refuses_other_files(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(HybridQuantError, match="not an exported integer program"):
        load_npz(tmp_path / "plain.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(HybridQuantError, match="cannot read integer program"):
        load_npz(tmp_path / "junk.npz")


def test_reader_runs_slice_and_expand(tmp_path):
    """Every layout op the executor writes into a program, ``slice`` and ``expand`` included, runs in the
    reader: a channel slice, and a pooled value expanded back over the positions."""
    from hybridquant.graph.ir import Graph, Node

    gen = torch.Generator().manual_seed(0)
    conv = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1}
    graph = Graph([
        Node("input", "input", []),
        Node("c1", "conv2d", ["input"], conv, {"weight": torch.randn(6, 3, 1, 1, generator=gen),
                                               "bias": torch.zeros(6)}),
        Node("part", "slice", ["c1"], {"dim": 1, "start": 1, "end": 5}),
        Node("pool", "global_avg_pool", ["part"]),
        Node("wide", "expand", ["pool"], {"shape": [-1, -1, 4, 4]}),  # 16 positions: a power-of-two mean
        Node("sum", "add", ["wide", "part"]),
        Node("c2", "conv2d", ["sum"], conv, {"weight": torch.randn(2, 4, 1, 1, generator=gen),
                                             "bias": torch.zeros(2)}),
        Node("output", "output", ["c2"]),
    ], meta={"input_size": [3, 4, 4]})
    x = _toy_images(8)[..., :4, :4]
    qg = quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), [x])
    path = tmp_path / "layout.npz"
    export_npz(qg, path)
    kinds = {op["op"] for op in load_npz(path)[0]["ops"]}
    assert {"slice", "expand"} <= kinds
    _assert_reader_matches(path, qg, x)


@pytest.mark.parametrize("cfg", ["hfq-two-term", "hfq-w6a6"])
def test_an_exported_program_loads_back_and_runs(cfg, toy_calib, tmp_path):
    """Saved, inspected and run again: the npz holds the whole Program (packed 4- and 6-bit weights too)."""
    from hybridquant.export import load_program

    qg = quantize_graph(make_toy_graph(), TOY_CONFIGS[cfg], toy_calib)
    program = lower(qg)
    export_npz(program, tmp_path / "p.npz")
    loaded = load_program(tmp_path / "p.npz")
    for a, b in zip(program.ops, loaded.ops, strict=True):
        assert (a.name, a.kind, a.inputs, a.attrs, a.out_shape) == (b.name, b.kind, b.inputs, b.attrs, b.out_shape)
        assert list(a.arrays) == list(b.arrays)
        assert all(a.arrays[k].dtype == b.arrays[k].dtype and np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    assert loaded.storage() == program.storage() and loaded.stats() == program.stats()
    x = _toy_images(4)
    got, want = IntegerModel(loaded).run(x), IntegerModel(qg).run(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert "stem.conv" in loaded.describe()


def test_a_program_of_another_version_is_refused(toy_calib, tmp_path):
    qg = quantize_graph(make_toy_graph(), TOY_CONFIGS["minmax-pot"], toy_calib)
    manifest, arrays = program_tables(qg)
    manifest["version"] = 1
    np.savez(tmp_path / "old.npz", **arrays, **{MANIFEST_KEY: np.array(json.dumps(manifest))})
    with pytest.raises(HybridQuantError, match="v1 file; this hybridquant reads v3: export it again"):
        load_npz(tmp_path / "old.npz")
    with pytest.raises(ValueError, match="manifest version 1"):
        rr.load(tmp_path / "old.npz")


def test_a_groupnorm_row_past_the_exact_length_runs_everywhere_alike(tmp_path):
    """A one-group GroupNorm over 16 x 64 x 64 = 65,536 values (MobileViT-v2 at ImageNet sizes has such rows):
    squares rounded down, the mean's fraction in fewer bits, more fraction bits in the normalised values. The
    simulation, the integer executor, the numpy reader and the C program agree bit for bit, within 32 bits."""
    from hybridquant.graph.ir import Graph, Node
    from hybridquant.integer.widths import analyse

    from .test_c_runtime import META, build, executor_codes, pixels, run

    gen = torch.Generator().manual_seed(0)
    conv = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1}
    graph = Graph([Node("input", "input", []),
                   Node("c1", "conv2d", ["input"], conv, {"weight": torch.randn(16, 3, 1, 1, generator=gen)}),
                   Node("relu", "relu", ["c1"]),  # unsigned codes from 0: squares up to 255^2
                   Node("gn", "group_norm", ["relu"], {"groups": 1, "eps": 1e-5},
                        {"weight": torch.rand(16, generator=gen) + 0.5, "bias": torch.randn(16, generator=gen) * 0.1}),
                   Node("gap", "global_avg_pool", ["gn"]), Node("flat", "flatten", ["gap"], {"start": 1, "end": -1}),
                   Node("fc", "linear", ["flat"], {}, {"weight": torch.randn(3, 16, generator=gen)}),
                   Node("output", "output", ["fc"])], meta={"input_size": [3, 64, 64]})
    x = torch.rand(4, 3, 64, 64, generator=gen) * 2 - 1
    qg = quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), [x])
    program = lower(qg)
    assert int(np.asarray(program["gn"].arrays["square_shift"])) > 0
    assert max(row["max_bits"] for row in analyse(program)) <= 32
    logits, _ = IntegerModel(program).run(x)
    assert torch.equal(logits, qg.run(x))
    export_npz(qg, tmp_path / "gn.npz")
    _assert_reader_matches(tmp_path / "gn.npz", qg, x)
    export_c(qg, tmp_path / "c", META)
    px = pixels(3, [3, 64, 64])
    assert np.array_equal(run(build(tmp_path / "c"), px, tmp_path), executor_codes(qg, px))
