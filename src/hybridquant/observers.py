"""Observers: statistics of activations and weights, and the ranges they imply.

An :class:`ActivationObserver` sees every calibration batch of one tensor and
keeps min/max (overall and per channel), running percentile estimates and a
bounded random sample for error-driven searches. Range choosers turn those
statistics into a clipping range: ``minmax``, ``percentile`` and ``mse``
(OMSE: the range whose quantization MSE is smallest).
"""

from __future__ import annotations

import torch

from .qparams import QParams, range_to_qparams


def channel_dim(x: torch.Tensor) -> int:
    """The channel dim of an activation: 1 for NCHW / [B, C] / [B, heads, ...], else last."""
    return 1 if x.dim() in (2, 4) else x.dim() - 1


class ActivationObserver:
    """Statistics of one activation tensor over the calibration batches."""

    def __init__(self, percentile: float = 99.99, per_batch_sample: int = 16384, seed: int = 0):
        self.percentile = percentile
        self.per_batch_sample = per_batch_sample
        self.generator = torch.Generator().manual_seed(seed)
        self.min = float("inf")
        self.max = float("-inf")
        self.ch_min: torch.Tensor | None = None
        self.ch_max: torch.Tensor | None = None
        self.pct_lo: list[float] = []
        self.pct_hi: list[float] = []
        self.samples: list[torch.Tensor] = []
        self.count = 0
        self.axis: int | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.axis = channel_dim(x)
        flat = x.flatten()
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        per_ch = x.transpose(0, self.axis).flatten(1)
        cmin, cmax = per_ch.min(1).values, per_ch.max(1).values
        self.ch_min = cmin if self.ch_min is None else torch.minimum(self.ch_min, cmin)
        self.ch_max = cmax if self.ch_max is None else torch.maximum(self.ch_max, cmax)
        n = flat.numel()
        k_hi = max(1, min(n, int(round(n * self.percentile / 100.0))))
        k_lo = max(1, min(n, int(round(n * (1 - self.percentile / 100.0))) + 1))
        self.pct_hi.append(float(flat.kthvalue(k_hi).values))
        self.pct_lo.append(float(flat.kthvalue(k_lo).values))
        if n > self.per_batch_sample:
            idx = torch.randint(0, n, (self.per_batch_sample,), generator=self.generator)
            self.samples.append(flat[idx])
        else:
            self.samples.append(flat.clone())
        self.count += n

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)

    def channel_absmax(self) -> torch.Tensor:
        assert self.ch_min is not None and self.ch_max is not None
        return torch.maximum(self.ch_min.abs(), self.ch_max.abs())

    def range(self, how: str) -> tuple[float, float]:
        """The clipping range chosen by ``how`` (``minmax`` or ``percentile``)."""
        if how == "minmax":
            return self.min, self.max
        if how == "percentile":
            lo = sum(self.pct_lo) / len(self.pct_lo)
            hi = sum(self.pct_hi) / len(self.pct_hi)
            return min(lo, 0.0) if self.min < 0 else max(lo, self.min), hi
        raise ValueError(f"range '{how}' needs a search; use mse_qparams")


def quant_mse(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Mean squared quantization error of ``x`` under ``qp``."""
    return (qp.fake(x) - x).pow(2).mean()


def mse_qparams(sample: torch.Tensor, lo: float, hi: float, bits: int, mode: str, steps: int = 80) -> QParams:
    """OMSE: shrink [lo, hi] by factors in (0.2, 1] and keep the one with least MSE on ``sample``."""
    best, best_err = None, float("inf")
    for r in torch.linspace(1.0, 0.2, steps).tolist():
        qp = range_to_qparams(torch.tensor(lo * r), torch.tensor(hi * r), bits, mode)
        err = float(quant_mse(sample, qp))
        if err < best_err:
            best, best_err = qp, err
    assert best is not None
    return best


def weight_qparams(weight: torch.Tensor, bits: int, how: str = "minmax", steps: int = 80) -> QParams:
    """Symmetric per-output-channel qparams for ``weight`` (``minmax`` or ``mse`` per channel)."""
    w = weight.detach().flatten(1).float()
    amax = w.abs().max(1).values
    qp = range_to_qparams(-amax, amax, bits, "symmetric", axis=0)
    if how == "minmax":
        return qp
    if how != "mse":
        raise ValueError(f"unknown weight observer '{how}'")
    best_scale = qp.scale.clone()
    best_err = torch.full_like(amax, float("inf"))
    for r in torch.linspace(1.0, 0.3, steps).tolist():
        cand = range_to_qparams(-amax * r, amax * r, bits, "symmetric", axis=0)
        err = (cand.fake(w) - w).pow(2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, cand.scale, best_scale)
    qp.scale = best_scale
    return qp
