"""Wall time and peak memory of a run's phases, and whether long work shows progress.

A run opens phases by name (``with phase("exponent search"): ...``) wherever the work is, however deep;
the :class:`Phases` recorder that is current (``with Phases() as rec:``) keeps each phase's seconds and
peak resident memory. Phases nest: an outer phase's peak covers its inner ones. Without a current
recorder a phase costs nothing.

Peak RSS per phase comes from the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``), reset at
each phase boundary by writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0); where that is not possible
the process-wide ``ru_maxrss`` is used, so a phase's figure is then the peak *so far*.
"""

from __future__ import annotations

import contextvars
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import heap

_CURRENT: contextvars.ContextVar[Phases | None] = contextvars.ContextVar("hybridquant_phases", default=None)


def _read_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (since the last reset where resets work)."""
    kb = _read_hwm_kb()
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":  # bytes there
            return int(kb)
    return int(kb) * 1024


@dataclass
class _Open:
    name: str
    start: float
    peak: int = 0


@dataclass
class Phases:
    """Per-phase ``{"seconds", "peak_rss_mb", "depth"}`` of one run, in the order the phases first opened
    (``depth``: how many phases enclose it); a phase opened twice accumulates its seconds and keeps the
    larger peak. ``progress`` is what long loops ask
    (:func:`progress_enabled`) before drawing a bar."""

    progress: bool = True
    records: dict[str, dict[str, float]] = field(default_factory=dict)
    peak: int = 0
    _stack: list[_Open] = field(default_factory=list)
    _token: Any = None
    _resets: bool = True

    def __enter__(self) -> Phases:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._fold()
        _CURRENT.reset(self._token)

    def _fold(self) -> None:
        """Fold the high-water mark since the last boundary into every open phase, and reset it (after
        handing freed heap back, so that the next phase's peak is not the last one's leftovers)."""
        hwm = peak_rss_bytes()
        self.peak = max(self.peak, hwm)
        for p in self._stack:
            p.peak = max(p.peak, hwm)
        heap.release()
        if self._resets:
            self._resets = _reset_hwm()

    @contextmanager
    def open(self, name: str) -> Iterator[None]:
        self._fold()
        rec = self.records.setdefault(name, {"seconds": 0.0, "peak_rss_mb": 0.0, "depth": len(self._stack)})
        self._stack.append(_Open(name, time.perf_counter()))
        try:
            yield
        finally:
            self._fold()
            p = self._stack.pop()
            rec["seconds"] = round(rec["seconds"] + time.perf_counter() - p.start, 2)
            rec["peak_rss_mb"] = max(rec["peak_rss_mb"], round(p.peak / 2**20, 1))

    def summary(self) -> dict[str, Any]:
        """JSON-ready: ``phases`` (name -> seconds, peak_rss_mb) and the run's ``peak_rss_mb``."""
        self._fold()
        return {"phases": {k: dict(v) for k, v in self.records.items()}, "peak_rss_mb": round(self.peak / 2**20, 1)}


def current() -> Phases | None:
    """The recorder of the run in progress, if any."""
    return _CURRENT.get()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Record the enclosed work as phase ``name`` of the current run (nothing without one)."""
    rec = _CURRENT.get()
    if rec is None:
        yield
        return
    with rec.open(name):
        yield


def progress_enabled(default: bool = False) -> bool:
    """Whether long loops draw progress bars: the current run's choice, else ``default``."""
    rec = _CURRENT.get()
    return default if rec is None else rec.progress
