"""Top-1 / top-5 evaluation of a classifier, and the paired interval of an accuracy drop.

:func:`evaluate` runs a model over a DataLoader in this process. :func:`evaluate_sharded` runs it over a
dataset and, under ``torchrun --nproc_per_node N``, splits the images over the N ranks (see
:mod:`hybridquant.distributed`): the integer hit counts are summed and the per-image predictions gathered
back into the dataset's order, so every rank returns the single-process result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .data import make_loader
from .distributed import (
    all_reduce_ints,
    gather_shards,
    is_distributed,
    is_main,
    rank,
    shard_indices,
    world_size,
)

#: a torch module, or any function from an image batch to a batch of logits
Model = nn.Module | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    """Accuracy and speed of one evaluation; ``predictions`` are top-1 class ids."""

    top1: float
    top5: float
    images: int
    seconds: float
    predictions: torch.Tensor = field(repr=False)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")

    def summary(self, predictions: bool = False) -> dict[str, Any]:
        """The JSON-ready fields (fractions in 0..1); with ``predictions``, also the per-image top-1 ids."""
        out = {
            "top1": self.top1,
            "top5": self.top5,
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 2),
        }
        if predictions:
            out["predictions"] = self.predictions.tolist()
        return out


def evaluate(model: Model, loader: DataLoader, device: str = "cpu", progress: bool = True,
             desc: str = "eval") -> EvalResult:
    """Run ``model`` over ``loader`` and count top-1 / top-5 hits.

    Top-1 is ``argmax`` (the first of tied logits), the rule every evaluator in
    hybridquant uses — ties are common in quantized logits, and ``topk`` does
    not promise an order among them. The progress bar shows on rank 0 only."""
    start = time.perf_counter()
    hit1, hit5, n, predictions = _count_hits(model, loader, device, progress, desc)
    return EvalResult(hit1 / max(n, 1), hit5 / max(n, 1), n, time.perf_counter() - start, predictions)


def evaluate_sharded(model: Model, dataset: Dataset, batch_size: int, workers: int, device: str = "cpu",
                     progress: bool = True, desc: str = "eval") -> EvalResult:
    """:func:`evaluate` over ``dataset``, split over the ranks when run in a process group.

    In a single process this is ``evaluate`` over ``make_loader(dataset, batch_size, workers)``. In a
    process group (``torchrun``, see :func:`hybridquant.distributed.process_group`) each rank evaluates
    the images of its :func:`~hybridquant.distributed.shard_indices` shard — disjoint shards, no padding
    duplicates —, the top-1 / top-5 hits and image counts are summed over the ranks as integers, and the
    predictions are gathered into the dataset's order; every rank returns the same result, the one a
    single process gets. ``seconds`` runs until the slowest rank has finished (the gather waits for it).
    """
    if not is_distributed():
        return evaluate(model, make_loader(dataset, batch_size, workers), device, progress, desc)
    start = time.perf_counter()
    total = len(dataset)
    shard = Subset(dataset, shard_indices(total, rank(), world_size()))
    hit1, hit5, n, local = _count_hits(model, make_loader(shard, batch_size, workers), device, progress, desc)
    hit1, hit5, n = all_reduce_ints([hit1, hit5, n])
    predictions = gather_shards(local, total)
    return EvalResult(hit1 / max(n, 1), hit5 / max(n, 1), n, time.perf_counter() - start, predictions)


@torch.no_grad()
def _count_hits(model: Model, loader, device: str, progress: bool, desc: str) -> tuple[int, int, int, torch.Tensor]:
    """Top-1 hits, top-5 hits, images, and the per-image top-1 predictions of ``model`` over ``loader``."""
    if isinstance(model, nn.Module):
        model.eval()
    hit1 = hit5 = n = 0
    preds = []
    for x, y in tqdm(loader, desc=desc, disable=not progress or not is_main(), leave=False, mininterval=2):
        logits = model(x.to(device)).float().cpu()
        k = min(5, logits.shape[1])
        pred = logits.argmax(1)
        top = logits.topk(k, dim=1).indices
        hit1 += int((pred == y).sum())
        hit5 += int(((top == y[:, None]).any(dim=1) | (pred == y)).sum())
        n += len(y)
        preds.append(pred)
    return hit1, hit5, n, torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


#: standard errors either side of the drop for its two-sided 95 % interval (normal approximation)
Z_95 = 1.96


def paired_drop(fp32_correct: torch.Tensor, quant_correct: torch.Tensor) -> dict[str, Any]:
    """The top-1 drop (points) of a quantized model against FP32 on the same images, with its interval.

    Only the images that one model gets right and the other wrong carry the difference: with ``b`` of them
    right for FP32 alone and ``c`` for the quantized model alone, out of ``n``, the drop is 100·(b − c)/n and
    its standard error that of the mean per-image difference, 100·sqrt(b + c − (b − c)²/n)/n; the interval is
    drop ± :data:`Z_95` standard errors. It is the sampling error of the evaluation
    images only: the same model on another n images would land in it 95 % of the time. Another calibration
    draw is another model and moves the drop too. Returns the report's fields.
    """
    if fp32_correct.shape != quant_correct.shape or fp32_correct.dim() != 1:
        raise ValueError("paired_drop needs two 1-D hit masks over the same images")
    n = fp32_correct.numel()
    b = int((fp32_correct & ~quant_correct).sum())
    c = int((quant_correct & ~fp32_correct).sum())
    if n == 0:
        return {"fp32_only_correct": 0, "quant_only_correct": 0, "drop_se_pp": 0.0, "drop_ci95_pp": [0.0, 0.0]}
    drop = 100.0 * (b - c) / n
    se = 100.0 * math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    return {"fp32_only_correct": b, "quant_only_correct": c, "drop_se_pp": round(se, 4),
            "drop_ci95_pp": [round(drop - Z_95 * se, 4), round(drop + Z_95 * se, 4)]}
