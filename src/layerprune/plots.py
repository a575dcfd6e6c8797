"""The run's and the comparison's plots (PNG files): importance heat map, quality against layers
removed or seconds, healing losses. Each reads what the records hold; nothing is measured."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from .checkpoint import History


def quality_curve(history: "History") -> list[tuple[int, float]]:
    """(layers removed, held-out quality retained) after each step, starting from the teacher."""
    points, removed = [(0, 1.0)], 0
    for record in history.iterations:
        removed += len(record.removed_original)
        points.append((removed, record.eval.quality_retained))
    return points


def plot_importance(history: "History", path: Path) -> None:
    depth = history.original_layers
    grid = np.full((len(history.iterations), depth), np.nan)
    for row, record in enumerate(history.iterations):
        for layer, score in record.scores.items():
            if score is not None:
                grid[row, int(layer)] = score
    fig, ax = plt.subplots(figsize=(max(6, depth * 0.3), 1.5 + 0.4 * len(grid)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    for row, record in enumerate(history.iterations):
        for layer in record.removed_original:
            ax.add_patch(plt.Rectangle((layer - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xlabel("original layer index (red: removed at this iteration; blank: already gone or not scored)")
    ax.set_ylabel("iteration")
    ax.set_yticks(range(len(grid)), [str(i + 1) for i in range(len(grid))])
    ax.set_title(f"layer importance ({history.config['metric']}; higher = more important)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _save_quality_plot(fig, ax, xlabel: str, title: str, path: Path,
                       ylabel: str = "quality retained (held-out, teacher = 1)") -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 60), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(curves: dict[str, list[tuple[int, float]]], path: Path, title: str, ylabel: str | None = None
                 ) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    _save_quality_plot(fig, ax, "layers removed", title, path, *([ylabel] if ylabel else []))


def plot_cost(points: dict[str, list[tuple[float, float, int]]], path: Path, title: str) -> None:
    """Quality retained against seconds, one line per method through its (seconds, quality,
    layers removed) points, each point labelled with its count."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, rows in points.items():
        seconds, quality, _ = zip(*rows)
        ax.plot(seconds, quality, marker="o", label=label)
        for x, y, n in rows:
            ax.annotate(f"-{n}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    _save_quality_plot(fig, ax, "seconds spent (scoring, cuts, healing, evaluation; log scale)", title, path)


def plot_heal(history: "History", path: Path) -> bool:
    heals = [record.heal for record in history.iterations] + [history.final_heal]
    rows = [row for log in heals if log is not None for row in log.rows]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(1, len(rows) + 1)
    for key, label in (("loss", "total"), ("kl", "KL (unweighted)"), ("mse", "MSE mapped layers"),
                       ("final_mse", "MSE final state")):
        ax.plot(x, [row[key] for row in rows], label=label, linewidth=1)
    starts = [i for i in range(1, len(rows)) if rows[i]["iteration"] != rows[i - 1]["iteration"]]
    for s in starts:
        ax.axvline(s + 0.5, color="grey", linestyle=":", linewidth=1)
    retries = [i for i in range(1, len(rows)) if rows[i]["iteration"] == rows[i - 1]["iteration"]
               and rows[i].get("attempt", 0) != rows[i - 1].get("attempt", 0)]
    for s in retries:
        ax.axvline(s + 0.5, color="red", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("healing step (dotted: next removal; red dashed: the guard's retry at a lower lr)")
    ax.set_ylabel("loss")
    ax.set_title("healing losses")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both seconds (fewer) and value (higher), by seconds."""
    best, kept = float("-inf"), []
    for seconds, value in sorted(points, key=lambda p: (p[0], -p[1])):
        if value > best:
            kept.append((seconds, value))
            best = value
    return kept


def plot_frontier(points: dict[int, dict[str, tuple[float, float]]], path: Path, title: str, ylabel: str) -> None:
    """One panel per count: each variant at (seconds to make the model, its retention), the
    frontier (what the fewest seconds buy) drawn through the points nothing beats."""
    counts = sorted(points)
    fig, axes = plt.subplots(1, len(counts), figsize=(5.5 * len(counts), 4.2), squeeze=False)
    for ax, count in zip(axes[0], counts):
        for name, (seconds, value) in sorted(points[count].items()):
            ax.plot([seconds], [value], marker="o", linestyle="none", label=name)
        line = frontier(list(points[count].values()))
        ax.step(*zip(*line), where="post", color="grey", linestyle="--", linewidth=1, label="frontier")
        ax.set_xscale("log")
        ax.set_title(f"-{count} layers", fontsize=10)
        ax.set_xlabel("seconds to make the model (scoring, cuts, healing; log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 110), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
