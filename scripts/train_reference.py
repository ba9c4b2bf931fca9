#!/usr/bin/env python3
"""Independent reference trainer: timm ``mobilevit_xxs`` on a CIFAR-10 ImageFolder at 64x64.

This script deliberately does NOT import ``hybridquant``. It is a plain
PyTorch + torchvision + timm training loop with its own recipe and its own
evaluation loop, so that its checkpoint can check ``hybridquant eval
--checkpoint`` against an outside source: hybridquant must reproduce the
top-1 that this script measures and stores as ``reference_top1``.

Recipe: SGD (momentum 0.9, Nesterov), one-cycle learning rate peaking at 0.1,
weight decay 5e-5 on weights (not on norms and biases), label smoothing 0.1,
gradient-norm clipping at 5; images are upsampled bilinearly from 32x32 to
64x64, then reflect-padded random crop and horizontal flip; normalised with
CIFAR-10's mean and std.

The checkpoint is ``torch.save({'state_dict', 'pretrained_cfg', 'reference_top1',
'recipe'})`` with ``pretrained_cfg`` in timm's terms (input 64, bilinear,
crop_pct 1.0, CIFAR-10 mean/std).

Example (a smoke run on a tiny folder)::

    python scripts/train_reference.py --data DIR --epochs 1 --max-steps 3 --batch-size 4 --out ref.pt
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

ARCH = "mobilevit_xxs"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ (or val/)")
    p.add_argument("--out", default="reference_mobilevit_xxs_cifar10.pt", help="checkpoint to write")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=5e-5)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--warmup-frac", type=float, default=0.15, help="fraction of steps spent warming up")
    p.add_argument("--clip-grad", type=float, default=5.0, help="max gradient norm (0 disables)")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for training (CUDA only)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke tests)"
    )
    p.add_argument("--log-every", type=int, default=50, help="print the running loss every N steps")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "img_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_steps is not None and args.max_steps <= 0:
        p.error("--max-steps must be positive")
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def find_eval_split(root: Path) -> Path:
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / name
    sys.exit(f"train_reference: {root} has no test/ or val/ folder")


def build_data(args: argparse.Namespace) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    root = Path(args.data)
    if not (root / "train").is_dir():
        sys.exit(f"train_reference: {root} has no train/ folder")
    size = args.img_size
    bilinear = T.InterpolationMode.BILINEAR
    train_tf = T.Compose(
        [
            T.Resize((size, size), interpolation=bilinear),
            T.RandomCrop(size, padding=size // 8, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )
    # Resize the short side, then centre-crop: timm's eval transform at crop_pct 1.0.
    test_tf = T.Compose(
        [
            T.Resize(size, interpolation=bilinear),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )
    train_set = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    test_set = datasets.ImageFolder(str(find_eval_split(root)), transform=test_tf)
    if train_set.classes != test_set.classes:
        sys.exit("train_reference: train and test have different class folders")
    return train_set, test_set


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def top1_accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, int]:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        logits = model(images.to(device, non_blocking=True)).float()
        correct += (logits.argmax(dim=1).cpu() == labels).sum().item()
        total += labels.numel()
    return correct / max(total, 1), total


def save_atomically(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_amp = args.amp and device.type == "cuda"
    seed_everything(args.seed)

    train_set, test_set = build_data(args)
    num_classes = len(train_set.classes)
    if len(train_set) < args.batch_size:
        sys.exit(
            f"train_reference: --batch-size {args.batch_size} exceeds the {len(train_set)} training images"
        )
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        worker_init_fn=seed_worker,
        generator=generator,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    test_loader = DataLoader(test_set, batch_size=256, shuffle=False, num_workers=args.workers)

    model = timm.create_model(ARCH, num_classes=num_classes).to(device)
    optimizer = torch.optim.SGD(
        param_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum, nesterov=True
    )
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=args.lr,
        total_steps=max(total_steps, 2),
        pct_start=args.warmup_frac,
        anneal_strategy="cos",
        div_factor=25.0,
        final_div_factor=1e3,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    print(
        f"train_reference: {ARCH}, {num_classes} classes, {len(train_set)} train / {len(test_set)} test images, "
        f"{args.img_size}x{args.img_size}, {total_steps} steps on {device}",
        flush=True,
    )

    step = 0
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        loss_sum, seen = 0.0, 0
        for images, labels in train_loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = criterion(model(images), labels)
            if not math.isfinite(loss.item()):
                sys.exit(f"train_reference: loss became {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            schedule.step()
            step += 1
            loss_sum += loss.item() * labels.numel()
            seen += labels.numel()
            if args.log_every and step % args.log_every == 0:
                print(
                    f"  step {step}/{total_steps} loss {loss_sum / seen:.4f} lr {schedule.get_last_lr()[0]:.5f}",
                    flush=True,
                )
            if step >= total_steps:
                break
        print(
            f"epoch {epoch + 1}/{args.epochs} train_loss {loss_sum / max(seen, 1):.4f} "
            f"elapsed {time.time() - start:.0f}s",
            flush=True,
        )
        if step >= total_steps:
            break

    model.eval()
    top1, images = top1_accuracy(model, test_loader, device)
    print(f"reference top-1: {top1:.4f} on {images} test images", flush=True)

    model.to("cpu")
    checkpoint = {
        "state_dict": {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
        "pretrained_cfg": {
            "input_size": [3, args.img_size, args.img_size],
            "mean": list(CIFAR10_MEAN),
            "std": list(CIFAR10_STD),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        },
        "reference_top1": float(top1),
        "recipe": {
            "script": "scripts/train_reference.py",
            "arch": ARCH,
            "num_classes": num_classes,
            "data": str(args.data),
            "epochs": args.epochs,
            "steps": step,
            "batch_size": args.batch_size,
            "optimizer": f"SGD(momentum={args.momentum:g}, nesterov=True)",
            "lr": args.lr,
            "schedule": f"OneCycleLR(pct_start={args.warmup_frac}, cos, div 25, final_div 1e3), per step",
            "weight_decay": args.weight_decay,
            "label_smoothing": args.label_smoothing,
            "clip_grad": args.clip_grad,
            "augment": "bilinear resize to img_size, reflect-pad random crop (pad img_size/8), hflip",
            "img_size": args.img_size,
            "seed": args.seed,
            "amp": use_amp,
            "eval_images": images,
            "train_seconds": round(time.time() - start, 1),
            "torch": str(torch.__version__),
            "timm": str(timm.__version__),
        },
    }
    save_atomically(checkpoint, Path(args.out))
    print(f"saved {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
