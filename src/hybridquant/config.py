"""Quantization configs: small frozen dataclasses that validate themselves.

``QuantConfig`` says *what* to quantize and how: what every method shares (bits, scales, granularity, float
ops, shift terms) and, in ``options``, the method's own frozen :class:`MethodConfig` (:class:`HfqConfig`,
:class:`SmoothQuantConfig`, ...; :data:`METHOD_CONFIGS` maps method names to them, and each method's class
names its own). It round-trips through JSON (``to_dict`` / ``from_dict``; the flat form stored before
configs were per method still reads) and is stored inside every ``model.hq``.

The dataclass defaults are the only defaults: ``hybridquant quantize`` builds its options from these
dataclasses (:func:`field_defaults` and the option fields' metadata) and leaves ``--scales`` and
``--pot-rounding`` unset, so ``QuantConfig`` resolves them per method (``MethodConfig.defaults``) exactly as
for ``QuantConfig(method=...)`` in Python. This module imports nothing of the rest of the package, so every
layer may read configs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import HybridQuantError

BITS_ALLOWED = (2, 3, 4, 5, 6, 7, 8, 16)
SCALES = ("float", "pot")
POT_ROUNDING = ("round", "ceil", "objective")
ACT_SYMMETRY = ("auto", "symmetric", "asymmetric")
OBSERVERS = ("minmax", "percentile", "mse")

#: the method of ``QuantConfig()`` and of ``hybridquant quantize`` without ``--method``
DEFAULT_METHOD = "hfq"
#: what ``QuantConfig`` fills in for ``scales`` / ``pot_rounding`` left unset (``None``): the method's
#: ``MethodConfig.defaults``, else these; the resolved values are stored, so a saved config never changes meaning
BASE_DEFAULTS: dict[str, str] = {"scales": "float", "pot_rounding": "round"}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise HybridQuantError(message)


def _option(default: Any, help: str, flag: str | None = None, **extra: Any) -> Any:
    """A method option: its default, the ``--help`` text of its command-line flag, and that flag (default
    ``--<name>``, or ``--no-<name>`` for a switch that defaults to on); ``choices`` maps words to values,
    ``cli=False`` keeps it off the command line."""
    return field(default=default, metadata={"help": help, "flag": flag, **extra})


@dataclass(frozen=True)
class MethodConfig:
    """The options of one method: a frozen dataclass per method that validates itself (this base has
    none). ``method`` names it; ``defaults`` overrides ``BASE_DEFAULTS`` for that method; ``legacy`` maps
    the flat keys of configs stored before configs were per method to its fields."""

    method: ClassVar[str] = ""
    defaults: ClassVar[dict[str, str]] = {}
    legacy: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        _check(not unknown, f"unknown {cls.method} options: {', '.join(unknown)}")
        return cls(**data)


#: method name -> its options class; each method's class names it too (``Method.config_class``)
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}


def _register(name: str):
    def deco(cls: type[MethodConfig]) -> type[MethodConfig]:
        cls.method = name
        METHOD_CONFIGS[name] = cls
        return cls
    return deco


def _no_options(name: str, cls_name: str, doc: str) -> type[MethodConfig]:
    """The registered options class of a method that has none."""
    cls = dataclass(frozen=True)(type(cls_name, (MethodConfig,), {"__doc__": doc, "__module__": __name__}))
    return _register(name)(cls)


MinMaxConfig = _no_options("minmax", "MinMaxConfig", "``minmax``: per-tensor min-max ranges; no options.")
OMSEConfig = _no_options("omse", "OMSEConfig", "``omse``: ranges of least quantization MSE; no options.")
FQViTConfig = _no_options("fq-vit", "FQViTConfig",
                          "``fq-vit``: FQ-ViT's power-of-two factors and log2 softmax; no options.")
PTQ4ViTConfig = _no_options("ptq4vit", "PTQ4ViTConfig",
                            "``ptq4vit``: twin uniform grids and the Hessian-guided search; no options.")
RepQViTConfig = _no_options("repq-vit", "RepQViTConfig",
                            "``repq-vit``: scale reparameterisation and log√2 softmax; no options.")


@_register("percentile")
@dataclass(frozen=True)
class PercentileConfig(MethodConfig):
    """``percentile``: ranges clipped at a percentile of each activation."""

    legacy: ClassVar[dict[str, str]] = {"percentile": "percentile"}
    percentile: float = _option(99.99, "percentile of the percentile method")

    def __post_init__(self) -> None:
        _check(50.0 < self.percentile <= 100.0, f"percentile must be in (50, 100], got {self.percentile}")


@_register("smoothquant")
@dataclass(frozen=True)
class SmoothQuantConfig(MethodConfig):
    """``smoothquant``: per-channel migration of activation outliers into the weights."""

    legacy: ClassVar[dict[str, str]] = {"smoothquant_alpha": "alpha"}
    alpha: float = _option(0.5, "migration strength of smoothquant", "--smoothquant-alpha")

    def __post_init__(self) -> None:
        _check(0.0 <= self.alpha <= 1.0, "smoothquant alpha must be in [0, 1]")


@_register("hyq")
@dataclass(frozen=True)
class HyQConfig(MethodConfig):
    """``hyq``: HyQ's QADS optimisation of the activation scales."""

    legacy: ClassVar[dict[str, str]] = {"hyq_iters": "iters", "hyq_lr": "lr"}
    iters: int = _option(1000, "QADS iterations of hyq", "--hyq-iters")
    lr: float | None = _option(None, "QADS learning rate (None: 0.01)", cli=False)

    def __post_init__(self) -> None:
        _check(self.iters >= 0, "hyq iterations must be >= 0")


@_register("hfq")
@dataclass(frozen=True)
class HfqConfig(MethodConfig):
    """``hfq``, this project's method (:mod:`hybridquant.methods.hfq`); every part can be switched off for
    ablations.

    Attributes:
        outlier_scaling / alpha_pot: outlier scaling on/off and α restricted to 2^k.
        channel_shift: outlier scaling also centres the input channels of a layer that reads a norm
            (X − z into the norm's bias, W z into the layer's bias).
        ptf: LayerNorm inputs get per-channel power-of-two factors (FQ-ViT's PTF).
        lut_zero_point: a two-sided tensor read only by lookup-table non-linearities (a conv's output
            before its SiLU) gets a zero point, and the exponent search also lowers the zero points of
            asymmetric grids (for those tensors it overrides ``act_symmetry``).
        lut_thresholds: a tensor of at most 6 bits read only by one lookup table is quantized on a
            threshold grid whose intervals are the preimages of the table's output codes (the integer
            program compares the shifted accumulator with integer thresholds); it replaces the uniform grid,
            zero point included, for those tensors.
        weight_rounding / bias_correction: GPTQ-style weight rounding and empirical bias correction on/off.
        input_compensation: weight rounding also absorbs the error arriving at each layer's input (target:
            the float model's output).
        reconstruction / reconstruction_iters: block reconstruction (learned rounding and biases per block
            with the activation quantizers in the loop) on/off, and its optimisation steps per block.
    """

    defaults: ClassVar[dict[str, str]] = {"scales": "pot", "pot_rounding": "objective"}
    legacy: ClassVar[dict[str, str]] = {name: name for name in (
        "outlier_scaling", "alpha_pot", "channel_shift", "ptf", "lut_zero_point", "lut_thresholds",
        "weight_rounding", "input_compensation", "bias_correction", "reconstruction", "reconstruction_iters")}
    outlier_scaling: bool = _option(True, "hfq: skip outlier scaling (ablation)")
    alpha_pot: bool = _option(True, "hfq: outlier-scaling factors 2^k or float", "--alpha",
                              choices={"pot": True, "float": False})
    channel_shift: bool = _option(True, "hfq: do not centre the input channels of layers that read a norm "
                                        "(ablation)")
    ptf: bool = _option(True, "hfq: no per-channel power-of-two factors on LayerNorm inputs (ablation)")
    lut_zero_point: bool = _option(True, "hfq: symmetric grids on lookup-table inputs, no zero-point search "
                                         "(ablation)")
    lut_thresholds: bool = _option(True, "hfq: uniform grids on lookup-table inputs instead of threshold grids "
                                         "(ablation)")
    weight_rounding: bool = _option(True, "hfq: round weights to nearest (ablation)")
    input_compensation: bool = _option(True, "hfq: weight rounding ignores the error arriving at each layer's "
                                             "input (ablation)")
    bias_correction: bool = _option(True, "hfq: skip bias correction (ablation)")
    reconstruction: bool = _option(True, "hfq: skip block reconstruction, the learned rounding and biases per "
                                         "block (ablation; faster)")
    reconstruction_iters: int = _option(300, "hfq: optimisation steps per block")

    def __post_init__(self) -> None:
        _check(self.reconstruction_iters >= 0, "--reconstruction-iters must be >= 0")


#: every flat key a config stored before per-method configs may hold besides QuantConfig's own
_LEGACY_KEYS = frozenset(k for c in METHOD_CONFIGS.values() for k in c.legacy)


def method_default(method: str, name: str) -> str:
    """The value ``QuantConfig(method=method)`` gives the method-dependent field ``name``."""
    return METHOD_CONFIGS[method].defaults.get(name, BASE_DEFAULTS[name])


def describe_method_default(name: str) -> str:
    """``'pot for hfq, float for the other methods'``: the per-method default of ``name``, for help texts."""
    special = [f"{c.defaults[name]} for {m}" for m, c in METHOD_CONFIGS.items() if name in c.defaults]
    return ", ".join([*special, f"{BASE_DEFAULTS[name]} for the other methods" if special else BASE_DEFAULTS[name]])


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
        shift_terms: requantization multipliers as a sum of this many powers of two.
        sqnr_images: calibration images used for the per-layer SQNR table.
        options: the method's own options (its :class:`MethodConfig`, e.g. :class:`HfqConfig`); unset
            (``None``): that class's defaults.

    ``scales``, ``pot_rounding`` and ``options`` are resolved in ``__post_init__``, so every instance holds
    concrete values. :meth:`build` takes the method's options as keywords too.
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
    shift_terms: int = 1
    sqnr_images: int = 32
    options: MethodConfig | None = None  # None: METHOD_CONFIGS[method]()

    def __post_init__(self) -> None:
        _check(self.method in METHOD_CONFIGS,
               f"unknown method '{self.method}' (choose from {', '.join(sorted(METHOD_CONFIGS))})")
        options_class = METHOD_CONFIGS[self.method]
        if self.options is None:
            object.__setattr__(self, "options", options_class())
        _check(type(self.options) is options_class,
               f"method '{self.method}' takes {options_class.__name__} options, not {type(self.options).__name__}")
        for name in BASE_DEFAULTS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, method_default(self.method, name))
        for name in ("wbits", "abits", "input_bits"):
            value = getattr(self, name)
            _check(value in BITS_ALLOWED, f"--{name} must be one of 2-8 or 16, got {value}")
        _check(self.scales in SCALES, f"--scales must be one of {SCALES}, got '{self.scales}'")
        _check(self.pot_rounding in POT_ROUNDING, f"--pot-rounding must be one of {POT_ROUNDING}")
        _check(self.act_symmetry in ACT_SYMMETRY, f"act_symmetry must be one of {ACT_SYMMETRY}")
        _check(self.shift_terms in (1, 2), f"--shift-terms must be 1 or 2, got {self.shift_terms}")
        _check(self.sqnr_images >= 1, "sqnr_images must be >= 1")
        object.__setattr__(self, "float_ops", tuple(self.float_ops))

    @classmethod
    def build(cls, method: str = DEFAULT_METHOD, **kwargs: Any) -> QuantConfig:
        """A config from keywords of both kinds: ``QuantConfig``'s fields and ``method``'s options, e.g.
        ``QuantConfig.build(method="hfq", wbits=6, reconstruction_iters=20)``."""
        _check(method in METHOD_CONFIGS,
               f"unknown method '{method}' (choose from {', '.join(sorted(METHOD_CONFIGS))})")
        own, option_names = _shared_fields(), {f.name for f in dataclasses.fields(METHOD_CONFIGS[method])}
        unknown = sorted(set(kwargs) - own - option_names)
        _check(not unknown, f"not an option of {method}: {', '.join(unknown)}")
        options = METHOD_CONFIGS[method](**{k: v for k, v in kwargs.items() if k in option_names})
        return cls(method=method, options=options, **{k: v for k, v in kwargs.items() if k in own})

    @property
    def pot(self) -> bool:
        return self.scales == "pot"

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["float_ops"] = list(self.float_ops)
        d["options"] = self.options.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """The config of ``to_dict``'s form, or of the flat form stored before configs were per method (its
        options of other methods, which did not change the model, are dropped)."""
        data = dict(data)
        method = data.get("method", DEFAULT_METHOD)
        _check(method in METHOD_CONFIGS,
               f"unknown method '{method}' (choose from {', '.join(sorted(METHOD_CONFIGS))})")
        options_class = METHOD_CONFIGS[method]
        if "options" in data:
            options = options_class.from_dict(data.pop("options"))
        else:
            options = options_class(**{options_class.legacy[k]: data[k] for k in options_class.legacy if k in data})
            data = {k: v for k, v in data.items() if k not in _LEGACY_KEYS}
        unknown = sorted(set(data) - _shared_fields())
        _check(not unknown, f"unknown config keys: {', '.join(unknown)}")
        return cls(**data, options=options)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with ``changes``: ``QuantConfig``'s fields and the method's options by name. A new
        ``method`` starts from its own default options."""
        method = changes.pop("method", self.method)
        options = changes.pop("options", self.options if method == self.method else None)
        option_changes = {k: changes.pop(k) for k in list(changes) if k not in _shared_fields()}
        if option_changes:
            base = options if options is not None else METHOD_CONFIGS[method]()
            names = {f.name for f in dataclasses.fields(base)}
            unknown = sorted(set(option_changes) - names)
            _check(not unknown, f"not an option of {method}: {', '.join(unknown)}")
            options = dataclasses.replace(base, **option_changes)
        return dataclasses.replace(self, method=method, options=options, **changes)


def _shared_fields() -> set[str]:
    """``QuantConfig``'s own fields, ``options`` aside."""
    return {f.name for f in dataclasses.fields(QuantConfig)} - {"options"}


def field_defaults() -> dict[str, Any]:
    """Each ``QuantConfig`` field's default (``None`` for the per-method ones), for the CLI's options."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(QuantConfig):
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out
