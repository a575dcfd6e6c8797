import csv
import json

from layerprune import DataConfig, HealConfig, PruneConfig, prune
from layerprune.options import to_dict
from layerprune.report import below_headline, recipe, speed_table, task_table, write_loss_log

from common import check_output_folder


def test_reports_plots_and_model_card(tiny_dir, text_file, tmp_path):
    out = tmp_path / "o"
    config = PruneConfig(out=str(out), model=str(tiny_dir), remove=2, device="cpu",
                         data=DataConfig(source=str(text_file), seq_len=32, calib_blocks=4, patch_blocks=8,
                                         eval_blocks=4, batch_size=2),
                         heal=HealConfig(steps=2, batch_size=2, grad_accum=1, warmup_steps=1))
    history = prune(config, progress=False)
    check_output_folder(out, depth=4, removed=2)
    for name in ("report.md", "report.json", "README.md", "importance_heatmap.png", "quality_retained.png",
                 "heal_loss.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "importance_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert report["removed_original"] == history.removed_original
    assert [n for n, _ in report["quality_curve"]] == [0, 1, 2]
    assert report["quality_retained_tasks"] == ["perplexity", "token_accuracy", "kl"]
    assert set(report["suite_tasks"]) >= {"perplexity", "kl", "continuation", "copy", "copy_generate"}
    speed = report["speed"]["prefill"]
    assert speed["repeats"] == 5 and speed["pruned"]["min"] <= speed["pruned"]["median"] <= speed["pruned"]["max"]
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "metric: quality" in card and "mean of perplexity, token_accuracy, kl" in card
    assert ("Recipe: Layers chosen by the `quality` metric (iterative, on perplexity, token_accuracy over 128 "
            "calibration tokens, shortlisted to the 12 layers Block Influence ranks lowest each round, the 4 least "
            "important on the first quarter of that text scored on the rest (the others keep their first-quarter "
            "score)); "
            "each cut patched by a least-squares linear map fitted in closed form on 256 training "
            "tokens and folded into the layer below; healing after each removal: 2 AdamW steps of 2 x 1 x 32 "
            "tokens") in card
    text = (out / "report.md").read_text()
    assert "median [min-max] of 5 interleaved runs" in text and "Suite quality retained" in text


def test_recipe_names_the_patch_and_a_run_without_healing():
    patched = to_dict(PruneConfig(out="o", remove=1, patch="diag", heal=HealConfig(method="none")))
    text = recipe(patched)
    assert "patched by a least-squares diagonal scaling fitted in closed form on 16384 training tokens" in text
    assert "no healing" in text
    assert "patched" not in recipe(to_dict(PruneConfig(out="o", remove=1, patch="none")))


def test_the_card_says_when_a_run_used_the_default_recipe_and_why():
    default = recipe(to_dict(PruneConfig(out="o", remove=3, model="m")))
    assert "This is layerprune's default recipe, chosen on validation text" in default
    assert "over 8192 calibration tokens, shortlisted to the 12 layers" in default
    for changed in (PruneConfig(out="o", remove=1, shortlist=0), PruneConfig(out="o", remove=1, screen=0),
                    PruneConfig(out="o", remove=1, heal=HealConfig(lr=1e-3)),
                    PruneConfig(out="o", remove=1, data=DataConfig(calib_tokens=2048))):
        assert "default recipe" not in recipe(to_dict(changed))
    assert "shortlisted" not in recipe(to_dict(PruneConfig(out="o", remove=1, shortlist=0)))
    # options that change no figure leave it the default recipe
    assert "default recipe" in recipe(to_dict(PruneConfig(out="o", remove=1, heal=HealConfig(log_every=1))))


def test_recipe_says_what_trained_and_on_which_text():
    last = recipe(to_dict(PruneConfig(out="o", remove=1, heal=HealConfig(trainable="last"))))
    assert "the last 3 layers and the LM head trained" in last and "(fresh text each removal)" in last
    teacher = recipe(to_dict(PruneConfig(out="o", remove=1, heal=HealConfig(train_data="teacher"))))
    assert "fresh text the original wrote itself, from prompts of the training text" in teacher
    assert "(the same text each removal)" in recipe(to_dict(PruneConfig(out="o", remove=1,
                                                                      heal=HealConfig(train_data="reuse"))))


def test_speed_table_shows_median_and_spread():
    spread = {"median": 2.0, "min": 1.0, "max": 3.0}
    lines = speed_table({"prefill": {"original": spread, "pruned": spread, "ratio": {"median": 1.05, "min": 0.9,
                                                                                     "max": 1.2}, "repeats": 5}})
    assert any("1.05x [0.90-1.20]" in line and "2.0 [1.0-3.0]" in line for line in lines)
    assert speed_table({}) == []


def test_loss_log_replaces_the_rows_of_a_redone_iteration(tmp_path):
    path = tmp_path / "logs" / "heal.csv"
    row = {"iteration": 1, "step": 1, "lr": 0.1, "loss": 1.0, "kl": 0.0, "mse": 0.0, "final_mse": 0.0}
    write_loss_log(path, [row, {**row, "step": 2}])
    write_loss_log(path, [{**row, "iteration": 2}])
    write_loss_log(path, [{**row, "loss": 0.5}])  # iteration 1 healed again after a resume
    rows = list(csv.DictReader(path.open()))
    assert [(r["iteration"], r["step"], r["loss"]) for r in rows] == [("2", "1", "1.0"), ("1", "1", "0.5")]


def test_a_task_the_headline_would_hide_is_named_with_its_interval():
    """copy_generate halving while the headline says 0.927: the card and the report name it; a task
    whose interval reaches the headline, or that keeps as much, is not named."""
    teacher = {"kl": {"score": 1.0}, "copy_generate": {"score": 0.527, "samples": 256.0},
               "continuation": {"score": 0.5}, "copy": {"score": 0.8}}
    pruned = {"kl": {"score": 0.9},
              "copy_generate": {"score": 0.27, "samples": 256.0, "retention": 0.512, "retention_low": 0.46,
                                "retention_high": 0.57},
              "continuation": {"score": 0.3}, "copy": {"score": 0.79}}
    rep = {"quality_retained": 0.927, "quality_retained_interval": [0.92, 0.935], "teacher_eval": teacher,
           "final_eval": pruned, "quality_retained_tasks": ["kl"]}   # kl is the headline's own part
    lines = below_headline(rep)
    assert lines == ["- **copy_generate** keeps 0.512 [0.460, 0.570] of the original, below the headline's 0.927",
                     "- **continuation** keeps 0.600 (no interval) of the original, below the headline's 0.927"]
    pruned["copy_generate"]["retention_high"] = 0.95          # its interval reaches the headline: not named
    assert [line for line in below_headline(rep) if "copy_generate" in line] == []
    table = "\n".join(task_table(teacher, pruned))
    assert "| copy_generate | score | 0.527 | 0.27 | 0.512 [0.460, 0.950] |" in table
    assert "retention_low" not in table and "| copy_generate | samples |" in table
