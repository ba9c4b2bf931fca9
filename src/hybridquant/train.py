"""A small-data training recipe for timm models on an ImageFolder.

AdamW with linear warm-up then cosine decay, label smoothing, padded random
crop and horizontal flip. Training is resumable: after every epoch the full
state goes to ``<out>.state`` and a later run with the same ``out`` continues
from it. The final checkpoint carries ``pretrained_cfg``, ``class_names``, the
recipe and the eval metrics, so ``hybridquant eval --checkpoint`` needs nothing else.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import __version__
from ._io import atomic_path, check_input_file, check_out_dir, read_torch_file
from .data import (
    DataOverrides,
    channel_stats,
    data_config,
    eval_transform,
    image_folder,
    make_loader,
    train_transform,
)
from .errors import HybridQuantError
from .evaluate import evaluate
from .models import load_model


@dataclass(frozen=True)
class TrainRecipe:
    """Hyper-parameters of :func:`train`; stored in the checkpoint."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise HybridQuantError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise HybridQuantError(f"--batch-size must be positive, got {self.batch_size}")
        if not (0 < self.lr < 1):
            raise HybridQuantError(f"--lr must be in (0, 1), got {self.lr}")
        if not (0 <= self.label_smoothing < 1):
            raise HybridQuantError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")


def lr_at(recipe: TrainRecipe, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimizer ``step``: linear warm-up, then cosine to ``min_lr``."""
    warmup = recipe.warmup_epochs * steps_per_epoch
    total = recipe.epochs * steps_per_epoch
    if step < warmup:
        return recipe.lr * min(1.0, (step + 1) / warmup)  # a fractional warm-up must not overshoot
    progress = (step - warmup) / max(1.0, total - warmup)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * progress))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on norms and biases, as usual for ViT-style models.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    model_name: str,
    data_root: str | Path,
    out: str | Path,
    recipe: TrainRecipe,
    overrides: DataOverrides,
    device: str = "cpu",
    workers: int = 2,
    eval_every: int = 5,
    init_checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``model_name`` from scratch on ``data_root/train``; write a checkpoint to ``out``.

    Returns the checkpoint's metrics (final top-1/top-5 on the eval split).
    """
    out = Path(out)
    state_path = out.with_name(out.name + ".state")
    # a bad output path or starting checkpoint fails now, not after the epochs
    if out.is_dir():
        raise HybridQuantError(f"checkpoint path {out} is a directory; give a file name")
    check_out_dir(out.parent, "checkpoint folder")
    if init_checkpoint is not None:
        check_input_file(init_checkpoint, "checkpoint")
    torch.manual_seed(recipe.seed)

    train_set = image_folder(data_root, "train")
    eval_set = image_folder(data_root, "eval")
    if eval_set.classes != train_set.classes:
        raise HybridQuantError("the train and eval splits have different class folders")
    if len(train_set) < recipe.batch_size:  # drop_last would leave no step at all
        raise HybridQuantError(
            f"--batch-size {recipe.batch_size} is larger than the {len(train_set)} training images"
        )
    loaded = load_model(
        model_name, init_checkpoint, num_classes=len(train_set.classes), img_size=overrides.img_size
    )
    model = loaded.model
    if init_checkpoint is not None and loaded.num_classes != len(train_set.classes):
        raise HybridQuantError(f"{init_checkpoint} has {loaded.num_classes} classes, the data {len(train_set.classes)}")
    if overrides.mean is None or overrides.std is None:
        mean, std = channel_stats(train_set, seed=recipe.seed)
        overrides = DataOverrides(
            overrides.img_size, overrides.mean or mean, overrides.std or std,
            overrides.interpolation, overrides.crop_pct,
        )
    cfg = data_config(loaded.data_cfg, overrides)
    train_set.transform = train_transform(cfg)
    eval_set.transform = eval_transform(cfg)

    model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if state_path.exists():
        try:  # our own file (optimizer state and all): a full load
            state = read_torch_file(state_path, "training state", weights_only=False, map_location=device)
        except HybridQuantError as exc:
            raise HybridQuantError(f"{exc}; delete it to start over") from exc
        if not isinstance(state, dict) or state.get("recipe") != asdict(recipe) or state.get("model") != loaded.name:
            raise HybridQuantError(f"{state_path} was written by a different run; delete it to start over")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        torch.set_rng_state(state["rng"])

    steps_per_epoch = len(train_set) // recipe.batch_size
    t_start = time.time()
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        loader = make_loader(train_set, recipe.batch_size, workers, shuffle=True, seed=recipe.seed + epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False, mininterval=5)
        loss_sum, seen = 0.0, 0
        for i, (x, y) in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(recipe, epoch * steps_per_epoch + i, steps_per_epoch)
            x = x.to(device, memory_format=torch.channels_last)
            loss = criterion(model(x), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "seconds": time.time() - t_start}
        if (epoch + 1) % eval_every == 0 or epoch + 1 == recipe.epochs:
            model.eval()
            result = evaluate(model, make_loader(eval_set, 256, workers), device, progress=False)
            row.update({"top1": result.top1, "top5": result.top5, "images": result.images})
        history.append(row)
        tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        with atomic_path(state_path) as tmp:
            torch.save(
                {
                    "model": loaded.name, "recipe": asdict(recipe), "epoch": epoch + 1,
                    "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "history": history, "rng": torch.get_rng_state(),
                },
                tmp,
            )

    model.eval().to("cpu").to(memory_format=torch.contiguous_format)
    metrics = {k: history[-1][k] for k in ("top1", "top5", "images") if k in history[-1]}
    ckpt = {
        "model": loaded.name,
        "state_dict": {k: v.contiguous() for k, v in model.state_dict().items()},
        "num_classes": len(train_set.classes),
        "class_names": list(train_set.classes),
        "pretrained_cfg": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "recipe": {**asdict(recipe), "data": str(data_root), "augment": "resize, reflect-pad crop, hflip",
                   "init_checkpoint": str(init_checkpoint) if init_checkpoint else None},
        "metrics": {**metrics, "history": history},
        "hybridquant_version": __version__,
    }
    with atomic_path(out) as tmp:
        torch.save(ckpt, tmp)
    state_path.unlink(missing_ok=True)
    return metrics
