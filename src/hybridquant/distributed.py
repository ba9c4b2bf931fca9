"""Data-parallel evaluation under torchrun: the process group and the collectives evaluation needs.

``torchrun --nproc_per_node N -m hybridquant eval ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. :func:`process_group` joins them
(gloo on the CPU, NCCL on CUDA) only when ``WORLD_SIZE`` > 1: a plain single-process run never touches
``torch.distributed``, and every helper here then acts as the identity.

Each rank evaluates the images :func:`shard_indices` gives it. The shards are disjoint and cover every
image exactly once — unlike ``DistributedSampler``, which pads the shards to one length by repeating
images, and so would count those twice. Integer counts are summed over the ranks with
:func:`all_reduce_ints`, and per-image results are put back into the dataset's order on every rank with
:func:`gather_shards`, so the ranks together return exactly what one process does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun's ``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes in the process group (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process is the one that reports: rank 0, or the only process."""
    return rank() == 0


@contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join torchrun's process group for the block when ``WORLD_SIZE`` > 1; otherwise do nothing.

    The backend follows ``device``, where the ranks compute: NCCL for CUDA, each rank on GPU
    ``LOCAL_RANK``, and gloo for the CPU. The group is destroyed on leaving the block, also on an error.
    A group the caller has already initialised is used as it is and left alone.
    """
    if launched_world_size() <= 1 or dist.is_initialized():
        yield
        return
    if torch.device(device).type == "cuda":
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)  # a plain "cuda" then means this rank's own GPU
        dist.init_process_group(backend="nccl", device_id=local)
    else:
        dist.init_process_group(backend="gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_indices(total: int, rank: int, world: int) -> range:
    """The positions of a ``total``-long dataset that rank ``rank`` of ``world`` evaluates.

    Every ``world``-th position from ``rank`` on: over the ranks the shards are disjoint, cover
    ``range(total)`` once, and hold ``total // world`` positions or one more (the lower ranks), with no
    padding. Striding rather than cutting blocks mixes the classes of a class-sorted ImageFolder evenly
    over the ranks.
    """
    return range(rank, total, world)


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors, gloo only CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_ints(values: Sequence[int]) -> list[int]:
    """``values`` summed element-wise over all ranks, on every rank (``values`` in a single process)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's ``local`` rows, put back into dataset order, on every rank (on the CPU).

    ``local`` holds one row per position of this rank's :func:`shard_indices` shard of a ``total``-long
    dataset, in that order. ``all_gather`` needs tensors of one size and the shards differ by one row, so
    each rank sends its rows zero-padded to the longest shard together with its true row count, and only
    the true rows are kept: no padding reaches the result. In a single process ``local`` is the result.
    """
    if not is_distributed():
        return local
    world, dev = world_size(), _comm_device()
    longest = len(shard_indices(total, 0, world))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: len(local)] = local
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(local)], dtype=torch.int64, device=dev))
    rows = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(rows, padded)
    out = torch.empty((total, *local.shape[1:]), dtype=local.dtype)
    for r in range(world):
        positions = shard_indices(total, r, world)
        count = int(counts[r])
        if count != len(positions):
            raise RuntimeError(f"rank {r} returned {count} results for the {len(positions)} images of its shard")
        out[list(positions)] = rows[r][:count].cpu()
    return out
