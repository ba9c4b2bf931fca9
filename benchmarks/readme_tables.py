"""Render the benchmark summaries into the README (tables, the sentences that quote them) and a PNG plot.

Every measured figure in README.md (top-1 %, drops and changes in points, agreement, seconds, bytes, dB,
images/s, LSBs, speed-ups) comes from the JSON that ``benchmarks/run.py`` and ``benchmarks/integer_check.sh``
write under ``benchmarks/results/`` (``<suite>_<label>.json`` and ``<suite>/<label>/...``), and this script is
the only thing that copies it there. Each generated part of the README sits between two markers::

    <!-- table:KIND.LABELS -->      (or <!-- text:KIND.LABELS --> for a generated paragraph)
    ...rendered from the JSON...
    <!-- /table:KIND.LABELS -->

``KIND`` names a renderer in ``BLOCKS``; ``LABELS`` are the result labels it reads (``benchmarks/run.py``'s
``--label``, e.g. ``mobilevit_xxs.cifar10``), joined by ``+``; a kind that reads no label has none
(``<!-- table:bundled -->``). Rerunning the script after new benchmark cells replaces every block in place.
To add a block: write ``def my_block(results: Path, *labels: str) -> str``, register it with
``@block("my-kind", labels=N)``, put the markers into the README and run the script.

``--check`` exits 1, listing every problem with its README line, when

1. a block's body differs from what the JSON renders (a hand edit, or results changed without a rerun);
2. a marker names an unknown kind or the wrong number of labels, or a start marker has no end marker;
3. the README *outside* the generated blocks (prose, hand-written tables, inline code and fenced code alike)
   contains a measured figure. A number is a token ``[+-−]digits[,ddd][.digits]`` that is not glued to a
   letter, digit, ``_`` or ``.`` before it (so ``W8A8``, ``int32``, ``mobilevitv2_050``, ``p99.99`` hold none).
   It is a measured figure when

   a. a unit follows it (after at most one blank or line break): ``%``, ``pp``, ``point(s)``, ``s``, ``sec(s)``,
      ``second(s)``, ``ms``, ``min``, ``minute(s)``, ``hour(s)``, ``KB``/``MB``/``GB``/``TB`` (``KiB``...),
      ``byte(s)``, ``dB``, ``LSB(s)``, ``images/s``, ``img/s``, ``times``, or ``×``/``x`` not followed by a
      number (a ratio, ``3×``; ``256×256`` is a size);
   b. it counts images out of a total: ``N of M [test] images``;
   c. it has a decimal part (an agreement ``0.98``, a drop ``0.73``, ``+0.08``), unless it is a dotted
      version (``2.14.1``) or follows a comparison (``≥ 3.10``, ``==``, ``>=``, ``<=``, ``~=``, ``!=``);
   d. it carries a sign (``+1``, ``−15``).

   Plain unsigned integers without a unit pass: bit widths, option values (``--calib 512``), image counts
   (``10,000 test images``), sizes (``64×64``), versions, epochs, years.
4. an allowance is stale. A figure that the rule flags but that is no measurement (a target stated for the
   method, a confidence level, a constant) may stay in prose only where its line ends with
   ``<!-- not-measured: FIGURE; FIGURE -->`` naming the exact text of each such figure (``0.6 points``,
   ``95 %``). The marker exempts those texts on that line only; a named text the line does not hold is an error.

Usage::

    python benchmarks/readme_tables.py                 # rewrite the README's generated blocks and the plots
    python benchmarks/readme_tables.py --no-plot       # the README only
    python benchmarks/readme_tables.py --check         # exit 1 on any of the problems above (CI runs this)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("W8A8", "W6A6", "W4A8")
W6A6_TARGET_PP = 0.6  # the W6A6 drop hfq is held to (points of top-1)
W8A8_AGREEMENT_TARGET = 0.99  # the W8A8 agreement with FP32 aimed for
QUANTIZE_BUDGET_S = 600  # a quantize run is held to 10 minutes
# a marker is a line of its own
MARKER = re.compile(r"^(?P<start><!-- (?P<tag>table|text):(?P<name>[\w.+-]+) -->\n)(?P<body>.*?)"
                    r"^(?P<end><!-- /(?P=tag):(?P=name) -->)$", re.S | re.M)
START = re.compile(r"^<!-- /?(?:table|text):[\w.+-]+ -->$", re.M)

def _load(results: Path, suite: str, model: str) -> list[dict[str, Any]]:
    path = results / f"{suite}_{model}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _setting(row: dict[str, Any]) -> str:
    return f"W{row['wbits']}A{row['abits']}"


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    if row.get("quant_top1") is None:
        return "error"
    return f"{100 * row['quant_top1']:.2f} ({0.0 - row['drop_pp']:+.2f})"  # 0.0 - 0.0 prints +0.00, not -0.00


def _env_line(rows: list[dict[str, Any]]) -> str:
    env = rows[0].get("environment", {})
    keys = ("torch", "timm", "cpu_cores", "torch_threads", "date")
    return ", ".join(f"{k} {env[k]}" for k in keys if k in env)


def _seconds(rows: list[dict[str, Any]]) -> str:
    """The range of ``quantize_seconds`` over ``rows`` (calibration and search, evaluation excluded)."""
    secs = sorted(r["quantize_seconds"] for r in rows if r.get("quant_top1") is not None and "quantize_seconds" in r)
    if not secs:
        return "–"
    lo, hi = round(secs[0]), round(secs[-1])
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _matrix(rows: list[dict[str, Any]], key: str, scales: tuple[str, str]) -> tuple[list[str], list[str]]:
    """Rows of ``key`` × (setting, scales) with a quantize-seconds column; errors become numbered notes."""
    measured = {_setting(r) for r in rows}
    cols = [(s, sc) for s in SETTINGS if s in measured for sc in scales]
    by = {(r[key], _setting(r), r["scales"]): r for r in rows}
    names = list(dict.fromkeys(r[key] for r in rows))
    head = f"| {key} | " + " | ".join(f"{s} {'PoT' if sc == 'pot' else 'float'}" for s, sc in cols) + " | quantize s |"
    lines, notes = [head, "|---" * (len(cols) + 2) + "|"], []
    for name in names:
        cells = []
        for s, sc in cols:
            r = by.get((name, s, sc))
            if r is not None and r.get("quant_top1") is None and r.get("error"):
                err = str(r["error"]).replace("|", "/")[:200]
                if err not in notes:
                    notes.append(err)
                cells.append(f"n/a [{notes.index(err) + 1}]")
            else:
                cells.append(_cell(r))
        mine = [r for r in rows if r[key] == name]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_seconds(mine)} |")
    return lines, [f"[{i + 1}] {n}" for i, n in enumerate(notes)]


def baselines_table(rows: list[dict[str, Any]]) -> str:
    """Methods × (setting, scales): top-1 % (drop in points), and the seconds each method's runs took."""
    if not rows:
        return "_not measured yet: `python benchmarks/run.py --suite baselines`_\n"
    lines, _ = _matrix(rows, "method", ("float", "pot"))
    return _footer(lines, rows, "Top-1 % (change against FP32 in points); quantize s = calibration and search, "
                                "the range over the method's cells")


def ablation_table(rows: list[dict[str, Any]]) -> str:
    """hfq variants × setting: top-1 % (drop) and agreement with FP32."""
    if not rows:
        return "_not measured yet: `python benchmarks/run.py --suite ablation`_\n"
    by = {(r["cell"].rsplit("_", 1)[0], _setting(r)): r for r in rows}
    variants = list(dict.fromkeys(r["cell"].rsplit("_", 1)[0] for r in rows))
    lines = ["| hfq variant (PoT scales) | " + " | ".join(SETTINGS) + " | param +% |", "|---" * (len(SETTINGS) + 2) + "|"]
    for v in variants:
        cells = []
        for s in SETTINGS:
            r = by.get((v, s))
            cells.append(_cell(r) + (f", agree {r['agreement_fp32']:.3f}" if r and r.get("quant_top1") is not None else ""))
        params = max((by[(v, s)]["param_increase_pct"] for s in SETTINGS if (v, s) in by), default=0.0)
        lines.append(f"| {v.replace('-', ' ')} | " + " | ".join(cells) + f" | {params:.2f} |")
    return _footer(lines, rows, "Top-1 % (change against FP32 in points), agreement = fraction of images with the FP32 top-1")


def core_table(rows: list[dict[str, Any]]) -> str:
    """One line per measured cell of the core suite."""
    if not rows:
        return "_not measured yet: `python benchmarks/run.py --suite core`_\n"
    lines = ["| cell | top-1 % | drop (pp) | agreement with FP32 | param +% | quantize s |", "|---" * 6 + "|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {100 * r['quant_top1']:.2f} | {r['drop_pp']:.2f} | {r['agreement_fp32']:.4f} | "
                     f"{r['param_increase_pct']:.2f} | {r['quantize_seconds']:.0f} |")
    return _footer(lines, rows, "Each row one `quantize` run")


def limits_table(rows: list[dict[str, Any]]) -> str:
    """hfq W6A6 with one activation group left in float: what each group's 6-bit quantization costs."""
    if not rows:
        return "_not measured yet: `python benchmarks/run.py --suite limits`_\n"
    base = next((r for r in rows if not r["config"]["float_ops"]), None)
    lines = ["| activations left in float | float_ops | top-1 % | drop (pp) | agreement | agreement change |",
             "|---" * 6 + "|"]
    for r in rows:
        group = r["cell"].split("float-", 1)[1].replace("-", " ")
        ops = ", ".join(f"`{p}`" for p in r["config"]["float_ops"]) or "none"
        change = f"{100 * (r['agreement_fp32'] - base['agreement_fp32']):+.2f}" if base else "n/a"
        lines.append(f"| {group} | {ops} | {100 * r['quant_top1']:.2f} | {r['drop_pp']:.2f} | "
                     f"{r['agreement_fp32']:.4f} | {change} |")
    return _footer(lines, rows, "hfq W6A6 with power-of-two scales, one `quantize` run per row; agreement change in "
                                "points against the fully quantized row")


def peers_table(rows: list[dict[str, Any]]) -> str:
    """Tools × (setting, scales), each tool's own quantized model; what a tool cannot do is spelled out."""
    if not rows:
        return "_not measured yet: `python benchmarks/run.py --suite peers` (needs the `peers` extra)_\n"
    rows = [{**r, "tool": f"{r['tool']} {r.get('version', '')}".strip()} for r in rows]
    lines, notes = _matrix(rows, "tool", ("pot", "float"))
    body = "\n".join(lines) + ("\n\n" + "<br>\n".join(notes) if notes else "")
    return _footer([body], rows, "Top-1 % (change against FP32 in points) of each tool's own quantized model, same "
                                 "calibration and evaluation images; n/a = the tool cannot run that setting, for the "
                                 "reason noted")


def _footer(lines: list[str], rows: list[dict[str, Any]], what: str) -> str:
    first = rows[0]
    return "\n".join(lines) + (
        f"\n\n{what}; FP32 top-1 {100 * first['fp32_top1']:.2f} % on {first['eval_images']} images, "
        f"{first['calib_images']} calibration images. Environment: {_env_line(rows)}.\n")


def _series(results: Path, model: str) -> tuple[dict[str, list], dict[str, list], float | None]:
    """(engine methods with PoT scales, peer tools with PoT and float scales): label -> [(setting index, top-1 %)],
    and the FP32 top-1 (None when nothing is measured)."""
    methods: dict[str, list[tuple[int, float]]] = {}
    tools: dict[str, list[tuple[int, float]]] = {}
    fp32 = None
    for suite in ("core", "baselines", "peers"):
        for r in _load(results, suite, model):
            fp32 = r["fp32_top1"] if fp32 is None else fp32
            if r.get("quant_top1") is None or _setting(r) not in SETTINGS:
                continue
            if suite == "peers":
                if r.get("tool") == "hfq":  # the same method as the engine's hfq line
                    continue
                series, label = tools, f"{r['tool']} ({'PoT' if r['scales'] == 'pot' else 'float'})"
            elif r["scales"] == "pot":
                series, label = methods, r["method"]
            else:
                continue
            x = SETTINGS.index(_setting(r))
            pts = series.setdefault(label, [])
            if all(p[0] != x for p in pts):
                pts.append((x, 100 * r["quant_top1"]))
    return methods, tools, fp32


def plot(results: Path, model: str, out: Path) -> bool:
    """Top-1 against bit width: the engine's methods (PoT scales) and the peer tools, hfq on both panels.

    False when there is nothing to plot.
    """
    methods, tools, fp32 = _series(results, model)
    if not methods and not tools:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("methods in hybridquant, power-of-two scales", methods)]
    if tools:
        panels.append(("peer tools (solid PoT, dotted float) vs hfq PoT",
                       {**tools, **({"hfq": methods["hfq"]} if "hfq" in methods else {})}))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False, sharey=True)
    # hfq keeps orange; everything else cycles through the other colours (a tool's PoT and float share one)
    others = [c for c in plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors if c != plt.get_cmap("tab10")(1)[:3]]
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        bases = sorted({label.split(" (")[0] for label in series} - {"hfq"})
        for label, pts in sorted(series.items()):
            pts = sorted(pts)
            base = label.split(" (")[0]
            color = "tab:orange" if label == "hfq" else others[bases.index(base) % len(others)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ":" if label.endswith("(float)") else "-", marker="o",
                    label=label, linewidth=2.5 if label == "hfq" else 1.2, color=color)
        ax.axhline(100 * fp32, color="k", linewidth=0.8, linestyle=":", label="FP32")
        ax.set_xticks(range(len(SETTINGS)), SETTINGS)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("top-1 %")
    fig.suptitle(model)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return True


def integer_table(results: Path, model: str) -> str:
    """Integer program and ONNX against the simulation (``benchmarks/integer_check.sh``)."""
    path = results / f"integer_{model}.json"
    if not path.exists():
        return "_not measured yet: `bash benchmarks/integer_check.sh`_\n"
    summary = json.loads(path.read_text())
    rows = summary["rows"]
    lines = ["| quantized model | simulation top-1 % | integer top-1 % | integer = simulation (top-1) | "
             "max logit diff (LSB) | integer s | ONNX top-1 % | ONNX − simulation (pp) |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {100 * r['sim_top1']:.2f} | {100 * r['integer_top1']:.2f} | "
                     f"{r['agreement_sim']:.4f} | {r['max_logit_diff_lsb']:g} | {r['integer_seconds']:.0f} | "
                     f"{100 * r['onnx_top1']:.2f} | {r['onnx_minus_sim_pp']:+.2f} |")
    return "\n".join(lines) + (f"\n\n{rows[0]['images']} test images each. Environment: "
                               + _env_line([summary]) + ".\n")


def bundled_table(results: Path) -> str:
    """The bundled models with their measured top-1 (``bundled_eval*.json`` from ``hybridquant eval --out``)."""
    lines = ["| name | top-1 | top-5 | test images | measured by |", "|---|---|---|---|---|"]
    for path in sorted(results.glob("bundled_eval*.json")):
        r = json.loads(path.read_text())
        lines.append(f"| `{r['model']}` | {r['top1']:.4f} | {r['top5']:.4f} | {r['images']} | "
                     f"`hybridquant eval --model {r['model']} --data DIR` (`{path.relative_to(results.parent.parent)}`) |")
    return "\n".join(lines) + "\n"


def runtime_table(results: Path, name: str) -> str:
    """Images per second of each runtime at each thread count, side by side in one run (``benchmarks/runtime.py``)."""
    path = results / "runtime" / f"{name}.json"
    if not path.exists():
        return "_not measured yet: `python benchmarks/runtime.py`_\n"
    r = json.loads(path.read_text())
    speed, ratio = r["images_per_second"], r["ratio_to_python_integer"]
    counts = list(speed)

    def num(v, spec):
        return "—" if v is None else format(v, spec)

    lines = ["| runtime | " + " | ".join(f"images/s, {t} thread{'s' * (t != '1')}" for t in counts) + " | "
             + " | ".join(f"× Python integer, {t} thread{'s' * (t != '1')}" for t in counts) + " |",
             "|---|" + "---|" * (2 * len(counts))]
    for key in speed[counts[0]]:
        lines.append(f"| {key} | " + " | ".join(num(speed[t][key], ",.1f") for t in counts) + " | "
                     + " | ".join(num(ratio[t][key], ".2f") for t in counts) + " |")
    env = r["environment"]
    return "\n".join(lines) + (f"\n\n{r['images']} test images, each runtime's best of {r.get('rounds', 1)} "
                               f"round(s); C flags `{r['cflags']}` (with more than one thread "
                               f"also `-fopenmp`: images in parallel); the other runtimes use their own threads "
                               f"within a batch. The C program's output codes equal the integer executor's on all "
                               f"of them: {r['c_identical']}. {r['model']}. {env.get('cpu_model')}, torch "
                               f"{env['torch']}, {env['date'][:10]}.\n")


def c_eval_table(results: Path, model: str) -> str:
    """The C runtime on the test split (``bash benchmarks/c_check.sh``): per quantized model, the simulation's
    top-1 (its ``report.json``), the C program's, their agreement, the images whose output codes equal the
    integer executor's and the largest logit difference in output codes."""
    paths = sorted((results / "runtime").glob(f"eval_c_{model}_*.json"))
    if not paths:
        return "_not measured yet: `bash benchmarks/c_check.sh`_\n"
    lines = ["| quantized model | FP32 top-1 % | simulation top-1 % | change vs FP32 (points) | C top-1 % | C = simulation "
             "(top-1) | C codes = integer executor's | max logit diff (LSB) | C images/s, 1 thread |",
             "|---" * 9 + "|"]
    rows = [json.loads(p.read_text()) for p in paths]
    for r in rows:
        cell = Path(r["qmodel"]).parent
        report = json.loads((ROOT / cell / "report.json").read_text())
        lines.append(f"| {cell.name} | {100 * report['fp32_top1']:.2f} | {100 * report['quant_top1']:.2f} | "
                     f"{_signed(-report['drop_pp'])} | {100 * r['top1']:.2f} | {r['agreement_sim']:.4f} | "
                     f"{r['identical_integer']:.4f} | {r['max_logit_diff_lsb']} | {r['images_per_second']:,.1f} |")
    env = rows[0]["environment"]
    return "\n".join(lines) + (f"\n\n{rows[0]['images']} test images each; C flags `{rows[0]['cflags']}`. "
                               f"{env.get('cpu_model', 'CPU not recorded')}, torch {env['torch']}, "
                               f"{env['date'][:10]}.\n")


# ---------------------------------------------------------------------------------------------------------------
# generated paragraphs: the sentences that quote the results


def _summary(results: Path, suite: str, label: str) -> dict[str, Any] | None:
    path = results / f"{suite}_{label}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _row(results: Path, suite: str, label: str, cell: str) -> dict[str, Any] | None:
    return next((r for r in _load(results, suite, label) if r["cell"] == cell and r.get("quant_top1") is not None),
                None)


def _pct(frac: float) -> str:
    """A top-1 fraction as a percentage with two decimals."""
    return f"{100 * frac:.2f}"


def _signed(x: float, digits: int = 2) -> str:
    """``x`` with an explicit sign (a true minus sign); a value that rounds to zero prints as +0.00."""
    x = 0.0 if round(x, digits) == 0 else x
    return f"{x:+.{digits}f}".replace("-", "−")


def _num(x: float, digits: int = 2) -> str:
    """``x`` with a true minus sign where negative (no plus sign)."""
    return f"{x:.{digits}f}".replace("-", "−")


def _images(a: float, b: float, n: int) -> int:
    """The difference of two top-1 fractions, in images of ``n``."""
    return round((a - b) * n)


def _not_measured(what: str) -> str:
    return f"_not measured yet: {what}_\n"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _flat(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured rows only (a cell that failed has no ``quant_top1``)."""
    return [r for r in rows if r.get("quant_top1") is not None]


def baselines_standing(results: Path, label: str) -> str:
    """Where hfq ranks among the engine's methods, per setting, with power-of-two and with float scales."""
    rows = _flat(_load(results, "baselines", label))
    if not rows:
        return _not_measured(f"`python benchmarks/run.py --suite baselines --model {label}`")
    lines = []
    for scales, name in (("pot", "power-of-two"), ("float", "float")):
        parts = []
        for s in SETTINGS:
            mine = [r for r in rows if r["scales"] == scales and _setting(r) == s]
            hfq = next((r for r in mine if r["method"] == "hfq"), None)
            if hfq is None:
                continue
            others = sorted((r for r in mine if r["method"] != "hfq"), key=lambda r: -r["quant_top1"])
            ahead = [r for r in others if r["quant_top1"] > hfq["quant_top1"]]
            level = [r for r in others if r["quant_top1"] == hfq["quant_top1"]]
            text = f"{s} {_pct(hfq['quant_top1'])} % ({_signed(-hfq['drop_pp'])} points against FP32), "
            if ahead:
                text += "behind " + ", ".join(f"{r['method']} ({_pct(r['quant_top1'])} %)" for r in ahead)
            else:
                text += f"first of {len(mine)} methods"
            if level:
                text += ", level with " + ", ".join(r["method"] for r in level)
            parts.append(text)
        if parts:
            lines.append(f"- hfq with {name} scales: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def peers_standing(results: Path, label: str) -> str:
    """hfq (power-of-two scales) against the peer tools' configurations, per setting; differences in images."""
    rows = _flat(_load(results, "peers", label))
    hfq = {_setting(r): r for r in rows if r["tool"] == "hfq" and r["scales"] == "pot"}
    if not hfq:
        return _not_measured(f"`python benchmarks/run.py --suite peers --model {label}`")

    def name(r: dict[str, Any]) -> str:
        return f"{r['tool']} {'PoT' if r['scales'] == 'pot' else 'float'}"

    lines = []
    for s in SETTINGS:
        if s not in hfq:
            continue
        me, n = hfq[s], hfq[s]["eval_images"]
        tools = sorted((r for r in rows if r["tool"] != "hfq" and _setting(r) == s), key=lambda r: -r["quant_top1"])
        ahead = [r for r in tools if r["quant_top1"] >= me["quant_top1"]]
        text = f"- **{s}**: hfq PoT {_pct(me['quant_top1'])} % on {n} images. "

        def vs(r: dict[str, Any], me: dict[str, Any] = me, n: int = n) -> str:
            return f"{name(r)} {_pct(r['quant_top1'])} % ({_signed(_images(r['quant_top1'], me['quant_top1'], n), 0)} images)"

        if ahead:
            text += "At or ahead of it: " + ", ".join(vs(r) for r in ahead) + "."
        elif tools:
            text += f"No tool configuration reaches it; the closest is {vs(tools[0])}."
        pot = [r for r in tools if r["scales"] == "pot"]
        if pot and pot[0] not in ahead:
            text += f" Best tool with power-of-two scales: {vs(pot[0])}."
        elif not pot:
            text += " No tool ran it with power-of-two scales."
        lines.append(text)
    return "\n".join(lines) + "\n"


def _draws(results: Path, label: str) -> list[tuple[int, dict[str, Any]]]:
    """(seed, hfq W6A6 PoT row): seed 0 is the core (else baselines) suite's cell, seed k the
    ``core_<label>.calib_seed<k>.json`` summary."""
    out = []
    first = _row(results, "core", label, "hfq_W6A6_pot") or _row(results, "baselines", label, "hfq_W6A6_pot")
    if first is not None:
        out.append((0, first))
    for path in results.glob(f"core_{label}.calib_seed*.json"):
        m = re.fullmatch(rf"core_{re.escape(label)}\.calib_seed(\d+)\.json", path.name)
        row = next((r for r in _flat(json.loads(path.read_text())["rows"]) if r["cell"] == "hfq_W6A6_pot"), None)
        if m and row is not None:
            out.append((int(m.group(1)), row))
    return sorted(out, key=lambda t: t[0])


def draws_table(results: Path, *labels: str) -> str:
    """hfq W6A6 over the calibration draws of each label: drops, mean (sd), agreement, intervals, the target."""
    draws = {label: _draws(results, label) for label in labels}
    draws = {k: v for k, v in draws.items() if v}
    if not draws:
        return _not_measured("`python benchmarks/run.py --suite core --only hfq_W6A6 --seed S "
                             "--label LABEL.calib_seedS`")
    has_ci = any("drop_ci95_pp" in r for d in draws.values() for _, r in d)
    head = ["checkpoint", "FP32 top-1 %", "seeds", "drop (pp), seed by seed", "mean (sd)",
            f"draws within {W6A6_TARGET_PP} pp", "mean agreement"] + (["95 % interval (pp), seed by seed"] if has_ci
                                                                       else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    notes = []
    for label, d in draws.items():
        drops = [r["drop_pp"] for _, r in d]
        sd = f"{statistics.stdev(drops):.2f}" if len(drops) > 1 else "–"
        within = sum(x <= W6A6_TARGET_PP + 1e-9 for x in drops)
        cells = [f"`{label}`", _pct(d[0][1]["fp32_top1"]), ", ".join(str(s) for s, _ in d),
                 " / ".join(_num(x) for x in drops), f"{_num(statistics.mean(drops))} ({sd})",
                 f"{within} of {len(d)}", f"{statistics.mean(r['agreement_fp32'] for _, r in d):.4f}"]
        if has_ci:
            cells.append(" / ".join(f"{_num(r['drop_ci95_pp'][0])} to {_num(r['drop_ci95_pp'][1])}"
                                    if "drop_ci95_pp" in r else "–" for _, r in d))
        lines.append("| " + " | ".join(cells) + " |")
        over = [f"seed {s} by {round((r['drop_pp'] - W6A6_TARGET_PP) * r['eval_images'] / 100)} images"
                for s, r in d if r["drop_pp"] > W6A6_TARGET_PP + 1e-9]
        notes.append(f"`{label}`: mean drop {_num(statistics.mean(drops))} points against the {W6A6_TARGET_PP} target"
                     + (f"; over it: {', '.join(over)}" if over else "; every draw within it"))
    first = next(iter(draws.values()))[0][1]
    ci = ("" if has_ci else " None of these cells records `drop_ci95_pp` (the drop's 95 % interval over the eval "
          "images): they predate it, so no interval is given here.")
    return "\n".join(lines) + (
        f"\n\nhfq W6A6 with power-of-two scales, one `quantize` run per draw, {first['eval_images']} test images, "
        f"{first['calib_images']} calibration images; sd over the draws. " + "; ".join(notes) + "." + ci + "\n")


def core_sides(results: Path, *labels: str) -> str:
    """Which side (weights or activations) limits W6A6 and W8A8: the core suite's mixed-width hfq cells."""
    have = [lb for lb in labels if _flat(_load(results, "core", lb))]
    if not have:
        return _not_measured("`python benchmarks/run.py --suite core`")

    def cell(lb: str, c: str) -> dict[str, Any] | None:
        return _row(results, "core", lb, c)

    def series(c: str, fmt: Callable[[dict[str, Any]], str]) -> str | None:
        rs = [cell(lb, c) for lb in have]
        return None if any(r is None for r in rs) else " / ".join(fmt(r) for r in rs)

    def drop(r: dict[str, Any]) -> str:
        return _num(r["drop_pp"])

    def agree(r: dict[str, Any]) -> str:
        return f"{r['agreement_fp32']:.4f}"

    def disagree(r: dict[str, Any]) -> str:
        return f"{100 * (1 - r['agreement_fp32']):.2f}"

    out = [f"Drops in points and agreements as {' / '.join(f'`{lb}`' for lb in have)}."]
    w6a8, w8a6, w6a6 = series("hfq_W6A8_pot", drop), series("hfq_W8A6_pot", drop), series("hfq_W6A6_pot", drop)
    if w6a8 and w8a6 and w6a6:
        larger = [lb for lb in have if cell(lb, "hfq_W8A6_pot")["drop_pp"] > cell(lb, "hfq_W6A8_pot")["drop_pp"]]
        out.append(f"W6A6 drops {w6a6}. With 6-bit weights and 8-bit activations (W6A8) hfq drops {w6a8}, with "
                   f"8-bit weights and 6-bit activations (W8A6) {w8a6}: the 6-bit activations cost more on "
                   + (_join([f"`{lb}`" for lb in larger]) if larger else "neither") + ".")
    a88, a816, a168 = (series(c, agree) for c in ("hfq_W8A8_pot", "hfq_W8A16_pot", "hfq_W16A8_pot"))
    a1616 = series("minmax_W16A16_float", agree)
    if a88 and a816 and a168 and a1616:
        below = all(cell(lb, "hfq_W8A8_pot")["agreement_fp32"] < W8A8_AGREEMENT_TARGET for lb in have)
        out.append(f"At W8A8 hfq agrees with FP32 on {a88} of the images"
                   + (f", short of the {W8A8_AGREEMENT_TARGET} aimed for" if below else "") + ". "
                   f"With 8-bit weights and 16-bit activations (W8A16) it agrees on {a816}, with 16-bit weights "
                   f"and 8-bit activations (W16A8) on {a168}; the W16A16 wiring check agrees on {a1616}. In points "
                   f"of disagreement with FP32: W8A8 {series('hfq_W8A8_pot', disagree)}, 8-bit activations alone "
                   f"{series('hfq_W16A8_pot', disagree)}, 8-bit weights alone {series('hfq_W8A16_pot', disagree)}, "
                   f"the wiring check {series('minmax_W16A16_float', disagree)}.")
        wide = [cell(lb, c) for lb in have for c in ("hfq_W16A8_pot", "hfq_W8A16_pot")]
        rest = [r for lb in have for r in _flat(_load(results, "core", lb))
                if r["method"] == "hfq" and r["cell"] not in ("hfq_W16A8_pot", "hfq_W8A16_pot")]
        platforms = {r["environment"].get("platform") for r in wide}
        if rest and platforms.isdisjoint({r["environment"].get("platform") for r in rest}):
            out.append(f"The W16A8 and W8A16 cells ran on another machine than the other hfq cells "
                       f"(`environment.platform`); their quantize times are {_seconds(wide)} s against "
                       f"{_seconds(rest)} s.")
    return " ".join(out) + "\n"


def integer_prose(results: Path, label: str) -> str:
    """Time and agreement of the integer-check runs (``benchmarks/integer_check.sh``)."""
    summary = _summary(results, "integer", label)
    if summary is None:
        return _not_measured("`bash benchmarks/integer_check.sh`")
    rows = sorted(summary["rows"], key=lambda r: r["cell"], reverse=True)  # W8A8 before W6A6
    env = summary.get("environment", {})
    reports = {r["cell"]: json.loads(p.read_text()) for r in rows
               if (p := results / "integer" / label / r["cell"] / "report.json").exists()}
    cells = " and ".join(f"{r['integer_seconds']:.0f} s ({r['cell']})" for r in rows)
    n = rows[0]["images"]
    out = [f"The integer program (PyTorch int64 tensors on the CPU; cpu_capability "
           f"{env.get('cpu_capability', 'not recorded')}, {env.get('cpu_cores', '?')} cores, "
           f"{env.get('torch_threads', '?')} torch threads) ran the {n} images in {cells}."]
    if len(reports) == len(rows):
        reps = [reports[r["cell"]] for r in rows]
        q = " and ".join(f"{rep['quantize_seconds']:.0f} s" for rep in reps)
        tot = " and ".join(f"{rep['seconds']:.0f} s" for rep in reps)
        fp = " and ".join(f"{rep['seconds_breakdown']['eval_fp32']:.0f} s" for rep in reps
                          if "seconds_breakdown" in rep)
        within = all(rep["quantize_seconds"] <= QUANTIZE_BUDGET_S for rep in reps)
        out.append(f"The `quantize` runs that made these models took {q} for calibration and search, {tot} in all "
                   f"(`report.json`: `seconds_breakdown`), {'within' if within else 'over'} the "
                   f"{QUANTIZE_BUDGET_S // 60} minutes the method is held to" + (f"; their FP32 evaluation took {fp}"
                                                                                   if fp else "") + ".")
        core = [c for r in rows if (c := _row(results, "core", label, r["cell"])) is not None]
        if len(core) == len(rows):
            other = all(c["environment"].get("platform") != rep["environment"].get("platform")
                        for c, rep in zip(core, reps, strict=True))
            out.append("The core suite's cells of the same settings" + (" (another machine: `environment.platform`)"
                                                                          if other else "")
                       + " took " + " and ".join(f"{c['quantize_seconds']:.0f} s" for c in core)
                       + " for calibration and search.")
    onnx = [r for r in rows if r.get("onnx_top1") is not None]
    if onnx:
        out.append("\n\nThe ONNX export differs from the simulation by "
                   + " and ".join(f"{_signed(r['onnx_minus_sim_pp'])} points ({r['cell']})" for r in onnx)
                   + (". It agrees with the simulation on " + " and ".join(
                       f"{100 * r['onnx_agreement_sim']:.2f} %" for r in onnx) + " of top-1 predictions"
                      if all("onnx_agreement_sim" in r for r in onnx) else "") + ".")
    return " ".join(out).replace(" \n\n", "\n\n") + "\n"


def _same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal on every option both record (an option added later is missing from older cells)."""
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def cpu_noise(results: Path, label: str) -> str:
    """The same quantize configuration in the core suite and in the integer check, which ran on another CPU."""
    summary = _summary(results, "integer", label)
    if summary is None:
        return _not_measured("`bash benchmarks/integer_check.sh`")
    pairs = []
    for r in sorted(summary["rows"], key=lambda r: r["cell"], reverse=True):
        p = results / "integer" / label / r["cell"] / "report.json"
        core = _row(results, "core", label, r["cell"])
        if not p.exists() or core is None:
            continue
        rep = json.loads(p.read_text())
        if not _same_config(rep.get("config", {}), core.get("config", {})):
            continue
        env, ienv = core.get("environment", {}), dict(rep.get("environment", {}))
        if ienv.get("platform") == summary.get("environment", {}).get("platform"):  # the same machine ran both
            ienv.setdefault("cpu_capability", summary["environment"].get("cpu_capability"))
        machine = "another machine" if env.get("platform") != ienv.get("platform") else "the same machine"
        pairs.append(f"{r['cell']}: {_pct(core['quant_top1'])} %, agreement {core['agreement_fp32']:.4f} in the "
                     f"core suite (cpu_capability {env.get('cpu_capability') or 'not recorded'}) and "
                     f"{_pct(rep['quant_top1'])} %, agreement {rep['agreement_fp32']:.4f} in "
                     f"`benchmarks/integer_check.sh` (cpu_capability {ienv.get('cpu_capability') or 'not recorded'}, "
                     f"{machine})")
    if not pairs:
        return "_no cell with the same configuration in the core suite and the integer check_\n"
    return ("The same configuration (every option both cells' `config` records) gave " + "; ".join(pairs)
            + ".\n")


def ablation_reading(results: Path, label: str) -> str:
    """The ablation read by agreement with FP32: what switching each part off costs, per setting."""
    rows = _flat(_load(results, "ablation", label))
    by = {(r["cell"].rsplit("_", 1)[0], _setting(r)): r for r in rows}
    full = {s: by[("hfq-full", s)] for s in SETTINGS if ("hfq-full", s) in by}
    if not full:
        return _not_measured("`python benchmarks/run.py --suite ablation`")
    variants = [v for v in dict.fromkeys(r["cell"].rsplit("_", 1)[0] for r in rows) if v != "hfq-full"]
    cols = [s for s in SETTINGS if s in full]
    lines = ["| switched off / changed | " + " | ".join(f"{s} agreement change | {s} top-1 change" for s in cols)
             + " |", "|---" * (1 + 2 * len(cols)) + "|"]
    for v in variants:
        cells = []
        for s in cols:
            r = by.get((v, s))
            cells += (["–", "–"] if r is None else
                      [_signed(100 * (r["agreement_fp32"] - full[s]["agreement_fp32"])),
                       _signed(100 * (r["quant_top1"] - full[s]["quant_top1"]))])
        lines.append(f"| {v.replace('-', ' ')} | " + " | ".join(cells) + " |")
    notes = []
    for s in cols:
        worst = min((by[(v, s)] for v in variants if (v, s) in by), key=lambda r: r["agreement_fp32"], default=None)
        same = [v.replace("-", " ") for v in variants if (v, s) in by
                and by[(v, s)]["quant_top1"] == full[s]["quant_top1"]
                and by[(v, s)]["agreement_fp32"] == full[s]["agreement_fp32"]]
        above = [v for v in variants if (v, s) in by and by[(v, s)]["quant_top1"] > full[s]["quant_top1"]]
        text = (f"{s}: hfq full {_pct(full[s]['quant_top1'])} %, agreement {full[s]['agreement_fp32']:.4f}; "
                f"{len(above)} of {sum((v, s) in by for v in variants)} variants score a higher top-1")
        if worst is not None:
            text += (f"; the largest agreement loss: {worst['cell'].rsplit('_', 1)[0].replace('-', ' ')} "
                     f"({_signed(100 * (worst['agreement_fp32'] - full[s]['agreement_fp32']))} points)")
        if same:
            text += f"; identical to the full model: {_join(same)}"
        notes.append(text)
    return "\n".join(lines) + ("\n\nChanges in points against hfq full at the same setting (agreement with FP32, "
                               "top-1). " + ". ".join(notes) + ".\n")


def analysis_outliers(results: Path, *labels: str) -> str:
    """Where the outlier channels are, per model (``hybridquant analyze --out-dir
    benchmarks/results/analysis/<label>``'s ``analysis.json``): per block kind, and which blocks hold the layers
    that per-tensor W6A6 quantization hurts most."""
    found = {lb: json.loads(p.read_text()) for lb in labels
             if (p := results / "analysis" / lb / "analysis.json").exists()}
    if not found:
        return _not_measured("`hybridquant analyze ... --out-dir benchmarks/results/analysis/<model>`")
    first = next(iter(found.values()))
    lines = [f"Over {first['images']} calibration images each; an outlier channel has a max |x| above "
             f"{first['outlier_factor']:g} times its tensor's median channel max; the channel spread is a layer "
             "input's largest channel max over its median one (dead channels, whose max is near 0, make it "
             "huge).", "",
             "| model | block kind | layer inputs | outlier channels | largest channel spread | largest max \\|x\\| | "
             "lowest W6A6 output SQNR dB |", "|---" * 7 + "|"]
    prose = []
    for lb, a in found.items():
        for kind, b in a["blocks"].items():
            lines.append(f"| {lb} | {kind} | {b['layers']} | {b['outlier_channels']} | {b['max_channel_spread']:.3g} | "
                         f"{b['max_absmax']:.1f} | {b['min_sqnr_w6a6_db']:.1f} |")
        layers = {r["layer"]: r for r in a["layers"]}
        worst = [layers[w] for w in a["worst_layers"] if w in layers]
        if worst:
            kinds: dict[str, list[dict[str, Any]]] = {}
            for r in worst:
                kinds.setdefault(f"{r['block']} blocks reading {r.get('producer_op') or 'the input'}", []).append(r)
            parts = [f"{len(rs)} in {k} (input kurtosis {min(r['kurtosis'] for r in rs):.0f} to "
                     f"{max(r['kurtosis'] for r in rs):.0f}, channel spread at most "
                     f"{max(r['channel_spread'] for r in rs):.3g})"
                     for k, rs in sorted(kinds.items(), key=lambda kv: -len(kv[1]))]
            prose.append(f"{lb}: of the {len(worst)} layers that per-tensor W6A6 quantization hurts most (output "
                         f"SQNR), " + _join(parts) + ".")
    return "\n".join(lines) + "\n\n" + "\n\n".join(prose) + ("\n" if prose else "")


def limits_reading(results: Path, *labels: str) -> str:
    """The limits suite read across checkpoints: agreement change per group, and how top-1 follows it."""
    data = {lb: rows for lb in labels if (rows := _flat(_load(results, "limits", lb)))}
    if not data:
        return _not_measured("`python benchmarks/run.py --suite limits`")
    base = {lb: next((r for r in rows if not r["config"]["float_ops"]), None) for lb, rows in data.items()}
    data = {lb: rows for lb, rows in data.items() if base[lb] is not None}
    if not data:
        return "_no fully quantized row in the limits suite_\n"

    def group(r: dict[str, Any]) -> str:
        return r["cell"].split("float-", 1)[1].replace("-", " ")

    groups = list(dict.fromkeys(group(r) for rows in data.values() for r in rows if r["config"]["float_ops"]))
    parts, best = [], None
    for g in groups:
        vals = []
        for lb, rows in data.items():
            r = next((r for r in rows if group(r) == g), None)
            if r is None:
                vals.append("–")
                continue
            change = 100 * (r["agreement_fp32"] - base[lb]["agreement_fp32"])
            vals.append(_signed(change))
            if best is None or change > best[0]:
                best = (change, r["eval_images"])
        parts.append(f"{g} {' / '.join(vals)}")
    out = [f"Agreement change in points with the group in float ({' / '.join(f'`{lb}`' for lb in data)}): "
           + ", ".join(parts) + "."]
    if best is not None:
        out.append(f"The largest is {_signed(best[0])} points ({round(best[0] * best[1] / 100)} of {best[1]} "
                   "images).")
    for lb, rows in data.items():
        grp = [r for r in rows if r["config"]["float_ops"]]
        below = [r for r in grp if r["quant_top1"] < base[lb]["quant_top1"]]
        lo, hi = min(r["quant_top1"] for r in grp), max(r["quant_top1"] for r in grp)
        out.append(f"On `{lb}` {len(below)} of {len(grp)} rows with a group in float score a lower top-1 than the "
                   f"fully quantized row ({_pct(lo)}–{_pct(hi)} % against {_pct(base[lb]['quant_top1'])} %).")
    return " ".join(out) + "\n"


def scale_table(results: Path) -> str:
    """What ``hybridquant quantize`` (hfq W8A8, power-of-two scales) costs at 256×256 against the calibration
    images, per model, and eval throughput with 1 and 2 processes (``benchmarks/scale.py``'s ``scale.json``)."""
    path = results / "scale.json"
    if not path.exists():
        return _not_measured("`python benchmarks/scale.py`")
    s = json.loads(path.read_text())
    cells = s["cells"]
    lines = ["| model | calibration images | whole run s | wall s | peak RSS MB | memory budget MB | spilled MB |",
             "|---" * 7 + "|"]
    for r in cells:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['calib']} | failed | {r['wall_seconds']:.0f} | – | – | – |")
        else:
            lines.append(f"| {r['model']} | {r['calib']} | {r['seconds']:.0f} | {r['wall_seconds']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['workspace']['budget_mb']:.0f} | "
                         f"{r['workspace']['spilled_mb']:.0f} |")
    lines += ["", "| model | wall s per calibration image (fit) | intercept s | peak RSS 256 / 64 images | "
                  "wall 256 / 64 images | 512 images projected s | eval images/s, 1 process | 2 processes | "
                  "2 / 1 |", "|---" * 9 + "|"]
    for model, m in s["models"].items():
        fit, rate = m.get("fit"), m["eval_images_per_s"]
        cols = [f"{fit['seconds_per_image']:.2f}" if fit else "–", f"{fit['intercept_s']:.0f}" if fit else "–",
                f"{m['rss_ratio']:.2f}" if "rss_ratio" in m else "–",
                f"{m['time_ratio']:.2f}" if "time_ratio" in m else "–",
                f"{m['projected_s']:.0f}" if "projected_s" in m else "–",
                *(f"{rate[p]:.1f}" if p in rate else "–" for p in ("1", "2")),
                f"{m['eval_speedup']:.2f}" if "eval_speedup" in m else "–"]
        lines.append(f"| {model} | " + " | ".join(cols) + " |")
    first = (cells or s["eval"])[0]
    setup = f"{first['img_size']}×{first['img_size']}"
    if cells:
        setup += f", {first['limit']} eval images, batch {first['batch_size']}, OMP_NUM_THREADS={first['threads']}"
        if first["reconstruction_iters"] is not None:
            setup += f", `--reconstruction-iters {first['reconstruction_iters']}`"
    return "\n".join(lines) + (
        f"\n\n{s['note']} `hybridquant quantize` with its defaults at {setup}; whole run = `report.json`'s "
        "`seconds`, wall = measured outside the process; the fit is least squares of wall time against the "
        "calibration images; the memory budget is the default of the commit that ran the cell (ratios compare "
        "cells of one budget only); projected = the fit where that cell is missing; eval in one process with all "
        "threads and under `torchrun --nproc_per_node 2` with the threads split. Environment: "
        f"{_env_line([first])}.\n")


def support_table(results: Path) -> str:
    """Which timm hybrids lower to the integer program (``benchmarks/support.py``'s ``support.json``), in the
    script's own table."""
    path = results / "support.json"
    if not path.exists():
        return _not_measured("`python benchmarks/support.py`")
    summary = json.loads(path.read_text())
    spec = importlib.util.spec_from_file_location("bench_support", Path(__file__).with_name("support.py"))
    support = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(support)
    return support.markdown(summary["rows"]) + f"\nEnvironment: {_env_line([summary])}.\n"


# ---------------------------------------------------------------------------------------------------------------
# the registry of generated blocks

Renderer = Callable[..., str]
BLOCKS: dict[str, tuple[int, Renderer]] = {}


def block(kind: str, labels: int) -> Callable[[Renderer], Renderer]:
    """Register ``fn(results, *labels) -> str`` as the renderer of ``<!-- table:KIND.LABELS -->`` blocks;
    ``labels`` is how many result labels the marker names (joined by ``+``), -1 for one or more."""
    def register(fn: Renderer) -> Renderer:
        BLOCKS[kind] = (labels, fn)
        return fn

    return register


block("bundled", 0)(bundled_table)
block("baselines", 1)(lambda results, lb: baselines_table(_load(results, "baselines", lb)))
block("ablation", 1)(lambda results, lb: ablation_table(_load(results, "ablation", lb)))
block("core", 1)(lambda results, lb: core_table(_load(results, "core", lb)))
block("peers", 1)(lambda results, lb: peers_table(_load(results, "peers", lb)))
block("limits", 1)(lambda results, lb: limits_table(_load(results, "limits", lb)))
block("integer", 1)(integer_table)
block("baselines-standing", 1)(baselines_standing)
block("peers-standing", 1)(peers_standing)
block("draws", -1)(draws_table)
block("core-sides", -1)(core_sides)
block("integer-prose", 1)(integer_prose)
block("cpu-noise", 1)(cpu_noise)
block("ablation-reading", 1)(ablation_reading)
block("analysis", -1)(analysis_outliers)
block("limits-reading", -1)(limits_reading)
block("scale", 0)(scale_table)
block("runtime", 1)(runtime_table)
block("c-eval", 1)(c_eval_table)
block("support", 0)(support_table)


def render(results: Path, name: str) -> str:
    """The body of the block ``name`` (``KIND`` or ``KIND.LABEL+LABEL``); ValueError for a bad name."""
    kind, _, args = name.partition(".")
    if kind not in BLOCKS:
        raise ValueError(f"unknown block kind {kind!r} (known: {', '.join(sorted(BLOCKS))})")
    want, fn = BLOCKS[kind]
    labels = args.split("+") if args else []
    if (want >= 0 and len(labels) != want) or (want < 0 and not labels):
        raise ValueError(f"block {name!r}: {kind!r} takes {'one or more' if want < 0 else want} label(s)")
    return fn(results, *labels)


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def inject(text: str, results: Path, problems: list[str] | None = None) -> str:
    """Replace the body of every marker pair in ``text``; a bad marker is reported in ``problems``
    (and left as it is)."""
    def sub(m: re.Match) -> str:
        try:
            body = render(results, m.group("name"))
        except ValueError as e:
            if problems is not None:
                problems.append(f"line {_line(text, m.start())}: {e}")
            return m.group(0)
        return m.group("start") + body + m.group("end")

    return MARKER.sub(sub, text)


# ---------------------------------------------------------------------------------------------------------------
# measured figures outside the generated blocks

_NUM = r"[+\-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
NUMBER = re.compile(rf"(?<![\w.])(?P<num>{_NUM})")
UNIT = re.compile(r"\s?(?:%|pp\b|points?\b|s\b|secs?\b|seconds?\b|ms\b|min\b|minutes?\b|hours?\b|[KMGT]i?B\b"
                  r"|bytes?\b|dB\b|LSBs?\b|images?/s\b|img/s\b|times\b|(?:×|x\b)(?!\s?\d))")
OUT_OF_IMAGES = re.compile(rf"\s+of\s+{_NUM}\s+(?:test\s+|eval\s+)?images?\b")
COMPARISON = re.compile(r"(?:≥|≤|>=|<=|==|~=|!=)\s*$")
ALLOWANCE = re.compile(r"[ \t]*<!-- not-measured: (?P<figs>[^>]*?) -->")


def _allowed(figure: str) -> re.Pattern:
    return re.compile(rf"(?<![\w.]){re.escape(figure)}(?!\d|\.\d)")


def measured_figures(text: str) -> list[str]:
    """Problems in ``text`` outside its generated blocks: measured figures and stale allowances, each
    ``line N: ...`` (see the module docstring for the rule)."""
    problems: list[str] = []
    chars = list(text)

    def blank(a: int, b: int) -> None:
        for i in range(a, b):
            if chars[i] != "\n":
                chars[i] = " "

    for m in MARKER.finditer(text):
        blank(m.start(), m.end())
    for m in START.finditer("".join(chars)):
        problems.append(f"line {_line(text, m.start())}: {m.group(0)} has no matching start or end marker")
        blank(m.start(), m.end())
    offset = 0
    for line in "".join(chars).split("\n"):
        a = ALLOWANCE.search(line)
        if a:
            blank(offset + a.start(), offset + a.end())
            for fig in (f.strip() for f in a.group("figs").split(";")):
                hits = [h for h in _allowed(fig).finditer(line) if not a.start() <= h.start() < a.end()]
                if not fig or not hits:
                    problems.append(f"line {_line(text, offset)}: stale allowance: {fig!r} is not on this line")
                for h in hits:
                    blank(offset + h.start(), offset + h.end())
        offset += len(line) + 1
    scan = "".join(chars)
    for m in NUMBER.finditer(scan):
        num, end = m.group("num"), m.end()
        if re.match(r"\.\d", scan[end:end + 2]):  # a dotted version: 2.14.1
            continue
        unit = UNIT.match(scan, end)
        images = OUT_OF_IMAGES.match(scan, end)
        if unit:
            what = scan[m.start():unit.end()]
        elif images:
            what = scan[m.start():images.end()]
        elif "." in num and not COMPARISON.search(scan[max(0, m.start() - 4):m.start()]):
            what = num
        elif num[0] in "+-−" and "." not in num:
            what = num
        else:
            continue
        problems.append(f"line {_line(scan, m.start())}: measured figure outside a generated block: "
                        f"{' '.join(what.split())!r}")
    return problems


def check(text: str, results: Path) -> list[str]:
    """Every problem ``--check`` reports for the README ``text``."""
    problems: list[str] = []
    new = inject(text, results, problems)
    if new != text:
        old_bodies = {m.group("name"): (m.group("body"), m.start()) for m in MARKER.finditer(text)}
        for m in MARKER.finditer(new):
            body, start = old_bodies.get(m.group("name"), (None, 0))
            if body is not None and body != m.group("body"):
                problems.append(f"line {_line(text, start)}: block {m.group('name')} differs from what "
                                "benchmarks/results renders")
    return problems + measured_figures(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--models", default="mobilevit_xxs.cifar10,mobilevit_xxs.reference_6ep,mobilevitv2_050.cifar10",
                   help="comma-separated result labels to plot (benchmarks/run.py's --label)")
    p.add_argument("--no-plot", action="store_true", help="rewrite the README only, not the PNG plots")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a generated block differs from the JSON or a measured figure is typed by hand")
    args = p.parse_args(argv)
    results, readme = Path(args.results), Path(args.readme)
    text = readme.read_text()
    if args.check:
        problems = check(text, results)
        for problem in problems:
            print(f"{readme}:{problem.removeprefix('line ')}", file=sys.stderr)
        if problems:
            print(f"{readme}: {len(problems)} problem(s); run python benchmarks/readme_tables.py to regenerate "
                  "the blocks, and move measured figures into generated blocks", file=sys.stderr)
            return 1
        return 0
    problems: list[str] = []
    new = inject(text, results, problems)
    for problem in problems:
        print(f"{readme}:{problem.removeprefix('line ')}", file=sys.stderr)
    if new != text:
        tmp = readme.with_suffix(".md.tmp")
        tmp.write_text(new)
        tmp.replace(readme)
    for model in [] if args.no_plot else args.models.split(","):
        plot(results, model, results / f"accuracy_{model}.png")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
