"""The depth a user asks for in layers, parameters or speed, as a count of layers to remove."""

import pytest

from layerprune import speed
from layerprune.cli import main
from layerprune.config import PruneConfig
from layerprune.depth import layer_sizes, parse_count, plan_depth
from layerprune.errors import LayerpruneError

from common import tiny_model
from test_cli import common


def plan(**kw):
    return plan_depth(PruneConfig(out="o", **kw), tiny_model("llama"))


class TestParams:
    def test_counts_are_read_as_people_write_them(self):
        assert [parse_count(t) for t in ("200M", "1.5B", "350000", "3e8", "12k")] == \
            [200_000_000, 1_500_000_000, 350_000, 300_000_000, 12_000]
        with pytest.raises(LayerpruneError, match="'two hundred' is not a parameter count.*200M"):
            parse_count("two hundred")

    def test_the_fewest_layers_that_bring_the_model_under_the_target(self):
        model = tiny_model("llama")
        total, layer = sum(p.numel() for p in model.parameters()), layer_sizes(model)[0]
        assert plan(target_params=str(total - 1)).remove == 1
        planned = plan(target_params=str(total - 2 * layer))
        assert planned.remove == 2 and "at most" in planned.why
        assert plan(target_params=str(total - 2 * layer - 1)).remove == 3

    def test_a_target_out_of_reach_names_the_range(self):
        model = tiny_model("llama")
        total = sum(p.numel() for p in model.parameters())
        with pytest.raises(LayerpruneError, match="is not below the model's .*give a count from"):
            plan(target_params=str(total))
        with pytest.raises(LayerpruneError, match="below what the model keeps with 5 layers removed"):
            plan(target_params="1k")


class TestSpeedup:
    def test_the_estimate_is_the_layer_proportion(self):
        planned = plan(target_speedup=1.5, speedup_estimate=True)
        assert planned.remove == 2 and "6 -> 4 layers is 1.50x" in planned.why
        with pytest.raises(LayerpruneError, match="at most 5 may go.*at most 6.00x"):
            plan(target_speedup=10.0, speedup_estimate=True)

    def test_the_measured_search_takes_the_fewest_removals_that_reach_the_target(self, monkeypatch):
        asked = []
        # a device where the embeddings and LM head cost two layers' worth: 6 layers -> 8 units
        monkeypatch.setattr(speed, "prefill_speedup", lambda model, keep: asked.append(keep) or 8 / (keep + 2))
        planned = plan(target_speedup=1.5)
        assert planned.remove == 3 and "3 of 6 layers measured 1.60x" in planned.why
        assert 6 - 2 in asked and 6 - 3 in asked   # the layer proportion's guess (2) fell short
        with pytest.raises(LayerpruneError, match="not reached on this device.*at most 2.67x"):
            plan(target_speedup=3.0)

    def test_the_measurement_times_the_shallower_model_against_the_whole(self, monkeypatch):
        from layerprune.surgery import num_layers

        model = tiny_model("llama")
        # a clock where a prefill costs one unit per layer it runs: 6 layers against 2 is 3x
        monkeypatch.setattr(speed, "_seconds", lambda fn: (fn(), num_layers(model))[1])
        assert speed.prefill_speedup(model, 2, repeats=3, prompt_tokens=32) == 3.0
        assert num_layers(model) == 6   # the view is undone


def test_a_resumed_run_keeps_the_depth_its_first_start_chose(monkeypatch, tiny_dir, text_file, tmp_path):
    from test_outdir import interrupted_after_first_iteration

    out = tmp_path / "out"
    argv = [*common(tiny_dir, text_file, out), "--target-speedup", "1.4", "--metric", "bi", "--heal", "none"]
    monkeypatch.setattr(speed, "prefill_speedup", lambda model, keep: 6 / keep)   # 2 layers reach 1.5x
    interrupted_after_first_iteration(monkeypatch, argv)
    monkeypatch.setattr(speed, "prefill_speedup", lambda model, keep: 1.0)     # this start would find nothing
    assert main(argv) == 0
    import json

    history = json.loads((out / "history.json").read_text())
    assert len(history["removed_original"]) == 2 and "--target-speedup 1.4" in history["depth"]
