"""What a run leaves for people: report.json, report.md, plots, and a model card.

Everything here is derived from the history the pipeline recorded; nothing is
measured again except speed, which the pipeline passes in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PLOTS = {"importance": "importance_heatmap.png", "quality": "quality_retained.png", "heal": "heal_loss.png"}


def quality_curve(history: dict) -> list[tuple[int, float]]:
    """(layers removed, held-out quality retained) after each step, starting from the teacher."""
    points, removed = [(0, 1.0)], 0
    for entry in history["iterations"]:
        removed += len(entry["removed_original"])
        points.append((removed, entry["eval"]["quality_retained"]))
    return points


def plot_importance(history: dict, path: Path) -> None:
    depth = history["original_layers"]
    grid = np.full((len(history["iterations"]), depth), np.nan)
    for row, entry in enumerate(history["iterations"]):
        for layer, score in entry["scores"].items():
            if score is not None:
                grid[row, int(layer)] = score
    fig, ax = plt.subplots(figsize=(max(6, depth * 0.3), 1.5 + 0.4 * len(grid)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    for row, entry in enumerate(history["iterations"]):
        for layer in entry["removed_original"]:
            ax.add_patch(plt.Rectangle((layer - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xlabel("original layer index (red: removed at this iteration; blank: already gone or not scored)")
    ax.set_ylabel("iteration")
    ax.set_yticks(range(len(grid)), [str(i + 1) for i in range(len(grid))])
    ax.set_title(f"layer importance ({history['config']['metric']}; higher = more important)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("layers removed")
    ax.set_ylabel("quality retained (held-out, teacher = 1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heal(history: dict, path: Path) -> bool:
    rows = [row for entry in history["iterations"] for row in entry.get("heal", {}).get("rows", [])]
    rows += history.get("final_heal", {}).get("rows", [])
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
    ax.set_yscale("log")
    ax.set_xlabel("healing step (dotted: next removal)")
    ax.set_ylabel("loss")
    ax.set_title("healing losses")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary(history: dict, speed: dict) -> dict:
    final = history["final_eval"]
    return {
        "model": history["model"],
        "original_layers": history["original_layers"],
        "final_layers": history["final_layers"],
        "removed_original": history["removed_original"],
        "kept_original": history["kept_original"],
        "quality_retained": final["quality_retained"],
        "quality_curve": quality_curve(history),
        "teacher_eval": history["teacher_eval"],
        "final_eval": final["tasks"],
        "speed": speed,
        "seconds": history["seconds"],
        "config": history["config"],
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def task_table(teacher: dict, pruned: dict) -> list[str]:
    lines = ["| task | measure | original | pruned | retained |", "| --- | --- | --- | --- | --- |"]
    for task, values in pruned.items():
        ref = teacher.get(task, {})
        for key, value in values.items():
            retained = f"{value / ref[key]:.3f}" if key == "score" and ref.get(key) else ""
            lines.append(f"| {task} | {key} | {_fmt(ref.get(key, ''))} | {_fmt(value)} | {retained} |")
    return lines


def markdown(rep: dict, history: dict, plots: dict) -> str:
    speed = rep["speed"]
    lines = [
        f"# layerprune report: {rep['model']}",
        "",
        f"{rep['original_layers']} -> {rep['final_layers']} layers; removed (original indices, in order): "
        f"{rep['removed_original']}. Quality retained on held-out tasks: **{rep['quality_retained']:.3f}**.",
        "",
        f"Metric `{rep['config']['metric']}`, mode `{rep['config']['mode']}`, healing "
        f"`{rep['config']['heal']['method']}`; {rep['seconds']:.0f} s in all.",
        "",
        "## Held-out evaluation", "", *task_table(rep["teacher_eval"], rep["final_eval"]), "",
        "## Per iteration", "",
        "| iteration | removed (original) | layers | quality retained | healing KL before -> after | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in history["iterations"]:
        heal = e.get("heal") or {}
        kl = (f"{heal['held_out_before']['kl']:.4f} -> {heal['held_out_after']['kl']:.4f}"
              if "kl" in heal.get("held_out_before", {}) else "-")
        lines.append(f"| {e['iteration']} | {e['removed_original']} | {e['layers_after']} | "
                     f"{e['eval']['quality_retained']:.3f} | {kl} | {sum(e['timings'].values()):.0f} |")
    if speed:
        o, p = speed["original"], speed["pruned"]
        lines += ["", "## Speed (tokens per second, this machine)", "",
                  "| | original | pruned | ratio |", "| --- | --- | --- | --- |",
                  *(f"| {k.replace('_tokens_per_s', '')} | {o[k]:.1f} | {p[k]:.1f} | {p[k] / o[k]:.2f}x |"
                    for k in o)]
    lines += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()]
    return "\n".join(lines) + "\n"


def model_card(rep: dict) -> str:
    base = rep["model"]
    config = json.dumps(rep["config"], indent=2)
    return (
        f"---\nlibrary_name: transformers\ntags:\n- layerprune\n- depth-pruning\n- distillation\n"
        f"base_model: {base}\n---\n\n"
        f"# {Path(str(base)).name} pruned to {rep['final_layers']} layers\n\n"
        f"Made with layerprune from `{base}` ({rep['original_layers']} layers) by removing the original layers "
        f"{sorted(rep['removed_original'])} one at a time, each chosen by the `{rep['config']['metric']}` "
        f"importance metric ({rep['config']['mode']}), and healing by "
        f"{'distillation from the original after each removal' if rep['config']['heal']['method'] == 'distill' else 'nothing (no healing)'}."
        f" `config.json` keeps the original index of every kept layer in `layerprune_original_layers`.\n\n"
        f"Quality retained on held-out tasks: {rep['quality_retained']:.3f} (original = 1).\n\n"
        + "\n".join(task_table(rep["teacher_eval"], rep["final_eval"]))
        + "\n\nLoad it like any causal LM:\n\n```python\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n```\n\n"
        f"## The exact configuration\n\n```json\n{config}\n```\n"
    )


def write_report(out: Path, history: dict, speed: dict, write_json) -> dict:
    """report.json, report.md, the plots and README.md (the model card) into `out`."""
    plots = {}
    plot_importance(history, out / PLOTS["importance"])
    plots["importance"] = PLOTS["importance"]
    plot_quality({history["config"]["metric"]: quality_curve(history)}, out / PLOTS["quality"],
                 "quality retained against layers removed")
    plots["quality"] = PLOTS["quality"]
    if plot_heal(history, out / PLOTS["heal"]):
        plots["heal"] = PLOTS["heal"]
    rep = summary(history, speed)
    write_json(out / "report.json", rep)
    (out / "report.md").write_text(markdown(rep, history, plots), encoding="utf-8")
    (out / "README.md").write_text(model_card(rep), encoding="utf-8")
    return rep
