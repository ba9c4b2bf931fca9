"""Reports: JSON first, Markdown made from the JSON."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """What produced a number: versions, cores, threads, the CPU's vector instruction set and the date (UTC).

    The instruction set is there because float kernels sum in another order on other CPUs, and a post-training
    search that compares quantized errors can then choose differently: the same hfq W8A8 command gave 85.11 % /
    agreement 0.9809 on the machine of the earlier results and 85.09 % / 0.9784 on an AVX2-only one.
    """
    import timm

    from . import __version__

    return {
        "hybridquant": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **cpu_info(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def cpu_info() -> dict[str, Any]:
    """The CPU model and its vector extensions (from /proc/cpuinfo where readable, else nothing)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
    flags = fields.get("flags", "").split()
    return {"cpu_model": fields.get("model name"),
            "vector_flags": sorted(f for f in flags if f.startswith(("avx", "sse4", "fma", "amx")))}


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if v != 0 and abs(v) < 10 ** -(digits - 1) else f"{v:.{digits}f}"
    return str(v)


# --- human formatting of report.md: one formatter per kind of figure (report.json keeps full precision) ----
DASH = "—"


def _fixed(template: str, doc: str, times: float = 1) -> Callable[[float | None], str]:
    """A formatter of ``times · v`` by ``template``, :data:`DASH` for a missing value."""
    def fmt(v: float | None) -> str:
        return DASH if v is None else template.format(times * v)
    fmt.__doc__ = doc
    return fmt


def _magnitude(unit: str, doc: str) -> Callable[[float | None], str]:
    """A formatter with thousands separators from 10 up, one decimal below: ``1,234 s``, ``2.4 s``."""
    def fmt(v: float | None) -> str:
        if v is None:
            return DASH
        return f"{v:,.0f} {unit}" if abs(v) >= 10 else f"{v:.1f} {unit}"
    fmt.__doc__ = doc
    return fmt


fmt_seconds = _magnitude("s", "Wall time: ``298 s`` (one decimal under 10 s: ``2.4 s``).")
fmt_mb = _magnitude("MB", "Memory in MiB: ``1,234 MB`` (one decimal under 10 MB).")
fmt_pp = _fixed("{:.2f} pp", "A top-1 difference in percentage points: ``0.20 pp``.")
fmt_fraction = _fixed("{:.1f} %", "A measured fraction as a percentage with one decimal: ``100.0 %``.", 100)
fmt_agreement = fmt_fraction  # a fraction of images that agree: ``98.0 %``
fmt_top1 = _fixed("{:.2f} %", "Top-1 accuracy given as a fraction: ``85.13 %``.", 100)
fmt_pct = _fixed("{:.2f} %", "A value already in percent: ``0.12 %``.")
fmt_db = _fixed("{:.1f}", "Decibels with one decimal: ``23.4``; ``—`` when there is no value.")


def fmt_int(v: int | None) -> str:
    """An integer with thousands separators: ``1,601,234``."""
    return DASH if v is None else f"{int(v):,}"


def fmt_bytes(n: int | None) -> str:
    """A size in decimal units: ``1.60 MB``, ``540.3 kB``, ``912 B``."""
    if n is None:
        return DASH
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} MB"
    if n >= 1_000:
        return f"{n / 1e3:.1f} kB"
    return f"{n} B"


def fmt_scale(v: Any) -> str:
    """A quantization scale: ``2^-6`` for a power of two, else three significant digits; a per-channel
    ``[min, max]`` as ``2^-6..2^-4``."""
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"{fmt_scale(v[0])}..{fmt_scale(v[1])}"
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
        m, e = math.frexp(v)
        return f"2^{e - 1}" if m == 0.5 else f"{v:.3g}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str], headers: list[str] | None = None,
                   formats: dict[str, Callable[[Any], str]] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``columns`` from ``rows``; ``formats`` maps a column to its
    formatter (others: a plain default)."""
    headers = headers or columns
    formats = formats or {}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(formats[c](v) if c in formats and v != "" else _fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: rows of ``deployed_bytes_breakdown`` in report.md
_STORAGE_LABELS = {
    "weights": "weights (packed at their bit width)", "biases": "biases", "requant_shifts": "requantization shifts",
    "thresholds": "threshold grids", "zero_points_and_ranges": "zero points and code ranges",
    "align_shifts": "add / concat alignment shifts", "lookup_tables": "lookup tables (activation functions)",
    "softmax_constants": "softmax constants (exp tables)", "layernorm_constants": "LayerNorm constants",
    "other": "other", "other_params_16bit": "other parameters (16 bits each)",
}

#: the phases a quantize run opens itself, in order (:mod:`hybridquant.pipeline`); any other phase in
#: report.json ran inside ``quantize`` (the method's own: observe, exponent search, reconstruction, ...)
PIPELINE_PHASES = ("load", "capture", "eval fp32", "quantize", "eval quantized", "layer sqnr", "integer summary")


def _phases_section(report: dict[str, Any]) -> list[str]:
    """Wall time and peak resident memory of each phase (indented: the phases inside quantization), followed by a
    blank line; nothing for a report without phases."""
    phases = report.get("phases")
    if not phases:
        return []
    # ``depth``: how many phases enclose this one (older reports: inside quantize unless a pipeline phase)
    rows = [{"phase": name if not (d := fig.get("depth", name not in PIPELINE_PHASES))
             else f"{'&nbsp;&nbsp;' * d}↳ {name}", **fig} for name, fig in phases.items()]
    rows.append({"phase": "**whole run**", "seconds": report["seconds"], "peak_rss_mb": report["peak_rss_mb"]})
    lines = [
        "## Time and memory",
        "",
        "Wall time and peak resident memory (RSS) of each phase; an indented phase ran inside the one above it, "
        "whose figures include it. Loading, capture and the FP32 evaluation are shared by every config run on the "
        "same prepared model.",
        "",
        markdown_table(rows, ["phase", "seconds", "peak_rss_mb"], ["phase", "time", "peak RSS"],
                       {"phase": str, "seconds": fmt_seconds, "peak_rss_mb": fmt_mb}),
    ]
    ws = report.get("workspace")
    if ws:
        lines += ["", f"Calibration values kept in memory: at most {fmt_mb(ws['peak_resident_mb'])} of a "
                      f"{fmt_mb(ws['budget_mb'])} budget (`--memory-budget`); {fmt_mb(ws['spilled_mb'])} spilled "
                      f"to disk."]
    return [*lines, ""]


def _sqnr_text(report: dict[str, Any]) -> str:
    """What the SQNR column measures, and why LayerNorm rows are (and used not to be) where they are."""
    n = report.get("sqnr_images", report["config"].get("sqnr_images"))
    text = (
        f"SQNR compares each node's simulated quantized output with the same node of the float graph the "
        f"quantized one was built from — after BatchNorm folding and the method's transforms (outlier scaling, "
        f"channel shifts, PTF), before its refinements — on {fmt_int(n)} calibration images, so every node, "
        f"the per-channel shift nodes a transform adds included, has a float twin."
    )
    norms = [r["sqnr_db"] for r in report["layers"] if r.get("op") == "layer_norm" and r.get("sqnr_db") is not None]
    transform = (report.get("method_info") or {}).get("transform") or {}
    if norms and any(bool(v) for v in transform.values()):
        text += (
            f" LayerNorm rows (here {fmt_db(min(norms))} to {fmt_db(max(norms))} dB) are compared with the "
            f"transformed norm: outlier scaling divides a norm's affine by per-channel factors α_j and a channel "
            f"shift subtracts a per-channel mean z_j from it (the next layer compensates both), so the norm's "
            f"output X/α − z is far from the untransformed model's X — comparing with that model, as earlier "
            f"reports did, measured the transform, not the quantization (about 0 dB, −4.4 to +6.2 dB on the "
            f"bundled W8A8 model)."
        )
    text += (" A row below 0 dB says why; inside blocks tuned by block reconstruction, inner values can leave "
             "the float model's while the block's output stays close (report.json's `sqnr_refined_db` compares "
             "with the refined float parameters).")
    return text


def _integer_line(integer: dict[str, Any]) -> str:
    if not integer.get("integer_only"):
        line = f"- integer-only program: no ({integer.get('reason', '')})"
        if integer.get("integer_op_fraction") is not None:
            line += (f"; with float multipliers allowed, {fmt_fraction(integer['integer_op_fraction'])} of its "
                     f"{fmt_int(integer['ops'])} ops and {fmt_fraction(integer['integer_mac_fraction'])} of its MACs "
                     f"are integer")
        return line
    extra = []
    if integer.get("two_term_requantizations"):
        extra.append(f"{integer['two_term_requantizations']} with two terms")
    if integer.get("threshold_requantizations"):
        extra.append(f"{integer['threshold_requantizations']} onto threshold grids")
    return (f"- integer-only program: yes — {integer['requant_multiplies_replaced_by_shifts']} requantizations "
            f"as shifts{' (' + ', '.join(extra) + ')' if extra else ''}, plus "
            f"{integer.get('identity_requantizations', 0)} identity ones (multiplier 1, only a saturation: after "
            f"a lookup table, softmax or LayerNorm), {integer['lookup_tables']} lookup tables; integer kernels "
            f"run {fmt_fraction(integer.get('integer_op_fraction'))} of its {fmt_int(integer.get('ops'))} compute "
            f"ops and {fmt_fraction(integer.get('integer_mac_fraction'))} of its {fmt_int(integer.get('macs'))} "
            f"MACs per image (measured on the lowered program; host input quantizer and output dequantization "
            f"excluded)")


def _size_section(report: dict[str, Any]) -> list[str]:
    total = report["deployed_bytes"]
    breakdown = report["deployed_bytes_breakdown"]
    rows = [{"what": _STORAGE_LABELS.get(k, k), "bytes": v, "share": v / total if total else 0.0}
            for k, v in breakdown.items() if v]
    rows.append({"what": "**total (deployed_bytes)**", "bytes": total, "share": 1.0 if total else 0.0})
    lines = [
        "## Deployed size",
        "",
        f"{fmt_bytes(total)} ({fmt_int(total)} bytes): every constant the integer hardware stores — basis: "
        f"{report.get('deployed_bytes_basis', '')}. The host's input quantizer and output dequantization (float "
        f"scales) take {fmt_int(report.get('host_bytes', 0))} bytes more, counted apart.",
        "",
        markdown_table(rows, ["what", "bytes", "share"], ["what", "bytes", "share"],
                       {"bytes": fmt_int, "share": fmt_fraction}),
    ]
    return lines


def _layer_table(layers: list[dict[str, Any]]) -> list[str]:
    notes: list[str] = []
    shown = []
    for row in layers:
        row = dict(row)
        cell = fmt_db(row.get("sqnr_db"))
        if row.get("sqnr_note"):
            if row["sqnr_note"] not in notes:
                notes.append(row["sqnr_note"])
            cell += f" [{notes.index(row['sqnr_note']) + 1}]"
        row["sqnr_cell"] = cell
        shown.append(row)
    lines = [markdown_table(
        shown,
        ["name", "op", "block", "act_bits", "act_grid", "act_scale", "weight_bits", "sqnr_cell"],
        ["node", "op", "block", "act bits", "act grid", "act scale", "weight bits", "SQNR (dB)"],
        {"act_scale": fmt_scale, "sqnr_cell": str},
    )]
    if notes:
        lines += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return lines


def quantize_report_md(report: dict[str, Any]) -> str:
    """The Markdown twin of a ``quantize`` report.json."""
    c = report["config"]
    lo, hi = report["drop_ci95_pp"]
    cov = report["coverage"]
    lines = [
        f"# hybridquant: {report['model']['name']} — {c['method']} W{c['wbits']}A{c['abits']} ({c['scales']} scales)",
        "",
        markdown_table(
            [report],
            ["fp32_top1", "quant_top1", "drop_pp", "agreement_fp32", "eval_images", "calib_images", "param_increase_pct",
             "deployed_bytes", "seconds"],
            ["FP32 top-1", "quant top-1", "drop", "agreement", "eval images", "calib images", "param increase",
             "deployed size", "time"],
            {"fp32_top1": fmt_top1, "quant_top1": fmt_top1, "drop_pp": fmt_pp, "agreement_fp32": fmt_agreement,
             "eval_images": fmt_int, "calib_images": fmt_int, "param_increase_pct": fmt_pct,
             "deployed_bytes": fmt_bytes, "seconds": fmt_seconds},
        ),
        "",
        f"- drop, 95 % interval over the eval images: {fmt_pp(lo)} to {fmt_pp(hi)} (FP32 alone right on "
        f"{fmt_int(report['fp32_only_correct'])} images, the quantized model alone on "
        f"{fmt_int(report['quant_only_correct'])}; another calibration draw moves the drop too)",
        f"- quantized MACs: {cov['quantized_macs']} of {cov['macs']} MAC layers "
        f"(conv {cov['conv2d']}, linear {cov['linear']}, matmul {cov['matmul']})",
        f"- first conv and classifier: {'8 bits' if c['first_last_8bit'] else 'same bits as the rest'}; input image: {c['input_bits']} bits",
        f"- left in float by request: {', '.join(report['float_nodes']) or 'none'}",
        _integer_line(report["integer"]),
        f"- deployed size: {fmt_bytes(report['deployed_bytes'])} ({fmt_int(report['deployed_bytes'])} bytes; "
        f"breakdown below)",
        f"- scales: {c['scales']}" + (f" (power-of-two rounding: {c['pot_rounding']})" if c["scales"] == "pot" else ""),
        f"- all activation and weight scales powers of two: {'yes' if report['all_scales_pot'] else 'no'}",
        f"- time: {fmt_seconds(report['seconds'])} in all, quantization {fmt_seconds(report.get('quantize_seconds'))}",
        "",
        *_size_section(report),
        "",
        *_phases_section(report),
        "## Layers",
        "",
        _sqnr_text(report),
        "",
        *_layer_table(report["layers"]),
        "",
        "A `threshold` grid (a lookup table's input) has non-uniform codes: its scale is the step its thresholds "
        "lie on, and its SQNR compares each code's representative value with the exact value, not the error "
        "that reaches the table's output." if any(r.get("act_grid") == "threshold" for r in report["layers"]) else "",
        "",
        "## Environment",
        "",
        "\n".join(f"- {k}: {v}" for k, v in report["environment"].items()),
        "",
    ]
    return "\n".join(lines)
