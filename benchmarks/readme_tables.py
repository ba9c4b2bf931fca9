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
    return f"{100 * row['quant_top1']:.2f} ({-row['drop_pp']:+.2f})"


def _env_line(rows: list[dict[str, Any]]) -> str:
    env = rows[0].get("environment", {})
    keys = ("torch", "timm", "cpu_cores", "torch_threads", "date")
    return ", ".join(f"{k} {env[k]}" for k in keys if k in env)


def baselines_table(rows: list[dict[str, Any]]) -> str:
    """Methods × (setting, scales): top-1 % (drop in points)."""
    if not rows:
        return "_not measured yet: `python benchmarks/run.py --suite baselines`_\n"
    measured = {_setting(r) for r in rows}
    cols = [(s, sc) for s in SETTINGS if s in measured for sc in ("float", "pot")]
    by = {(r["method"], _setting(r), r["scales"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | " + " | ".join(f"{s} {'PoT' if sc == 'pot' else 'float'}" for s, sc in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_cell(by.get((m, s, sc))) for s, sc in cols) + " |")
    return _footer(lines, rows, "Top-1 % (change against FP32 in points)")


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


def peers_table(rows: list[dict[str, Any]]) -> str:
    """Peer tools × setting, errors spelled out."""
    if not rows:
        return "_not measured yet: `python benchmarks/run.py --suite peers` (needs the `peers` extra)_\n"
    lines = ["| tool | setting | scales | top-1 % | drop (pp) | agreement | quantize s | note |", "|---" * 8 + "|"]
    for r in rows:
        ok = r.get("quant_top1") is not None
        lines.append(
            f"| {r.get('tool', r['cell'].split('_')[0])} | {_setting(r)} | {r['scales']} | "
            + (f"{100 * r['quant_top1']:.2f} | {r['drop_pp']:.2f} | {r['agreement_fp32']:.4f} | "
               f"{r.get('quantize_seconds', 0):.0f} | {r.get('note', '') or ''} |" if ok
               else f"– | – | – | – | {str(r.get('error', '')).replace('|', '/')[:160]} |"))
    return _footer(lines, rows, "Each tool's own quantized model, same calibration and evaluation images")


def _footer(lines: list[str], rows: list[dict[str, Any]], what: str) -> str:
    first = rows[0]
    return "\n".join(lines) + (
        f"\n\n{what}; FP32 top-1 {100 * first['fp32_top1']:.2f} % on {first['eval_images']} images, "
        f"{first['calib_images']} calibration images. Environment: {_env_line(rows)}.\n")


def plot(results: Path, model: str, out: Path) -> bool:
    """Top-1 against bit width per method (PoT scales) and peer tool; False when there is nothing to plot."""
    series: dict[str, list[tuple[int, float]]] = {}
    for suite in ("core", "baselines", "peers"):
        for r in _load(results, suite, model):
            if r.get("quant_top1") is None or _setting(r) not in SETTINGS or r["scales"] != "pot":
                continue
            if suite == "peers" and r.get("tool") == "hfq":  # the same method as the core suite's hfq line
                continue
            label = r.get("tool", r["method"]) + (" (tool)" if suite == "peers" else "")
            series.setdefault(label, [])
            x = SETTINGS.index(_setting(r))
            if all(p[0] != x for p in series[label]):
                series[label].append((x, 100 * r["quant_top1"]))
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in sorted(series.items()):
        pts.sort()
        style = "--" if label.endswith("(tool)") else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label,
                linewidth=2.5 if label == "hfq" else 1.2)
    fp32 = next(r["fp32_top1"] for s in ("core", "baselines", "peers") for r in _load(results, s, model))
    ax.axhline(100 * fp32, color="k", linewidth=0.8, linestyle=":", label="FP32")
    ax.set_xticks(range(len(SETTINGS)), SETTINGS)
    ax.set_ylabel("top-1 %")
    ax.set_title(f"{model}: power-of-two scales")
    ax.legend(fontsize=7, ncol=2)
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
    p.add_argument("--models", default="mobilevit_xxs.cifar10,mobilevit_xxs.reference_6ep",
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
