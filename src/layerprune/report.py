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
from pathlib import Path
from typing import TYPE_CHECKING

from .config import HealConfig, PruneConfig
from .healing.lr_probe import ProbeLog
from .io import write_file, write_json, write_text
from .options import changes_result, from_dict
from .plots import plot_heal, plot_importance, plot_quality, quality_curve

if TYPE_CHECKING:
    from .checkpoint import History

PLOTS = {"importance": "importance_heatmap.png", "quality": "quality_retained.png", "heal": "heal_loss.png"}


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


RETENTION_KEYS = ("retention", "retention_low", "retention_high")


def task_table(teacher: dict, pruned: dict) -> list[str]:
    """One row per task measure; a task scored item by item against the original (copy_generate,
    the benchmark suites) shows its retention with its paired 95% interval."""
    lines = ["| task | measure | original | pruned | retained [95% interval over items] |",
             "| --- | --- | --- | --- | --- |"]
    for task, values in pruned.items():
        ref = teacher.get(task, {})
        for key, value in values.items():
            if key in RETENTION_KEYS:
                continue
            lines.append(f"| {task} | {key} | {_fmt(ref.get(key, ''))} | {_fmt(value)} | "
                         f"{retained_cell(values, ref.get(key), key)} |")
    return lines


def retained_cell(values: dict, original: float | None, key: str) -> str:
    """A task's score against the original's: with its paired interval where the task gives one
    (copy_generate, the suites), else the plain ratio; blank for its other measures."""
    if key != "score" or not original:
        return ""
    if "retention_low" in values:
        return with_interval(values["retention"], [values["retention_low"], values["retention_high"]])
    return f"{values[key] / original:.3f}"


def hidden_tasks(rep: dict) -> list[str]:
    """A paragraph naming the tasks `below_headline` finds, for the report and the card (none: nothing)."""
    lines = below_headline(rep)
    return ["Not every task keeps what the headline says:", "", *lines, ""] if lines else []


def below_headline(rep: dict) -> list[str]:
    """The final tasks a headline would hide: retention below the headline's by more than the
    task's own interval (its upper end under the headline), or, for a task without an interval,
    below the headline's interval. The headline's own tasks are its parts, not hidden by it."""
    headline_value = rep["quality_retained"]
    floor = (rep.get("quality_retained_interval") or [headline_value])[0]
    lines = []
    for task, values in rep["final_eval"].items():
        if task in rep.get("quality_retained_tasks", ()):
            continue
        original = rep["teacher_eval"].get(task, {}).get("score")
        if "retention_high" in values and values["retention_high"] < headline_value:
            kept = with_interval(values["retention"], [values["retention_low"], values["retention_high"]])
        elif "retention_high" not in values and original and values["score"] / original < floor:
            kept = f"{values['score'] / original:.3f} (no interval)"
        else:
            continue
        lines.append(f"- **{task}** keeps {kept} of the original, below the headline's {headline_value:.3f}")
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
        f"{rep['removed_original']}. {headline(rep)}", "", *hidden_tasks(rep),
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
    """One line per guarded healing: what it did to validation KL, and what was kept (and before
    the first, where it ran, what the lr probe tried and chose)."""
    heals = [(f"iteration {r.iteration}", r.heal) for r in history.iterations]
    heals.append(("final healing", history.final_heal))
    lines = []
    for name, heal in heals:
        if heal is not None and heal.lr_probe:
            lines.append(f"- {name}: {ProbeLog(**heal.lr_probe).sentence()}")
        if heal is not None and heal.guard:
            lines.append(f"- {name}: {heal.guard.sentence()}")
    return lines


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
                "teacher": "fresh text the original wrote itself, from prompts of the training text, each removal",
                "mix": "fresh text each removal, every other block written by the original"}[heal.train_data]
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
        f"{recipe(rep['config'])}\n\n{guard}{headline(rep)}\n\n" + "".join(f"{line}\n" for line in hidden_tasks(rep))
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
