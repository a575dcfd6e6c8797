"""Benchmark retention as the field computes it, and chance-corrected, with paired intervals.

Per task: the model's score (its table metric: acc_norm for HellaSwag, ARC-c and OpenBookQA,
acc for the others, the convention of ShortGPT- and LLM-Pruner-style tables), the original's,
and their ratio. For the suite: the ratio of the mean scores (the field's "retained
performance") and the mean of the per-task ratios. Chance-corrected retention is (score -
chance) / (original - chance), chance being what the best constant answer scores (1 / choices;
BoolQ: its majority label's share): a 4-way task at 25% keeps nothing. A task where the
original is not above chance beyond its own interval is shown but left out of that mean.

Intervals are 95% percentile intervals of a paired bootstrap over items: each draw resamples
every task's items with replacement, the same draw for both models (and for the two variants
of a difference), so the noise the two share cancels.
"""

from __future__ import annotations

import numpy as np

from .suite import ItemResults

DRAWS = 2000


def _scores(results: ItemResults, name: str) -> np.ndarray:
    return np.asarray(results.tasks[name][results.tasks[name]["metric"]], dtype=float)


def task_score(results: ItemResults, name: str) -> dict[str, float]:
    """One model's figures on one task: its table metric, acc and acc_norm."""
    values = results.tasks[name]
    return {"score": float(_scores(results, name).mean()), "metric": results.tasks[name]["metric"],
            "acc": float(np.mean(values["acc"])), "acc_norm": float(np.mean(values["acc_norm"])),
            "items": len(values["item"])}


def chance(results: ItemResults, name: str) -> float:
    """The best constant answer's score on these items."""
    values = results.tasks[name]
    if values["chance"] == "majority":
        targets = np.asarray(values["target"])
        return float(max(np.mean(targets == t) for t in np.unique(targets)))
    return float(np.mean(1.0 / np.asarray(values["choices"], dtype=float)))


def _check_paired(a: ItemResults, b: ItemResults, name: str) -> None:
    if a.tasks[name]["item"] != b.tasks[name]["item"]:
        raise ValueError(f"task {name}: the two results were not made on the same items")


def _interval(values: np.ndarray) -> list[float]:
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():   # 0 / 0 on every draw: no interval to give
        return [float("nan"), float("nan")]
    with np.errstate(invalid="ignore"):   # draws where the original scored 0 give inf, which stays in the tails
        low, high = np.nanpercentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def _draws(results: ItemResults, names: list[str], draws: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, len(results.tasks[name]["item"]), (draws, len(results.tasks[name]["item"])))
            for name in names}


def _suite_figures(model: dict[str, np.ndarray], original: dict[str, np.ndarray], chances: dict[str, float],
                   corrected: list[str]) -> dict[str, np.ndarray]:
    """Suite figures from per-task mean scores (arrays: one value per draw, or one value)."""
    names = list(model)
    with np.errstate(divide="ignore", invalid="ignore"):
        figures = {"ratio_of_means": np.mean([model[n] for n in names], 0) / np.mean([original[n] for n in names], 0),
                   "mean_of_ratios": np.mean([model[n] / original[n] for n in names], 0)}
        if corrected:
            figures["chance_corrected"] = np.mean([(model[n] - chances[n]) / (original[n] - chances[n])
                                                   for n in corrected], 0)
    return figures


def retention(model: ItemResults, original: ItemResults, draws: int = DRAWS, seed: int = 0) -> dict:
    """Per-task and suite retention of `model` against `original`, each with its paired interval."""
    names = list(original.tasks)
    for name in names:
        _check_paired(model, original, name)
    picks = _draws(original, names, draws, seed)
    tasks, chances, corrected = {}, {}, []
    drawn_model, drawn_original = {}, {}
    for name in names:
        m, o = _scores(model, name), _scores(original, name)
        chances[name] = chance(original, name)
        drawn_model[name], drawn_original[name] = m[picks[name]].mean(1), o[picks[name]].mean(1)
        above = bool(np.nanpercentile(drawn_original[name], 2.5) > chances[name])
        if above:
            corrected.append(name)
        with np.errstate(divide="ignore", invalid="ignore"):
            tasks[name] = {
                "metric": original.tasks[name]["metric"], "items": len(m), "score": float(m.mean()),
                "original": float(o.mean()), "original_interval": _interval(drawn_original[name]),
                "retention": float(m.mean() / o.mean()) if o.mean() else float("nan"),
                "retention_interval": _interval(drawn_model[name] / drawn_original[name]),
                "chance": chances[name], "original_above_chance": above,
                # None where the original is not above chance: the ratio would divide by noise.
                "chance_corrected": float((m.mean() - chances[name]) / (o.mean() - chances[name])) if above else None,
                "chance_corrected_interval": _interval((drawn_model[name] - chances[name])
                                                       / (drawn_original[name] - chances[name])) if above else None,
                "acc": float(np.mean(model.tasks[name]["acc"])),
                "acc_norm": float(np.mean(model.tasks[name]["acc_norm"])),
                "original_acc": float(np.mean(original.tasks[name]["acc"])),
                "original_acc_norm": float(np.mean(original.tasks[name]["acc_norm"]))}
    point = _suite_figures({n: np.array(tasks[n]["score"]) for n in names},
                           {n: np.array(tasks[n]["original"]) for n in names}, chances, corrected)
    spread = _suite_figures(drawn_model, drawn_original, chances, corrected)
    suite = {key: float(point[key]) for key in point}
    suite.update({f"{key}_interval": _interval(spread[key]) for key in spread})
    suite.update(score=float(np.mean([tasks[n]["score"] for n in names])),
                 original=float(np.mean([tasks[n]["original"] for n in names])),
                 chance_corrected_tasks=corrected, left_out=[n for n in names if n not in corrected])
    return {"tasks": tasks, "suite": suite, "draws": draws}


def difference(a: ItemResults, b: ItemResults, original: ItemResults, draws: int = DRAWS, seed: int = 0) -> dict:
    """Retention of `a` minus retention of `b` (both against `original`, on the same items), per
    task and for the suite's ratio of means, with paired intervals: what a comparison claims."""
    names = list(original.tasks)
    for name in names:
        _check_paired(a, original, name)
        _check_paired(b, original, name)
    picks = _draws(original, names, draws, seed)
    means = {side: {n: _scores(r, n)[picks[n]].mean(1) for n in names} for side, r in (("a", a), ("b", b),
                                                                                        ("o", original))}
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in names:
            o = _scores(original, name).mean()
            delta = (means["a"][name] - means["b"][name]) / means["o"][name]
            out[name] = {"difference": float((_scores(a, name).mean() - _scores(b, name).mean()) / o),
                         "interval": _interval(delta)}
        suite_o = np.mean([means["o"][n] for n in names], 0)
        delta = (np.mean([means["a"][n] for n in names], 0) - np.mean([means["b"][n] for n in names], 0)) / suite_o
        point = (np.mean([_scores(a, n).mean() for n in names]) - np.mean([_scores(b, n).mean() for n in names])) \
            / np.mean([_scores(original, n).mean() for n in names])
    return {"tasks": out, "suite": {"difference": float(point), "interval": _interval(delta)}}


def paired_ratio(model: list[float], original: list[float], draws: int = DRAWS, seed: int = 0
                 ) -> tuple[float, list[float]]:
    """Mean of `model` over mean of `original` (per-item scores on the same items, in the same
    order) and its 95% paired bootstrap interval: a task outside the suite, e.g. copy_generate."""
    return paired_ratio_difference(model, [0.0] * len(model), original, draws, seed)


def paired_ratio_difference(model: list[float], other: list[float], original: list[float], draws: int = DRAWS,
                            seed: int = 0) -> tuple[float, list[float]]:
    """`model`'s ratio to `original` minus `other`'s (per-item scores on the same items) and its
    95% paired bootstrap interval: what one variant keeps over another on a task outside the suite."""
    m, n, o = (np.asarray(values, dtype=float) for values in (model, other, original))
    if not m.shape == n.shape == o.shape:
        raise ValueError("the models were not scored on the same items")
    picks = np.random.default_rng(seed).integers(0, len(m), (draws, len(m)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (float((m.mean() - n.mean()) / o.mean()) if o.mean() else float("nan"),
                _interval((m[picks].mean(1) - n[picks].mean(1)) / o[picks].mean(1)))


def _span(value: float, interval) -> str:
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def suite_lines(bench: dict) -> list[str]:
    """A plain-text table of one evaluation's suite figures (`layerprune eval`)."""
    request = bench["request"]
    items = "whole splits" if not request["items"] else f"{request['items']} items a task"
    lines = [f"benchmarks, zero-shot on {bench['split']} items ({items}, {request['calibration']:g} of each task "
             "reserved for calibration); acc_norm for hellaswag, arc_challenge, openbookqa, acc for the others"]
    if "retention" not in bench:
        lines.append(f"{'task':<14} {'items':>5} {'metric':<8} {'score':>7} {'acc':>7} {'acc_norm':>8}")
        for name, row in bench["scores"].items():
            lines.append(f"{name:<14} {row['items']:>5} {row['metric']:<8} {row['score']:>7.3f} {row['acc']:>7.3f} "
                         f"{row['acc_norm']:>8.3f}")
        return lines
    figures = bench["retention"]
    lines.append(f"{'task':<14} {'items':>5} {'metric':<8} {'model':>6} {'original':>8} {'chance':>6}  "
                 f"{'retained [95%]':<22}  chance-corrected [95%]")
    for name, row in figures["tasks"].items():
        corrected = _span(row["chance_corrected"], row["chance_corrected_interval"]) \
            if row["original_above_chance"] else "- (the original is not above chance)"
        lines.append(f"{name:<14} {row['items']:>5} {row['metric']:<8} {row['score']:>6.3f} {row['original']:>8.3f} "
                     f"{row['chance']:>6.3f}  {_span(row['retention'], row['retention_interval']):<22}  {corrected}")
    suite = figures["suite"]
    lines.append(f"suite: mean {suite['score']:.3f} against {suite['original']:.3f}; retained (ratio of means) "
                 f"{_span(suite['ratio_of_means'], suite['ratio_of_means_interval'])}, mean of ratios "
                 f"{_span(suite['mean_of_ratios'], suite['mean_of_ratios_interval'])}")
    if "chance_corrected" in suite:
        left = f"; left out (original not above chance): {', '.join(suite['left_out'])}" if suite["left_out"] else ""
        corrected = _span(suite["chance_corrected"], suite["chance_corrected_interval"])
        lines.append(f"chance-corrected retention {corrected} over {', '.join(suite['chance_corrected_tasks'])}{left}")
    lines.append(f"(paired bootstrap over items, {figures['draws']} draws; {bench['seconds']:.0f}s"
                 + (f", of which the original {bench['original_seconds']:.0f}s" if "original_seconds" in bench else "")
                 + ")")
    return lines
