"""Equal compute: each healed variant of a comparison given the seconds a reference variant took.

What a user decides with is what a model at count k costs to make: the seconds of scoring, cutting
and healing of one run to k removals (evaluation excluded), `build_seconds`, its final healing's
included where the recipe has one (compare.run_variant gives it to a copy at each count). The default heals
after every removal where healed ReplaceMe, one block cut, heals once, so at its own budget a
baseline spends a fraction of the default's seconds.

How it is measured: every variant first runs at the comparison's budget (its row as before). For
`--equal-seconds METHOD`, that method's healed variant is the reference. Another healed variant's
seconds at count k are split into its fixed part (scoring and cuts, which its healing budget does
not change) and its healing part, which is linear in healing steps: the variant runs again, at
that count alone, with the steps per removal that make fixed + scaled healing equal the
reference's seconds (`scaled_steps`). Its row records the seconds it then took beside the target:
both runs time the same work on the same machine, so the match is as repeatable as the machine's
step times (the ratio is in compare.md). Steps are capped where the variant's training text would
reach the healing guard's validation blocks; the cap is logged and the shortfall shows as a ratio
below 1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from .healing.text import healing_offsets

log = logging.getLogger(__name__)

SUFFIX = " @ equal seconds"


def build_seconds(records) -> float:
    """Seconds to make the model of these iteration records: scoring and cutting plus healing."""
    return sum(record.timings.get("score_s", 0.0) + record.timings.get("heal_s", 0.0) for record in records)


def fixed_seconds(records) -> float:
    """The part of `build_seconds` the healing budget does not change."""
    return sum(record.timings.get("score_s", 0.0) for record in records)


def scaled_steps(target: float, fixed: float, healing: float, steps: int, cap: int | None = None
                 ) -> tuple[int | None, str]:
    """Healing steps per removal so that fixed + healing scaled to them takes `target` seconds,
    from a run that took `healing` seconds at `steps` steps per removal; (None, why) where the fixed
    cost alone reaches the target, and at least one step otherwise."""
    if fixed >= target:
        return None, f"its scoring and cuts alone took {fixed:.0f} s, the reference's whole budget is {target:.0f} s"
    if healing <= 0 or steps <= 0:
        return None, "it ran no healing to scale"
    wanted = max(1, math.floor(steps * (target - fixed) / healing + 0.5))
    if cap is not None and wanted > cap:
        return cap, f"capped at {cap} steps from {wanted}: more would train on the guard's validation text"
    return wanted, ""


def validation_cap(blocks_before_validation: int, removals: float, blocks_per_step: int) -> int:
    """The most steps per removal whose fresh text, `removals` healings one after the other (a final
    healing counted as its share of one), ends before the guard's validation blocks."""
    return max(1, int(blocks_before_validation // max(1, removals * blocks_per_step)))


def equal_seconds_row(measured: dict, target: dict[int, float], steps_used: dict[int, int]) -> dict:
    """The figures of a variant run at equal seconds, per count, with the seconds it was given."""
    return {**measured, "target_seconds": target, "heal_steps": steps_used,
            "seconds_ratio": {n: measured["build_seconds_per_count"][n] / target[n] for n in steps_used}}


def with_steps(config, steps: int):
    """The comparison with a healing budget of `steps` optimizer steps per removal; a final healing
    keeps its share of the budget (its steps scaled alike, at least one)."""
    heal, before = config.heal, config.heal.steps_per_removal(config.data.seq_len)
    final = max(1, round(heal.final_steps * steps / before)) if heal.final_steps and before else heal.final_steps
    return dataclasses.replace(config, heal=dataclasses.replace(heal, steps=steps, tokens=None, epochs=1,
                                                                final_steps=final))


def at_scale(config, scale: float):
    """The comparison with its healing budget `scale` times as many steps per removal (at least one)."""
    if scale == 1:
        return config
    return with_steps(config, max(1, round(config.heal.steps_per_removal(config.data.seq_len) * scale)))


def scale_suffix(scale: float) -> str:
    return "" if scale == 1 else f" at {scale:g}x healing"


# A variant's seconds per count: all of it, the model's making (evaluation excluded), and its fixed part.
SECONDS_KEYS = ("seconds_per_count", "build_seconds_per_count", "fixed_seconds_per_count")


def at_equal_seconds(config, healed: list[tuple[str, str, bool]], by_seed: dict[str, dict], seed: int, again,
                     prepared_with) -> dict[str, dict]:
    """The rows `name + SUFFIX` of every healed variant but the reference, run again per count at the
    reference's seconds. `healed`: (variant name, method, whether it heals after every removal) of
    the healed variants; `by_seed`: what each ran at its own budget; `again(method, count, steps)`
    runs one at one count and steps; `prepared_with`: the configuration whose healings placed the
    guard's validation blocks."""
    names = {method: name for name, method, _ in healed}
    reference = by_seed[names[config.equal_seconds]][seed]["build_seconds_per_count"]
    steps = config.heal.steps_per_removal(config.data.seq_len)
    per_step = config.heal.batch_size * config.heal.grad_accum
    final_share = config.heal.final_steps / max(steps, 1)   # a final healing's text, in removals' worth
    before_validation = max(healing_offsets(prepared_with, max(config.counts))) if config.heal.guard else None
    rows = {}
    for name, method, iterative in healed:
        if method == config.equal_seconds:
            continue
        pilot, measured, used, started = by_seed[name][seed], {}, {}, time.perf_counter()
        for count in sorted(config.counts):
            cap = None if before_validation is None else \
                validation_cap(before_validation, (count if iterative else 1) + final_share, per_step)
            fixed = pilot["fixed_seconds_per_count"][count]
            chosen, why = scaled_steps(reference[count], fixed, pilot["build_seconds_per_count"][count] - fixed,
                                       steps, cap)
            if chosen is None:
                log.warning("%s cannot match %s at -%d: %s", name, names[config.equal_seconds], count, why)
                continue
            if why:
                log.warning("%s at -%d: %s", name, count, why)
            log.info("%s at -%d: %d healing steps a removal for %.0f s (the reference's)", name, count, chosen,
                     reference[count])
            for key, values in again(method, count, chosen).items():
                measured.setdefault(key, {}).update(values)
            used[count] = chosen
        if used:
            rows[name + SUFFIX] = {**equal_seconds_row(measured, {n: reference[n] for n in used}, used),
                                   "seconds": time.perf_counter() - started}
    return rows


def equal_seconds_lines(summary: dict) -> list[str]:
    """compare.md's account of the equal-seconds rows: the seconds each was given and took."""
    rows = {name: r for name, r in summary["results"].items() if name.endswith(SUFFIX)}
    if not rows:
        return []
    lines = ["", "## At equal seconds", "",
             f"Each healed variant run again at each count with the healing steps per removal that make its "
             f"seconds (scoring, cuts, healing; evaluation excluded) those of "
             f"{summary['config']['equal_seconds']}'s healed variant; fixed costs measured in its own-budget run "
             "(equal_compute.py).", "",
             "| variant | count | target s | healing steps a removal | took s | took / target |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        for count in sorted(r["heal_steps"], key=int):
            lines.append(f"| {name} | -{count} | {r['target_seconds'][count]:.0f} | {r['heal_steps'][count]} | "
                         f"{r['build_seconds_per_count'][count]:.0f} | {r['seconds_ratio'][count]:.2f} |")
    return lines
