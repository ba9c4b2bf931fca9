"""Quantization configs: small frozen dataclasses that validate themselves.

``QuantConfig`` says *what* to quantize and how; it round-trips through JSON
(``to_dict`` / ``from_dict``) and is stored inside every ``model.hq``.

Its field defaults are the only defaults: ``hybridquant quantize`` takes its
option defaults from :func:`field_defaults` and leaves ``--scales`` and
``--pot-rounding`` unset, so ``QuantConfig`` resolves them per method
(:data:`METHOD_DEFAULTS`) exactly as for ``QuantConfig(method=...)`` in Python.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import HybridQuantError

BITS_ALLOWED = (2, 3, 4, 5, 6, 7, 8, 16)
SCALES = ("float", "pot")
POT_ROUNDING = ("round", "ceil", "objective")
ACT_SYMMETRY = ("auto", "symmetric", "asymmetric")
OBSERVERS = ("minmax", "percentile", "mse")

#: the method of ``QuantConfig()`` and of ``hybridquant quantize`` without ``--method``
DEFAULT_METHOD = "hfq"
#: what ``QuantConfig`` fills in for ``scales`` / ``pot_rounding`` left unset (``None``): a method's own
#: entry, else ``BASE_DEFAULTS``; the resolved values are stored, so a saved config never changes meaning
BASE_DEFAULTS: dict[str, str] = {"scales": "float", "pot_rounding": "round"}
METHOD_DEFAULTS: dict[str, dict[str, str]] = {"hfq": {"scales": "pot", "pot_rounding": "objective"}}


def method_default(method: str, name: str) -> str:
    """The value ``QuantConfig(method=method)`` gives the method-dependent field ``name``."""
    return METHOD_DEFAULTS.get(method, {}).get(name, BASE_DEFAULTS[name])


def describe_method_default(name: str) -> str:
    """``'pot for hfq, float for the other methods'``: the per-method default of ``name``, for help texts."""
    special = [f"{d[name]} for {m}" for m, d in METHOD_DEFAULTS.items() if name in d]
    return ", ".join([*special, f"{BASE_DEFAULTS[name]} for the other methods" if special else BASE_DEFAULTS[name]])


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise HybridQuantError(message)


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides a quantized model, apart from the data.

    Attributes:
        method: the algorithm (``minmax``, ``percentile``, ``omse``, ``fq-vit``,
            ``smoothquant``, ``hyq``, ``ptq4vit``, ``repq-vit``, ``hfq``); default ``hfq``.
        wbits / abits: weight and activation bit widths (2–8 or 16).
        scales: ``float`` (any real scale) or ``pot`` (every scale a power of two);
            unset (``None``): the method's default, ``pot`` for hfq, ``float`` otherwise.
        pot_rounding: how a float scale becomes 2^k with ``scales='pot'``:
            ``round`` (round log2), ``ceil`` (never clip more), ``objective``
            (search the exponent that minimises output error; hfq); unset (``None``):
            ``objective`` for hfq, ``round`` otherwise.
        act_symmetry: ``auto`` quantizes one-sided activation ranges
            asymmetrically (with a zero point) and the rest symmetrically.
        input_bits: bits of the quantized input image.
        first_last_8bit: keep the first conv and the classifier at 8 bits.
        float_ops: node names left in float on request (listed in the report).
        percentile: upper percentile for the ``percentile`` observer.
        smoothquant_alpha: migration strength of ``smoothquant``.
        hyq_iters / hyq_lr: QADS optimisation of ``hyq`` (lr ``None`` = 0.01).
        shift_terms: requantization multipliers as a sum of this many powers of two.
        outlier_scaling / alpha_pot: hfq's outlier scaling on/off and α restricted to 2^k.
        channel_shift: hfq's outlier scaling also centres the input channels of a layer
            that reads a norm (X − z into the norm's bias, W z into the layer's bias).
        weight_rounding / bias_correction: hfq's GPTQ-style weight rounding and
            empirical bias correction on/off.
        input_compensation: hfq's weight rounding also absorbs the error arriving
            at each layer's input (target: the float model's output).
        ptf: hfq gives LayerNorm inputs per-channel power-of-two factors (FQ-ViT's
            PTF).
        lut_zero_point: hfq gives a two-sided tensor read only
            by lookup-table non-linearities (a conv's output before its SiLU) a zero point,
            and the exponent search also lowers the zero points of asymmetric grids
            (for those tensors it overrides ``act_symmetry``).
        lut_thresholds: hfq quantizes a tensor of at most 6 bits read
            only by one lookup table on a threshold grid whose intervals are the preimages of the table's
            output codes (the integer program compares the shifted accumulator with integer
            thresholds); it replaces the uniform grid, zero point included, for those tensors.
        reconstruction / reconstruction_iters: hfq's block reconstruction (learned
            rounding and biases per block with the activation quantizers in the
            loop) on/off, and its optimisation steps per block.
        sqnr_images: calibration images used for the per-layer SQNR table.

    ``scales`` and ``pot_rounding`` are resolved in ``__post_init__``, so every
    instance holds concrete values; ``replace(method=...)`` keeps them as they are.
    """

    method: str = DEFAULT_METHOD
    wbits: int = 8
    abits: int = 8
    scales: str | None = None  # None: method_default(method, "scales")
    pot_rounding: str | None = None  # None: method_default(method, "pot_rounding")
    act_symmetry: str = "auto"
    input_bits: int = 8
    first_last_8bit: bool = False
    float_ops: tuple[str, ...] = field(default_factory=tuple)
    percentile: float = 99.99
    smoothquant_alpha: float = 0.5
    hyq_iters: int = 1000
    hyq_lr: float | None = None
    shift_terms: int = 1
    outlier_scaling: bool = True
    alpha_pot: bool = True
    channel_shift: bool = True
    ptf: bool = True
    lut_zero_point: bool = True
    lut_thresholds: bool = True
    weight_rounding: bool = True
    input_compensation: bool = True
    bias_correction: bool = True
    reconstruction: bool = True
    reconstruction_iters: int = 300
    sqnr_images: int = 32

    def __post_init__(self) -> None:
        from .methods import METHODS  # late import: methods import this module

        _check(self.method in METHODS, f"unknown method '{self.method}' (choose from {', '.join(sorted(METHODS))})")
        for name in BASE_DEFAULTS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, method_default(self.method, name))
        for name in ("wbits", "abits", "input_bits"):
            value = getattr(self, name)
            _check(value in BITS_ALLOWED, f"--{name} must be one of 2-8 or 16, got {value}")
        _check(self.scales in SCALES, f"--scales must be one of {SCALES}, got '{self.scales}'")
        _check(self.pot_rounding in POT_ROUNDING, f"--pot-rounding must be one of {POT_ROUNDING}")
        _check(self.act_symmetry in ACT_SYMMETRY, f"act_symmetry must be one of {ACT_SYMMETRY}")
        _check(50.0 < self.percentile <= 100.0, f"percentile must be in (50, 100], got {self.percentile}")
        _check(0.0 <= self.smoothquant_alpha <= 1.0, "smoothquant alpha must be in [0, 1]")
        _check(self.hyq_iters >= 0, "hyq iterations must be >= 0")
        _check(self.shift_terms in (1, 2), f"--shift-terms must be 1 or 2, got {self.shift_terms}")
        _check(self.reconstruction_iters >= 0, "--reconstruction-iters must be >= 0")
        _check(self.sqnr_images >= 1, "sqnr_images must be >= 1")
        object.__setattr__(self, "float_ops", tuple(self.float_ops))

    @property
    def pot(self) -> bool:
        return self.scales == "pot"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["float_ops"] = list(self.float_ops)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        _check(not unknown, f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)


def field_defaults() -> dict[str, Any]:
    """Each ``QuantConfig`` field's default (``None`` for the per-method ones), for the CLI's options."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(QuantConfig):
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out
