import json

import pytest

from layerprune.cli import main
from layerprune.compare import METHODS, variant_config
from layerprune.config import CompareConfig, HealConfig

from common import make_text_file


def test_variants_share_the_recipe_and_set_their_method():
    config = CompareConfig(out="c", seed=3, tasks=("kl",), protect_last=1, heal=HealConfig(steps=7))
    variant = variant_config(config, "sleb-nll", "distill", 4)
    assert (variant.metric, variant.mode, variant.remove) == ("nll", "iterative", 4)
    assert variant.seed == 3 and variant.tasks == ("kl",) and variant.protect_last == 1
    assert variant.heal.steps == 7 and variant.heal.method == "distill" and variant.heal.checkpoint_every == 0
    assert variant_config(config, "shortgpt", "none", 2).heal.method == "none"
    replaceme = variant_config(config, "replaceme", "none", 3)
    assert (replaceme.metric, replaceme.mode, replaceme.patch) == ("angular_last", "block", "lstsq")
    assert variant_config(CompareConfig(out="c", patch="diag"), "layerprune", "none", 1).patch == "diag"
    # the shortlist is our recipe's: SLEB scores every layer, as published; every method reads the same text
    shortlisted = CompareConfig(out="c", shortlist=5)
    assert variant_config(shortlisted, "layerprune", "distill", 2).shortlist == 5
    assert variant_config(shortlisted, "sleb-nll", "distill", 2).shortlist is None
    assert variant_config(CompareConfig(out="c", screen=4), "sleb-nll", "none", 2).screen is None
    assert variant_config(CompareConfig(out="c", screen=4), "layerprune", "none", 2).screen == 4
    assert variant_config(shortlisted, "sleb-nll", "none", 2).data == variant_config(shortlisted, "layerprune",
                                                                                      "none", 2).data


def test_compare_writes_table_and_plot(tiny_dir, text_file, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(tiny_dir), "--data", str(text_file), "--out", str(out), "--remove", "1,2",
                 "--seq-len", "32", "--calib-blocks", "2", "--patch-blocks", "4", "--eval-blocks", "2",
                 "--heal-steps", "1", "--heal-grad-accum", "1", "--quiet", "--device", "cpu"])
    assert code == 0
    summary = json.loads((out / "compare.json").read_text())
    assert len(summary["results"]) == 2 * len(METHODS) - 1   # last-layers-ft runs with its own healing only
    assert "last-layers-ft + healing (LM head and last 3 layers)" in summary["results"]
    for result in summary["results"].values():
        assert set(result["quality_retained"]) == {"1", "2"} == set(result["quality_retained_unseen"])
        assert all(0 < q <= 1.5 for q in result["quality_retained_unseen"].values())
    assert summary["unseen_data"] == "embedded:news"
    for plot in ("compare.png", "compare_unseen.png", "compare_seconds.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    for result in summary["results"].values():   # reaching -2 takes longer than -1 for an iterative method
        spent = result["seconds_per_count"]
        assert spent["2"] > 0 and (spent["2"] > spent["1"] or result["method"] not in ("iterative-bi", "sleb-nll",
                                                                                  "layerprune"))
    for result in summary["results"].values():   # which original layers each count removed
        assert [len(result["removed_original"][n]) for n in ("1", "2")] == [1, 2]
    for result in summary["results"].values():   # every figure with its interval, around it
        for n, (low, high) in result["quality_retained_interval"].items():
            assert low <= result["quality_retained"][n] <= high
    table = (out / "compare.md").read_text()
    assert "95% bootstrap interval" in table and table.count("**") >= 2 * 4
    assert "| layerprune + lstsq patch + healing |" in table and "| shortgpt + no healing |" in table
    assert "| replaceme + no healing |" in table and "embedded:news: -1 | -2 |" in table
    assert not (out / "cache").exists()


def test_the_unseen_domain_is_evaluated_on_the_student_at_each_count(tiny_dir, text_file, tmp_path, monkeypatch):
    """Iterative variants are read off after each removal: the unseen domain is measured then too."""
    from layerprune.compare import Domain, Measures, run_variant, unseen_domain
    from layerprune.config import DataConfig
    from layerprune.models import load_model
    from layerprune.inputs import build_inputs
    from layerprune.healing import build_resources

    other = make_text_file(tmp_path / "other.txt", docs=40, seed=1)
    config = CompareConfig(out="unused", model=str(tiny_dir), device="cpu", counts=(1, 3), unseen_data=str(other),
                           data=DataConfig(source=str(text_file), seq_len=32, calib_blocks=2, patch_blocks=2,
                                           eval_blocks=2, batch_size=2))
    teacher, tokenizer = load_model(config.model, device="cpu")
    inputs = build_inputs(config, teacher, tokenizer, (), teacher_scores=False)
    domain = unseen_domain(config, teacher, tokenizer)
    assert domain.tasks[0].batches[0].input_ids.shape == (2, 32)   # every document of it is held out
    depths = []
    monkeypatch.setattr(Domain, "retained",
                        lambda self, student, teacher: depths.append(student.config.num_hidden_layers) or (1.0, None))
    shared = build_resources(config, inputs.corpus, 3, teacher, tmp_path / "text", None, False)
    quality = run_variant(inputs, config, "iterative-bi", "none", shared, Measures(domain, None), progress=False)
    assert depths == [5, 3] and set(quality["quality_retained_unseen"]) == {1, 3}
    # a domain of the held-out tasks themselves: the unseen figures equal the held-out ones
    monkeypatch.undo()
    held_out = Domain("held-out", inputs.eval_tasks, inputs.teacher_eval, inputs.teacher_rows)
    quality = run_variant(inputs, config, "shortgpt", "none", shared, Measures(held_out, None), progress=False)
    assert quality["quality_retained_unseen"] == pytest.approx(quality["quality_retained"])
    assert quality["quality_retained_unseen_interval"] == quality["quality_retained_interval"]


def test_a_final_healing_is_given_at_each_count_to_a_copy(tiny_dir, text_file, tmp_path, monkeypatch):
    """A count's figures and seconds are those of the model a run stopped there ends with, its final
    healing included; the run goes on from the student as it was."""
    from layerprune.compare import Measures, run_variant
    from layerprune.run import PruneRun
    from layerprune.config import DataConfig
    from layerprune.models import load_model
    from layerprune.inputs import build_inputs
    from layerprune.healing import build_resources

    data = DataConfig(source=str(text_file), seq_len=32, calib_blocks=2, patch_blocks=2, eval_blocks=2, batch_size=2)
    branch, unhealed = PruneRun.final_branch, {}

    def timed_branch(run):   # the records' own figure before the copy's healing, and a final healing of 1,000 s
        unhealed[len(run.records)] = run.records[-1].eval.quality_retained
        model, healed, _ = branch(run)
        return model, healed, 1000.0 if healed is not None else 0.0
    monkeypatch.setattr(PruneRun, "final_branch", timed_branch)
    runs = {}
    for final in (0, 2):
        heal = HealConfig(steps=2, batch_size=2, grad_accum=1, warmup_steps=1, final_steps=final, lr=1e-2)
        config = CompareConfig(out="unused", model=str(tiny_dir), device="cpu", counts=(1, 2), data=data, heal=heal)
        teacher, tokenizer = load_model(config.model, device="cpu")
        inputs = build_inputs(config, teacher, tokenizer, (), teacher_scores=False)
        shared = build_resources(config, inputs.corpus, 2, teacher, tmp_path / f"text{final}", None, False)
        runs[final] = run_variant(inputs, config, "iterative-bi", "distill", shared, Measures(None, None), False)
    plain, finals = runs[0], runs[2]
    assert finals["removed_original"] == plain["removed_original"]
    for count in (1, 2):
        assert unhealed[count] == plain["quality_retained"][count]   # the run itself went on as without
        assert finals["quality_retained"][count] != plain["quality_retained"][count]
        assert finals["build_seconds_per_count"][count] >= 1000 > plain["build_seconds_per_count"][count]


def test_a_patch_the_method_does_not_define_is_named():
    from layerprune.compare import variant_name

    assert variant_name(CompareConfig(out="c", patch="lstsq"), "layerprune", "distill") == \
        "layerprune + lstsq patch + healing"
    assert variant_name(CompareConfig(out="c", patch="lstsq"), "replaceme", "none") == "replaceme + no healing"
    assert variant_name(CompareConfig(out="c", patch="none"), "layerprune", "none") == "layerprune + no healing"
    taught = CompareConfig(out="c", patch="lstsq", patch_target="teacher")
    assert variant_name(taught, "layerprune", "none") == "layerprune + lstsq patch (to the teacher) + no healing"


def test_replaceme_runs_as_published_whatever_the_comparison_patch():
    from layerprune.compare import variant_config

    taught = CompareConfig(out="c", patch="diag", patch_target="teacher")
    replaceme = variant_config(taught, "replaceme", "none", 2)
    assert (replaceme.patch, replaceme.patch_target, replaceme.mode) == ("lstsq", "layer", "block")
    ours = variant_config(taught, "layerprune", "distill", 2)
    assert (ours.patch, ours.patch_target, ours.heal.method) == ("diag", "teacher", "distill")


def test_separate_comparisons_merge_into_one_table_only_on_the_same_inputs(tmp_path):
    from layerprune.compare_table import merge_comparisons, write_comparison
    from layerprune.errors import LayerpruneError

    def summary(name, quality, data="embedded:wiki"):
        return {"model": "m", "counts": [1, 2], "eval_tasks": ["kl"], "data": data, "unseen_data": None,
                "teacher_eval": {"kl": {"score": 1.0}}, "config": {"methods": [name]},
                "results": {name: {"method": name, "heal": "none", "patch": "none", "seconds": 1.0,
                                   "quality_retained": {"1": quality, "2": quality / 2}}}}

    merged = merge_comparisons([summary("a", 0.9), summary("b", 0.8)])
    assert list(merged["results"]) == ["a", "b"] and merged["results"]["b"]["config"] == {"methods": ["b"]}
    write_comparison(tmp_path, merged)
    assert "| b | 0.800 | 0.400 | 1 | 0 |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 0
    with pytest.raises(LayerpruneError, match="differ in data"):
        merge_comparisons([summary("a", 0.9), summary("b", 0.8, data="embedded:news")])
    with pytest.raises(LayerpruneError, match="seed 0 in more than one"):
        merge_comparisons([summary("a", 0.9), summary("a", 0.8)])


def test_a_variants_seeds_run_in_separate_comparisons_pool_as_if_run_together(tmp_path):
    from layerprune.compare_table import merge_comparisons, over_seeds, write_comparison
    from layerprune.errors import LayerpruneError

    def figures(quality, seconds):
        return {"seconds": seconds, "seconds_per_count": {1: seconds}, "quality_retained": {1: quality},
                "quality_retained_interval": {1: [quality - 0.01, quality + 0.01]}}

    def summary(seeds, runs, lr=0.1):   # as compare.json holds it: JSON keys are strings
        result = json.loads(json.dumps({"method": "m", "heal": "distill", "patch": "none",
                                        **over_seeds(dict(zip(seeds, runs)))}))
        return {"model": "m", "counts": [1], "eval_tasks": ["kl"], "data": "d", "unseen_data": None,
                "teacher_eval": {}, "seeds": seeds, "config": {"seed": 0, "seeds": seeds, "lr": lr, "out": str(seeds)},
                "results": {"m": result}}

    one, two, three = figures(0.90, 10.0), figures(0.80, 30.0), figures(0.85, 20.0)
    merged = merge_comparisons([summary([0], [one]), summary([1, 2], [two, three])])
    pooled = merged["results"]["m"]
    together = over_seeds({0: one, 1: two, 2: three})
    assert pooled["seeds"] == [0, 1, 2] and merged["seeds"] == [0, 1, 2]
    assert pooled["quality_retained"] == pytest.approx(together["quality_retained"]) == {1: pytest.approx(0.85)}
    assert pooled["quality_retained_spread"] == {1: [0.80, 0.90]}
    assert pooled["quality_retained_interval"] == {1: [pytest.approx(0.79), pytest.approx(0.91)]}
    assert pooled["seconds"] == pytest.approx(20.0)   # what one model costs, not the sum over seeds
    write_comparison(tmp_path, merged)
    assert "| 20 | 0, 1, 2 |" in (tmp_path / "compare.md").read_text()
    with pytest.raises(LayerpruneError, match="other lr"):
        merge_comparisons([summary([0], [one]), summary([1], [two], lr=0.2)])
    with pytest.raises(LayerpruneError, match="seed 1 in more than one"):
        merge_comparisons([summary([0, 1], [one, two]), summary([1], [two])])


def test_seeds_run_every_variant_once_each_and_report_mean_spread_and_interval(tiny_dir, text_file, tmp_path,
                                                                              capsys):
    out = tmp_path / "seeded"
    argv = ["compare", "--model", str(tiny_dir), "--data", str(text_file), "--out", str(out), "--remove", "1",
            "--seq-len", "32", "--calib-blocks", "2", "--patch-blocks", "4", "--eval-blocks", "4",
            "--heal-steps", "2", "--heal-grad-accum", "1", "--heal-lr", "0.01", "--quiet", "--device", "cpu",
            "--methods", "shortgpt", "--unseen-data", str(make_text_file(tmp_path / "other.txt", docs=40, seed=1))]
    assert main([*argv, "--seeds", "0,0"]) == 2
    assert "repeats a seed" in capsys.readouterr().err and not (out / "compare.json").exists()
    assert main([*argv, "--seeds", ""]) == 2
    assert "--seeds is empty" in capsys.readouterr().err and not (out / "compare.json").exists()
    assert main([*argv, "--unseen-data", str(text_file)]) == 2   # the training text is not unseen
    assert "is also the training data" in capsys.readouterr().err and not (out / "compare.json").exists()
    assert main([*argv, "--seeds", "0,1"]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["seeds"] == [0, 1]
    healed, plain = summary["results"]["shortgpt + healing"], summary["results"]["shortgpt + no healing"]
    seeds = [healed["per_seed"][s]["quality_retained"]["1"] for s in ("0", "1")]
    assert seeds[0] != seeds[1]   # a seed changes healing's data order
    assert healed["quality_retained"]["1"] == pytest.approx(sum(seeds) / 2)
    assert healed["quality_retained_spread"]["1"] == [min(seeds), max(seeds)]
    low, high = healed["quality_retained_interval"]["1"]
    assert low <= min(seeds) and max(seeds) <= high
    assert plain["seeds"] == [0] and "per_seed" not in plain   # nothing random without healing: run once
    table = (out / "compare.md").read_text()
    assert "a variant run on several seeds gives the mean over them" in table
    assert table.count(" | 0, 1 |") == 1 and "| shortgpt + no healing |" in table


def test_a_variant_without_healing_gives_the_same_figures_on_every_seed(tiny_dir, text_file, tmp_path):
    """Why compare runs it on the first seed only: with a patch fitted too (layerprune), and on
    tasks that draw nothing; a task that draws its items makes every variant depend on the seed."""
    from layerprune.compare import depends_on_seed

    figures = []
    for seed in ("0", "1"):
        out = tmp_path / f"seed{seed}"
        assert main(["compare", "--model", str(tiny_dir), "--data", str(text_file), "--out", str(out),
                     "--remove", "1,2", "--seq-len", "32", "--calib-blocks", "2", "--patch-blocks", "4",
                     "--eval-blocks", "4", "--quiet", "--device", "cpu", "--methods", "shortgpt,layerprune",
                     "--healing", "none", "--seeds", seed]) == 0
        results = json.loads((out / "compare.json").read_text())["results"]
        figures.append({name: (r["quality_retained"], r["quality_retained_unseen"]) for name, r in results.items()})
    assert figures[0] == figures[1]
    assert not depends_on_seed(CompareConfig(out="c"), "none") and depends_on_seed(CompareConfig(out="c"), "distill")
    assert depends_on_seed(CompareConfig(out="c", eval_tasks=("perplexity", "continuation")), "none")


def test_scaled_steps_fill_the_reference_seconds_or_say_why_not():
    from layerprune.equal_compute import scaled_steps, validation_cap

    # fixed 20 s, healing 30 s at 10 steps: 3 s a step; 110 s leave 90 s of healing, 30 steps
    assert scaled_steps(110.0, 20.0, 30.0, 10) == (30, "")
    assert scaled_steps(21.0, 20.0, 30.0, 10) == (1, "")             # at least one step
    steps, why = scaled_steps(20.0, 25.0, 30.0, 10)
    assert steps is None and "scoring and cuts alone took 25 s" in why
    assert scaled_steps(110.0, 20.0, 30.0, 10, cap=12) == (12, "capped at 12 steps from 30: more would train on the "
                                                                "guard's validation text")
    assert validation_cap(100, 4, 4) == 6 and validation_cap(100, 1, 4) == 25


def test_a_scaled_budget_keeps_the_final_healings_share():
    from layerprune.equal_compute import at_scale, validation_cap, with_steps
    config = CompareConfig(out="x", heal=HealConfig(steps=20, final_steps=40))
    assert (at_scale(config, 0.5).heal.steps, at_scale(config, 0.5).heal.final_steps) == (10, 20)
    assert with_steps(config, 30).heal.final_steps == 60
    assert with_steps(CompareConfig(out="x", heal=HealConfig(steps=20)), 30).heal.final_steps == 0
    assert validation_cap(100, 2 + 40 / 20, 4) == 6   # two removals' text and the final's share of two


def test_the_frontier_keeps_what_nothing_beats():
    from layerprune.plots import frontier

    points = [(10.0, 0.8), (20.0, 0.7), (30.0, 0.9), (5.0, 0.6), (30.0, 0.85)]
    assert frontier(points) == [(5.0, 0.6), (10.0, 0.8), (30.0, 0.9)]


def test_equal_seconds_runs_each_healed_baseline_again_at_the_reference_seconds(tiny_dir, text_file, tmp_path):
    """ReplaceMe + healing, one healing per count, gets the steps that fill the default's seconds at
    each count, from its own-budget run's fixed and healing seconds; the table says what it was
    given and took, and the frontier is plotted."""
    from layerprune.equal_compute import scaled_steps, validation_cap
    from layerprune.healing.text import healing_offsets

    out = tmp_path / "equal"
    code = main(["compare", "--model", str(tiny_dir), "--data", str(text_file), "--out", str(out), "--remove", "1,2",
                 "--methods", "layerprune,replaceme", "--healing", "distill", "--equal-seconds", "layerprune",
                 "--seq-len", "32", "--calib-blocks", "2", "--patch-blocks", "4", "--eval-blocks", "2",
                 "--heal-steps", "2", "--heal-grad-accum", "1", "--quiet", "--device", "cpu"])
    assert code == 0
    summary = json.loads((out / "compare.json").read_text())
    results = summary["results"]
    reference, own = results["layerprune + lstsq patch + healing"], results["replaceme + healing"]
    equal = results["replaceme + healing @ equal seconds"]
    config = CompareConfig(out="x", counts=(1, 2), heal=HealConfig(steps=2, grad_accum=1))
    cap = validation_cap(max(healing_offsets(config, 2)), 1, 2)
    for n in ("1", "2"):
        fixed, built = own["fixed_seconds_per_count"][n], own["build_seconds_per_count"][n]
        expected, _ = scaled_steps(reference["build_seconds_per_count"][n], fixed, built - fixed, 2, cap)
        target = reference["build_seconds_per_count"][n]
        assert equal["heal_steps"][n] == expected and equal["target_seconds"][n] == target
        assert equal["seconds_ratio"][n] == pytest.approx(equal["build_seconds_per_count"][n] / target)
        assert built <= own["seconds_per_count"][n]                    # evaluation is not part of it
    assert "layerprune + lstsq patch + healing @ equal seconds" not in results
    table = (out / "compare.md").read_text()
    assert "## At equal seconds" in table and "| replaceme + healing @ equal seconds | -2 |" in table
    assert (out / "compare_frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_heal_scales_run_each_healed_variant_at_each_budget(tiny_dir, text_file, tmp_path):
    """--heal-scales 0.5,1,2: the healed variant at 1, 2 and 4 steps a removal (rows named for the
    scale), the unhealed one once; the guard's validation blocks lie past the largest budget."""
    from layerprune.compare import deepest, scaled_variants

    out = tmp_path / "scales"
    code = main(["compare", "--model", str(tiny_dir), "--data", str(text_file), "--out", str(out), "--remove", "1",
                 "--methods", "shortgpt", "--heal-scales", "0.5,1,2", "--seq-len", "32", "--calib-blocks", "2",
                 "--patch-blocks", "4", "--eval-blocks", "2", "--heal-steps", "2", "--heal-grad-accum", "1",
                 "--quiet", "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "compare.json").read_text())["results"]
    steps = {name: r["heal_steps"]["1"] for name, r in results.items()}
    assert steps == {"shortgpt + healing at 0.5x healing": 1, "shortgpt + healing": 2,
                     "shortgpt + healing at 2x healing": 4, "shortgpt + no healing": 0}
    config = CompareConfig(out="x", counts=(1,), heal_scales=(1.0, 2.0), heal=HealConfig(steps=2))
    assert deepest(config).heal.steps == 4
    only = CompareConfig(out="x", methods=("layerprune", "shortgpt"), healing=("distill",), heal_scales=(1.0, 2.0),
                         scaled_methods=("layerprune",))
    assert scaled_variants(only) == [("layerprune", "distill", 1.0), ("layerprune", "distill", 2.0),
                                     ("shortgpt", "distill", 1.0)]
    with pytest.raises(Exception, match="--scaled-methods names replaceme"):
        CompareConfig(out="x", methods=("shortgpt",), scaled_methods=("replaceme",)).validate()
    with pytest.raises(Exception, match="1 \\(the comparison's own budget\\)"):
        CompareConfig(out="x", heal_scales=(2.0,)).validate()


def test_a_stopped_comparison_continues_with_the_variants_it_had_measured(tiny_dir, text_file, tmp_path, monkeypatch):
    """Stopped in its second variant, the same command measures that one alone and writes the
    same table an unstopped run writes; other options are refused in that folder."""
    import importlib

    compare_module = importlib.import_module("layerprune.compare")   # the package exports its function

    def argv(out, remove="1"):
        return ["compare", "--model", str(tiny_dir), "--data", str(text_file), "--out", str(out), "--remove", remove,
                "--methods", "shortgpt,iterative-bi", "--healing", "none", "--seq-len", "32", "--calib-blocks", "2",
                "--patch-blocks", "4", "--eval-blocks", "2", "--quiet", "--device", "cpu"]
    real, ran = compare_module.run_variant, []

    def stopped_in_the_second(*args, **kwargs):
        ran.append(args[2])
        if len(ran) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "stopped"
    monkeypatch.setattr(compare_module, "run_variant", stopped_in_the_second)
    assert main(argv(out)) == 130
    assert (out / "variants.json").is_file() and not (out / "compare.json").exists()
    assert main(argv(out, remove="2")) == 2   # other options: refused before any work
    ran.clear()
    assert main(argv(out)) == 0 and ran == ["iterative-bi"]
    assert not (out / "variants.json").exists()
    monkeypatch.setattr(compare_module, "run_variant", real)
    assert main(argv(tmp_path / "whole")) == 0
    stopped, whole = (json.loads((f / "compare.json").read_text())["results"] for f in (out, tmp_path / "whole"))
    for name in whole:
        assert stopped[name]["removed_original"] == whole[name]["removed_original"]
        assert stopped[name]["quality_retained"] == whole[name]["quality_retained"]
