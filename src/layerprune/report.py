"""What a run leaves for people: report.json, report.md, plots, a model card, and the healing loss log.

Everything here is derived from the typed `History` the pipeline recorded;
nothing is measured again.
Every quality figure names the tasks it averages: "quality retained" is the
mean over --eval-tasks (the same in every iteration, the headline and
`compare`), "suite quality retained" the mean over the wider final suite.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .config import HealConfig, PruneConfig  # noqa: E402
from .io import write_file, write_json, write_text  # noqa: E402
from .options import changes_result, from_dict  # noqa: E402

if TYPE_CHECKING:
    from .checkpoint import History

PLOTS = {"importance": "importance_heatmap.png", "quality": "quality_retained.png", "heal": "heal_loss.png"}


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


def _tasks_named(names) -> str:
    return ", ".join(names)


def summary(history: "History") -> dict:
    return {
        "model": history.model,
        "original_layers": history.original_layers,
        "final_layers": history.final_layers,
        "removed_original": history.removed_original,
        "kept_original": history.kept_original,
        "quality_retained": history.final_eval.quality_retained,
        "quality_retained_interval": history.final_eval.interval,
        "quality_retained_tasks": history.final_eval.averaged_over,
        "suite_quality_retained": history.final_suite.quality_retained,
        "suite_tasks": history.final_suite.averaged_over,
        "quality_curve": quality_curve(history),
        "depth": history.depth,
        "teacher_eval": history.teacher_eval,
        "final_eval": history.final_suite.tasks,
        "speed": history.speed,
        "seconds": history.seconds,
        "config": history.config,
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


def with_interval(quality: float, interval) -> str:
    """0.889 [0.851, 0.924]: a quality retained with its 95% interval over held-out blocks."""
    return f"{quality:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def headline(rep: dict) -> str:
    interval = rep.get("quality_retained_interval")
    spread = f" (95% interval {interval[0]:.3f} to {interval[1]:.3f}, over held-out blocks)" if interval else ""
    return (f"Quality retained: **{rep['quality_retained']:.3f}**{spread} (mean of "
            f"{_tasks_named(rep['quality_retained_tasks'])} relative to the original, held-out text; the same "
            f"measure as in every iteration). Suite quality retained: {rep['suite_quality_retained']:.3f} "
            f"(mean over the final suite: {_tasks_named(rep['suite_tasks'])}).")


def speed_table(speed: dict) -> list[str]:
    if not speed:
        return []
    repeats = next(iter(speed.values()))["repeats"]
    lines = ["", f"## Speed (tokens per second on this machine; median [min-max] of {repeats} interleaved runs)", "",
             "| | original | pruned | pruned / original |", "| --- | --- | --- | --- |"]
    for workload, s in speed.items():
        cells = [f"{s[k]['median']:.1f} [{s[k]['min']:.1f}-{s[k]['max']:.1f}]" for k in ("original", "pruned")]
        ratio = s["ratio"]
        lines.append(f"| {workload} | {cells[0]} | {cells[1]} | {ratio['median']:.2f}x "
                     f"[{ratio['min']:.2f}-{ratio['max']:.2f}] |")
    return lines


def report_markdown(rep: dict, history: "History", plots: dict) -> str:
    config = rep["config"]
    lines = [
        f"# layerprune report: {rep['model']}", "",
        f"{rep['original_layers']} -> {rep['final_layers']} layers; removed (original indices, in order): "
        f"{rep['removed_original']}. {headline(rep)}", "",
        f"Metric `{config['metric']}`, mode `{config['mode']}`, healing `{config['heal']['method']}`; "
        f"{rep['seconds']:.0f} s in all.", "",
        "## Held-out evaluation (final suite)", "", *task_table(rep["teacher_eval"], rep["final_eval"]), "",
        "## Per iteration", "",
        f"Quality retained: mean of {_tasks_named(rep['quality_retained_tasks'])} relative to the original.", "",
        "| iteration | removed (original) | layers | quality retained [95% interval] | healing KL before -> after | "
        "seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for record in history.iterations:
        kl = healing_kl(record)
        lines.append(f"| {record.iteration} | {record.removed_original} | {record.layers_after} | "
                     f"{with_interval(record.eval.quality_retained, record.eval.interval)} | {kl} | "
                     f"{sum(record.timings.values()):.0f} |")
    guarded = guard_lines(history)
    if guarded:
        lines += ["", "## Healing guard (KL to the original on validation text from the training split)", "",
                  *guarded]
    lines += speed_table(rep["speed"])
    lines += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()]
    return "\n".join(lines) + "\n"


def healing_kl(record) -> str:
    """What one healing did to KL against the original: on held-out text where the run measured
    the cut before healing (--eval-before-heal), else on the guard's validation text."""
    heal = record.heal
    if heal is None:
        return "-"
    if "kl" in heal.held_out_before and "kl" in record.held_out_after:
        return f"{heal.held_out_before['kl']:.4f} -> {record.held_out_after['kl']:.4f} (held-out)"
    guard = heal.guard
    if guard is not None and guard.kl_after is not None:
        return f"{guard.kl_before:.4f} -> {guard.kl_after:.4f} (validation)"
    return "-"


def guard_lines(history: "History") -> list[str]:
    """One line per guarded healing: what it did to validation KL, and what was kept."""
    heals = [(f"iteration {r.iteration}", r.heal) for r in history.iterations]
    heals.append(("final healing", history.final_heal))
    return [f"- {name}: {heal.guard.sentence()}" for name, heal in heals
            if heal is not None and heal.guard]


def recipe(config: dict) -> str:
    """The run's recipe in words: what chose the layers, what patched the cuts, how healing trained.
    A card reader should not have to decode config.yaml to know how the model was made."""
    c = from_dict(PruneConfig, config)
    heal, seq = c.heal, c.data.seq_len
    # The removal metrics measure calibration text: `quality` on the chosen tasks, `nll` on its NLL alone.
    measured = {"quality": ", ".join(c.tasks), "nll": "NLL"}.get(c.metric)
    calib = f", on {measured} over {c.data.blocks('calib') * seq} calibration tokens" if measured else ""
    if measured and c.shortlist:
        calib += f", shortlisted to the {c.shortlist} layers Block Influence ranks lowest each round"
    if measured and c.screen:
        calib += (f", the {c.screen} least important on the first quarter of that text scored on the rest "
                  "(the others keep their first-quarter score)")
    parts = [f"Layers chosen by the `{c.metric}` metric ({c.mode}{calib})"]
    if c.patch != "none":
        # lstsq becomes a diagonal where the MLP output passes a norm (Gemma): "linear map" covers both.
        kind = "linear map" if c.patch == "lstsq" else "diagonal scaling"
        parts.append(f"each cut patched by a least-squares {kind} fitted in closed form on "
                     f"{c.data.blocks('patch') * seq} training tokens and folded into the layer below")
    if heal.method == "none":
        parts.append("no healing")
    else:
        trained = {"neighbours": f"the {heal.radius} layers on each side of the cut", "all": "every layer",
                   "lora": f"LoRA adapters of rank {heal.lora_r}", "last": "the last 3 layers and the LM head"
                   }[heal.trainable]
        text = {"stream": "fresh text each removal", "reuse": "the same text each removal",
                "teacher": "fresh text the original wrote itself, from prompts of the training text, each removal"
                }[heal.train_data]
        final = f", then {heal.final_steps} more steps after the last removal" if heal.final_steps else ""
        parts.append(
            f"healing after each removal: {heal.steps_per_removal(seq)} AdamW steps of {heal.batch_size} x "
            f"{heal.grad_accum} x {seq} tokens ({text}), lr {heal.lr:g}, {trained} trained{final}; "
            f"loss {heal.w_kl:g} x KL to the original's "
            f"logits + {heal.w_mse:g} x MSE of mapped hidden states + {heal.w_final:g} x MSE of the final state "
            f"({heal.mse_scale} MSE)" + (f", guarded on {c.data.blocks('val') * seq} validation tokens with up to "
                                         f"{heal.guard_retries} lower-lr retries" if heal.guard else ""))
    default = PruneConfig()
    chosen = (" This is layerprune's default recipe, chosen on validation text cut from the training split "
              f"(its docs/heal-sweep.md): {default.data.blocks('calib')} calibration blocks and a shortlist of "
              f"{default.shortlist} chose the same layers on every seed and kept the most at -2, -4 and -6 on "
              "SmolLM2.") if is_default_recipe(c) else ""
    return "Recipe: " + "; ".join(parts) + "." + chosen


# How layers are chosen and patched; with every healing option that changes a result, the recipe.
_CHOICE_FIELDS = ("metric", "mode", "patch", "patch_target", "patch_fit", "shortlist", "screen", "tasks")


def is_default_recipe(config: PruneConfig) -> bool:
    """Whether a run used the recipe the sweep chose (any model, depth and output). Every healing
    option counts unless config/ declares it `result=False` (the declaration resume reads too)."""
    default = PruneConfig()
    heal = [f.name for f in dataclasses.fields(HealConfig) if changes_result(f)]
    return (all(getattr(config, f) == getattr(default, f) for f in _CHOICE_FIELDS)
            and all(getattr(config.heal, f) == getattr(default.heal, f) for f in heal)
            and config.data.blocks("calib") == default.data.blocks("calib")
            and config.data.seq_len == default.data.seq_len)


def model_card(rep: dict, config_yaml: str, guarded: list[str] = ()) -> str:
    base = rep["model"]
    guard = ("Every healing was guarded: KL to the original was measured on validation text from the training "
             "split before, during and after it, and the best state was kept (the unhealed cut included).\n\n"
             + "\n".join(guarded) + "\n\n") if guarded else ""
    healed_by = ("distillation from the original after each removal" if rep["config"]["heal"]["method"] == "distill"
                 else "nothing (no healing)")
    return (
        f"---\nlibrary_name: transformers\ntags:\n- layerprune\n- depth-pruning\n- distillation\n"
        f"base_model: {base}\n---\n\n"
        f"# {Path(str(base)).name} pruned to {rep['final_layers']} layers\n\n"
        f"Made with layerprune from `{base}` ({rep['original_layers']} layers) by removing the original layers "
        f"{sorted(rep['removed_original'])} one at a time, each chosen by the `{rep['config']['metric']}` "
        f"importance metric ({rep['config']['mode']}), and healing by {healed_by}."
        f" `config.json` keeps the original index of every kept layer in `layerprune_original_layers`."
        + (f" Depth: {rep['depth']}." if rep.get("depth") else "") + "\n\n"
        f"{recipe(rep['config'])}\n\n{guard}{headline(rep)}\n\n"
        + "\n".join(task_table(rep["teacher_eval"], rep["final_eval"]))
        + "\n\nLoad it like any causal LM:\n\n```python\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n```\n\n"
        "## The exact configuration\n\n`config.yaml` in this folder; `layerprune prune --config config.yaml "
        f"--out NEW` repeats the run.\n\n```yaml\n{config_yaml}```\n"
    )


def write_report(out: Path, history: "History") -> dict:
    """report.json, report.md, the plots and README.md (the model card) into `out`; `out` holds
    config.yaml already."""
    plots = {}
    plot_importance(history, out / PLOTS["importance"])
    plots["importance"] = PLOTS["importance"]
    plot_quality({history.config["metric"]: quality_curve(history)}, out / PLOTS["quality"],
                 "quality retained against layers removed")
    plots["quality"] = PLOTS["quality"]
    if plot_heal(history, out / PLOTS["heal"]):
        plots["heal"] = PLOTS["heal"]
    rep = summary(history)
    write_json(out / "report.json", rep)
    write_text(out / "report.md", report_markdown(rep, history, plots))
    write_text(out / "README.md", model_card(rep, (out / "config.yaml").read_text(encoding="utf-8"),
                                             guard_lines(history)))
    return rep


def set_card_section(folder: Path, section: str) -> None:
    """Put a `## Title` section into the model card (README.md), replacing one of the same title."""
    card = Path(folder) / "README.md"
    title = section.split("\n", 1)[0]
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    start = text.find(f"\n{title}\n")
    if start >= 0:
        end = text.find("\n## ", start + len(title) + 2)
        text = text[:start] + (text[end:] if end >= 0 else "\n")
    write_text(card, text.rstrip("\n") + "\n\n" + section)


def write_loss_log(path: Path, rows: list[dict]) -> None:
    """Add per-step healing rows to a CSV; TensorBoard too where it is installed. Rows of the same
    iteration already there (a resumed run heals that iteration to its end again) are replaced."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.exists():
        with open(path, newline="", encoding="utf-8") as handle:
            redone = {str(row["iteration"]) for row in rows}
            kept = [row for row in csv.DictReader(handle) if row["iteration"] not in redone]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            # a run resumed from an older version's checkpoint may add a column
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in [*kept, *rows] for k in row)))
            writer.writeheader()
            writer.writerows([*kept, *rows])

    write_file(path, write)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    board = SummaryWriter(str(path.parent / "tensorboard"))
    for row in rows:   # one healing's attempts (guard retries) follow each other on the axis
        global_step = row["iteration"] * 100000 + row.get("attempt", 0) * 10000 + row["step"]
        for key in ("loss", "kl", "mse", "final_mse", "lr"):
            board.add_scalar(f"heal/{key}", row[key], global_step)
    board.close()
