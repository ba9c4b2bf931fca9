"""The peer-tool benchmark: fx-traceable MobileViT wrapper, cell list, error cells, adapters.

The wrapper and runner tests need only hybridquant; the tests that run a
peer tool skip unless the ``peers`` extra is installed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.benchmarks import load_script

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import peers  # noqa: E402
from peers import common  # noqa: E402

TOOL_MODULES = {"torchao": "torchao", "brevitas": "brevitas", "quark": "quark",
                "mct": "model_compression_toolkit", "nncf": "nncf"}


def _load_runner():
    return load_script("run")


@pytest.fixture(scope="module")
def timm_model():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", num_classes=10).eval()
    for m in model.modules():  # non-trivial BN statistics, so BN handling is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_traceable_wrapper_matches_timm(timm_model):
    wrapper = common.traceable(timm_model, (3, 64, 64))
    traced = torch.fx.symbolic_trace(wrapper)  # the point of the wrapper
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = timm_model(x)
        assert torch.allclose(wrapper(x), ref, atol=1e-5, rtol=0)
        assert torch.allclose(traced(x), ref, atol=1e-5, rtol=0)
        assert torch.allclose(traced(x[:1]), ref[:1], atol=1e-5, rtol=0)  # batch size stays free
        folded = common.fold_batchnorm(wrapper)
        assert torch.allclose(folded(x), ref, atol=1e-4, rtol=0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    ops = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert torch.matmul in ops and torch.softmax in ops  # attention spelled out
    # the original model is left as it was
    assert any(type(m).__name__ == "MobileVitBlock" for m in timm_model.modules())


def test_traceable_wrapper_matches_timm_mobilevitv2():
    from tests.conftest import make_bn_model

    model = make_bn_model("mobilevitv2_050")
    traced = torch.fx.symbolic_trace(common.traceable(model, (3, 64, 64)))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(traced(x), ref, atol=1e-5, rtol=0)
        assert torch.allclose(traced(x[:1]), ref[:1], atol=1e-5, rtol=0)
    assert any(type(m).__name__ == "MobileVitV2Block" for m in model.modules())


def test_peers_cells_are_well_formed():
    cells = peers.cells()
    ids = [cid for cid, _ in cells]
    assert len(ids) == len(set(ids)) == len(peers.TOOLS) * len(peers.SETTINGS) * len(peers.SCALES)
    for cid, (tool, wbits, abits, pot) in cells:
        assert re.fullmatch(r"[a-z0-9]+_W\d+A\d+_(pot|float)", cid)
        assert cid == f"{tool}_W{wbits}A{abits}_{'pot' if pot else 'float'}"
        assert tool in peers.TOOLS and tool in peers.DISTRIBUTIONS
    assert {t for _, (t, *_) in cells} == set(peers.TOOLS) >= {"hfq", "torchao", "brevitas", "quark", "mct", "nncf"}
    assert [cid for cid, _ in _load_runner().cells("peers")] == ids


def test_failures_become_error_cells():
    images, labels = torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)

    def broken():
        raise RuntimeError("no luck\nsecond line")

    row = common.quantize_and_evaluate("x", "1", "cfg", 8, 8, True, broken, images, images, labels)
    assert row["error"] == "RuntimeError: no luck" and row["quant_top1"] is None
    assert row["scales"] == "pot" and row["where"]
    # a setting the tool cannot express is a cell too, without importing the tool
    row = peers.TOOLS["torchao"](torch.nn.Identity(), images, images, labels, 8, 8, True)
    assert row["error"].startswith("unsupported:") and row["quant_top1"] is None and row["tool"] == "torchao"
    row = peers.TOOLS["quark"](torch.nn.Identity(), images, images, labels, 6, 6, True)
    assert "int6" in row["error"]


def test_peers_suite_writes_cells_and_summary(tmp_path, q_ckpt_path, data_dir):
    runner = _load_runner()
    args = ["--suite", "peers", "--model", "mobilevit_xxs", "--checkpoint", str(q_ckpt_path), "--data", str(data_dir),
            "--calib", "6", "--workers", "0", "--batch-size", "6", "--only", "hfq_W8A8_pot,torchao_W8A8_pot",
            "--out", str(tmp_path)]
    assert runner.main(args) == 0
    label = f"mobilevit_xxs.{q_ckpt_path.stem}"  # results of a --checkpoint are filed under model.stem
    summary = json.loads((tmp_path / f"peers_{label}.json").read_text())
    rows = {r["cell"]: r for r in summary["rows"]}
    assert set(rows) == {"hfq_W8A8_pot", "torchao_W8A8_pot"}
    assert rows["hfq_W8A8_pot"]["error"] is None and 0 <= rows["hfq_W8A8_pot"]["quant_top1"] <= 1
    assert rows["hfq_W8A8_pot"]["quantize_seconds"] > 0 and rows["hfq_W8A8_pot"]["agreement_fp32"] is not None
    assert rows["torchao_W8A8_pot"]["quant_top1"] is None and rows["torchao_W8A8_pot"]["error"]
    md = (tmp_path / f"peers_{label}.md").read_text()
    assert "| error |" in md and "unsupported: PT2E observers have no power-of-two scale option" in md
    assert (tmp_path / "peers" / label / "hfq_W8A8_pot.json").exists()


@pytest.mark.parametrize("tool", ["torchao", "brevitas", "quark", "mct", "nncf"])
def test_peer_tool_quantizes_and_evaluates(tool, timm_model):
    pytest.importorskip(TOOL_MODULES[tool])
    g = torch.Generator().manual_seed(0)
    calib, images = torch.randn(8, 3, 64, 64, generator=g), torch.randn(6, 3, 64, 64, generator=g)
    labels = torch.randint(0, 10, (6,), generator=g)
    pot = tool not in ("torchao", "nncf")  # the tools without power-of-two scales run float
    row = peers.TOOLS[tool](timm_model, calib, images, labels, 8, 8, pot)
    assert row["error"] is None, row
    assert 0 <= row["quant_top1"] <= 1 and 0 <= row["agreement_fp32"] <= 1
    assert row["quantize_seconds"] > 0 and row["version"] and row["config"]
