"""QuantConfig validates itself and round-trips through JSON."""

from __future__ import annotations

import dataclasses

import pytest

from hybridquant.config import QuantConfig
from hybridquant.errors import HybridQuantError


def test_json_round_trip():
    cfg = QuantConfig(method="omse", wbits=6, abits=6, scales="pot", float_ops=("a", "b*"))
    assert QuantConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"wbits": 1}, "wbits"),
        ({"abits": 9}, "abits"),
        ({"method": "magic"}, "unknown method"),
        ({"scales": "log"}, "scales"),
        ({"shift_terms": 3}, "shift-terms"),
    ],
)
def test_invalid_values_are_rejected(kwargs, message):
    with pytest.raises(HybridQuantError, match=message):
        QuantConfig(**kwargs)


def test_unknown_keys_are_rejected():
    with pytest.raises(HybridQuantError, match="unknown config keys"):
        QuantConfig.from_dict({"method": "minmax", "colour": "red"})


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().wbits = 4  # type: ignore[misc]
