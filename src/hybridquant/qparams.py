"""Quantization parameters of one tensor and how they are chosen from a range.

The pipeline, as in Brevitas: statistics (:mod:`observers`) -> float scale
(:func:`range_to_qparams`) -> restriction (:func:`restrict_pot`) -> integer
rounding (:mod:`primitives`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .primitives import (
    fake_quantize,
    log2_fake_quantize,
    log_sqrt2_fake_quantize,
    pot_scale,
    qrange,
    round_half_up,
    threshold_fake_quantize,
    threshold_table,
    twin_fake_quantize,
    two_term_round,
)


@dataclass
class QParams:
    """Scale, zero point and integer range of a quantized tensor.

    ``axis`` is ``None`` for per-tensor parameters, else the channel dim of the
    per-channel ``scale``. ``grid``: where the codes lie — ``'uniform'`` (``scale·(q − zero_point)``) or:

    * ``'log2'``: FQ-ViT's log2 quantizer (values 2^-q, ``scale`` unused);
    * ``'log_sqrt2'``: RepQ-ViT's log√2 quantizer (values 2^(-q/2), ``scale`` unused);
    * ``'twin'``: PTQ4ViT's twin uniform quantizer (per tensor, zero point 0):
      ``scale`` is the fine range's step and ``scale·2^twin_shift`` the coarse
      one's; ``qmin == 0`` is the post-softmax form, ``qmin < 0`` the
      post-GELU/SiLU form (see :func:`~hybridquant.primitives.twin_fake_quantize`).
    * ``'threshold'``: a non-uniform grid for a tensor read only by a lookup table (hfq): code ``k`` of
      ``0 … qmax`` covers ``[thresholds_k·scale, thresholds_(k+1)·scale)`` (``thresholds``: ``qmax``
      ascending integers on the power-of-two grid ``scale``) and stands for ``levels[k]``; the integer
      program compares the accumulator, shifted to ``scale``, with the thresholds
      (:func:`~hybridquant.primitives.threshold_quantize`).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    bits: int
    axis: int | None = None
    grid: str = "uniform"
    twin_shift: int = 0
    thresholds: torch.Tensor | None = None
    levels: torch.Tensor | None = None
    #: lookup table of a threshold grid (:func:`~hybridquant.primitives.threshold_table`), built on first use
    _table: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def is_pot(self) -> bool:
        """True when every scale is an exact power of two."""
        m, _ = torch.frexp(self.scale.double())
        return bool((m == 0.5).all())

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with these parameters."""
        if self.grid == "log2":
            return log2_fake_quantize(x, self.bits)
        if self.grid == "log_sqrt2":
            return log_sqrt2_fake_quantize(x, self.bits)
        if self.grid == "twin":
            return twin_fake_quantize(x, self.scale, self.twin_shift, self.qmin, self.qmax)
        if self.grid == "threshold":
            if self._table is None:
                self._table = threshold_table(self.thresholds, self.levels)
            return threshold_fake_quantize(x, self.thresholds, self.scale, self.levels, self._table)
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "scale": self.scale.tolist(), "zero_point": self.zero_point.tolist(), "qmin": self.qmin,
            "qmax": self.qmax, "bits": self.bits, "axis": self.axis, "grid": self.grid,
        }
        if self.grid == "twin":
            d["twin_shift"] = self.twin_shift
        if self.grid == "threshold":
            d["thresholds"], d["levels"] = self.thresholds.tolist(), self.levels.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QParams:
        return cls(
            torch.tensor(d["scale"], dtype=torch.float32), torch.tensor(d["zero_point"], dtype=torch.int32),
            # model.hq files written before the rename name the grid "kind"
            int(d["qmin"]), int(d["qmax"]), int(d["bits"]), d["axis"], d.get("grid", d.get("kind", "uniform")),
            int(d.get("twin_shift", 0)),
            torch.tensor(d["thresholds"], dtype=torch.int64) if "thresholds" in d else None,
            torch.tensor(d["levels"], dtype=torch.float32) if "levels" in d else None,
        )

    def summary(self) -> dict[str, Any]:
        """Compact description for reports (scales summarised for per-channel)."""
        s = self.scale
        out: dict[str, Any] = {"bits": self.bits, "signed": self.signed, "grid": self.grid}
        if s.dim() == 0:
            out["scale"] = float(s)
            out["zero_point"] = int(self.zero_point)
        else:
            out["scale_min"], out["scale_max"] = float(s.min()), float(s.max())
            out["channels"] = int(s.numel())
        if self.grid == "twin":
            out["twin_shift"] = self.twin_shift
        if self.grid == "threshold":
            out["levels"] = self.qmax + 1
        out["pot"] = self.is_pot
        return out


def choose_mode(lo: float, hi: float, symmetry: str) -> str:
    """``unsigned``, ``symmetric`` or ``asymmetric`` for a range and the config's policy.

    ``auto``: a range with no negative part is unsigned; a lopsided one (the
    smaller side under half the larger) gets a zero point; the rest is symmetric.
    """
    if symmetry == "symmetric":
        return "unsigned" if lo >= 0 else "symmetric"
    if symmetry == "asymmetric":
        return "asymmetric"
    if lo >= 0:
        return "unsigned"
    small, large = sorted((abs(lo), abs(hi)))
    return "asymmetric" if small < 0.5 * large else "symmetric"


def range_to_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, mode: str, axis: int | None = None) -> QParams:
    """Float qparams covering [lo, hi] (tensors: 0-d or per channel)."""
    lo = torch.as_tensor(lo, dtype=torch.float64).clamp(max=0.0) if mode != "unsigned" else torch.zeros_like(torch.as_tensor(hi, dtype=torch.float64))
    hi = torch.as_tensor(hi, dtype=torch.float64).clamp(min=0.0)
    tiny = 1e-8
    if mode == "symmetric":
        qmin, qmax = qrange(bits, signed=True, narrow=axis is not None)
        scale = torch.maximum(lo.abs(), hi).clamp_min(tiny) / qmax
        zp = torch.zeros_like(scale)
    elif mode == "unsigned":
        qmin, qmax = qrange(bits, signed=False)
        scale = hi.clamp_min(tiny) / qmax
        zp = torch.zeros_like(scale)
    elif mode == "asymmetric":
        qmin, qmax = qrange(bits, signed=False)
        scale = (hi - lo).clamp_min(tiny) / (qmax - qmin)
        zp = torch.clamp(round_half_up(-lo / scale), qmin, qmax)
    else:
        raise ValueError(f"unknown mode {mode}")
    return QParams(scale.float(), zp.to(torch.int32), qmin, qmax, bits, axis)


def with_scale(qp: QParams, scale: torch.Tensor, lo: torch.Tensor | None = None) -> QParams:
    """The same quantizer with another scale; an asymmetric zero point is re-derived from ``lo``."""
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(qp.scale.shape)
    zp = qp.zero_point
    if lo is not None and qp.qmin == 0 and bool((qp.zero_point != 0).any()):
        ref = scale.double()
        if qp.zero_point.shape != scale.shape:  # one zero point shared by per-channel scales (FQ-ViT's
            ref = ref.max()                      # PTF): the widest channel's grid must reach ``lo``
        zp = torch.clamp(round_half_up(-torch.as_tensor(lo, dtype=torch.float64) / ref), qp.qmin, qp.qmax)
        zp = zp.to(torch.int32).reshape(qp.zero_point.shape)
    return dataclasses.replace(qp, scale=scale, zero_point=zp)


def restrict_pot(qp: QParams, mode: str = "round", lo: torch.Tensor | None = None) -> QParams:
    """Replace every scale by 2^k (:func:`~.primitives.pot_exponent`'s ``mode``); zero points follow."""
    return with_scale(qp, pot_scale(qp.scale, mode).float().reshape(qp.scale.shape), lo)


def restrict_two_term(qp: QParams) -> QParams:
    """Replace every scale by the nearest 2^a ± 2^b (weights with ``--shift-terms 2``)."""
    return with_scale(qp, two_term_round(qp.scale))
