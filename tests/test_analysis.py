"""Outlier analysis finds the planted outlier channels and writes plots."""

from __future__ import annotations

import torch

from hybridquant.analysis import analysis_markdown, analyze_graph, tensor_stats
from hybridquant.plots import analysis_plots
from tests.methods.conftest import OUTLIERS, make_toy_graph


def test_tensor_stats_flags_outliers():
    x = torch.randn(4, 8, 5, 5)
    x[:, 3] *= 50
    s = tensor_stats(x)
    assert s["outlier_channels"] == [3] and s["channel_spread"] > 10


def test_analysis_of_toy_graph(tmp_path):
    graph = make_toy_graph()
    images = torch.rand(16, 3, 6, 6) * 2 - 1
    result = analyze_graph(graph, images)
    row = next(r for r in result["layers"] if r["layer"] == "blk.conv1_1x1.conv")
    assert set(OUTLIERS) <= set(row["outlier_channels"])
    assert row["sqnr_w8a8_db"] > row["sqnr_w6a6_db"]
    assert result["blocks"]["mv2"]["outlier_channels"] >= len(OUTLIERS)
    plots = analysis_plots(result, tmp_path)
    assert all((tmp_path / p).stat().st_size > 1000 for p in plots)
    md = analysis_markdown(result, "toy", plots)
    assert "blk.conv1_1x1.conv" in md and "channel_max.png" in md
