"""QuantConfig validates itself and round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json

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


# --- issue 24 item 3: configs per method ------------------------------------------------------------------------


def test_each_method_owns_its_options_with_their_defaults():
    from hybridquant.config import METHOD_CONFIGS, HfqConfig, MinMaxConfig

    assert QuantConfig().options == HfqConfig() and QuantConfig().options.reconstruction_iters == 300
    assert QuantConfig(method="minmax").options == MinMaxConfig()
    assert QuantConfig(method="smoothquant").options.alpha == 0.5
    assert set(METHOD_CONFIGS) == set(METHODS)
    assert all(METHODS[m].config_class is METHOD_CONFIGS[m] for m in METHODS)
    with pytest.raises(HybridQuantError, match="takes SmoothQuantConfig options, not HfqConfig"):
        QuantConfig(method="smoothquant", options=HfqConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().options.ptf = False  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "smoothquant", "alpha": 2.0}, "alpha must be in"),
    ({"method": "percentile", "percentile": 40.0}, "percentile must be in"),
    ({"method": "hyq", "iters": -1}, "hyq iterations"),
    ({"method": "hfq", "reconstruction_iters": -1}, "reconstruction-iters"),
    ({"method": "minmax", "reconstruction_iters": 3}, "not an option of minmax: reconstruction_iters"),
])
def test_method_options_validate_themselves(kwargs, message):
    with pytest.raises(HybridQuantError, match=message):
        QuantConfig.build(**kwargs)


def test_build_and_replace_route_options_to_the_method():
    cfg = QuantConfig.build(method="hfq", wbits=6, reconstruction_iters=20, ptf=False)
    assert (cfg.wbits, cfg.options.reconstruction_iters, cfg.options.ptf) == (6, 20, False)
    again = cfg.replace(abits=4, reconstruction=False)
    assert (again.abits, again.options.reconstruction, again.options.reconstruction_iters) == (4, False, 20)
    assert cfg.replace(method="smoothquant").options.alpha == 0.5  # a new method starts from its defaults
    with pytest.raises(HybridQuantError, match="not an option of hfq"):
        cfg.replace(alpha=0.3)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_round_trips_with_its_options(method):
    cfg = QuantConfig(method=method, wbits=6)
    d = json.loads(cfg.to_json())
    assert set(d["options"]) == {f.name for f in dataclasses.fields(cfg.options)}
    assert QuantConfig.from_json(cfg.to_json()) == cfg


def test_flat_configs_of_older_model_files_still_read():
    """Before configs were per method, every method's option was a top-level key; the method's own ones
    become its options and the others, which did not change the model, are dropped."""
    flat = {"method": "hfq", "wbits": 6, "abits": 6, "scales": "pot", "pot_rounding": "objective",
            "act_symmetry": "auto", "input_bits": 8, "first_last_8bit": False, "float_ops": [], "percentile": 99.99,
            "smoothquant_alpha": 0.5, "hyq_iters": 1000, "hyq_lr": None, "shift_terms": 1, "outlier_scaling": True,
            "alpha_pot": True, "channel_shift": True, "ptf": False, "lut_zero_point": True, "lut_thresholds": True,
            "weight_rounding": True, "input_compensation": True, "bias_correction": True, "reconstruction": True,
            "reconstruction_iters": 30, "sqnr_images": 32}
    assert QuantConfig.from_dict(flat) == QuantConfig.build(method="hfq", wbits=6, abits=6, ptf=False,
                                                             reconstruction_iters=30)
    old_sq = {**flat, "method": "smoothquant", "smoothquant_alpha": 0.8, "scales": "float", "pot_rounding": "round"}
    assert QuantConfig.from_dict(old_sq) == QuantConfig.build(method="smoothquant", wbits=6, abits=6, alpha=0.8)
    with pytest.raises(HybridQuantError, match="unknown config keys: colour"):
        QuantConfig.from_dict({**flat, "colour": "red"})
