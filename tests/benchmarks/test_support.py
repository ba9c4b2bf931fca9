"""The support matrix: every family's smallest models through capture, quantization and lowering."""

from __future__ import annotations

import pytest

from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def support():
    return load_script("support")


def test_the_globs_cover_the_families(support):
    names = support.models()
    assert {"mobilevit_xxs", "mobilevitv2_050", "efficientformerv2_s0", "efficientformer_l1", "efficientvit_m0",
            "fastvit_t8"} <= set(names)
    assert all(support.family(n) for n in names)


def test_fastvit_lowers_after_reparameterization(support):
    """FastViT's train-time branches merge into single convs before capture; then it lowers and runs exactly.
    (The other families' smallest models lower in tests/export/test_export.py.)"""
    row = support.check("fastvit_t8")
    assert row["reached"] == "exact" and row["error"] is None, row["error"]
    assert "conv2d" in row["ops"] and row["program_ops"] > 0


def test_a_model_that_stops_names_the_op_and_the_node(support):
    """EfficientFormer V1 runs only at its own input size, and stops at capture on its pooling token mixer."""
    row = support.check("efficientformer_l1")
    assert row["img_size"] == 224 and row["reached"] == "build"
    assert "avg_pool2d" in row["error"] and "node" in row["error"] and "\n" not in row["error"]
    table = support.markdown([row])
    assert "stops at capture" in table and "`efficientformer_l1`" in table
