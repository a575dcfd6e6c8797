import json

from layerprune.cli import main
from layerprune.compare import METHODS, variant_config
from layerprune.config import CompareConfig, HealConfig


def test_variants_share_the_recipe_and_set_their_method():
    config = CompareConfig(out="c", seed=3, tasks=("kl",), protect_last=1, heal=HealConfig(steps=7))
    variant = variant_config(config, "sleb-nll", "distill", 4)
    assert (variant.metric, variant.mode, variant.remove) == ("nll", "iterative", 4)
    assert variant.seed == 3 and variant.tasks == ("kl",) and variant.protect_last == 1
    assert variant.heal.steps == 7 and variant.heal.method == "distill" and variant.heal.checkpoint_every == 0
    assert variant_config(config, "shortgpt", "none", 2).heal.method == "none"


def test_compare_writes_table_and_plot(tiny_dir, text_file, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(tiny_dir), "--data", str(text_file), "--out", str(out), "--remove", "1,2",
                 "--seq-len", "32", "--calib-blocks", "2", "--train-blocks", "4", "--eval-blocks", "2",
                 "--heal-steps", "1", "--heal-grad-accum", "1", "--quiet", "--device", "cpu"])
    assert code == 0
    summary = json.loads((out / "compare.json").read_text())
    assert len(summary["results"]) == 2 * len(METHODS)
    for result in summary["results"].values():
        assert set(result["quality_retained"]) == {"1", "2"}
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "compare.md").read_text()
    assert "| layerprune + healing |" in table and "| shortgpt + no healing |" in table
    assert not (out / "cache").exists()
