"""Reports: JSON first, Markdown made from the JSON."""

from __future__ import annotations

import datetime as _dt
import os
import platform
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
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if v != 0 and abs(v) < 10 ** -(digits - 1) else f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str], headers: list[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``columns`` from ``rows``."""
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def quantize_report_md(report: dict[str, Any]) -> str:
    """The Markdown twin of a ``quantize`` report.json."""
    c = report["config"]
    lines = [
        f"# hybridquant: {report['model']['name']} — {c['method']} W{c['wbits']}A{c['abits']} ({c['scales']} scales)",
        "",
        markdown_table(
            [report],
            ["fp32_top1", "quant_top1", "drop_pp", "agreement_fp32", "eval_images", "calib_images", "param_increase_pct", "seconds"],
            ["FP32 top-1", "quant top-1", "drop (pp)", "agreement", "eval images", "calib images", "param increase %", "seconds"],
        ),
        "",
        f"- drop, 95 % interval over the eval images: {_fmt(report['drop_ci95_pp'][0], 2)} to "
        f"{_fmt(report['drop_ci95_pp'][1], 2)} points (FP32 alone right on {report['fp32_only_correct']} images, "
        f"the quantized model alone on {report['quant_only_correct']}; another calibration draw moves the drop too)",
        f"- quantized MACs: {report['coverage']['quantized_macs']} of {report['coverage']['macs']} "
        f"(conv {report['coverage']['conv2d']}, linear {report['coverage']['linear']}, matmul {report['coverage']['matmul']})",
        f"- first conv and classifier: {'8 bits' if c['first_last_8bit'] else 'same bits as the rest'}; input image: {c['input_bits']} bits",
        f"- left in float by request: {', '.join(report['float_nodes']) or 'none'}",
        f"- integer-only program: {report['integer'].get('integer_only')}"
        + (f" ({report['integer']['requant_multiplies_replaced_by_shifts']} requantizations as shifts, "
           f"{report['integer']['lookup_tables']} lookup tables)" if report["integer"].get("integer_only")
           else f" ({report['integer'].get('reason', '')})"),
        f"- deployed size: {report['model_size_bytes']['total']} bytes "
        f"(weights {report['model_size_bytes']['weights']}, biases {report['model_size_bytes']['biases']})",
        f"- scales: {c['scales']}" + (f" (power-of-two rounding: {c['pot_rounding']})" if c["scales"] == "pot" else ""),
        f"- all activation and weight scales powers of two: {report['all_scales_pot']}",
        "",
        "## Layers",
        "",
        markdown_table(
            report["layers"],
            ["name", "op", "block", "act_bits", "act_kind", "act_scale", "weight_bits", "sqnr_db"],
            ["node", "op", "block", "act bits", "act grid", "act scale", "weight bits", "SQNR (dB)"],
        ),
        "",
        "A `threshold` grid (a lookup table's input) has non-uniform codes: its scale is the step its thresholds "
        "lie on, and its SQNR compares each code's representative value with the exact value, not the error "
        "that reaches the table's output." if any(r.get("act_kind") == "threshold" for r in report["layers"]) else "",
        "",
        "## Environment",
        "",
        "\n".join(f"- {k}: {v}" for k, v in report["environment"].items()),
        "",
    ]
    return "\n".join(lines)
