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


def _op_knowledge():
    sys.path.insert(0, str(ROOT / "tools"))
    import op_knowledge

    return op_knowledge


def test_op_knowledge_outside_the_op_table_is_capture_report_and_reader():
    """Issue 24: at most three modules outside the op table name op kinds — graph capture (torch calls to
    op kinds), report grouping and the standalone numpy reader of exported programs."""
    found = _op_knowledge().count()
    assert found["hybridquant/graph/capture.py"]["literals"] > 10  # capture maps torch calls to op kinds
    outside = sorted(rel for rel in found if not rel.startswith("hybridquant/ops/"))
    assert outside == ["hybridquant/export/reader.py", "hybridquant/graph/capture.py", "hybridquant/report.py"]
    assert "hybridquant/graph/capture.py" not in _op_knowledge().count(exclude=["hybridquant/graph/*"])


def test_op_knowledge_counts_literals_set_references_and_not_field_names(tmp_path):
    pkg = tmp_path / "hybridquant"
    pkg.mkdir()
    (pkg / "walker.py").write_text('def f(node, graph):\n    """Reads "conv2d" in a docstring."""\n'
                                   '    return node.op == "input" or node.op in MAC_OPS\n')
    (pkg / "fields.py").write_text('def g(row, F, x):\n    return row["input"], {"output": 1}, '
                                   'F.cross_entropy(x, x, reduction="sum")\n')
    (pkg / "kinds.py").write_text('KINDS = {"conv2d": 1, "input": 2}\n')
    found = _op_knowledge().count(root=pkg)
    assert found["hybridquant/walker.py"] == {"literals": 1, "sets": 1, "field_names": 0}
    assert "hybridquant/fields.py" not in found  # plain words as field names only
    assert found["hybridquant/kinds.py"]["literals"] == 1 and found["hybridquant/kinds.py"]["field_names"] == 1
