"""File handling: atomic writes, and up-front checks of input files and output paths.

An output file is either complete or absent. The checks turn every bad path
(and every unreadable input file) into a one-line :class:`HybridQuantError`
that names the path, so the CLI can refuse it before loading anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import HybridQuantError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed, so a failed run never
    leaves a half-written output behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give outputs the usual permissions (umask applies)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; it replaces ``path`` (a folder or nothing) on success.

    On any exception the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HybridQuantError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def plain(obj: Any) -> Any:
    """A JSON-like copy of ``obj``: dicts, lists, numbers, strings; tensors and arrays as lists."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


# --- checks: every input file and output path, before any work -------------------------------------


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` when it is a readable regular file; else a one-line error naming ``what`` and the path."""
    path = Path(path)
    if not path.exists():
        raise HybridQuantError(f"{what} not found: {path}")
    if path.is_dir():
        raise HybridQuantError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise HybridQuantError(f"{what} {path} is not a regular file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise HybridQuantError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    return path


def _writable_problem(folder: Path) -> str | None:
    """Why no file can be created in the existing ``folder`` (really tried: root ignores permissions), or None."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".hybridquant-probe-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def check_out_dir(path: str | os.PathLike, option: str = "--out-dir", names: Iterable[str] = ()) -> Path:
    """``path`` when it is, or can be created as, a writable folder in which the files ``names`` can be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HybridQuantError(f"{option} {path} is a file, not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:  # the nearest folder that is there
        existing = existing.parent
    if not existing.is_dir():
        raise HybridQuantError(f"{option} {path} cannot be created: {existing} is a file, not a folder")
    problem = _writable_problem(existing)
    if problem:
        where = "" if existing == path else f" ({existing}, where it would be created)"
        raise HybridQuantError(f"{option} {path} is not writable{where}: {problem}")
    for name in names:
        if (path / name).is_dir():
            raise HybridQuantError(f"{option} {path}: {path / name} is a directory; cannot write {name} there")
    return path


def check_out_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` when it names a file that can be written: not a directory, in a writable folder that exists."""
    path = Path(path)
    if path.is_dir():
        raise HybridQuantError(f"{option} {path} is a directory; give a file name")
    folder = path.parent
    if not folder.exists():
        raise HybridQuantError(f"{option} {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise HybridQuantError(f"{option} {path}: {folder} is a file, not a folder")
    problem = _writable_problem(folder)
    if problem:
        raise HybridQuantError(f"{option} {path}: folder {folder} is not writable: {problem}")
    return path


# --- reading: a damaged file is one line that names it, never a library's advice ---------------------


def invalid_file(what: str, path: str | os.PathLike, fmt: str) -> HybridQuantError:
    """The error for a file that is there but cannot be parsed (corrupt, truncated or another format)."""
    return HybridQuantError(f"cannot read {what} {path}: not a valid or complete {fmt} file")


_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def read_torch_file(path: str | os.PathLike, what: str, fmt: str = "torch.save", weights_only: bool = True,
                    map_location: Any = "cpu") -> Any:
    """``torch.load`` of ``path`` with one-line errors (``what`` names the file in them)."""
    import torch

    path = check_input_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except MemoryError:
        raise
    except Exception as exc:  # torch raises many types for a damaged file, with pages of advice
        refused = _REFUSED_GLOBAL.search(str(exc)) if weights_only else None
        if refused:  # a sound file holding pickled objects that a weights-only load does not run
            raise HybridQuantError(f"cannot read {what} {path}: it stores Python objects that a safe "
                                   f"(weights-only) load refuses, e.g. {refused.group(1)}") from exc
        raise invalid_file(what, path, fmt) from exc
