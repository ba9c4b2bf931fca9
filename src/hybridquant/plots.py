"""PNG plots made from JSON results (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._io import atomic_path
from .errors import HybridQuantError

BLOCK_COLOURS = {"stem": "#7f7f7f", "mv2": "#d62728", "mobilevit": "#1f77b4", "head": "#2ca02c", "stage": "#9467bd",
                 "ffn": "#ff7f0e", "attention": "#17becf", "downsample": "#8c564b", "patch_merging": "#e377c2"}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise HybridQuantError("plots need matplotlib: pip install 'hybridquant[plot]'") from exc
    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def analysis_plots(result: dict[str, Any], out_dir: Path, worst: int = 4) -> list[str]:
    """Per-channel max bars and histograms of the worst layers, and a per-block overview."""
    plt = _plt()
    by_name = {(r["layer"], r["input"]): r for r in result["layers"]}
    worst_rows = [by_name[(n, 0)] for n in result["worst_layers"][:worst]]
    files = []

    fig, axes = plt.subplots(len(worst_rows), 1, figsize=(9, 2.2 * len(worst_rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], worst_rows, strict=True):
        vals = row["channel_absmax"]
        colours = ["#d62728" if i in set(row["outlier_channels"]) else "#1f77b4" for i in range(len(vals))]
        ax.bar(range(len(vals)), vals, color=colours, width=1.0)
        ax.axhline(row["channel_median_absmax"] * result["outlier_factor"], color="k", ls="--", lw=0.8)
        ax.set_title(f"{row['layer']} input ({row['block']}): per-channel max |x|, spread {row['channel_spread']:.1f}",
                     fontsize=9)
        ax.set_ylabel("max |x|")
    axes[-1, 0].set_xlabel("channel (red: outlier)")
    fig.tight_layout()
    _save(fig, out_dir / "channel_max.png")
    plt.close(fig)
    files.append("channel_max.png")

    fig, axes = plt.subplots(1, len(worst_rows), figsize=(3.2 * len(worst_rows), 2.8), squeeze=False)
    for ax, row in zip(axes[0], worst_rows, strict=True):
        vals = row["channel_absmax"]
        ax.hist(vals, bins=40, color="#1f77b4", log=True)
        for i in row["outlier_channels"]:
            ax.axvline(vals[i], color="#d62728", lw=0.8)
        ax.set_title(row["layer"].replace(".conv", ""), fontsize=8)
        ax.set_xlabel("channel max |x| (red: outliers)", fontsize=8)
    fig.tight_layout()
    _save(fig, out_dir / "histograms.png")
    plt.close(fig)
    files.append("histograms.png")

    rows = [r for r in result["layers"] if any(k.startswith("sqnr_") for k in r)]  # weighted layers' inputs
    fig, ax = plt.subplots(figsize=(11, 3.4))
    ax.bar(range(len(rows)), [r["channel_spread"] for r in rows],
           color=[BLOCK_COLOURS.get(r["block"], "#bcbd22") for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("channel spread (max / median)")
    ax.set_xlabel("conv / linear layers in network order")
    kinds = list(dict.fromkeys(r["block"] for r in rows))  # the kinds present, in network order
    handles = [plt.Rectangle((0, 0), 1, 1, color=BLOCK_COLOURS.get(k, "#bcbd22")) for k in kinds]
    ax.legend(handles, kinds, fontsize=8, ncol=5)
    ax.set_title("Where the activation outliers are: input channel spread per layer, by block kind", fontsize=10)
    fig.tight_layout()
    _save(fig, out_dir / "blocks.png")
    plt.close(fig)
    files.append("blocks.png")
    return files
