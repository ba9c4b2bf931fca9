"""report.json and report.md tell the truth: human figures, an SQNR (or a reason) on every row measured against
the transformed float graph, deployed bytes from the lowered program, a measured integer op fraction."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from hybridquant.config import QuantConfig
from hybridquant.pipeline import Prepared, run_config
from hybridquant.primitives import sqnr_db
from hybridquant.quantize import layer_sqnr
from hybridquant.report import (
    fmt_agreement,
    fmt_bytes,
    fmt_db,
    fmt_int,
    fmt_pp,
    fmt_scale,
    fmt_seconds,
    fmt_top1,
    quantize_report_md,
)
from tests.methods.conftest import make_toy_graph


def test_formatters():
    assert fmt_seconds(298.07) == "298 s" and fmt_seconds(2.44) == "2.4 s" and fmt_seconds(3725.2) == "3,725 s"
    assert fmt_pp(0.2) == "0.20 pp" and fmt_pp(-0.0333) == "-0.03 pp"
    assert fmt_agreement(0.98) == "98.0 %" and fmt_agreement(0.9809) == "98.1 %"
    assert fmt_top1(0.8513) == "85.13 %"
    assert fmt_db(23.456) == "23.5" and fmt_db(None) == "—"
    assert fmt_bytes(1_601_234) == "1.60 MB" and fmt_bytes(540_321) == "540.3 kB" and fmt_bytes(912) == "912 B"
    assert fmt_int(1_601_234) == "1,601,234"
    assert fmt_scale(0.015625) == "2^-6" and fmt_scale(0.1) == "0.1" and fmt_scale([0.015625, 0.0625]) == "2^-6..2^-4"


class _FloatModel(torch.nn.Module):
    """The toy graph as the float model :func:`fp32_result` evaluates."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def _prepared(graph, calib: torch.Tensor) -> Prepared:
    """A Prepared around the toy graph: no checkpoint, data or timm model needed."""
    gen = torch.Generator().manual_seed(11)
    images = torch.rand(24, 3, 6, 6, generator=gen) * 2 - 1
    labels = graph(images).argmax(1)  # FP32 right on every image
    labels[:3] = (labels[:3] + 1) % 3
    loaded = SimpleNamespace(name="toy", source="tests", num_classes=3, class_names=["a", "b", "c"],
                             model=_FloatModel(graph))
    return Prepared(loaded, {"input_size": [3, 6, 6]}, graph, calib, TensorDataset(images, labels), labels,
                    phases={"load": {"seconds": 0.0, "peak_rss_mb": 1.0, "depth": 0}, "capture": {"seconds": 0.0, "peak_rss_mb": 1.0, "depth": 0}})


@pytest.fixture(scope="module")
def toy_run():
    gen = torch.Generator().manual_seed(3)
    calib = torch.rand(32, 3, 6, 6, generator=gen) * 2 - 1
    prep = _prepared(make_toy_graph(), calib)
    cfg = QuantConfig.build(method="hfq", scales="pot", wbits=8, abits=8, reconstruction_iters=20)
    report, qgraph, _ = run_config(prep, cfg, batch_size=8, progress=False)
    return prep, report, qgraph


def test_report_json_keys(toy_run):
    _, report, qgraph = toy_run
    json.dumps(report, allow_nan=False)  # no nan / inf anywhere
    assert "model_size_bytes" not in report
    assert isinstance(report["deployed_bytes"], int) and isinstance(report["host_bytes"], int)
    assert report["deployed_bytes"] == sum(report["deployed_bytes_breakdown"].values())
    assert report["deployed_bytes_breakdown"]["lookup_tables"] > 0
    integer = report["integer"]
    assert integer["integer_only"] and integer["integer_op_fraction"] == 1.0 and integer["integer_mac_fraction"] == 1.0
    assert integer["ops"] == integer["integer_ops"] > 0 and integer["macs"] == integer["integer_macs"] > 0
    assert integer["identity_requantizations"] > 0 and integer["requant_multiplies_replaced_by_shifts"] > 0
    assert report["drop_pp"] == pytest.approx(100 * (report["fp32_top1"] - report["quant_top1"]))


def test_every_layer_row_has_an_sqnr_or_a_reason(toy_run):
    _, report, _ = toy_run
    rows = report["layers"]
    assert rows
    for row in rows:
        if row["sqnr_db"] is None:
            assert row.get("sqnr_note"), row["name"]
        else:
            assert math.isfinite(row["sqnr_db"]), row["name"]
            if row["sqnr_db"] < 0:
                assert row.get("sqnr_note"), row["name"]


def test_sqnr_is_measured_against_the_transformed_graph(toy_run):
    """The rows a transform changes — LayerNorms whose affine outlier scaling and channel shifts rewrote, and
    the per-channel shift nodes it added — must read like quantization noise, not like the transform."""
    prep, report, qgraph = toy_run
    rows = {r["name"]: r for r in report["layers"]}
    assert qgraph.info["transform"]["layers_scaled"] and qgraph.info["transform"]["layers_shifted"]
    added = [n.name for n in qgraph.graph if n.op == "scale_channels"]
    assert added and all(n not in prep.graph for n in added)
    for name in added:  # no float twin in the untransformed graph: a transformed reference has one
        assert rows[name]["sqnr_db"] is not None and rows[name]["sqnr_db"] > 10, rows[name]
    norms = [r for r in report["layers"] if r["op"] == "layer_norm"]
    assert len(norms) == 2 and all(r["sqnr_db"] > 12 for r in norms), norms  # ≈ 6–9 dB against the original
    # a W8A8 model: every row above 0 dB
    assert all(r["sqnr_db"] > 0 for r in report["layers"] if r["sqnr_db"] is not None)
    # the reference is the graph right after the transforms, run in float
    images = prep.calib[: qgraph.config.sqnr_images]
    ref, sim = qgraph.reference.run(images, keep=True), qgraph.run(images, keep=True)
    for name, row in rows.items():
        if row["sqnr_db"] is not None:
            assert row["sqnr_db"] == pytest.approx(sqnr_db(ref[name], sim[name]), abs=1e-9), name
    untransformed = layer_sqnr(qgraph, images, reference=prep.graph)
    assert all(untransformed[r["name"]] < r["sqnr_db"] - 3 for r in norms)


def test_rows_without_a_finite_sqnr_say_why():
    from hybridquant.pipeline import SQNR_EXACT, SQNR_ZERO, _sqnr_cell

    assert _sqnr_cell(float("inf"), None) == (None, SQNR_EXACT)
    assert _sqnr_cell(float("-inf"), None) == (None, SQNR_ZERO)
    assert _sqnr_cell(None, None)[0] is None and _sqnr_cell(float("nan"), None)[1]
    value, note = _sqnr_cell(-4.789, 9.05)
    assert value == -4.789 and "refinement" in note and "9.1 dB" in note
    assert "threshold grid" in _sqnr_cell(-9.7, -9.0, "threshold")[1]
    assert _sqnr_cell(-1.0, -2.0)[1] and _sqnr_cell(12.345, 14.0) == (12.345, None)


def test_report_md_is_human(toy_run):
    _, report, _ = toy_run
    report = {**report, "seconds": 298.07, "drop_pp": 0.2, "agreement_fp32": 0.98, "fp32_top1": 0.8513,
              "quant_top1": 0.8493, "drop_ci95_pp": [-0.1, 0.5], "deployed_bytes": 1_601_234}
    rows = [dict(r) for r in report["layers"]]
    rows[1].update(sqnr_db=None, sqnr_note="exact on these images")
    report["layers"] = rows
    md = quantize_report_md(report)
    assert "| 85.13 % | 84.93 % | 0.20 pp | 98.0 % |" in md
    assert "298 s" in md and "1.60 MB" in md and "1,601,234" in md and "-0.10 pp to 0.50 pp" in md
    assert "nan" not in md.lower() and "298.07" not in md and "0.2000" not in md and "0.9800" not in md
    body = md.split("## Environment")[0]  # versions and dates aside, no figure with four or more decimals
    assert not re.search(r"\d\.\d{4}", body), re.findall(r"\S*\d\.\d{4}\S*", body)
    assert "| — [1] |" in md and "[1] exact on these images" in md
    for row in rows[2:]:
        assert f"| {row['name']} |" in md
        if row["sqnr_db"] is not None:
            assert f"| {row['sqnr_db']:.1f} |" in md or f"| {row['sqnr_db']:.1f} [" in md
    assert "## Deployed size" in md and "lookup tables" in md
    assert "transformed" in md and "LayerNorm rows" in md


def test_report_json_has_phases_and_peak_memory(toy_run):
    from hybridquant.report import PIPELINE_PHASES

    _, report, _ = toy_run
    phases = report["phases"]
    assert list(phases)[:3] == ["load", "capture", "eval fp32"]  # the shared ones first
    assert set(PIPELINE_PHASES) <= set(phases)
    for name, fig in phases.items():
        assert set(fig) == {"seconds", "peak_rss_mb", "depth"} and fig["seconds"] >= 0 and fig["peak_rss_mb"] > 0, name
        assert fig["depth"] == (name not in PIPELINE_PHASES) or name in ("outlier scaling", "exponent search",
                                                                            "reconstruction", "ptf samples"), name
    assert report["peak_rss_mb"] >= max(fig["peak_rss_mb"] for fig in phases.values()) > 0
    # the older keys, derived from the phases
    assert report["quantize_seconds"] == phases["quantize"]["seconds"]
    assert report["seconds_breakdown"] == {"load": 0.0, "capture": 0.0, "eval_fp32": phases["eval fp32"]["seconds"],
                                           "quantize": phases["quantize"]["seconds"],
                                           "eval_quant": phases["eval quantized"]["seconds"]}
    assert report["seconds"] >= phases["quantize"]["seconds"] + phases["eval quantized"]["seconds"]


def test_report_md_has_the_phase_table(toy_run):
    _, report, _ = toy_run
    report = {**report, "phases": {**report["phases"], "exponent search": {"seconds": 61.2, "peak_rss_mb": 2345.6}},
              "peak_rss_mb": 3456.7, "workspace": {"budget_mb": 512.0, "peak_resident_mb": 300.2, "spilled_mb": 0.0}}
    md = quantize_report_md(report)
    table = md.split("## Time and memory")[1].split("## Layers")[0]
    assert "| phase | time | peak RSS |" in table
    for name in report["phases"]:
        assert f" {name} |" in table, name
    assert "| &nbsp;&nbsp;↳ exponent search | 61 s | 2,346 MB |" in table  # ran inside quantization
    assert "| **whole run** |" in table and "3,457 MB |" in table
    assert "300 MB of a 512 MB budget" in table
    assert not re.search(r"\d\.\d{4}", table)
