"""A recipe sweep for the healing defaults, judged on text the reported figures never use.

Each variant changes one thing from the recipe the sweep began from (the default then: no patch,
raw MSE with KL/100, no healing guard), or, in RECIPE_VARIANTS, from today's default, and runs
`layerprune prune --remove N` on the embedded defaults (same data, budget and seeds). It is
judged on validation blocks cut from the training split past everything the runs heal on (the
training stream's blocks from `--skip` on): quality retained (perplexity, token accuracy, KL to
the original) there chooses. The held-out figure each run reports is printed beside it, for
reading only: choosing by it would tune on the numbers the README reports.

    python bench/sweep_heal.py --out runs/sweep                  # all variants, 2 removals
    python bench/sweep_heal.py --out runs/sweep --variants default,lr-1e-3
    python bench/sweep_heal.py --out runs/budget --skip 1000 --variants default,steps-120 --reuse runs/sweep
    python bench/sweep_heal.py --model gemma-3-270m-q4_k_m.gguf --out runs/sweep-gemma --remove 1 --skip 400 \
        --variants patch-lstsq,patch-lstsq-relative-mse-guard
    python bench/sweep_heal.py --out runs/sweep-local --variants current,local-15,local-30-global-22 \
        --seeds 0,1 --blocks 64 --skip 600     # today's default against its #26 variants
    python bench/sweep_heal.py --out runs/sweep-local --variants teacher-text,final-third --seeds 0,1 \
        --blocks 64 --skip 600 --reuse runs/sweep-local

`--bench-items N` also judges every variant on the benchmarks' calibration share (N items a task
of the items `--bench-calibration` reserves, which no reported figure uses: retention against the
original, paired interval), and `--copy` on copy_generate with paragraphs from the calibration
documents (training-side text): what users use, chosen on without touching what is reported.

    python bench/sweep_heal.py --out runs/screen-4 --remove 4 --variants current,teacher-text,teacher-mix,final-third,\
        bf16,lr-probe,choice-copy,choice-bench --skip 600 --blocks 64 --bench-items 150 --copy \
        --keep docs/heal-sweep-parts/screen-4     # #47's screen, one seed

`--keep DIR` (a folder committed with the repository, e.g. docs/heal-sweep-parts/screen-4) gets
sweep.json and each finished variant's history, report and per-item results after every variant,
and its finished rows are not run again: a sweep longer than a session continues in the next one,
whose checkout has no runs/ folder.

`--reuse DIR` takes a variant's finished run from an earlier sweep when its config is the same,
and only evaluates it again: a new validation window (a larger `--skip`, needed by the longer
budgets) then costs no second run of the variants already trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
from pathlib import Path

import yaml

from layerprune import DataConfig, PruneConfig, prune
from layerprune.checkpoint import continues
from layerprune.cli import configure_logging
from layerprune.config import BenchConfig
from layerprune.data import StreamPosition, load_corpus
from layerprune.models import load_model
from layerprune.options import from_dict, to_dict
from layerprune.inputs import scores_and_rows
from layerprune.tasks import TaskData, build_tasks, quality_retained
from layerprune.tasks.copying import copying_items
from layerprune.tasks.retention import difference, paired_ratio, paired_ratio_difference, retention
from layerprune.tasks.suite import ItemResults, request_for, run_suite
from layerprune.tasks.suite_cache import original_results
from layerprune.tasks.interval import bootstrap_interval

TASKS = ("perplexity", "token_accuracy", "kl")
# name -> (top-level overrides, heal overrides): one change from the default each, unless noted.
VARIANTS = {
    "default": ({}, {}),
    "lr-1e-3": ({}, {"lr": 1e-3}),
    "lr-2e-4": ({}, {"lr": 2e-4}),
    "relative-mse": ({}, {"mse_scale": "relative", "w_kl": 1.0}),
    "relative-mse-kl-led": ({}, {"mse_scale": "relative", "w_kl": 1.0, "w_mse": 0.1, "w_final": 0.1}),
    "trainable-all": ({}, {"trainable": "all"}),
    "patch-lstsq": ({"patch": "lstsq"}, {}),
    # the two changes that led alone, together
    "patch-lstsq-lr-1e-3": ({"patch": "lstsq"}, {"lr": 1e-3}),
    # the healing budget per removal (default 30 steps): how quality grows with compute
    "steps-60": ({}, {"steps": 60}),
    "steps-120": ({}, {"steps": 120}),
    # 8x: at -2 it heals on 1,920 of the embedded wiki's 2,323 training blocks (--skip 1950 fits)
    "steps-240": ({}, {"steps": 240}),
    # the recipe that transfers across families: scale-free MSE, KL at full weight, the healing guard
    "patch-lstsq-raw-guard": ({"patch": "lstsq"}, {"guard": True}),
    "patch-lstsq-relative-mse": ({"patch": "lstsq"}, {"mse_scale": "relative", "w_kl": 1.0}),
    "patch-lstsq-relative-mse-guard": ({"patch": "lstsq"}, {"mse_scale": "relative", "w_kl": 1.0, "guard": True}),
    "patch-lstsq-channel-mse": ({"patch": "lstsq"}, {"mse_scale": "channel", "w_kl": 1.0}),
    "patch-lstsq-channel-mse-guard": ({"patch": "lstsq"}, {"mse_scale": "channel", "w_kl": 1.0, "guard": True}),
}
# The recipe the sweep began from (the default then): no patch, the paper's raw MSE with KL/100, no guard.
# Its outcome made lstsq the default, and the second family (Gemma-3) made relative MSE and the guard so.
ORIGIN = {"patch": "none"}
ORIGIN_HEAL = {"mse_scale": "raw", "w_kl": 0.01, "guard": False}
# Variants of today's default recipe (PruneConfig's defaults), one change each: the #26 techniques.
# local-15: half of the 30 steps local, at equal tokens; local-30-global-22: about the default's
# seconds (bench/bench_heal_step.py: a local step costs about a third of a global one, 2026-12-04).
# teacher-text: healing on text the original writes (--train-data teacher), at the default's steps.
# final-third: a third of each removal's 30 steps moved to one final healing (20 per removal, then 10 per
# removal at the end): the same total tokens, spread otherwise.
RECIPE_VARIANTS = {
    "current": ({}, {}),
    "local-15": ({}, {"local_steps": 15}),
    "local-30-global-22": ({}, {"steps": 52, "local_steps": 30}),
    "teacher-text": ({}, {"train_data": "teacher"}),
    "teacher-mix": ({}, {"train_data": "mix"}),   # every other block the original's, the others the stream's
    "final-third": lambda remove: ({}, {"steps": 20, "final_steps": 10 * remove}),
    "bf16": ({}, {"mixed_precision": "bf16"}),   # healing under bfloat16 autocast: a cheaper step
    # #47's screen's two leads together: a third of the budget in a final healing, on the mixed text
    "final-third-mix": lambda remove: ({}, {"steps": 20, "final_steps": 10 * remove, "train_data": "mix"}),
    # The layer choice's calibration text (today: 32 blocks, the 12 layers Block Influence ranks lowest scored).
    # calib-8: the default before the GPU sweep of 2026-12-04 (8 blocks, every layer scored; near-ties decided
    # its choices at -4/-6); calib-32-all: 32 blocks, every layer scored (4x calib-8's scoring).
    "calib-8": ({"data": DataConfig(calib_tokens=8 * 256), "shortlist": 0}, {}),
    "calib-32-all": ({"shortlist": 0}, {}),
    # #47's candidates: the first healing's lr probed on validation text; the layer choice also
    # measuring the teacher-forced copying task on calibration text
    "lr-probe": ({}, {"lr_probe": True}),
    "choice-copy": ({"tasks": ("perplexity", "token_accuracy", "copy")}, {}),
    # the paper's evaluation-based importance: candidates also scored on the suite's calibration items
    "choice-bench": ({"tasks": ("perplexity", "token_accuracy", "bench")}, {}),
    "choice-all": ({"tasks": ("perplexity", "token_accuracy", "copy", "bench")}, {}),
}


def variant_config(name: str, out: Path, remove: int, model: str | None = None, seed: int = 0) -> PruneConfig:
    """The variant's run; a seed other than 0 gets its own folder (`name@seed`)."""
    folder = out / (name if seed == 0 else f"{name}@{seed}")
    common = dict(model=model, out=str(folder), remove=remove, seed=seed, measure_speed=False, gguf=False,
                  final_tasks=TASKS)
    if name in RECIPE_VARIANTS:
        variant = RECIPE_VARIANTS[name]
        top, heal = variant(remove) if callable(variant) else variant
        base = PruneConfig(**common)
        return dataclasses.replace(base, heal=dataclasses.replace(base.heal, **heal), **top)
    top, heal = VARIANTS[name]
    base = PruneConfig(**common, **ORIGIN)
    return dataclasses.replace(base, heal=dataclasses.replace(base.heal, **{**ORIGIN_HEAL, **heal}), **top)


def reusable(previous: Path | None, config: PruneConfig) -> Path | None:
    """An earlier sweep's finished run of exactly this config (its `out` aside), if there is one."""
    if previous is None:
        return None
    folder = previous / Path(config.out).name
    if not (folder / "history.json").is_file() or not (folder / "config.yaml").is_file():
        return None
    saved = from_dict(PruneConfig, {**yaml.safe_load((folder / "config.yaml").read_text()), "out": config.out})
    return folder if to_dict(saved) == to_dict(config) else None   # an option added since takes its default


def run_variant(config: PruneConfig, previous: Path | None) -> dict:
    """Train the variant, or copy an identical finished run; its removals, held-out figure, seconds.
    A variant killed mid-way (a session's end) continues from its last checkpoint, and one killed
    after its run but before sweep.json was written is only evaluated: a sweep can span sessions."""
    out = Path(config.out)
    folder = reusable(out.parent, config) or reusable(previous, config)
    if folder is None:
        prune(config, progress=True, overwrite=not continues(to_dict(config), out))
        folder = out
    elif folder != out:
        shutil.copytree(folder, config.out, dirs_exist_ok=True)
        print(f"reusing {folder} (same config)", flush=True)
    saved = json.loads((folder / "history.json").read_text())
    heal_s = sum(record["timings"].get("heal_s", 0) for record in saved["iterations"])
    return {"held_out": saved["final_eval"]["quality_retained"],
            "held_out_interval": saved["final_eval"].get("interval"), "removed": saved["removed_original"],
            "seconds": saved["seconds"], "heal_seconds": heal_s}


def users_judges(args, teacher, tokenizer, data: DataConfig) -> tuple[dict, dict]:
    """{name: (student, its folder) -> {figure: (retention, interval)}}: the benchmarks' calibration
    share and copying on the calibration documents, as asked; and the original's per-item results
    on them, which the paired differences between variants need. The original is scored once here
    (the suite: cached). Each variant's per-item results are kept in its folder."""
    judges, original = {}, {}
    if args.bench_items:
        request = request_for(("bench",), args.bench_items, BenchConfig().calibration, side="calibration")
        original["bench"] = original_results(teacher, tokenizer, request, "the original", True, True)

        def bench(student, folder: Path) -> dict:
            items = run_suite(student, tokenizer, request, True)
            (folder / BENCH_ITEMS).write_text(json.dumps(items.to_json()))
            suite = retention(items, original["bench"])["suite"]
            # BoolQ apart: a model that drifts onto its majority label gains there without reading
            without = retention(items.without(["boolq"]), original["bench"].without(["boolq"]))["suite"]
            return {"bench_calibration": (suite["ratio_of_means"], suite["ratio_of_means_interval"]),
                    "bench_calibration_no_boolq": (without["ratio_of_means"], without["ratio_of_means_interval"]),
                    "bench_calibration_chance_corrected": (suite.get("chance_corrected"),
                                                           suite.get("chance_corrected_interval"))}
        judges["bench_calibration"] = bench
    if args.copy:
        corpus = load_corpus(data, tokenizer)
        copying = copying_items(TaskData(tokenizer, corpus.blocks["calib"], corpus.docs["calib"], data.batch_size, 0))
        print("copy_generate: the original copies the calibration paragraphs (its scores kept for every variant)",
              flush=True)
        original["copy"] = copying.scores(teacher)

        def copy(student, folder: Path) -> dict:
            scores = copying.scores(student)
            (folder / COPY_ITEMS).write_text(json.dumps(scores))
            return {"copy_calibration": paired_ratio(scores, original["copy"])}
        judges["copy_calibration"] = copy
    return judges, original


def differences(rows: dict, folders: list[Path], original: dict, base: str = "current") -> list[str]:
    """Each variant minus `base` (same seed) on the calibration items, paired over items, from the
    per-item results the variants' folders keep: the screen's leads and losses with their noise."""
    def kept(key: str, name: str):
        for folder in folders:
            if folder is not None and (folder / key / name).is_file():
                return json.loads((folder / key / name).read_text())
        return None

    lines = []
    for key, row in sorted(rows.items()):
        seed = row.get("seed", 0)
        reference = base if seed == 0 else f"{base}@{seed}"
        if row.get("variant") == base or reference not in rows:
            continue
        cells = []
        mine, theirs = kept(key, BENCH_ITEMS), kept(reference, BENCH_ITEMS)
        for dropped in ((), ("boolq",)):
            if mine is None or theirs is None or "bench" not in original:
                cells.append("-")
                continue
            a, b = (ItemResults.from_json(items).without(dropped) for items in (mine, theirs))
            suite = difference(a, b, original["bench"].without(dropped))["suite"]
            cells.append(f"{suite['difference']:+.3f} [{suite['interval'][0]:+.3f}, {suite['interval'][1]:+.3f}]")
        mine, theirs = kept(key, COPY_ITEMS), kept(reference, COPY_ITEMS)
        if mine is None or theirs is None or "copy" not in original:
            cells.append("-")
        else:
            value, (low, high) = paired_ratio_difference(mine, theirs, original["copy"])
            cells.append(f"{value:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {row.get('variant', key)} | {seed} | " + " | ".join(cells) + " |")
    return lines


BENCH_ITEMS, COPY_ITEMS = "bench-calibration.json", "copy-calibration.json"   # per-item results, kept
KEPT_FILES = ("history.json", "report.md", "config.yaml", BENCH_ITEMS, COPY_ITEMS)


def save_original(original: dict, folders: list[Path | None]) -> None:
    """The original's per-item results beside the variants', in `original/`: the paired
    differences can be read again without running a model."""
    for folder in folders:
        if folder is None or not original:
            continue
        (folder / "original").mkdir(parents=True, exist_ok=True)
        if "bench" in original:
            (folder / "original" / BENCH_ITEMS).write_text(json.dumps(original["bench"].to_json()))
        if "copy" in original:
            (folder / "original" / COPY_ITEMS).write_text(json.dumps(original["copy"]))


def read_rows(out: Path, keep: Path | None) -> dict:
    """The finished variants' rows: the kept folder's, then the working folder's (newer) over them."""
    rows = {}
    for folder in (keep, out):
        if folder is not None and (folder / "sweep.json").is_file():
            rows.update(json.loads((folder / "sweep.json").read_text()))
    return rows


def save_rows(rows: dict, out: Path, keep: Path | None, finished: Path) -> None:
    """sweep.json in the working folder and, with --keep, in the kept one beside the finished
    variant's small files (no weights): what a later session needs to continue the sweep and to read
    each variant's figures, where the working folder (runs/) does not outlive the session."""
    for folder in (out, keep):
        if folder is None:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if folder == keep:
            (keep / finished.name).mkdir(exist_ok=True)
            for name in KEPT_FILES:
                if (finished / name).is_file():
                    shutil.copy2(finished / name, keep / finished.name / name)
        (folder / "sweep.json").write_text(json.dumps(rows, indent=2))


def _interval(interval) -> str:
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--remove", type=int, default=2)
    parser.add_argument("--model", help="a .gguf file or HF folder (default: the embedded SmolLM2)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds (data order, healing)")
    parser.add_argument("--skip", type=int, default=400, help="training-stream blocks before the validation ones")
    parser.add_argument("--blocks", type=int, default=32, help="validation blocks")
    parser.add_argument("--reuse", type=Path, help="an earlier sweep's --out whose identical finished runs are reused")
    parser.add_argument("--keep", type=Path,
                        help="a folder kept with the repository: each finished variant's row and small files go there, "
                             "and its rows count as finished (a sweep over several sessions)")
    parser.add_argument("--device", default="cpu", help="where the validation is scored: cpu (default), auto or cuda")
    parser.add_argument("--bench-items", type=int, default=0,
                        help="also judge on N items a task of the benchmarks' calibration share (0: not)")
    parser.add_argument("--copy", action="store_true",
                        help="also judge on copy_generate with paragraphs from the calibration documents")
    args = parser.parse_args()
    configure_logging(quiet=False)
    names, seeds = args.variants.split(","), [int(seed) for seed in args.seeds.split(",")]
    unknown = sorted(set(names) - set(VARIANTS) - set(RECIPE_VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: choose from {', '.join([*VARIANTS, *RECIPE_VARIANTS])}")

    teacher, tokenizer = load_model(args.model, device=args.device)
    data = DataConfig()
    stream = load_corpus(data, tokenizer).train
    # the runs heal on these blocks, and the guarded ones hold back validation blocks just past them
    healed = args.remove * max(variant_config(n, args.out, args.remove).heal.blocks_per_removal(data.seq_len)
                               for n in names) + data.blocks("val")
    if args.skip < healed:
        raise SystemExit(f"--skip {args.skip} is inside the {healed} blocks the runs heal on or guard with")
    validation = stream.take(args.blocks, stream.advance(StreamPosition(), args.skip))[0]
    tasks = build_tasks(TASKS, TaskData(tokenizer, validation, [], data.batch_size, 0))
    reference, reference_rows = scores_and_rows(teacher, tasks, teacher)
    judges, original = users_judges(args, teacher, tokenizer, data)
    save_original(original, [args.out, args.keep])
    rows = read_rows(args.out, args.keep)
    for seed in seeds:
        for name in names:
            config = variant_config(name, args.out, args.remove, args.model, seed)
            key = Path(config.out).name
            if key in rows:
                continue
            print(f"variant {key}: {'continuing' if continues(to_dict(config), Path(config.out)) else 'running'}",
                  flush=True)
            row = run_variant(config, args.reuse)
            print(f"variant {key}: judging on validation text" + "".join(f", {what}" for what in judges), flush=True)
            student, _ = load_model(config.out, device=args.device)
            scores, block_rows = scores_and_rows(student, tasks, teacher)
            judged = {}
            for judge in judges.values():
                judged.update(judge(student, Path(config.out)))
            rows[key] = {"variant": name, "seed": seed, "validation": quality_retained(scores, reference),
                         "validation_interval": bootstrap_interval(block_rows, reference_rows, tasks),
                         "validation_kl": scores["kl"]["kl"], **row, **judged}
            save_rows(rows, args.out, args.keep, Path(config.out))
            print(key, rows[key], flush=True)
    print(f"\n{args.remove} layers removed; validation: {args.blocks} x {data.seq_len} training-split tokens from "
          f"block {args.skip} of the stream (chooses, 95% interval over its blocks); held-out: the run's own "
          "report (read only)\n")
    print("| variant | seed | removed | validation quality retained | validation KL | held-out quality retained | "
          "healing s | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, row in sorted(rows.items(), key=lambda kv: (kv[1].get("variant", kv[0]), kv[1].get("seed", 0))):
        print(f"| {row.get('variant', key)} | {row.get('seed', 0)} | {row['removed']} | {row['validation']:.3f}"
              f"{_interval(row.get('validation_interval'))} | {row['validation_kl']:.3f} | {row['held_out']:.3f}"
              f"{_interval(row.get('held_out_interval'))} | {row.get('heal_seconds', float('nan')):.0f} | "
              f"{row['seconds']:.0f} |")
    users = [key for key in ("bench_calibration", "bench_calibration_no_boolq", "bench_calibration_chance_corrected",
                             "copy_calibration") if any(key in row for row in rows.values())]
    if users:
        print("\nWhat users use, on training-side items (chooses with the validation above): retention against the "
              "original, 95% paired interval over items\n")
        print("| variant | seed | " + " | ".join(users) + " |")
        print("| --- | --- |" + " --- |" * len(users))
        for key, row in sorted(rows.items(), key=lambda kv: (kv[1].get("variant", kv[0]), kv[1].get("seed", 0))):
            cells = [f"{row[u][0]:.3f}{_interval(row[u][1])}" if row.get(u, [None])[0] is not None else "-"
                     for u in users]
            print(f"| {row.get('variant', key)} | {row.get('seed', 0)} | " + " | ".join(cells) + " |")
    paired = differences(rows, [args.out, args.keep], original)
    if paired:
        print("\nEach variant minus today's default (current) on the same training-side items: 95% paired "
              "bootstrap interval over items\n")
        print("| variant | seed | benchmarks | without BoolQ | copying |")
        print("| --- | --- | --- | --- | --- |")
        print("\n".join(paired))
    by_variant: dict[str, list[dict]] = {}
    for row in rows.values():
        by_variant.setdefault(row.get("variant", ""), []).append(row)
    print("\n| variant | seeds | validation mean | spread over seeds | held-out mean | healing s (mean) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, group in sorted(by_variant.items(), key=lambda kv: -statistics.mean(r["validation"] for r in kv[1])):
        values = [r["validation"] for r in group]
        print(f"| {name} | {len(group)} | {statistics.mean(values):.3f} | {min(values):.3f} to {max(values):.3f} | "
              f"{statistics.mean(r['held_out'] for r in group):.3f} | "
              f"{statistics.mean(r.get('heal_seconds', float('nan')) for r in group):.0f} |")


if __name__ == "__main__":
    main()
