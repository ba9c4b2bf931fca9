"""Which modules of ``src/hybridquant`` know op kinds: the count the op table (issue 24) is to bring down.

A module knows op kinds when its code holds any of:

* a string literal that is an op kind (``"conv2d"``, ``"softmax"``, ...: a graph op as the op table
  :mod:`hybridquant.ops` registers it), wherever it stands — a comparison, a dict key, a tuple of kinds;
* a reference to an op-kind set of ``graph.ir`` (``MAC_OPS``, ``LAYOUT_OPS``, ...) other than its definition.

The vocabulary is read from the op table, so the tool imports ``hybridquant.ops`` (and torch) from ``src/``.
Docstrings and comments do not count; replacing strings by constants does not lower the count. The count
is conservative: an op kind counts wherever it stands as a literal, with one exception. An op kind that is
also a plain word (:data:`PLAIN_WORDS`: ``"input"``, ``"output"``, ``"sum"``) is a field name, not an op kind,
where it stands as a subscript key (``row["input"]``), a dict-literal key (``{"output": ...}``) or a keyword
argument's value (``reduction="sum"``); those are reported as ``field names`` and not counted. Prints one
line per module (its count of each kind of reference) and the number of modules; ``--json`` writes the same
as JSON.

Usage::

    python tools/op_knowledge.py [--exclude PATTERN ...] [--json]
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "hybridquant"
#: op kinds that are also plain words: as field names (subscript, dict key, keyword value) they are no op kind
PLAIN_WORDS = frozenset({"input", "output", "sum"})
OP_TABLE = "hybridquant/ops/"


def _vocabulary() -> tuple[frozenset[str], frozenset[str]]:
    """(op kinds: the graph ops of the op table, names of ``graph.ir``'s op-kind sets)."""
    sys.path.insert(0, str(SRC.parent))
    from hybridquant.ops import OP_DEFS

    tree = ast.parse((SRC / "graph" / "ir.py").read_text())
    sets = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name) and t.id.isupper() and t.id.endswith("OPS")}
    return frozenset(OP_DEFS), frozenset(sets)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants (not code)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _field_names(tree: ast.AST) -> set[int]:
    """ids of the plain-word constants that stand as field names: subscript keys, dict keys, keyword values."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            out.add(id(node.slice))
        elif isinstance(node, ast.Dict):
            out.update(id(k) for k in node.keys if k is not None)
        elif isinstance(node, ast.keyword):
            out.add(id(node.value))
    return out


def count(exclude: list[str] | None = None, root: Path = SRC) -> dict[str, dict[str, int]]:
    """``{module path: {"literals": n, "sets": n, "field_names": n}}`` of every module that knows op kinds
    (field names alone do not make a module count); ``root``: the package directory to scan."""
    kinds, set_names = _vocabulary()
    out: dict[str, dict[str, int]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root.parent))
        if any(fnmatch.fnmatch(rel, pat) for pat in exclude or []):
            continue
        tree = ast.parse(path.read_text())
        docs, fields = _docstrings(tree), _field_names(tree)
        found = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and n.value in kinds and id(n) not in docs]
        field_names = sum(1 for n in found if n.value in PLAIN_WORDS and id(n) in fields)
        literals = len(found) - field_names
        defined = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
                   if isinstance(t, ast.Name)}
        refs = sum(1 for n in ast.walk(tree)
                   if (isinstance(n, ast.Name) and n.id in set_names and n.id not in defined)
                   or (isinstance(n, ast.Attribute) and n.attr in set_names)
                   or (isinstance(n, ast.alias) and n.name in set_names))
        if literals or refs:
            out[rel] = {"literals": literals, "sets": refs, "field_names": field_names}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exclude", nargs="*", default=[], help="glob patterns of module paths to leave out "
                                                            "(e.g. the op table: 'hybridquant/ops/*')")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    found = count(args.exclude)
    if args.json:
        json.dump({"modules": len(found), "per_module": found}, sys.stdout, indent=2)
        print()
    else:
        for rel, c in found.items():
            print(f"{rel}: {c['literals']} op-kind literals, {c['sets']} op-set references"
                  + (f" ({c['field_names']} plain-word field names not counted)" if c["field_names"] else ""))
        outside = [rel for rel in found if not rel.startswith(OP_TABLE)]
        print(f"{len(found)} modules know op kinds; {len(outside)} outside the op table ({OP_TABLE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
