"""The figures, drawn from exactly the dictionaries that go into ``analysis.json``.

Each function takes the numbers (nothing else) and a path, so what the JSON says is what the
picture shows. Matplotlib's object API with the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def plot_activation_ranges(data: dict, path: Path, title: str) -> Path:
    """Figure 1: one heat map per site, blocks × channels, colour = range ÷ the block's median channel.

    Vertical stripes are channels that stay outliers through the blocks; marked cells are the
    channels over the threshold.
    """
    sites = data["sites"]
    fig = Figure(figsize=(12, 2.1 * len(sites) + 0.8), layout="constrained")
    axes = fig.subplots(len(sites), 1, squeeze=False)[:, 0]
    blocks = data["blocks"]
    for ax, (key, site) in zip(axes, sites.items(), strict=True):
        width = max((len(r) for r in site["ranges"]), default=1)
        grid = np.full((len(blocks), width), np.nan)
        for b, ranges in enumerate(site["ranges"]):
            if ranges:
                r = np.asarray(ranges)
                grid[b, : len(r)] = np.log10(np.maximum(r, 1e-12) / max(float(np.median(r)), 1e-12))
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma", origin="lower",
                       vmin=min(-0.5, float(np.nanmin(grid))) if np.isfinite(grid).any() else -0.5,
                       vmax=max(1.0, float(np.nanmax(grid))) if np.isfinite(grid).any() else 1.0)
        xs = [c for b, marked in enumerate(site["outliers"]) for c in marked]
        ys = [b for b, marked in enumerate(site["outliers"]) for _ in marked]
        ax.scatter(xs, ys, s=28, facecolors="none", edgecolors="cyan", linewidths=1.2,
                   label=f"outlier (> {data['threshold']:g}× block median)")
        persistent = list(site["persistence"].items())[:6]
        note = ", ".join(f"ch {c}: {n}/{len(blocks)} blocks" for c, n in persistent) or "no outlier channel"
        ax.set_title(f"{site['label']} — {note}", fontsize=9, loc="left")
        ax.set_ylabel("block")
        ax.set_xlabel("key token index" if key == "post_softmax" else "channel index")
        if len(blocks) <= 24:
            ax.set_yticks(range(len(blocks)))
        ax.legend(loc="upper right", fontsize=7, framealpha=0.7)
        fig.colorbar(im, ax=ax, pad=0.01).set_label("log10(max|a| ÷ median)", fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_reconstruction(data: dict, path: Path, title: str) -> Path:
    """Figure 2: each group's loss over iterations (left) and its output MSE before/after (right)."""
    groups = data["groups"]
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax_loss, ax_mse = fig.subplots(1, 2, width_ratios=[3, 2])
    cmap = _cmap("viridis")
    n = max(len(groups), 1)
    traced = [g for g in groups if g["loss_curve"]]
    for g in traced:
        its, losses = zip(*g["loss_curve"], strict=True)
        ax_loss.plot(its, losses, color=cmap(g["index"] / max(n - 1, 1)), lw=1.2,
                     label=f"{g['index']}: {g['label']}" if len(groups) <= 12 else None)
    if traced:
        ax_loss.set_yscale("log")
    else:
        ax_loss.text(0.5, 0.5, "no loss trace recorded\n(0 iterations, or a run from before traces)",
                     ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("reconstruction loss (group output MSE)")
    ax_loss.set_title("loss during reconstruction, per group", fontsize=10)
    if traced and len(groups) <= 12:
        ax_loss.legend(fontsize=7, title="group", title_fontsize=7)
    elif traced:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        fig.colorbar(ScalarMappable(Normalize(0, n - 1), cmap), ax=ax_loss).set_label("group index")

    idx = np.arange(len(groups))
    before = [g["mse_before"] for g in groups]
    after = [g["mse_after"] for g in groups]
    ax_mse.bar(idx - 0.2, before, 0.4, color="tab:gray", label="before (round-to-nearest)")
    ax_mse.bar(idx + 0.2, after, 0.4, color="tab:blue", label="after reconstruction")
    ax_mse.set_yscale("log")
    ax_mse.set_xticks(idx)
    ax_mse.set_xlabel("group")
    ax_mse.set_ylabel("group output MSE vs float (calibration images)")
    ax_mse.set_title("output MSE per group", fontsize=10)
    ax_mse.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_sensitivity(data: dict, path: Path, title: str) -> Path:
    """Figure 3: cross-entropy recovered when each set of activation quantizers runs in float."""
    kinds = [k for k in ("role", "block") if any(r["kind"] == k for r in data["rows"])]
    fig = Figure(figsize=(13, 0.9 + 0.32 * max(len([r for r in data["rows"] if r["kind"] == k]) for k in kinds)
                          if kinds else 3), layout="constrained")
    axes = fig.subplots(1, max(len(kinds), 1), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=False):
        rows = [r for r in data["rows"] if r["kind"] == kind][::-1]  # largest at the top
        y = np.arange(len(rows))
        values = [r["delta_cross_entropy"] for r in rows]
        ax.barh(y, values, color=["tab:red" if v > 0 else "tab:gray" for v in values])
        ax.set_yticks(y, [r["released"].replace(".input_quantizer", " in").replace("_quantizer", "") for r in rows],
                      fontsize=8)
        for yi, r in zip(y, rows, strict=True):
            ax.annotate(f"{r['delta_top1']:+.1f} pt", (r["delta_cross_entropy"], yi), fontsize=7,
                        xytext=(3, 0), textcoords="offset points", va="center")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("cross-entropy recovered in float (nats; label: Δ top-1)")
        ax.set_title(f"by {'quantizer kind' if kind == 'role' else 'block'}", fontsize=10)
    base = data["baseline"]
    fig.suptitle(f"{title}\nquantized: top-1 {base['top1']:.1f}%, cross-entropy {base['cross_entropy']:.3f} "
                 f"on {base['n']} images", fontsize=11)
    return _save(fig, path)


def plot_granularity(data: dict, path: Path, title: str) -> Path:
    """Figure 4: output MSE, KL and top-1 per plan, mean bar with min..max whiskers and each run as a dot."""
    plans = data["plans"]
    metrics = [(k, label) for k, label in (
        ("output_mse", f"output MSE vs fp32\n({data.get('output_mse_on', 'calibration images')})"),
        ("kl", "KL(fp32 ‖ quantized), nats\n(evaluation images)"),
        ("top1", "top-1 %\n(evaluation images)"),
    ) if any(p.get(k) for p in plans)]
    fig = Figure(figsize=(4.2 * max(len(metrics), 1) + 1, 4.4), layout="constrained")
    axes = fig.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    x = np.arange(len(plans))
    for ax, (key, label) in zip(axes, metrics, strict=False):
        means, lo, hi = [], [], []
        for p in plans:
            vals = p.get(key) or []
            m = float(np.mean(vals)) if vals else math.nan
            means.append(m)
            lo.append(m - min(vals) if vals else 0.0)
            hi.append(max(vals) - m if vals else 0.0)
        ax.bar(x, means, 0.6, color="tab:blue", alpha=0.6, yerr=[lo, hi], capsize=4, label="mean (whiskers: min..max)")
        for xi, p in zip(x, plans, strict=True):
            vals = p.get(key) or []
            ax.scatter([xi] * len(vals), vals, color="black", s=12, zorder=3, label="one run" if xi == 0 else None)
        if key == "top1" and data.get("fp32_top1") is not None:
            ax.axhline(data["fp32_top1"], color="tab:green", ls="--", label=f"fp32 {data['fp32_top1']:.1f}%")
            finite = [v for p in plans for v in (p.get(key) or [])] + [data["fp32_top1"]]
            ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 3))
        ax.set_xticks(x, [p["plan"] for p in plans], rotation=30, ha="right")  # ten plans fit without overlapping
        ax.set_xlabel("reconstruction plan")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name]
