"""The package's layers point down (the import-linter contracts in pyproject.toml), and the contracts bite."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli")

ROOT = Path(__file__).resolve().parents[1]


def _lint(config: Path, monkeypatch) -> int:
    monkeypatch.chdir(ROOT)
    return importlinter_cli.lint_imports(config_filename=str(config), no_cache=True, no_logo=True)


def test_the_layers_point_down(monkeypatch):
    assert _lint(ROOT / "pyproject.toml", monkeypatch) == 0


def test_an_upward_import_breaks_the_contract(tmp_path, monkeypatch, capsys):
    """A copy of the package where the lowest layer imports the command line fails the same contracts."""
    pkg = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "hybridquant", pkg / "hybridquant")
    prim = pkg / "hybridquant" / "primitives" / "__init__.py"
    prim.write_text(prim.read_text() + "\nimport hybridquant.cli  # noqa\n")
    monkeypatch.syspath_prepend(str(pkg))
    for name in [m for m in sys.modules if m == "hybridquant" or m.startswith("hybridquant.")]:
        monkeypatch.delitem(sys.modules, name)
    assert __import__("hybridquant").__file__.startswith(str(pkg))  # the copy is what gets analysed
    assert _lint(ROOT / "pyproject.toml", monkeypatch) == 1
    out = capsys.readouterr().out
    assert "layers point down BROKEN" in out and "hybridquant.primitives -> hybridquant.cli" in out


def test_op_knowledge_counts_literals_and_set_references():
    sys.path.insert(0, str(ROOT / "tools"))
    import op_knowledge

    found = op_knowledge.count()
    assert found["hybridquant/graph/capture.py"]["literals"] > 10  # capture maps torch calls to op kinds
    assert found["hybridquant/pipeline.py"] == {"literals": 0, "sets": found["hybridquant/pipeline.py"]["sets"]}
    assert found["hybridquant/pipeline.py"]["sets"] > 0  # names MAC_OPS, no literal
    assert "hybridquant/config.py" not in found and "hybridquant/primitives/__init__.py" not in found
    assert "hybridquant/graph/capture.py" not in op_knowledge.count(exclude=["hybridquant/graph/*"])
