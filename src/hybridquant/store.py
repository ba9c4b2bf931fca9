"""Values over the calibration images in bounded memory.

The calibration walkers (outlier scaling, the exponent search, block reconstruction) read a tensor's value
on every calibration image many times — once per candidate — so they keep it. At 256×256 one MobileNetV2
activation of MobileViT-S is ~8 MB per image, and a walker holds several: kept whole, memory grows with the
calibration images (the issue measured ~90 MB per image). Here such a value is a :class:`Stored`: per-chunk
tensors of a few images each (the walkers compute chunk by chunk, so their working memory is one chunk's),
held in memory while the :class:`Workspace`'s budget allows and beyond it written to a file in the spill
folder, read back with plain file reads (not memory-mapped, so a spilled value never counts in resident
memory). Values are stored exactly (float32): spilling changes speed, never a result.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

#: the largest activation of one chunk (of every image in it) the walkers aim for: a chunk's working set
#: is up to ~8 such tensors (a consumer's inputs, target, candidate value, output, error), read back from
#: disk once values spill; 64 MiB keeps that near 0.5 GiB (256 MiB: the exponent search of mobilevit_xxs at
#: 256×256 peaked ~1.75 GB higher with 256 calibration images, mostly spilled, than with 64, mostly held)
CHUNK_BYTES = 64 * 2**20
MIN_BUDGET, MAX_BUDGET = 128 * 2**20, 4 * 2**30
#: the share of physical memory the default budget takes
BUDGET_SHARE = 96


def default_budget() -> int:
    """Bytes of calibration values kept in memory by default: 1/:data:`BUDGET_SHARE` of the machine's
    physical memory (~250 MB of 24 GB), within [:data:`MIN_BUDGET`, :data:`MAX_BUDGET`]. Small on purpose:
    a spilled chunk is written to a file that the kernel keeps in its page cache while memory is free, so
    spilling costs copies, not disk reads, and the page cache is given back under memory pressure where the
    process's own memory is not. Measured with ``benchmarks/scale.py`` (mobilevit_xxs, 256×256): the larger
    the budget, the more the peak RSS rose from 64 to 256 calibration images, as the stored values filled
    it (a tenth of the memory: 1.33×, 1/48: 1.23×), and the time did not fall (903 → 824 s at 256 images
    from the tenth to 1/48)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return int(min(max(total // BUDGET_SHARE, MIN_BUDGET), MAX_BUDGET))


class Workspace:
    """Memory budget and spill folder of one quantization run.

    ``budget_bytes``: how many bytes of :class:`Stored` chunks stay in memory; chunks beyond it go to files
    under ``spill_dir`` (a temporary folder when None), deleted when their value is freed.
    ``chunk_bytes``: the activation size a chunk of images aims at (:meth:`chunk_images`).
    """

    def __init__(self, budget_bytes: int | None = None, spill_dir: str | Path | None = None,
                 chunk_bytes: int = CHUNK_BYTES):
        self.budget = default_budget() if budget_bytes is None else int(budget_bytes)
        if self.budget < 0:
            raise ValueError("memory budget must be >= 0")
        self.chunk_bytes = chunk_bytes
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._spill_dir: Path | None = None
        self.resident = 0
        self.peak_resident = 0
        self.spilled_bytes = 0  # written to disk in all

    def chunk_images(self, image_bytes: int, cap: int | None = None) -> int:
        """Images per chunk when the largest activation takes ``image_bytes`` per image (at most ``cap``)."""
        n = max(1, self.chunk_bytes // max(int(image_bytes), 1))
        return n if cap is None else max(1, min(n, cap))

    def spill_dir(self) -> Path:
        if self._spill_dir is None:
            if self._spill_root is not None:
                self._spill_root.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="hq-spill-", dir=self._spill_root))
        return self._spill_dir

    def stats(self) -> dict[str, float]:
        """What the run kept and spilled (MiB), for the report."""
        return {"budget_mb": round(self.budget / 2**20, 1), "peak_resident_mb": round(self.peak_resident / 2**20, 1),
                "spilled_mb": round(self.spilled_bytes / 2**20, 1)}

    def close(self) -> None:
        """Remove the spill folder (every spilled value is gone with it)."""
        if self._spill_dir is not None:
            for f in self._spill_dir.iterdir():
                f.unlink(missing_ok=True)
            self._spill_dir.rmdir()
            self._spill_dir = None

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Spilled:
    """One chunk in a file: its dtype, shape and byte offset."""

    __slots__ = ("dtype", "shape", "offset")

    def __init__(self, dtype: torch.dtype, shape: torch.Size, offset: int):
        self.dtype, self.shape, self.offset = dtype, shape, offset


_NP = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16, torch.int64: np.int64,
       torch.int32: np.int32}


class Stored:
    """A tensor over calibration images, as chunks of consecutive images (image-major rows: a chunk of
    ``b`` images has ``b·r`` rows, ``r`` rows per image — e.g. MobileViT's unfolded patches)."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.chunks: list[torch.Tensor | _Spilled] = []
        self.images: list[int] = []  # images per chunk
        self._file: Path | None = None
        self._size = 0

    @classmethod
    def of(cls, ws: Workspace, chunks: list[torch.Tensor], images: list[int] | None = None) -> Stored:
        """A value made of ``chunks`` (``images``: images per chunk, default their first dims)."""
        s = cls(ws)
        for i, c in enumerate(chunks):
            s.append(c, images[i] if images is not None else c.shape[0])
        return s

    def append(self, t: torch.Tensor, images: int) -> None:
        """Add the next chunk (``images`` images); kept in memory within the budget, else spilled."""
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if t.untyped_storage().nbytes() > nbytes:
            t = t.clone()  # a view (a slice of q/k/v, a split) would keep its whole base alive, uncounted
        if self.ws.resident + nbytes <= self.ws.budget:
            self.chunks.append(t)
            self.ws.resident += nbytes
            self.ws.peak_resident = max(self.ws.peak_resident, self.ws.resident)
        else:
            self.chunks.append(self._spill(t))
        self.images.append(int(images))

    def _spill(self, t: torch.Tensor) -> _Spilled:
        if self._file is None:
            fd, path = tempfile.mkstemp(dir=self.ws.spill_dir(), suffix=".bin")
            os.close(fd)
            self._file = Path(path)
        arr = t.contiguous().cpu().numpy()
        with open(self._file, "ab") as f:
            arr.tofile(f)  # no bytes copy of the chunk
        chunk = _Spilled(t.dtype, t.shape, self._size)
        self._size += arr.nbytes
        self.ws.spilled_bytes += arr.nbytes
        return chunk

    def _read(self, c: _Spilled, row_lo: int = 0, row_hi: int | None = None) -> torch.Tensor:
        rows = c.shape[0]
        row_hi = rows if row_hi is None else row_hi
        per_row = int(np.prod(c.shape[1:])) if len(c.shape) > 1 else 1
        dt = _NP[c.dtype]
        itemsize = np.dtype(dt).itemsize
        assert self._file is not None
        arr = np.fromfile(self._file, dtype=dt, count=(row_hi - row_lo) * per_row,
                          offset=c.offset + row_lo * per_row * itemsize)
        return torch.from_numpy(arr).reshape(row_hi - row_lo, *c.shape[1:])

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def num_images(self) -> int:
        return sum(self.images)

    def chunk(self, i: int) -> torch.Tensor:
        """Chunk ``i`` as a tensor (read back from disk when spilled)."""
        c = self.chunks[i]
        return c if isinstance(c, torch.Tensor) else self._read(c)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self.chunks)):
            yield self.chunk(i)

    def rows(self, images: torch.Tensor) -> torch.Tensor:
        """The rows of the given images (global image indices), in that order."""
        first = self.chunks[0]
        # the spill file is opened once per batch, not once per image
        with open(self._file, "rb") if self._file is not None else nullcontext() as f:
            return gather_rows(self.images, [c.shape[0] for c in self.chunks], first.shape[1:], first.dtype,
                               partial(self._rows_into, f), images)

    def _rows_into(self, f: BinaryIO | None, ci: int, lo: int, hi: int, out: torch.Tensor) -> None:
        c = self.chunks[ci]
        if isinstance(c, torch.Tensor):
            out.copy_(c[lo:hi])
            return
        assert f is not None
        row_bytes = out[0].numel() * out.element_size()
        view = memoryview(out.numpy()).cast("B")  # out is a contiguous slice of gather_rows' buffer
        f.seek(c.offset + lo * row_bytes)
        if f.readinto(view) != (hi - lo) * row_bytes:
            raise OSError(f"spill file {self._file} is shorter than its index")

    def whole(self) -> torch.Tensor:
        """Every chunk concatenated (for small values only)."""
        return torch.cat(list(self))

    def free(self) -> None:
        """Release the memory and the file."""
        for c in self.chunks:
            if isinstance(c, torch.Tensor):
                self.ws.resident -= c.numel() * c.element_size()
        self.chunks, self.images = [], []
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None
            self._size = 0


def gather_rows(images_per_chunk: list[int], rows_per_chunk: list[int], row_shape: Sequence[int],
                dtype: torch.dtype, read_into, images: torch.Tensor) -> torch.Tensor:
    """Rows of the given global image indices (in that order) from chunks of consecutive images; each chunk
    holds the same number of rows for each of its images, and ``read_into(chunk, lo, hi, out)`` writes rows
    ``lo:hi`` into ``out``. One buffer is allocated for the result and filled in place (a batch gathered
    image by image from spilled chunks would otherwise allocate once per image, and fragment the heap)."""
    starts = np.cumsum([0, *images_per_chunk])
    chunk_of = np.searchsorted(starts, images.numpy(), side="right") - 1
    pers = [rows_per_chunk[ci] // images_per_chunk[ci] for ci in chunk_of.tolist()]
    out = torch.empty(sum(pers), *row_shape, dtype=dtype)
    at = 0
    for img, ci, per in zip(images.tolist(), chunk_of.tolist(), pers, strict=True):
        local = img - int(starts[ci])
        read_into(ci, local * per, (local + 1) * per, out[at:at + per])
        at += per
    return out


class Held(list):
    """Chunks held as plain tensors (a small value, or a tensor passed where chunks are read)."""

    @property
    def images(self) -> list[int]:
        return [t.shape[0] for t in self]

    def chunk(self, i: int) -> torch.Tensor:
        return self[i]

    def rows(self, images: torch.Tensor) -> torch.Tensor:
        """The rows of the given images (global indices: one row per image)."""
        return gather_rows(self.images, self.images, self[0].shape[1:], self[0].dtype,
                           lambda ci, lo, hi, out: out.copy_(self[ci][lo:hi]), images)


def as_chunks(x: torch.Tensor | Stored | Mapped | Held) -> Stored | Mapped | Held:
    """``x`` readable chunk by chunk (a tensor is one chunk)."""
    return Held([x]) if isinstance(x, torch.Tensor) else x


class Lazy(Sequence):
    """``n`` chunks computed (or read back) one at a time when indexed: a sequence of tensors that never
    holds them all."""

    def __init__(self, n: int, fn):
        self.n, self.fn = n, fn

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.fn(i)


class Mapped:
    """``fn`` applied to every chunk of ``base`` when read (a value computed on the fly, never stored)."""

    def __init__(self, base: Stored | Mapped | Held, fn):
        self.base, self.fn = base, fn
        self.images = base.images

    def __len__(self) -> int:
        return len(self.base)

    def chunk(self, i: int) -> torch.Tensor:
        return self.fn(self.base.chunk(i))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self.chunk(i)
