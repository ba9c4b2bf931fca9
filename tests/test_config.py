"""QuantConfig validates itself and round-trips through JSON."""

from __future__ import annotations

import dataclasses

import pytest

from hybridquant.config import QuantConfig
from hybridquant.errors import HybridQuantError
from hybridquant.methods import METHODS


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


# --- issue 22 item 4: one set of defaults --------------------------------------------------------------------


def test_default_is_hfq_with_power_of_two_scales_and_the_objective_search():
    cfg = QuantConfig()
    assert (cfg.method, cfg.scales, cfg.pot_rounding) == ("hfq", "pot", "objective")
    assert cfg == QuantConfig(method="hfq", scales="pot", pot_rounding="objective")


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"hfq"}))
def test_baselines_keep_float_scales_and_round(method):
    cfg = QuantConfig(method=method)
    assert (cfg.scales, cfg.pot_rounding) == ("float", "round")
    assert QuantConfig(method=method, scales="pot").pot_rounding == "round"


def test_method_defaults_resolve_only_what_is_unset():
    assert QuantConfig(method="hfq", scales="float").pot_rounding == "objective"
    assert QuantConfig(method="hfq", pot_rounding="ceil").scales == "pot"
    assert QuantConfig(method="minmax", scales="pot", pot_rounding="objective").pot_rounding == "objective"


def test_resolved_values_are_stored_and_round_trip():
    for cfg in (QuantConfig(), QuantConfig(method="omse", wbits=6)):
        d = cfg.to_dict()
        assert d["scales"] in ("float", "pot") and d["pot_rounding"] in ("round", "objective")
        assert QuantConfig.from_dict(d) == cfg
    # a config stored before the defaults moved (explicit values, minmax was the default) reads back as it was
    old = {**QuantConfig(method="minmax").to_dict(), "scales": "float", "pot_rounding": "round"}
    assert QuantConfig.from_dict(old) == QuantConfig(method="minmax", scales="float", pot_rounding="round")


def test_field_defaults_are_the_dataclass_defaults():
    from hybridquant.config import field_defaults

    d = field_defaults()
    assert d["method"] == "hfq" and d["scales"] is None and d["pot_rounding"] is None and d["float_ops"] == ()
    assert QuantConfig(**d) == QuantConfig()
