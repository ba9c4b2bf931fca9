"""QDQ ONNX export (``export --format onnx``) and its evaluation with onnxruntime (``eval --onnx``)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, numpy_helper  # noqa: E402

from hybridquant import qmodel  # noqa: E402
from hybridquant.cli import main  # noqa: E402
from hybridquant.config import QuantConfig  # noqa: E402
from hybridquant.errors import HybridQuantError  # noqa: E402
from hybridquant.export.onnx import (  # noqa: E402
    EXPORT_EXTRA,
    OPSET,
    OnnxRunner,
    build_onnx,
    export_onnx,
    session_options,
)
from hybridquant.graph.ir import Graph, Node  # noqa: E402
from hybridquant.primitives import _bcast  # noqa: E402
from hybridquant.qparams import range_to_qparams, restrict_pot  # noqa: E402
from hybridquant.quantize import quantize_graph  # noqa: E402
from tests.conftest import ARCH, CLASSES, QIMG, pretrained_cfg  # noqa: E402
from tests.methods.conftest import _conv, make_toy_graph  # noqa: E402

CONFIGS = {
    "W8A8-pot": QuantConfig(method="minmax", scales="pot"),
    "W8A8-float": QuantConfig(method="minmax"),
    "W6A6-pot": QuantConfig(method="minmax", scales="pot", wbits=6, abits=6),  # every activation but the input needs the Clip
}
META = {"name": ARCH, "source": "test", "num_classes": len(CLASSES), "class_names": list(CLASSES),
        "data_cfg": {**pretrained_cfg(QIMG), "crop_mode": "center"}}


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _session(model_or_path) -> ort.InferenceSession:
    options = session_options(1)
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _output_lsb(qg) -> float:
    return float(qg.act[qg.graph.producer(qg.graph.output.inputs[0]).name].scale.max())


def _half_even_fake_quantize(x, scale, zero_point, qmin, qmax, axis=None):
    """The simulation's fake quantizer with QuantizeLinear's rounding (half to even)."""
    s, z = _bcast(scale, x, axis), _bcast(zero_point, x, axis)
    return torch.clamp(torch.round(x / s), qmin - z, qmax - z) * s


def _half_even_per_channel(x, scale, zero_point, qmin, qmax, axis=None):
    """The simulation's fake quantizer, with QuantizeLinear's half-to-even rounding for per-channel scales."""
    from hybridquant.primitives import fake_quantize

    if torch.as_tensor(scale).dim() > 0:
        return _half_even_fake_quantize(x, scale, zero_point, qmin, qmax, axis)
    return fake_quantize(x, scale, zero_point, qmin, qmax, axis)


def _assert_same_logits(got: np.ndarray, want: np.ndarray, qg) -> None:
    """The QDQ model's logits are the simulation's (both with float softmax / LayerNorm): measured identical on
    an AVX-512 CPU. Float softmax / LayerNorm / GELU / GroupNorm run in two runtimes whose vector kernels
    differ by CPU, and an ulp next to a rounding boundary flips one code, so another CPU may part on a
    few logits by an LSB or two; a wrong integer part (rounding chain, threshold comparisons) parts on
    most of them."""
    same = float((got == want).mean())
    worst = float(np.abs(got - want).max() / _output_lsb(qg))
    assert same >= 0.98 and worst <= 2.0, (same, worst)


def _sim_as_onnx(qg, x, monkeypatch) -> torch.Tensor:
    """The simulation with float softmax / LayerNorm: the QDQ model's arithmetic."""
    with monkeypatch.context() as m:
        m.setattr(qg, "override", {})
        return qg.run(x)


@pytest.fixture(scope="module")
def images(calib_images) -> torch.Tensor:
    wide = torch.rand(16, 3, QIMG, QIMG, generator=torch.Generator().manual_seed(7)) * 3 - 1.5  # saturates too
    return torch.cat([calib_images, wide])


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, mvit_graph, calib_images, tmp_path_factory):
    """(config name, quantized tiny mobilevit, path of its ONNX export, export summary)."""
    qg = quantize_graph(mvit_graph, CONFIGS[request.param], calib_images)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    summary = export_onnx(qg, path, META)
    return request.param, qg, path, summary


# --- (a) outputs follow the simulation ---------------------------------------------------
def test_onnxruntime_follows_the_simulation(exported, images):
    name, qg, path, summary = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert summary["opset"] == OPSET == model.opset_import[0].version
    runner = OnnxRunner(path, threads=1)
    # no QDQ fusion into integer kernels (they saturate on x86 CPUs without VNNI; see export/onnx.py)
    level = runner.session.get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    got = runner(images)
    want = qg.run(images)
    diff = (got - want).abs() / _output_lsb(qg)
    agree = float((got.argmax(1) == want.argmax(1)).float().mean())
    # Not exact, by design: with power-of-two scales the simulation's softmax and LayerNorm run integer
    # kernels where ONNX runs float ones (each within one code of the float result, see
    # tests/integer/test_executor.py; the int32 kernels differ from float in 0.1-0.4 % of their codes on this
    # network), and with float scales float32 evaluation order (and x·(1/s) for x/s) decides values next to a
    # rounding boundary. Each such difference is one code of one activation, and this random-weight network
    # carries it through ~40 quantized layers. Measured: mean 0.05-2.3, max 3-11 output LSBs on logits
    # spanning 45-200 LSBs, top-1 always the same; bounds with about 2x room.
    # The exact checks (float softmax / LayerNorm on both sides) are the next tests.
    assert float(diff.mean()) <= 4.5, (name, float(diff.mean()))
    assert float(diff.max()) <= 24.0, (name, float(diff.max()))
    assert agree >= 0.97, (name, agree)


@pytest.mark.parametrize("name", ["W8A8-pot", "W6A6-pot"])
def test_onnx_is_the_simulation_up_to_float_softmax_and_layernorm(name, mvit_graph, calib_images, images,
                                                                 monkeypatch):
    """With the simulation's softmax / LayerNorm switched to float (ONNX's ops) the logits are identical,
    bit for bit: every other part of the QDQ graph, rounding included, is the simulation's.

    With power-of-two scales conv / linear / matmul / add are exact in float32 on both sides. Float
    softmax / LayerNorm are the one place the two runtimes could part (an ulp next to a rounding boundary
    flips a code); torch 2.14 and onnxruntime agree on every value here (measured: all 32 x 3 logits equal,
    on an AVX-512 CPU), and a platform where they do not is a real difference from the simulation.
    """
    qg = quantize_graph(mvit_graph, CONFIGS[name], calib_images)
    got = _session(build_onnx(qg, META)).run(None, {"input": images.numpy()})[0]
    want = _sim_as_onnx(qg, images, monkeypatch).numpy()
    assert got.shape == want.shape == (len(images), len(CLASSES))
    _assert_same_logits(got, want, qg)


def test_threshold_grids_export_exactly(mvit_graph, calib_images, images, monkeypatch, tmp_path):
    """hfq's threshold grids on the SiLU inputs become comparisons and a gather: exactly the simulation's
    logits (float softmax / LayerNorm on both sides), as in the test above."""
    cfg = QuantConfig.build(method="hfq", scales="pot", pot_rounding="objective", wbits=6, abits=6, reconstruction=False)
    qg = quantize_graph(mvit_graph, cfg, calib_images)
    grids = sum(qp.grid == "threshold" for qp in qg.act.values())
    assert grids > 0
    summary = export_onnx(qg, tmp_path / "hfq.onnx", META)
    assert summary["threshold_grids"] == grids
    got = _session(tmp_path / "hfq.onnx").run(None, {"input": images.numpy()})[0]
    want = _sim_as_onnx(qg, images, monkeypatch).numpy()
    _assert_same_logits(got, want, qg)


def test_half_up_rounding_chain_is_what_makes_it_exact(mvit_graph, calib_images, images, monkeypatch):
    """Without the Floor chain, QuantizeLinear alone would round ties to even: the simulation with that
    rounding differs from the exported model, so the chain is doing the work (the test can fail)."""
    qg = quantize_graph(mvit_graph, CONFIGS["W6A6-pot"], calib_images)
    model = build_onnx(qg, META)
    assert [n.op_type for n in model.graph.node].count("Floor") == sum(
        1 for qp in qg.act.values() if qp.scale.dim() == 0)
    got = _session(model).run(None, {"input": images.numpy()})[0]
    with monkeypatch.context() as m:
        m.setattr("hybridquant.qparams.fake_quantize", _half_even_fake_quantize)
        half_even = _sim_as_onnx(qg, images, monkeypatch).numpy()
    half_up = _sim_as_onnx(qg, images, monkeypatch).numpy()
    _assert_same_logits(got, half_up, qg)
    assert float((got == half_even).mean()) < float((got == half_up).mean())


# --- (b), (c) structure ------------------------------------------------------------------
def _initializers(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_graph_is_qdq_with_static_shapes(exported):
    name, qg, path, summary = exported
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMul", "Gemm", "Softmax", "LayerNormalization",
            "Sigmoid", "GlobalAveragePool", "Concat", "Transpose", "Reshape", "Gather"} <= set(ops)
    assert not {"Resize", "Shape", "Expand", "ConstantOfShape", "Slice"} & set(ops)
    # one QDQ pair per activation quantizer (+ the exact re-QDQ after layout ops)
    assert ops.count("QuantizeLinear") == summary["qdq_pairs"] >= len(qg.act)
    assert summary["nodes"] == len(ops)
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == qg.graph.nodes[0].name
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, QIMG, QIMG]
    (out,) = model.graph.output
    assert out.name == "logits" and out.type.tensor_type.shape.dim[1].dim_value == len(CLASSES)
    inits = _initializers(model)
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    if name.startswith("W6A6"):
        # every 6-bit activation quantizer clips its int8/uint8 codes to [qmin, qmax]
        assert len(clips) == sum(1 for qp in qg.act.values() if qp.bits == 6) == len(qg.act) - 1
        for clip in clips:
            lo, hi = inits[clip.input[1]], inits[clip.input[2]]
            assert lo.dtype in (np.int8, np.uint8) and int(hi) - int(lo) == 63
    else:
        assert not clips
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["hybridquant.class_names"] == list(CLASSES) and meta["hybridquant.model_name"] == ARCH
    assert meta["hybridquant.data_cfg"]["mean"] == META["data_cfg"]["mean"]
    assert meta["hybridquant.config"]["wbits"] == qg.config.wbits


def test_weights_and_biases_are_integer_initializers(exported):
    _, qg, path, _ = exported
    model = onnx.load(str(path))
    by_name = {t.name: t for t in model.graph.initializer}
    inits = _initializers(model)
    produced = {o: n for n in model.graph.node for o in n.output}
    for node in qg.graph.by_op("conv2d", "linear"):
        q = inits[f"{node.name}.weight_quantized"]
        assert by_name[f"{node.name}.weight_quantized"].data_type == TensorProto.INT8
        want = qg.weight_int[node.name].numpy()
        assert np.array_equal(q, want) or np.array_equal(q, want.T)
        assert produced[f"{node.name}.weight"].op_type == "DequantizeLinear"
        if node.name in qg.bias_int:
            assert by_name[f"{node.name}.bias_quantized"].data_type == TensorProto.INT32
            assert np.array_equal(inits[f"{node.name}.bias_quantized"], qg.bias_int[node.name].numpy())
    # the only large float initializers left are none: floats are scales, LayerNorm affines, constants
    floats = [v.size for v in inits.values() if v.dtype == np.float32]
    ints = [v.size for v in inits.values() if v.dtype == np.int8]
    assert sum(ints) > 20 * sum(floats)


# --- every op, per-channel quantizers, 16-bit codes ------------------------------------------
def make_all_ops_graph(seed: int = 0) -> Graph:
    """A small graph with every op of the graph vocabulary the exporter maps (6x6 input)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    c = 8
    nodes = [
        Node("input", "input", []),
        _conv("c1", "input", 3, c, 3, gen),
        Node("relu", "relu", ["c1"]),
        Node("hswish", "hardswish", ["c1"]),
        Node("sig", "sigmoid", ["c1"]),
        Node("mul", "mul", ["hswish", "sig"]),
        Node("cat", "cat", ["relu", "mul"], {"dim": 1}),
        Node("gelu", "gelu", ["cat"], {"approximate": "tanh"}),
        Node("gn", "group_norm", ["gelu"], {"groups": 4, "eps": 1e-5},
             {"weight": r(2 * c).abs() + 0.5, "bias": r(2 * c) * 0.1}),
        Node("half", "mul_const", ["gn"], {"value": 0.5}),
        Node("shift", "scale_channels", ["half"], {"dim": 1, "raw_input": True},
             {"inv_alpha": 2.0 ** -torch.randint(0, 3, (2 * c,), generator=gen).float()}),
        _conv("c2", "shift", 2 * c, c, 1, gen),
        # MobileViT-v2-style separable attention: slices of one conv, softmax over tokens, sum, expand
        Node("q", "slice", ["c2"], {"dim": 1, "start": 0, "end": c // 2}),
        Node("k", "slice", ["c2"], {"dim": 1, "start": c // 2, "end": c}),
        Node("qsm", "softmax", ["q"], {"dim": -1}),
        Node("qk", "mul", ["k", "qsm"]),
        Node("ctx", "sum", ["qk"], {"dims": [-1], "keepdim": True}),
        Node("ctx_wide", "expand", ["ctx"], {"shape": [-1, c // 2, 6, 6]}),
        Node("attn", "mul", ["ctx_wide", "k"]),
        Node("qa", "cat", ["q", "attn"], {"dim": 1}),
        Node("gap", "global_avg_pool", ["qa"]),
        Node("flat", "flatten", ["gap"], {"start": 1, "end": -1}),
        # EfficientFormerV2-style strided attention: 1x1 pools as strided slices, a bilinear upsampling back,
        # an attention-bias table added
        Node("rows", "slice", ["c2"], {"dim": 2, "start": 0, "end": 6, "step": 2}),
        Node("pix", "slice", ["rows"], {"dim": 3, "start": 0, "end": 6, "step": 2}),
        Node("up", "upsample_bilinear", ["pix"], {"scale": [2, 2]}),
        Node("bias", "add_const", ["up"], {}, {"value": r(c, 6, 6) * 0.1}),
        Node("perm", "permute", ["bias"], {"dims": [0, 2, 3, 1]}),
        Node("tokens", "reshape", ["perm"], {"shape": [-1, 36, c]}),
        Node("ln", "layer_norm", ["tokens"], {"shape": [c], "eps": 1e-5}, {"weight": r(c) * 0.2 + 1, "bias": r(c) * 0.1}),
        Node("fc", "linear", ["ln"], {}, {"weight": r(c, c) * 0.3, "bias": r(c) * 0.1}),
        Node("smax", "softmax", ["fc"], {"dim": -1}),
        Node("tr", "transpose", ["smax"], {"dim0": 1, "dim1": 2}),
        Node("mm", "matmul", ["tr", "tokens"]),
        Node("sel", "select", ["mm"], {"dim": 1, "index": 2}),
        Node("add", "add", ["sel", "flat"]),
        Node("silu", "silu", ["add"]),
        Node("head", "linear", ["silu"], {}, {"weight": r(3, c) * 0.3, "bias": r(3) * 0.1}),
        Node("output", "output", ["head"]),
    ]
    return Graph(nodes, meta={"input_size": [3, 6, 6]})


def _toy_calib() -> list[torch.Tensor]:
    return list((torch.rand(32, 3, 6, 6, generator=torch.Generator().manual_seed(3)) * 2 - 1).split(8))


def _toy_images() -> torch.Tensor:
    return torch.rand(64, 3, 6, 6, generator=torch.Generator().manual_seed(5)) * 3 - 1.5


def _per_channel(qg, name: str, bits: int, axis: int) -> None:
    """Give ``name`` a narrow symmetric per-channel power-of-two quantizer (codes +-(2^(b-1) - 1))."""
    out = qg.graph.run(torch.cat(_toy_calib()), keep=True)[name]
    dims = [d for d in range(out.dim()) if d != axis % out.dim()]
    amax = out.abs().amax(dim=dims)
    qg.act[name] = restrict_pot(range_to_qparams(-amax, amax, bits, "symmetric", axis=axis))
    assert qg.act[name].qmin == -(2 ** (bits - 1)) + 1


def test_every_op(monkeypatch):
    """Each op's ONNX form computes the simulation's op (power-of-two scales: exact float32 sums; float scales
    put this graph's scale_channels output on near-ties that float evaluation order decides)."""
    qg = quantize_graph(make_all_ops_graph(), QuantConfig(method="minmax", scales="pot"), _toy_calib())
    assert "half" not in qg.act and "shift" in qg.act  # the scale_channels node reads the raw product
    model = build_onnx(qg, None)
    ops = {n.op_type for n in model.graph.node}
    assert {"GroupNormalization", "Gelu", "HardSwish", "Relu", "Mul", "Concat", "GlobalAveragePool", "Transpose",
            "Reshape", "LayerNormalization", "MatMul", "Softmax", "Gather", "Add", "Gemm", "Conv", "Slice", "Expand",
            "ReduceSum", "Resize"} <= ops
    x = _toy_images()
    got = _session(model).run(None, {"input": x.numpy()})[0]
    want = _sim_as_onnx(qg, x, monkeypatch).numpy()
    # exact, as above: float group norm / gelu / LayerNorm / softmax could part only by an ulp next to a
    # rounding boundary, and torch and onnxruntime agree on every value here (measured)
    _assert_same_logits(got, want, qg)


def test_per_channel_and_16_bit_activations(monkeypatch):
    """Per-channel quantizers (axis attribute), narrow ranges in int8 (Clip) and int16 (Clip through int32),
    a float bias (its input is per channel), 16-bit weights (int16 initializers).

    Per-channel activation quantizers get no half-up Floor chain (the exporter adds it to per-tensor ones
    only), so QuantizeLinear rounds their ties to even: the logits are exactly those of the simulation with
    that rounding on the per-channel quantizers, and differ from the plain simulation (round half up) by
    that alone (measured: 2 of 96 logits, by up to 2 output LSBs)."""
    qg = quantize_graph(make_all_ops_graph(), QuantConfig(method="minmax", scales="pot"), _toy_calib())
    _per_channel(qg, "c1", 8, axis=1)
    _per_channel(qg, "fc", 16, axis=-1)
    _per_channel(qg, "silu", 8, axis=-1)
    qg.rebuild()
    assert "head" not in qg.bias_int and "bias" in qg.sim["head"].params  # its input is per channel
    model = build_onnx(qg, None)
    nodes = {n.name: n for n in model.graph.node}
    assert nodes["c1.quantized"].attribute[0].i == 1 and nodes["fc.quantized"].attribute[0].i == -1
    assert nodes["c1.clipped"].op_type == "Clip" and nodes["fc.clipped_int32"].op_type == "Clip"
    x = _toy_images()
    got = _session(model).run(None, {"input": x.numpy()})[0]
    want = _sim_as_onnx(qg, x, monkeypatch).numpy()
    assert np.abs(got - want).max() <= 2 * _output_lsb(qg)
    with monkeypatch.context() as m:
        m.setattr("hybridquant.qparams.fake_quantize", _half_even_per_channel)
        want_half_even = _sim_as_onnx(qg, x, monkeypatch).numpy()
    assert np.array_equal(got, want_half_even), float((got == want_half_even).mean())

    qg16 = quantize_graph(make_toy_graph(), QuantConfig(method="minmax", scales="pot", wbits=16, abits=16), _toy_calib())
    model = build_onnx(qg16, None)
    by_name = {t.name: t for t in model.graph.initializer}
    assert by_name["stem.conv.weight_quantized"].data_type == TensorProto.INT16
    assert by_name["stem.conv.act_zero_point"].data_type in (TensorProto.INT16, TensorProto.UINT16)
    x = _toy_images()
    got = _session(model).run(None, {"input": x.numpy()})[0]
    want = _sim_as_onnx(qg16, x, monkeypatch).numpy()
    # 16-bit products are no longer exact float32 sums, so compare in the output scale's LSBs (2^-14 or so)
    assert np.abs(got - want).max() <= 64 * _output_lsb(qg16)
    assert np.array_equal(got.argmax(1), want.argmax(1))


# --- (d) no QDQ form ----------------------------------------------------------------------
def test_log2_softmax_is_refused(tmp_path):
    qg = quantize_graph(make_toy_graph(), QuantConfig(method="fq-vit"), _toy_calib())
    assert qg.act["tok.softmax"].grid == "log2"
    with pytest.raises(HybridQuantError, match=r"node tok\.softmax: its 'log2' quantizer has no ONNX") as exc:
        export_onnx(qg, tmp_path / "m.onnx")
    assert "\n" not in str(exc.value)
    assert not any(tmp_path.iterdir())


def test_missing_onnx_package(tmp_path, monkeypatch, capsys):
    qg = quantize_graph(make_toy_graph(), QuantConfig(method="minmax"), _toy_calib())
    path = tmp_path / "model.hq"
    qmodel.save(path, qg, {"name": "toy", "num_classes": 3, "data_cfg": {"input_size": [3, 6, 6]}})
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(HybridQuantError, match="needs the 'export' extra"):
        export_onnx(qg, tmp_path / "m.onnx")
    out = tmp_path / "m.onnx"
    code, _, err = _run(capsys, "export", "--qmodel", str(path), "--format", "onnx", "--out", str(out))
    assert code == 2 and err.strip() == f"hybridquant export: error: {EXPORT_EXTRA}"
    assert not out.exists()


# --- (e), (f) command line ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_files(mvit_graph, calib_images, tmp_path_factory):
    qg = quantize_graph(mvit_graph, CONFIGS["W8A8-pot"], calib_images)
    folder = tmp_path_factory.mktemp("cli")
    qmodel.save(folder / "model.hq", qg, META)
    return folder


def test_cli_export_and_eval(cli_files, data_dir, tmp_path, capsys):
    hq, onnx_path = cli_files / "model.hq", tmp_path / "deploy" / "m.onnx"
    onnx_path.parent.mkdir()  # --out's folder must exist
    code, out, err = _run(capsys, "export", "--qmodel", str(hq), "--format", "onnx", "--out", str(onnx_path))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["format"] == "onnx" and summary["opset"] == OPSET and summary["qdq_pairs"] > 0
    assert summary["bytes"] == onnx_path.stat().st_size
    assert [p.name for p in onnx_path.parent.iterdir()] == ["m.onnx"]  # no temporary files left

    report = tmp_path / "r.json"
    common = ["--data", str(data_dir), "--workers", "0", "--batch-size", "5"]
    code, out, err = _run(capsys, "eval", "--onnx", str(onnx_path), "--qmodel", str(hq), *common, "--out", str(report))
    assert code == 0, err
    result = json.loads(report.read_text())
    assert result == json.loads(out)
    assert {"top1", "top5", "images", "seconds", "images_per_s", "agreement_sim", "method", "wbits"} <= set(result)
    assert result["images"] == 12 and result["wbits"] == 8 and result["agreement_sim"] >= 0.75
    code, out, err = _run(capsys, "eval", "--qmodel", str(hq), *common)
    assert code == 0, err
    if result["agreement_sim"] == 1.0:
        assert result["top1"] == json.loads(out)["top1"]

    code, out, err = _run(capsys, "eval", "--onnx", str(onnx_path), *common, "--limit", "6")
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 6 and "agreement_sim" not in result

    code, _, err = _run(capsys, "eval", "--onnx", str(onnx_path), *common, "--img-size", "32")
    assert code == 2 and "takes inputs of size" in err and len(err.strip().splitlines()) == 1


def test_cli_bad_onnx_input(tmp_path, data_dir, capsys):
    out = tmp_path / "r.json"
    common = ["--data", str(data_dir), "--workers", "0", "--out", str(out)]

    def check(path, message):
        code, stdout, err = _run(capsys, "eval", "--onnx", str(path), *common)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not stdout

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not a protobuf" * 8)
    check(corrupt, "cannot read ONNX model")
    check(tmp_path / "missing.onnx", "ONNX model not found")
    # a valid ONNX model that hybridquant did not write: no preprocessing to rebuild
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                               [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), foreign)
    check(foreign, "was not exported by hybridquant")
