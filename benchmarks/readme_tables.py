"""Render the benchmark summaries as Markdown tables and a PNG plot, and put the tables into the README.

Every number in the README's result tables comes from the JSON summaries that
``benchmarks/run.py`` writes (``benchmarks/results/<suite>_<model>.json``);
this script is the only thing that copies them there. Each table sits between
``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` markers, so rerunning it
after new benchmark cells replaces the tables in place.

Usage::

    python benchmarks/readme_tables.py                 # rewrite the README tables and the plot
    python benchmarks/readme_tables.py --check         # exit 1 when the README is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("W8A8", "W6A6", "W4A8")
MARKER = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(.*?)(<!-- /table:(?P=name) -->)", re.S)


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


def tables(results: Path, model: str) -> dict[str, str]:
    """Every table of ``model``, keyed by its README marker name."""
    return {
        f"baselines.{model}": baselines_table(_load(results, "baselines", model)),
        f"ablation.{model}": ablation_table(_load(results, "ablation", model)),
        f"core.{model}": core_table(_load(results, "core", model)),
        f"peers.{model}": peers_table(_load(results, "peers", model)),
        f"limits.{model}": limits_table(_load(results, "limits", model)),
        f"integer.{model}": integer_table(results, model),
    }


def inject(text: str, rendered: dict[str, str]) -> str:
    """Replace the body of every known marker pair in ``text``."""
    def sub(m: re.Match) -> str:
        body = rendered.get(m.group("name"))
        return m.group(0) if body is None else m.group(1) + body + m.group(4)

    return MARKER.sub(sub, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--models", default="mobilevit_xxs.cifar10,mobilevit_xxs.reference_6ep,mobilevitv2_050.cifar10",
                   help="comma-separated result names (benchmarks/run.py's --label)")
    p.add_argument("--check", action="store_true", help="exit 1 when the README tables differ from the JSON")
    args = p.parse_args(argv)
    results, readme = Path(args.results), Path(args.readme)
    rendered: dict[str, str] = {"bundled": bundled_table(results)}
    for model in args.models.split(","):
        rendered.update(tables(results, model))
    text = readme.read_text()
    new = inject(text, rendered)
    if args.check:
        if new != text:
            print(f"{readme}: result tables are out of date; run python benchmarks/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        tmp = readme.with_suffix(".md.tmp")
        tmp.write_text(new)
        tmp.replace(readme)
    for model in args.models.split(","):
        plot(results, model, results / f"accuracy_{model}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
